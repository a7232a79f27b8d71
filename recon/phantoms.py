"""Analytic k-space of ellipse (2D) and ellipsoid (3D) phantoms, with coils and T2* decay.

The object is a sum of uniform ellipsoids ``f(x) = sum_c a_c exp(-TE / T2*_c) 1_c(x)``, positions
``x`` in fractions of the field of view (``-0.5 .. 0.5`` per axis, image-axis order: 2D ``(y, x)``,
3D ``(z, y, x)``) and k in cycles per FOV, the same column order. Its continuous Fourier transform
``F(k) = integral f(x) exp(-2 pi i k . x) dx`` is known in closed form, so k-space at any
trajectory point is exact (no NUFFT, no gridding, no inverse crime):

* a unit ball: ``(4 pi / 3) * 3 (sin u - u cos u) / u^3`` in 3D and ``pi * 2 J1(u) / u`` in 2D,
  with ``u = 2 pi |k|``;
* an ellipsoid with semi-axes ``s``, rotated by ``R`` and centred at ``c``:
  ``prod(s) exp(-2 pi i k . c) B(|s * (R^T k)|)``.

Coil sensitivities are low-order complex Fourier series ``S_j(x) = sum_t b_jt exp(2 pi i f_t . x)``,
so the coil k-space stays analytic: ``F_j(k) = sum_t b_jt F(k - f_t)`` (the object's transform,
shifted). A rigidly moved object (:meth:`Phantom.moved`) is again a sum of ellipsoids, with the coils
left in place, and a Gaussian blur of the object (``Phantom.blur``) multiplies each shifted transform by
its own analytic transform, so moved and smooth (band-limited) objects keep exact k-space. The truth is
what a fully sampled Cartesian scan of the same object gives: the analytic
k-space on the integer grid ``-N/2 .. N/2 - 1`` (cycles per FOV) of each axis, inverse DFT'd with the
``1 / prod(shape)`` normalisation (``numpy.fft.ifftn``'s), image centred at pixel ``N // 2``. That is
the scale at which ``reconq.recon.radial.gridding`` returns a Nyquist-sampled object.

References:
    Shepp LA, Logan BF. The Fourier reconstruction of a head section. IEEE Trans Nucl Sci
    1974;21:21-43.
    Koay CG, Sarlls JE, Ozarslan E. Three-dimensional analytical magnetic resonance imaging
    phantom in the Fourier domain. Magn Reson Med 2007;58:430-436.
    Guerquin-Kern M, Lejeune L, Pruessmann KP, Unser M. Realistic analytical phantoms for
    parallel magnetic resonance imaging. IEEE Trans Med Imaging 2012;31:626-636 (coil
    sensitivities as smooth series, so that coil k-space stays analytic).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.special

from reconq.recon.errors import ReconError

_CHUNK = 1 << 16  # k-space points evaluated at once (bounds the float64 temporaries)


@dataclass(frozen=True)
class Ellipsoid:
    """A uniform ellipse (2D) or ellipsoid (3D).

    Attributes:
        centre: centre in fractions of the FOV, image-axis order (2D ``(y, x)``, 3D ``(z, y, x)``).
        semi_axes: semi-axes in fractions of the FOV along the same axes, before the rotation.
        amplitude: signal at ``TE = 0`` (components add where they overlap).
        t2star_ms: T2* in milliseconds (``inf``: no decay).
        angle_deg: rotation in the plane of the last two axes, from ``+x`` towards ``+y``.
        orientation: a full rotation matrix ``(ndim, ndim)`` (rows and columns in image-axis order),
            object frame to image axes; when given it replaces ``angle_deg`` (see :meth:`Phantom.moved`).
    """

    centre: tuple[float, ...]
    semi_axes: tuple[float, ...]
    amplitude: float
    t2star_ms: float = math.inf
    angle_deg: float = 0.0
    orientation: tuple[tuple[float, ...], ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.centre)

    def rotation(self) -> np.ndarray:
        """``R`` ``(ndim, ndim)``: object frame to image axes (``x = R u + centre``)."""
        if self.orientation is not None:
            return np.array(self.orientation, dtype=np.float64)
        r = np.eye(self.ndim)
        c, s = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        r[-2:, -2:] = [[c, s], [-s, c]]  # rows/columns (y, x)
        return r

    def decay(self, te_ms: float) -> float:
        return self.amplitude * (math.exp(-te_ms / self.t2star_ms) if math.isfinite(self.t2star_ms) else 1.0)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Indicator at ``points (..., ndim)`` (fractions of the FOV), bool."""
        u = (np.asarray(points, dtype=np.float64) - np.asarray(self.centre)) @ self.rotation()
        return np.sum((u / np.asarray(self.semi_axes)) ** 2, axis=-1) <= 1.0

    def transform(self, k: np.ndarray) -> np.ndarray:
        """Continuous FT at ``k (npts, ndim)`` cycles per FOV: ``(npts,)`` complex128."""
        semi = np.asarray(self.semi_axes, dtype=np.float64)
        q = (k @ self.rotation()) * semi
        u = 2 * np.pi * np.sqrt(np.sum(q * q, axis=-1))
        phase = np.exp(-2j * np.pi * (k @ np.asarray(self.centre, dtype=np.float64)))
        return np.prod(semi) * _unit_ball(u, self.ndim) * phase


