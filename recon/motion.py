"""Rigid transforms of images as exactly unitary sinc operators (Fourier shifts and shears).

A rigid motion ``T(theta)`` of a 2D ``(ny, nx)`` or 3D ``(nz, ny, nx)`` image moves the content
at voxel position ``p`` (relative to the centre pixel ``N // 2`` of each axis, in voxels, image-axis
order) to ``R p + t``::

    (T x)(r) = x(R^T (r - t))

* Translations are Fourier phase ramps: ``fftn``, times ``exp(-2 pi i sum_d k_d t_d / N_d)``,
  ``ifftn`` (a periodic, band-limited shift of any, also fractional, size).
* A rotation in the plane of axes ``(a, b)``, by ``theta`` from ``+a`` towards ``+b``, is three shears
  (Paeth; Unser et al.): along ``a`` by ``-tan(theta / 2) r_b``, along ``b`` by ``sin(theta) r_a``,
  along ``a`` again by ``-tan(theta / 2) r_b``; each shear is a 1D phase ramp along its axis, with a
  slope that depends on the other coordinate.

Every factor is a diagonal phase in some Fourier basis, so the whole transform is exactly unitary
(to float32 rounding): ``|T x| = |x|`` and ``T^H = T^-1`` (:func:`transform_adjoint`). For a
band-limited object it is the sampled continuous rigid motion, to the extent that the spectrum stays
inside the grid through the intermediate shears (the periodic grid wraps content pushed over an
edge, as a Cartesian scan aliases it). Voxels are taken to be isotropic: the rotation acts on voxel
coordinates.

Parameters (float, degrees and voxels; any leading batch shape, one transform per entry):
    2D ``(ty, tx, rot)``: ``rot`` rotates from ``+x`` towards ``+y`` (``R = [[c, s], [-s, c]]`` in
    ``(y, x)`` rows, as :class:`reconq.recon.phantoms.Ellipsoid`'s ``angle_deg``).
    3D ``(tz, ty, tx, rz, ry, rx)``: ``R = Rz(rz) Ry(ry) Rx(rx)`` (``Rx`` applied first), each a
    right-handed rotation about that axis in ``(x, y, z) = (axis -1, -2, -3)``: ``rz`` turns ``+x``
    towards ``+y``, ``ry`` turns ``+z`` towards ``+x``, ``rx`` turns ``+y`` towards ``+z``. The 2D
    rotation is ``rz``.
    The translation is applied after the rotation (about the centre pixel).

Derivatives (:func:`transform_derivatives`) are analytic through the shear chain: the derivative of
a shear by ``c`` is the same phase ramp times ``-2 pi i k_a r_b / N_a``, so ``dT/dtheta`` is exact for
the discrete operator (not a finite difference), per degree and per voxel.

Internal 1D/nD FFTs are unnormalised-origin (uncentred) transforms: a shift does not depend on the
origin of the axis it moves along, and the ramps use the centred coordinate of the other axis.

References:
    Unser M, Thevenaz P, Yaroslavsky L. Convolution-based interpolation for fast, high-quality
    rotation of images. IEEE Trans Image Process 1995;4:1371-1381.
    Paeth AW. A fast algorithm for general raster rotation. Graphics Interface 1986, pp. 77-81.
    Cordero-Grande L, Teixeira RPAG, Hughes EJ, Hutter J, Price AN, Hajnal JV. Sensitivity encoding
    for aligned multishot magnetic resonance reconstruction. IEEE Trans Comput Imaging
    2016;2:266-280 (the rigid model, its sinc shears and their derivatives).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
import sigpy as sp

from reconq.recon import fft as _fftmod
from reconq.recon.errors import ReconError

_DEG = math.pi / 180.0

#: elementary rotations of each dimension, in order of application: (param index, axis a, axis b)
#: with the rotation turning ``+a`` towards ``+b`` (negative image axes).
_PLANES = {2: ((2, -1, -2),), 3: ((5, -2, -3), (4, -3, -1), (3, -1, -2))}


def nparams(ndim: int) -> int:
    """Parameters of a rigid transform in ``ndim`` dimensions: 3 (2D) or 6 (3D)."""
    if ndim not in (2, 3):
        raise ReconError(f"rigid transforms are 2D or 3D, got ndim={ndim}")
    return 3 if ndim == 2 else 6


def ndim_of(params) -> int:
    """The image dimension of ``params (..., 3 | 6)``."""
    n = int(np.shape(params)[-1]) if np.ndim(params) else 0
    if n not in (3, 6):
        raise ReconError(f"rigid parameters must end in 3 (2D) or 6 (3D) values, got shape {np.shape(params)}")
    return 2 if n == 3 else 3


def _xyz_rotation(axis: int, angle_deg: float) -> np.ndarray:
    c, s = math.cos(angle_deg * _DEG), math.sin(angle_deg * _DEG)
    if axis == 2:  # about z: x -> y
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if axis == 1:  # about y: z -> x
        return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])  # about x: y -> z


def rotation_matrix(params) -> np.ndarray:
    """The rotation ``R`` of one parameter vector, in image-axis order (2D ``(y, x)``, 3D ``(z, y, x)``).

    ``T`` moves the voxel at ``p`` (voxels from the centre pixel) to ``R p + t``.
    """
    p = np.asarray(params, dtype=np.float64)
    if p.ndim != 1:
        raise ReconError(f"rotation_matrix takes one parameter vector, got shape {p.shape}")
    if ndim_of(p) == 2:
        c, s = math.cos(p[2] * _DEG), math.sin(p[2] * _DEG)
        return np.array([[c, s], [-s, c]])
    r = _xyz_rotation(2, p[3]) @ _xyz_rotation(1, p[4]) @ _xyz_rotation(0, p[5])
    return r[::-1, ::-1].copy()  # (x, y, z) -> (z, y, x)


def to_matrix(params) -> np.ndarray:
    """Homogeneous ``(ndim + 1, ndim + 1)`` matrix ``[[R, t], [0, 1]]`` of one parameter vector."""
    p = np.asarray(params, dtype=np.float64)
    d = ndim_of(p)
    m = np.eye(d + 1)
    m[:d, :d] = rotation_matrix(p)
    m[:d, d] = p[:d]
    return m


def from_matrix(m) -> np.ndarray:
    """Parameters of a homogeneous rigid matrix (the inverse of :func:`to_matrix`; 3D angles in ``(-90, 90)``
    for ``ry``)."""
    m = np.asarray(m, dtype=np.float64)
    d = m.shape[0] - 1
    if d not in (2, 3) or m.shape != (d + 1, d + 1):
        raise ReconError(f"a rigid matrix is 3 x 3 (2D) or 4 x 4 (3D), got shape {m.shape}")
    r, t = m[:d, :d], m[:d, d]
    if d == 2:
        return np.array([t[0], t[1], math.degrees(math.atan2(r[0, 1], r[0, 0]))])
    q = r[::-1, ::-1]  # (x, y, z)
    ry = -math.asin(max(-1.0, min(1.0, q[2, 0])))
    rx = math.atan2(q[2, 1], q[2, 2])
    rz = math.atan2(q[1, 0], q[0, 0])
    return np.array([t[0], t[1], t[2], math.degrees(rz), math.degrees(ry), math.degrees(rx)])


def compose(outer, inner) -> np.ndarray:
    """Parameters of ``T(outer) T(inner)`` (``inner`` applied first), from the exact rigid matrices."""
    return from_matrix(to_matrix(outer) @ to_matrix(inner))


def invert(params) -> np.ndarray:
    """Parameters of ``T(params)^-1``."""
    return from_matrix(np.linalg.inv(to_matrix(params)))


# --- the discrete operators --------------------------------------------------------------------


def _fft1(u, axis: int, inverse: bool):
    xp = sp.get_array_module(u)
    if xp is np:
        fn = scipy.fft.ifft if inverse else scipy.fft.fft
        return fn(u, axis=axis, workers=_fftmod.WORKERS, overwrite_x=False)
    return (xp.fft.ifft if inverse else xp.fft.fft)(u, axis=axis)


def _fftn(u, axes: tuple[int, ...], inverse: bool):
    xp = sp.get_array_module(u)
    if xp is np:
        fn = scipy.fft.ifftn if inverse else scipy.fft.fftn
        return fn(u, axes=axes, workers=_fftmod.WORKERS)
    return (xp.fft.ifftn if inverse else xp.fft.fftn)(u, axes=axes)


def _along(xp, values, axis: int, ndim: int, dtype=np.float64):
    """``values`` laid along image axis ``axis`` (negative) of an ``ndim``-axis image array."""
    shape = [1] * ndim
    shape[axis] = len(values)
    return xp.asarray(np.asarray(values, dtype=dtype).reshape(shape))


class _Grid:
    """Frequencies and centred coordinates of one image shape, on one device."""

    def __init__(self, xp, shape: tuple[int, ...]):
        self.xp, self.shape, self.ndim = xp, shape, len(shape)
        self.k = {-self.ndim + d: _along(xp, np.fft.fftfreq(n) * n, -self.ndim + d, self.ndim)
                  for d, n in enumerate(shape)}
        self.r = {-self.ndim + d: _along(xp, np.arange(n) - n // 2, -self.ndim + d, self.ndim)
                  for d, n in enumerate(shape)}

    def n(self, axis: int) -> int:
        return self.shape[axis]

    def shear_phase(self, a: int, b: int):
        """``-2 pi k_a r_b / N_a`` (radians per unit shear), image-shaped with ones elsewhere."""
        return (-2 * np.pi / self.n(a)) * self.k[a] * self.r[b]

    def shift_phase(self, axis: int):
        return (-2 * np.pi / self.n(axis)) * self.k[axis]


def _expand(coef, ndim: int, xp):
    """Batch coefficients ``(...)`` as ``(..., 1 * ndim)`` float64 on the device."""
    c = xp.asarray(coef, dtype=np.float64)
    return c.reshape(c.shape + (1,) * ndim)


def _ramp(phase, coef, dtype):
    """``exp(i coef phase)`` in the image's precision (the phase itself is formed in float64)."""
    xp = sp.get_array_module(phase)
    real = np.float32 if np.dtype(dtype) == np.complex64 else np.float64
    arg = (coef * phase).astype(real)
    return (xp.cos(arg) + 1j * xp.sin(arg)).astype(dtype, copy=False)