def _unit_ball(u: np.ndarray, ndim: int) -> np.ndarray:
    """FT of the unit ball (disc in 2D) at ``u = 2 pi |k|``, exact near 0 by its Taylor series."""
    small = u < 1e-2
    safe = np.where(small, 1.0, u)
    if ndim == 3:
        value = 3 * (np.sin(safe) - safe * np.cos(safe)) / safe**3
        series = 1 - u**2 / 10 + u**4 / 280
        return (4 * np.pi / 3) * np.where(small, series, value)
    value = 2 * scipy.special.j1(safe) / safe
    series = 1 - u**2 / 8 + u**4 / 192
    return np.pi * np.where(small, series, value)


def _ellipses_2d(k, rs, centres, qf, pf, w, coefs, out, freqs, sig2) -> None:
    """2D coil k-space of a chunk of points into ``out (nte, ncoil, n)`` (see :meth:`Phantom.kspace`)."""
    nterm, ncomp = pf.shape
    g = np.zeros((w.shape[0], nterm, k.shape[0]), dtype=np.complex128)
    gauss = [np.exp(-((k - freqs[t]) ** 2) @ sig2) if np.any(sig2) else 1.0 for t in range(nterm)]
    for c in range(ncomp):
        q0 = k @ rs[c]
        phase = np.exp(-2j * np.pi * (k @ centres[c]))
        for t in range(nterm):
            q = q0 - qf[t, c]
            b = gauss[t] * _unit_ball(2 * np.pi * np.sqrt(np.sum(q * q, axis=-1)), 2) / np.pi
            g[:, t] += w[:, c, None] * (pf[t, c] * phase * b)[None]
    out[...] = np.einsum("jt,etn->ejn", coefs, g)


@numba.njit(parallel=True, cache=True)
def _ellipsoids_3d(k, rs, centres, qf, pf, w, coefs, out, freqs, sig2):  # pragma: no cover - compiled
    """3D coil k-space at every point into ``out (nte, ncoil, n)``, one point per thread iteration."""
    n = k.shape[0]
    nterm, ncomp = pf.shape
    nte, ncoil = w.shape[0], coefs.shape[0]
    for i in numba.prange(n):
        g = np.zeros((nte, nterm), dtype=np.complex128)
        gauss = np.ones(nterm)
        for t in range(nterm):
            acc = 0.0
            for e in range(3):
                acc += sig2[e] * (k[i, e] - freqs[t, e]) ** 2
            gauss[t] = np.exp(-acc)
        for c in range(ncomp):
            q0 = np.zeros(3)
            for e in range(3):
                q0[e] = k[i, 0] * rs[c, 0, e] + k[i, 1] * rs[c, 1, e] + k[i, 2] * rs[c, 2, e]
            arg = -2 * np.pi * (k[i, 0] * centres[c, 0] + k[i, 1] * centres[c, 1] + k[i, 2] * centres[c, 2])
            phase = complex(np.cos(arg), np.sin(arg))
            for t in range(nterm):
                a, b, d = q0[0] - qf[t, c, 0], q0[1] - qf[t, c, 1], q0[2] - qf[t, c, 2]
                u = 2 * np.pi * np.sqrt(a * a + b * b + d * d)
                series = 1 - u * u / 10 + u**4 / 280
                ball = series if u < 1e-2 else 3 * (np.sin(u) - u * np.cos(u)) / (u * u * u)
                v = gauss[t] * ball * phase * pf[t, c]
                for e in range(nte):
                    g[e, t] += w[e, c] * v
        for e in range(nte):
            for j in range(ncoil):
                acc = 0j
                for t in range(nterm):
                    acc += coefs[j, t] * g[e, t]
                out[e, j, i] = acc