def _shear(u, grid: _Grid, a: int, b: int, coef, derivative: bool = False):
    """Shear ``u`` along axis ``a`` by ``coef * r_b`` voxels; with ``derivative``, also ``d/dcoef``."""
    phase = grid.shear_phase(a, b)
    spec = _fft1(u, a, inverse=False) * _ramp(phase, _expand(coef, grid.ndim, grid.xp), u.dtype)
    out = _fft1(spec, a, inverse=True).astype(u.dtype, copy=False)
    if not derivative:
        return out
    d = _fft1(spec * (1j * phase).astype(u.dtype), a, inverse=True).astype(u.dtype, copy=False)
    return out, d


def _rotate(u, grid: _Grid, a: int, b: int, theta_deg, inverse: bool = False):
    """Rotate in plane ``(a, b)`` by ``theta`` (batch array, degrees); the inverse with ``inverse``."""
    th = np.asarray(theta_deg, dtype=np.float64) * _DEG
    alpha, beta = -np.tan(th / 2), np.sin(th)
    if inverse:
        alpha, beta = -alpha, -beta
    u = _shear(u, grid, a, b, alpha)
    u = _shear(u, grid, b, a, beta)
    return _shear(u, grid, a, b, alpha)


def _rotate_d(u, grid: _Grid, a: int, b: int, theta_deg):
    """Rotation and its derivative per degree."""
    th = np.asarray(theta_deg, dtype=np.float64) * _DEG
    alpha, beta = -np.tan(th / 2), np.sin(th)
    dalpha, dbeta = -(1 + alpha**2) / 2 * _DEG, np.cos(th) * _DEG
    xp = grid.xp
    da, db = _expand(dalpha, grid.ndim, xp).astype(u.real.dtype), _expand(dbeta, grid.ndim, xp).astype(u.real.dtype)
    u1, d1 = _shear(u, grid, a, b, alpha, derivative=True)
    u2, d2 = _shear(u1, grid, b, a, beta, derivative=True)
    u3, d3 = _shear(u2, grid, a, b, alpha, derivative=True)
    inner = db * d2 + da * _shear(d1, grid, b, a, beta)
    return u3, da * d3 + _shear(inner, grid, a, b, alpha)


def _split(x, params):
    xp = sp.get_array_module(x)
    p = np.asarray(params, dtype=np.float64)
    ndim = ndim_of(p)
    if x.ndim < ndim:
        raise ReconError(f"a {ndim}D transform needs an image of at least {ndim} axes, got shape {x.shape}")
    batch = p.shape[:-1]
    lead = x.shape[:x.ndim - ndim]
    try:
        np.broadcast_shapes(batch, lead)
    except ValueError:
        raise ReconError(f"parameters of batch shape {batch} do not broadcast with image leading axes {lead}") from None
    if not xp.iscomplexobj(x):
        x = x.astype(np.complex64)
    return xp, p, ndim, _Grid(xp, tuple(x.shape[x.ndim - ndim:]))


def _translate(u, grid: _Grid, shifts, derivative: bool = False):
    """Shift ``u`` by ``shifts (..., ndim)`` voxels; with ``derivative``, also ``d/dt_d`` stacked on
    axis ``-ndim - 1``."""
    axes = tuple(range(-grid.ndim, 0))
    spec = _fftn(u, axes, inverse=False)
    for d in range(grid.ndim):  # separable: one 1D ramp per axis
        spec *= _ramp(grid.shift_phase(-grid.ndim + d), _expand(shifts[..., d], grid.ndim, grid.xp), u.dtype)
    out = _fftn(spec, axes, inverse=True).astype(u.dtype, copy=False)
    if not derivative:
        return out
    ds = [_fftn(spec * (1j * grid.shift_phase(-grid.ndim + d)).astype(u.dtype), axes, inverse=True)
          for d in range(grid.ndim)]
    return out, grid.xp.stack([d.astype(u.dtype, copy=False) for d in ds], axis=-grid.ndim - 1)