@dataclass(frozen=True)
class CoilArray:
    """Coil sensitivities ``S_j(x) = sum_t coefs[j, t] exp(2 pi i freqs[t] . x)``.

    Attributes:
        freqs: ``(nterm, ndim)`` float, cycles per FOV (image-axis order).
        coefs: ``(ncoil, nterm)`` complex.
    """

    freqs: np.ndarray
    coefs: np.ndarray

    @property
    def ncoil(self) -> int:
        return int(self.coefs.shape[0])

    def sensitivity(self, points: np.ndarray) -> np.ndarray:
        """``S_j`` at ``points (..., ndim)`` (fractions of the FOV): ``(ncoil, ...)`` complex128."""
        points = np.asarray(points, dtype=np.float64)
        basis = np.exp(2j * np.pi * (points @ self.freqs.T))  # (..., nterm)
        return np.moveaxis(basis @ self.coefs.T, -1, 0)

    @staticmethod
    def default(ndim: int, ncoil: int, seed: int = 0) -> CoilArray:
        """Coils on a ring (2D) or a sphere (3D) of radius 0.5 FOV around the centre.

        Each coil is ``exp(i phi) prod_d (1 + 0.7 cos(pi (x_d - p_d)))`` (peak at the coil's position
        ``p``, about 5 times weaker on the far side) plus a small random term of the same harmonics
        (a smooth phase and shape change), so ``3^ndim`` terms at ``0, +-0.5`` cycles per FOV per axis.
        """
        if ncoil < 1:
            raise ReconError(f"a coil array needs at least one coil, got {ncoil}")
        rng = np.random.default_rng(seed)
        if ndim == 2:
            angle = 2 * np.pi * (np.arange(ncoil) + 0.5) / ncoil
            pos = 0.5 * np.stack([np.sin(angle), np.cos(angle)], -1)
        else:  # Fibonacci sphere, (z, y, x)
            i = np.arange(ncoil) + 0.5
            z = 1 - 2 * i / ncoil
            az = np.pi * (1 + 5**0.5) * i
            rho = np.sqrt(1 - z**2)
            pos = 0.5 * np.stack([z, rho * np.sin(az), rho * np.cos(az)], -1)
        steps = np.array(list(itertools.product((-1, 0, 1), repeat=ndim)), dtype=np.float64)  # (nterm, ndim)
        freqs = 0.5 * steps
        # 1 + a cos(pi (x - p)) = 1 + a/2 exp(i pi (x - p)) + a/2 exp(-i pi (x - p)), per axis
        per_axis = np.where(steps[None] == 0, 1.0, 0.35 * np.exp(-1j * np.pi * steps[None] * pos[:, None]))
        coefs = np.prod(per_axis, axis=-1)
        coefs = coefs + 0.1 * (rng.standard_normal(coefs.shape) + 1j * rng.standard_normal(coefs.shape))
        coefs *= np.exp(2j * np.pi * rng.uniform(size=(ncoil, 1)))
        return CoilArray(freqs, coefs)