def transform(x, params):
    """``T(params) x``: rotate about the centre pixel, then translate.

    Args:
        x: ``(..., *shape)`` image(s), numpy or cupy (real input is taken as complex64).
        params: ``(..., 3)`` (2D) or ``(..., 6)`` (3D) host array, batch shape broadcasting with the
            leading axes of ``x`` (see the module docstring for units and signs).

    Returns:
        ``(..., *shape)`` complex, same dtype and device as ``x`` (complex64 for real input).
    """
    xp, p, ndim, grid = _split(x, params)
    u = x if xp.iscomplexobj(x) else x.astype(np.complex64)
    for index, a, b in _PLANES[ndim]:
        u = _rotate(u, grid, a, b, p[..., index])
    return _translate(u, grid, p[..., :ndim])


def transform_adjoint(y, params):
    """``T(params)^H y = T(params)^-1 y`` (exact: the transform is unitary)."""
    xp, p, ndim, grid = _split(y, params)
    u = y if xp.iscomplexobj(y) else y.astype(np.complex64)
    u = _translate(u, grid, -p[..., :ndim])
    for index, a, b in reversed(_PLANES[ndim]):
        u = _rotate(u, grid, a, b, p[..., index], inverse=True)
    return u


def transform_derivatives(x, params):
    """``T x`` and its derivatives with respect to each parameter (per voxel, per degree).

    Args:
        x, params: as :func:`transform`.

    Returns:
        ``(T x, D)``: ``T x`` ``(..., *shape)`` and ``D`` ``(..., nparams, *shape)`` with
        ``D[..., j, :] = d(T x)/d params[..., j]``.
    """
    xp, p, ndim, grid = _split(x, params)
    u = x if xp.iscomplexobj(x) else x.astype(np.complex64)
    stack_axis = -ndim - 1
    derivs: dict[int, object] = {}
    for index, a, b in _PLANES[ndim]:
        theta = p[..., index]
        for j in derivs:  # earlier rotations' derivatives go through this rotation too
            derivs[j] = _rotate(derivs[j], grid, a, b, theta)
        u, derivs[index] = _rotate_d(u, grid, a, b, theta)
    order = [index for index, _, _ in _PLANES[ndim]]
    rot = xp.stack([derivs[j] for j in order], axis=stack_axis)  # (..., nrot, *shape)
    rot = _translate(rot, grid, p[..., None, :ndim]) if rot.ndim else rot
    out, dshift = _translate(u, grid, p[..., :ndim], derivative=True)
    rot_by_index = {j: rot.take(i, axis=stack_axis) for i, j in enumerate(order)}
    columns = [dshift.take(d, axis=stack_axis) for d in range(ndim)]
    columns += [rot_by_index[j] for j in range(ndim, nparams(ndim))]
    return out, xp.stack(columns, axis=stack_axis)