@dataclass(frozen=True)
class Phantom:
    """A sum of ellipsoids seen through a coil array, with exact k-space.

    Attributes:
        components: the ellipsoids (all of one dimension, 2 or 3).
        coils: the coil sensitivities; None is one uniform coil.
        scale: multiplies all k-space (and so the truth).
        blur: standard deviation of a Gaussian blur of the object (before the coils multiply it),
            fractions of the FOV, one value or one per axis; 0 is none. Its transform
            ``exp(-2 pi^2 sum_d blur_d^2 k_d^2)`` multiplies the object's, so a blur of a voxel or two
            keeps the spectrum inside the Cartesian grid (a band-limited, smooth object).
    """

    components: tuple[Ellipsoid, ...]
    coils: CoilArray | None = None
    scale: float = 1.0
    blur: float | tuple[float, ...] = 0.0
    _ndim: int = field(init=False, repr=False, default=0)

    def __post_init__(self):
        dims = {c.ndim for c in self.components}
        if len(dims) != 1 or dims - {2, 3}:
            raise ReconError(f"phantom components must all be 2D or all 3D, got dimensions {sorted(dims)}")
        for c in self.components:
            if len(c.semi_axes) != c.ndim or min(c.semi_axes) <= 0:
                raise ReconError(f"ellipsoid semi-axes must be {c.ndim} positive values, got {c.semi_axes}")
            if not c.t2star_ms > 0:
                raise ReconError(f"T2* must be positive, got {c.t2star_ms} ms")
        object.__setattr__(self, "_ndim", dims.pop())
        if np.ndim(self.blur) not in (0, 1) or np.size(self.blur) not in (1, self._ndim) \
                or not np.all(np.asarray(self.blur, dtype=np.float64) >= 0):
            raise ReconError(f"blur must be one or {self._ndim} non-negative values, got {self.blur}")
        if self.coils is not None and self.coils.freqs.shape[1] != self._ndim:
            raise ReconError(f"coil harmonics are {self.coils.freqs.shape[1]}D for a {self._ndim}D phantom")

    @property
    def ndim(self) -> int:
        return self._ndim

    @property
    def ncoil(self) -> int:
        return 1 if self.coils is None else self.coils.ncoil

    @staticmethod
    def default(ndim: int = 2, ncoil: int = 8, seed: int = 0, scale: float = 1.0) -> Phantom:
        """A head-like phantom: a short-T2* skull shell, brain (T2* 50 ms) and lesions/ventricles
        (extra signal with T2* 20 ms), so two echoes decay differently by region.

        Args:
            ndim: 2 (the 3D head's central ``(y, x)`` section) or 3.
            ncoil: coils of :meth:`CoilArray.default` (0: one uniform coil).
            seed: the coils' random perturbation.
            scale: multiplies all k-space (e.g. ``prod(shape)`` for an image of amplitude about 1).
        """
        if ndim not in (2, 3):
            raise ReconError(f"the default phantom is 2D or 3D, got ndim={ndim}")
        skull, brain, fast = 10.0, 50.0, 20.0
        # (centre (z, y, x), semi-axes (z, y, x), amplitude, T2* ms, angle deg)
        parts = [
            ((0, 0, 0), (0.40, 0.45, 0.36), 1.0, skull, 0),
            ((0, 0, 0), (0.37, 0.42, 0.33), -1.0, skull, 0),
            ((0, 0, 0), (0.37, 0.42, 0.33), 0.5, brain, 0),
            ((0.02, -0.02, 0.09), (0.18, 0.17, 0.045), 0.3, fast, -18),  # ventricles
            ((0.02, -0.02, -0.09), (0.20, 0.20, 0.06), 0.3, fast, 18),
            ((-0.10, 0.22, 0.0), (0.09, 0.08, 0.10), 0.25, fast, 0),
            ((0.12, -0.25, 0.05), (0.05, 0.04, 0.04), 0.4, fast, 0),
            ((-0.05, -0.28, -0.10), (0.04, 0.03, 0.03), -0.2, brain, 0),
        ]
        comps = tuple(Ellipsoid(c[3 - ndim:], s[3 - ndim:], a, t, ang) for c, s, a, t, ang in parts)
        coils = CoilArray.default(ndim, ncoil, seed) if ncoil > 0 else None
        return Phantom(comps, coils, float(scale))

    def moved(self, rotation=None, shift=None, grid: Sequence[int] | None = None) -> Phantom:
        """The object moved rigidly about the FOV centre, the coils left where they are (scanner frame).

        A point ``p`` of the object goes to ``R p + shift``; each ellipsoid's centre and orientation are
        transformed exactly (the result is again a sum of ellipsoids, so its k-space stays analytic).

        Args:
            rotation: ``(ndim, ndim)`` rotation matrix in image-axis order (2D ``(y, x)``, 3D
                ``(z, y, x)``); None is the identity.
            shift: ``(ndim,)`` translation, fractions of the FOV, or voxels when ``grid`` is given.
            grid: the voxel matrix ``(ny, nx)`` / ``(nz, ny, nx)``: when given, the rotation acts on
                isotropic voxel coordinates (``p_vox = p * grid``), as a rigid motion of a scan with
                cubic voxels does, and ``shift`` is in voxels.

        Returns:
            A new phantom (same coils, scale and blur).
        """
        d = self.ndim
        r = np.eye(d) if rotation is None else np.asarray(rotation, dtype=np.float64)
        if r.shape != (d, d) or not np.allclose(r @ r.T, np.eye(d), atol=1e-9) or np.linalg.det(r) < 0:
            raise ReconError(f"rotation must be a proper {d} x {d} rotation matrix, got {r.tolist()}")
        t = np.zeros(d) if shift is None else np.asarray(shift, dtype=np.float64)
        if t.shape != (d,):
            raise ReconError(f"shift must be {d} values, got {t.tolist()}")
        if grid is not None:
            n = np.asarray(grid, dtype=np.float64)
            if n.shape != (d,) or np.any(n <= 0):
                raise ReconError(f"grid must be {d} positive sizes, got {grid}")
            r = (r * n[None, :]) / n[:, None]  # diag(1/n) R diag(n): fractions -> voxels -> fractions
            t = t / n
        comps = []
        for c in self.components:
            a = r @ c.rotation() * np.asarray(c.semi_axes)[None, :]  # x = a u + centre, |u| <= 1
            u, s, _ = np.linalg.svd(a)
            if np.linalg.det(u) < 0:
                u[:, -1] = -u[:, -1]
            comps.append(Ellipsoid(tuple(float(v) for v in r @ np.asarray(c.centre) + t), tuple(float(v) for v in s),
                                   c.amplitude, c.t2star_ms, 0.0, tuple(tuple(float(v) for v in row) for row in u)))
        return Phantom(tuple(comps), self.coils, self.scale, self.blur)

    def resized(self, factor: float) -> Phantom:
        """The object scaled by ``factor`` about the FOV centre (centres and semi-axes), coils unchanged."""
        if not factor > 0:
            raise ReconError(f"resize factor must be positive, got {factor}")
        comps = tuple(Ellipsoid(tuple(factor * v for v in c.centre), tuple(factor * v for v in c.semi_axes),
                                c.amplitude, c.t2star_ms, c.angle_deg, c.orientation) for c in self.components)
        return Phantom(comps, self.coils, self.scale, self.blur)

    def blurred(self, sigma: float, grid: Sequence[int] | None = None) -> Phantom:
        """The same phantom with a Gaussian blur of ``sigma`` (fractions of the FOV, or voxels of ``grid``,
        isotropic in voxels: the blur then commutes with :meth:`moved` on that grid)."""
        if not sigma >= 0:
            raise ReconError(f"blur must be non-negative, got {sigma}")
        blur = sigma if grid is None else tuple(float(sigma) / float(n) for n in grid)
        return Phantom(self.components, self.coils, self.scale, blur)

    def without_coils(self) -> Phantom:
        """The object alone (one uniform coil): its :meth:`truth_coils` is the object's band-limited image."""
        return Phantom(self.components, None, self.scale, self.blur)

    def image(self, points, te_ms: float = 0.0) -> np.ndarray:
        """The continuous object (no coils, not band-limited, not blurred) at ``points (..., ndim)``, float64."""
        points = np.asarray(points, dtype=np.float64)
        out = np.zeros(points.shape[:-1])
        for c in self.components:
            out += c.decay(te_ms) * c.inside(points)
        return self.scale * out

    def sensitivity(self, points) -> np.ndarray:
        """Coil sensitivities at ``points (..., ndim)``: ``(ncoil, ...)`` complex128."""
        points = np.asarray(points, dtype=np.float64)
        if self.coils is None:
            return np.ones((1, *points.shape[:-1]), dtype=np.complex128)
        return self.coils.sensitivity(points)

    def kspace(self, coord, te_ms: float | Sequence[float] = 0.0) -> np.ndarray:
        """Exact coil k-space at ``coord (..., ndim)`` (cycles per FOV, image-axis column order).

        Args:
            coord: trajectory, any leading shape (e.g. ``(nreadouts, ns, ndim)``).
            te_ms: one echo time, or a sequence of them (each component decays with its T2*).

        Returns:
            ``(ncoil, ...)`` complex64 for one echo time, ``(nte, ncoil, ...)`` for a sequence.
        """
        coord = np.asarray(coord, dtype=np.float64)
        if coord.shape[-1] != self.ndim:
            raise ReconError(f"coord must end in {self.ndim} columns for a {self.ndim}D phantom, "
                             f"got shape {coord.shape}")
        single = np.ndim(te_ms) == 0
        tes = [float(te_ms)] if isinstance(te_ms, int | float) else [float(t) for t in te_ms]
        lead = coord.shape[:-1]
        flat = np.ascontiguousarray(coord.reshape(-1, self.ndim))
        freqs = np.zeros((1, self.ndim)) if self.coils is None else np.asarray(self.coils.freqs, dtype=np.float64)
        coefs = np.ones((1, 1), np.complex128) if self.coils is None else np.asarray(self.coils.coefs, np.complex128)
        # F(k - f) of component c = w_c prod(s) B(|(k - f) R s|) exp(-2 pi i k.c) exp(2 pi i f.c)
        rs = np.stack([c.rotation() * np.asarray(c.semi_axes) for c in self.components])  # (ncomp, ndim, ndim)
        centres = np.array([c.centre for c in self.components], dtype=np.float64)
        qf = np.einsum("td,cde->tce", freqs, rs)  # (nterm, ncomp, ndim)
        pf = np.exp(2j * np.pi * (freqs @ centres.T))  # (nterm, ncomp)
        ball = 4 * np.pi / 3 if self.ndim == 3 else np.pi
        w = np.array([[c.decay(t) * np.prod(c.semi_axes) * ball * self.scale for c in self.components]
                      for t in tes])  # (nte, ncomp)
        sig2 = 2 * np.pi**2 * np.broadcast_to(np.asarray(self.blur, dtype=np.float64), (self.ndim,)) ** 2
        sig2 = np.ascontiguousarray(sig2)
        out = np.empty((len(tes), coefs.shape[0], flat.shape[0]), dtype=np.complex64)
        if self.ndim == 3:
            _ellipsoids_3d(flat, rs, centres, qf, pf, w, coefs, out, np.ascontiguousarray(freqs), sig2)
        else:
            for start in range(0, flat.shape[0], _CHUNK):
                _ellipses_2d(flat[start:start + _CHUNK], rs, centres, qf, pf, w, coefs, out[..., start:start + _CHUNK],
                             freqs, sig2)
        out = out.reshape(len(tes), coefs.shape[0], *lead)
        return out[0] if single else out

    def cartesian_kspace(self, shape: Sequence[int], te_ms: float = 0.0) -> np.ndarray:
        """k-space on the integer grid ``-N/2 .. N/2 - 1`` of each axis: ``(ncoil, *shape)``, centre at ``N // 2``."""
        shape = tuple(int(n) for n in shape)
        if len(shape) != self.ndim:
            raise ReconError(f"a {self.ndim}D phantom needs a {self.ndim}D shape, got {shape}")
        axes = [np.arange(n) - n // 2 for n in shape]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        return self.kspace(grid, te_ms)

    def truth_coils(self, shape: Sequence[int], te_ms: float = 0.0) -> np.ndarray:
        """Coil images of a fully sampled Cartesian scan: ``(ncoil, *shape)`` complex64.

        The band-limited image: :meth:`cartesian_kspace` inverse DFT'd with ``1 / prod(shape)``,
        pixel ``N // 2`` at the FOV centre.
        """
        ksp = self.cartesian_kspace(shape, te_ms)
        axes = tuple(range(1, ksp.ndim))
        img = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(ksp, axes=axes), axes=axes), axes=axes)
        return img.astype(np.complex64)

    def truth(self, shape: Sequence[int], te_ms: float = 0.0) -> np.ndarray:
        """The root sum of squares of :meth:`truth_coils`: ``shape`` float32."""
        img = self.truth_coils(shape, te_ms)
        return np.sqrt(np.sum(np.abs(img) ** 2, axis=0)).astype(np.float32)

    def pixel_points(self, shape: Sequence[int]) -> np.ndarray:
        """Pixel centres of ``shape`` in fractions of the FOV: ``(*shape, ndim)`` (pixel ``N // 2`` at 0)."""
        axes = [(np.arange(n) - n // 2) / n for n in shape]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1)
