"""Radial reconstruction on arrays: trajectories, density compensation, gridding, CG, coil maps.

Units and layout (those of :class:`reconq.recon.nufft.NufftPlan`): k in cycles per field of view,
columns in image-axis order (2D ``(ky, kx)``, 3D ``(kz, ky, kx)``); a trajectory is
``(nreadouts, ns, ndim)``; k-space for a plan is ``(n_trans, npts)``, ``n_trans = nvol * ncoil``
rows ordered volume-major (row ``v * ncoil + c``), ``npts = nreadouts * ns`` (C order).

Scale: a density compensation function (DCF) is the k-space area (2D) or volume (3D) that each
sample stands for, in (cycles per FOV)^ndim, so that it is 1 for a Cartesian grid.
:func:`gridding` returns ``adjoint(dcf * y) / prod(shape)``: a Nyquist-sampled object comes back at
the scale of the image ``x`` whose NDFT is ``y`` (for a full Cartesian grid this is exactly the
inverse DFT ``numpy.fft.ifftn``). :func:`cg` solves the same-scaled normal equations
``(A^H W A / prod(shape) + lamda I) x = A^H W y / prod(shape)``, so ``lamda`` is relative to an
operator whose eigenvalues are about 1.

Methods:

* Radial 2D: uniform angles (``pi / nspokes`` for full spokes, ``2 pi / nspokes`` for half spokes) or
  golden-angle increments (``pi (sqrt 5 - 1) / 2``, 111.25 degrees, for full spokes; ``2 pi`` times
  that, the 137.5 degree angle, for half spokes).
* Kooshball: 3D radial spokes ordered by the 2D golden means ``phi1 = 0.4656, phi2 = 0.6823``
  (``kz = mod(m phi1, 1)`` on a hemisphere for full spokes, ``2 mod(m phi1, 1) - 1`` on the sphere
  for half spokes; azimuth ``2 pi mod(m phi2, 1)``).
* Stack of stars: integer Cartesian ``kz`` partitions with the same 2D radial spokes in each one.
* Analytic DCF: the exact area/volume of the ring/shell a sample represents (``2 pi |k| dk / H`` in
  2D, ``4 pi (|k|^2 dk + dk^3 / 12) / H`` in 3D, ``H`` the number of half-lines, full spokes counting
  twice), the centre a disc/ball of radius ``dk / 2`` shared by the samples in it.
* Pipe-Menon DCF: ``w <- w / (C w)`` where ``C`` is convolution with a separable triangle of
  half-width 1 cycle, applied as ``forward(phi * adjoint(w))`` (``phi = sinc^2``, the triangle's
  transform) on a grid spanning twice the FOV (see :func:`pipe_menon_dcf`).
* CG: conjugate gradients on the DCF-weighted normal equations, one independent system per image
  (per coil and volume without maps, per volume with maps), from the gridding result. The normal
  operator is applied by Toeplitz embedding (Wajer and Pruessmann; Fessler et al.): the point-spread
  kernel on the twice-larger grid is computed once with a 1-transform NUFFT, then each application
  is a zero-padded FFT pair, pruned to the non-zero half of each axis. On 2 CPU cores (AMD EPYC), a
  64^3 grid, 8 coils x 2 echoes, 6434 x 128 kooshball samples, eps 1e-4 (``bench/radial.py``):
  :func:`reconstruct` with 10 iterations takes 13.1 s with Toeplitz, 39.6 s with a forward and
  adjoint NUFFT per iteration (3.0 times slower, same error); ``toeplitz=False`` selects the latter.
* Low-resolution coil maps: samples with ``|k| < radius``, Hann-tapered, gridded on a small grid,
  Fourier-interpolated to the image grid and normalised to unit root sum of squares.

References:
    Glover GH, Pauly JM. Projection reconstruction techniques for reduction of motion effects in
    MRI. Magn Reson Med 1992;26:345-353.
    Winkelmann S, Schaeffter T, Koehler T, Eggers H, Doessel O. An optimal radial profile order
    based on the golden ratio for time-resolved MRI. IEEE Trans Med Imaging 2007;26:68-76.
    Chan RW, Ramsay EA, Cunningham CH, Plewes DB. Temporal stability of adaptive 3D radial MRI
    using multidimensional golden means. Magn Reson Med 2009;61:354-363.
    Pipe JG, Menon P. Sampling density compensation in MRI: rationale and an iterative numerical
    solution. Magn Reson Med 1999;41:179-186.
    Jackson JI, Meyer CH, Nishimura DG, Macovski A. Selection of a convolution function for Fourier
    inversion using gridding. IEEE Trans Med Imaging 1991;10:473-478.
    Pruessmann KP, Weiger M, Boernert P, Boesiger P. Advances in sensitivity encoding with
    arbitrary k-space trajectories. Magn Reson Med 2001;46:638-651.
    Wajer FTAW, Pruessmann KP. Major speedup of reconstruction for sensitivity encoding with
    arbitrary trajectories. Proc ISMRM 2001, p. 767.
    Fessler JA, Lee S, Olafsson VT, Shi HR, Noll DC. Toeplitz-based iterative image reconstruction
    for MRI with correction for magnetic field inhomogeneity. IEEE Trans Signal Process
    2005;53:3393-3402.
    Walsh DO, Gmitro AF, Marcellin MW. Adaptive reconstruction of phased array MR imagery.
    Magn Reson Med 2000;43:682-690.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
import sigpy as sp

from reconq.recon import fft
from reconq.recon.coils import combine_with_maps, sos
from reconq.recon.errors import ReconError
from reconq.recon.nufft import NufftPlan

logger = logging.getLogger(__name__)

#: Golden-angle fraction ``(sqrt 5 - 1) / 2`` (Winkelmann 2007).
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
#: The 2D golden means (Chan 2009): ``phi2`` the real root of ``x^3 + x - 1``, ``phi1 = phi2^2``.
PHI2 = 0.6823278038280193
PHI1 = PHI2 * PHI2

KINDS = ("2d", "3d", "stack")
_PM_HALF_WIDTH = 1.0  # Pipe-Menon kernel half-width, cycles per FOV
_PM_MARGIN = 4  # pixels added to the Pipe-Menon period (more than twice the kernel half-width)


# --------------------------------------------------------------------------------------- trajectories


def _spoke_radii(ns: int, kmax: float, half: bool) -> np.ndarray:
    """Signed positions along a spoke: full ``(i - ns//2) * kmax / (ns//2)``; half ``i * kmax / ns``."""
    if ns < 2:
        raise ReconError(f"a spoke needs at least 2 samples, got ns={ns}")
    if not kmax > 0:
        raise ReconError(f"kmax must be positive (cycles per FOV), got {kmax}")
    if half:
        return np.arange(ns) * (kmax / ns)
    return (np.arange(ns) - ns // 2) * (kmax / (ns // 2))


def _check_spokes(nspokes: int) -> None:
    if nspokes < 1:
        raise ReconError(f"nspokes must be at least 1, got {nspokes}")


def radial_2d(nspokes: int, ns: int, kmax: float, golden: bool = False, half: bool = False) -> np.ndarray:
    """2D radial spokes.

    Args:
        nspokes: number of spokes.
        ns: samples per spoke. Full spokes run ``-kmax .. kmax`` (``kmax - dk`` for even ``ns``) with
            ``dk = kmax / (ns // 2)`` and sample ``ns // 2`` at ``k = 0``; half spokes run centre-out,
            sample 0 at ``k = 0``, ``dk = kmax / ns``.
        kmax: the largest ``|k|``, cycles per FOV (``N / 2`` of the grid for Nyquist along the spoke).
        golden: golden-angle increments instead of uniform angles.
        half: centre-out half spokes (angles over ``2 pi``) instead of full ones (over ``pi``).

    Returns:
        ``(nspokes, ns, 2)`` float32, columns ``(ky, kx)``; spoke ``m`` at angle ``theta_m`` from
        ``+kx`` towards ``+ky``.
    """
    _check_spokes(nspokes)
    r = _spoke_radii(ns, kmax, half)
    span = 2 * np.pi if half else np.pi
    m = np.arange(nspokes)
    theta = np.mod(m * GOLDEN * span, span) if golden else m * span / nspokes
    direction = np.stack([np.sin(theta), np.cos(theta)], -1)
    return (r[None, :, None] * direction[:, None, :]).astype(np.float32)


def kooshball(nspokes: int, ns: int, kmax: float, half: bool = False) -> np.ndarray:
    """3D radial spokes in the 2D golden-means order (Chan et al. 2009).

    Args:
        nspokes: number of spokes.
        ns: samples per spoke, as :func:`radial_2d`.
        kmax: the largest ``|k|``, cycles per FOV.
        half: centre-out half spokes over the whole sphere; otherwise full spokes, directions on the
            ``kz >= 0`` hemisphere.

    Returns:
        ``(nspokes, ns, 3)`` float32, columns ``(kz, ky, kx)``.
    """
    _check_spokes(nspokes)
    r = _spoke_radii(ns, kmax, half)
    m = np.arange(nspokes)
    kz = np.mod(m * PHI1, 1.0)
    if half:
        kz = 2 * kz - 1
    azimuth = 2 * np.pi * np.mod(m * PHI2, 1.0)
    rho = np.sqrt(np.clip(1 - kz**2, 0, None))
    direction = np.stack([kz, rho * np.sin(azimuth), rho * np.cos(azimuth)], -1)
    return (r[None, :, None] * direction[:, None, :]).astype(np.float32)


def stack_of_stars(nspokes: int, ns: int, kmax: float, nz: int, golden: bool = False) -> np.ndarray:
    """Stack of stars: ``nz`` integer Cartesian partitions, the same full 2D spokes in each.

    Args:
        nspokes: spokes per partition (full spokes, :func:`radial_2d`).
        ns: samples per spoke.
        kmax: the largest in-plane ``|k|``, cycles per FOV.
        nz: partitions, ``kz = -nz/2 .. nz/2 - 1`` (``-(nz//2) .. (nz-1)//2``).
        golden: golden-angle spokes within each partition.

    Returns:
        ``(nz * nspokes, ns, 3)`` float32, columns ``(kz, ky, kx)``, partition-major (readout
        ``p * nspokes + m`` is spoke ``m`` of partition ``p``).
    """
    if nz < 1:
        raise ReconError(f"nz must be at least 1, got {nz}")
    plane = radial_2d(nspokes, ns, kmax, golden=golden)
    kz = np.arange(nz) - nz // 2
    out = np.empty((nz, nspokes, ns, 3), dtype=np.float32)
    out[..., 0] = kz[:, None, None]
    out[..., 1:] = plane[None]
    return out.reshape(nz * nspokes, ns, 3)


# ------------------------------------------------------------------------------------ density weights


def _check_coord(coord, ndims: Sequence[int] = (2, 3)) -> np.ndarray:
    coord = np.asarray(sp.to_device(coord, sp.cpu_device))
    if coord.ndim != 3 or coord.shape[-1] not in ndims or coord.shape[1] < 2:
        raise ReconError(f"coord must be (nreadouts, ns >= 2, ndim) with ndim in {tuple(ndims)}, "
                         f"got {tuple(coord.shape)}")
    if not np.isrealobj(coord) or not np.all(np.isfinite(coord)):
        raise ReconError("coord must be finite real values (cycles per FOV)")
    return coord


def analytic_dcf(coord, kind: str) -> np.ndarray:
    """The exact k-space area (2D) or volume (3D) each radial sample stands for.

    Sample spacing ``dk`` along the spokes is the median distance between neighbouring samples.
    A readout whose smallest ``|k|`` is inside it is a full spoke (two half-lines), one whose
    smallest ``|k|`` is its first or last sample a half spoke (one). A sample at radius ``r >= dk/2``
    gets its ring (``2 pi r dk / H``) or shell (``4 pi (r^2 dk + dk^3 / 12) / H``), ``H`` the number of
    half-lines; samples within ``dk / 2`` of the centre share the disc (``pi dk^2 / 4``) or ball
    (``pi dk^3 / 6``). For ``"stack"`` the in-plane weight (last two columns, ``H`` counted per
    partition) is multiplied by the partition spacing. Uniform angular coverage is assumed (golden
    angles cover uniformly on average).

    Args:
        coord: ``(nreadouts, ns, ndim)``, cycles per FOV, numpy or cupy.
        kind: ``"2d"`` (``|k|``), ``"3d"`` (``|k|^2``) or ``"stack"`` (``|k|`` in ``(ky, kx)``).

    Returns:
        ``(nreadouts, ns)`` float32, on ``coord``'s device; the scale of the module docstring
        (1 per sample for a Cartesian grid).

    Raises:
        ReconError: an unknown kind, or coordinates of the wrong shape for it.
    """
    if kind not in KINDS:
        raise ReconError(f"unknown DCF kind {kind!r}: expected one of {', '.join(KINDS)}")
    device = sp.get_device(coord)
    c = _check_coord(coord, (2,) if kind == "2d" else (3,)).astype(np.float64)
    plane = c[..., -2:] if kind == "stack" else c
    r = np.sqrt(np.sum(plane**2, axis=-1))  # (nreadouts, ns)
    steps = np.sqrt(np.sum(np.diff(plane, axis=1) ** 2, axis=-1))
    dk = float(np.median(steps))
    if not dk > 0:
        raise ReconError("coord has no spacing along its readouts (all samples of a readout coincide)")
    centre_index = np.argmin(r, axis=1)
    lines = np.where((centre_index > 0) & (centre_index < c.shape[1] - 1), 2, 1)  # half-lines per readout
    centre = r < dk / 2
    if kind == "stack":
        kz = c[:, 0, 0]
        if np.any(np.abs(c[..., 0] - kz[:, None]) > 1e-6):
            raise ReconError("a stack of stars needs kz constant along each readout")
        parts, group = np.unique(np.round(kz, 6), return_inverse=True)
        dkz = float(np.min(np.diff(parts))) if len(parts) > 1 else 1.0
        h = np.bincount(group, weights=lines)[group]  # half-lines in each readout's partition
        n_centre = np.bincount(group, weights=centre.sum(axis=1))[group]
    else:
        dkz, h = 1.0, np.full(c.shape[0], lines.sum(), dtype=np.float64)
        n_centre = np.full(c.shape[0], centre.sum(), dtype=np.float64)
    if kind == "3d":
        w = 4 * np.pi * (r**2 * dk + dk**3 / 12) / h[:, None]
        core = (np.pi * dk**3 / 6) / np.maximum(n_centre, 1)
    else:
        w = 2 * np.pi * r * dk / h[:, None]
        core = (np.pi * dk**2 / 4) / np.maximum(n_centre, 1)
    w = np.where(centre, core[:, None], w) * dkz
    return sp.to_device(w.astype(np.float32), device)


def pipe_menon_dcf(coord, shape: Sequence[int], niter: int = 10, eps: float = 1e-3,
                   threads: int | None = None):
    """Iterative DCF (Pipe and Menon 1999): ``w <- w / (C w)`` until ``C w = 1``.

    ``C`` is convolution with a separable triangle of half-width 1 cycle per FOV, applied as
    ``forward(phi * adjoint(w))`` with one 1-transform NUFFT pair. The grid has ``2 (N + 4)`` pixels of
    ``1 / (N + 4)`` FOV per axis: ``phi = sinc^2`` (the triangle's transform) then weights the point
    spread over ``-1 .. 1`` FOV, every pixel difference within the image, and the kernel's period
    ``N + 4`` exceeds the trajectory's extent (the outermost samples do not see the opposite edge).
    A wider kernel or a one-FOV grid leaves the point spread unconstrained near the FOV's edge
    (2D gridding NRMSE 0.13 to 0.3 instead of 0.03). The converged ``w`` is scaled by the kernel's
    integral, so the result is a sample's area/volume (the module docstring's scale).

    Args:
        coord: ``(..., ndim)`` cycles per FOV, within ``-N/2 .. N/2`` of ``shape``; numpy or cupy.
        shape: the image grid.
        niter: iterations (10 is usual).
        eps: NUFFT tolerance (the weights need little accuracy).
        threads: finufft threads (None: all cores).

    Returns:
        ``coord.shape[:-1]`` float32 on ``coord``'s device.
    """
    shape = tuple(int(n) for n in shape)
    if niter < 1:
        raise ReconError(f"Pipe-Menon needs at least one iteration, got niter={niter}")
    if coord.shape[-1] != len(shape):
        raise ReconError(f"coord has {coord.shape[-1]} columns for a {len(shape)}D grid {shape}")
    xp = sp.get_array_module(coord)
    flat = coord.reshape(-1, len(shape))
    # pixels of 1/M FOV (M = N + margin: the kernel's period M exceeds the k-space extent N plus its
    # width), on a grid of 2M pixels spanning -1 .. 1 FOV, where phi constrains the point spread
    span = tuple(n + _PM_MARGIN for n in shape)
    big = tuple(2 * m for m in span)
    plan = NufftPlan(2 * flat, big, n_trans=1, eps=eps, dtype=np.complex64, threads=threads)
    phi: Any = 1.0
    for axis, (n, m) in enumerate(zip(big, span, strict=True)):
        view = [1] * len(big)
        view[axis] = n
        phi = phi * (np.sinc(_PM_HALF_WIDTH * (np.arange(n) - n // 2) / m) ** 2).reshape(view)
    phi = xp.asarray(np.asarray(phi, dtype=np.float32))[None]
    w = xp.ones((1, flat.shape[0]), dtype=np.complex64)
    for _ in range(int(niter)):
        cw = xp.abs(plan.forward(plan.adjoint(w) * phi))
        w = w / xp.maximum(cw, 1e-12 * float(cw.max()))
    dcf = xp.abs(w[0]) * float(np.prod(span))
    return dcf.astype(np.float32).reshape(coord.shape[:-1])


# ---------------------------------------------------------------------------------------- operators


def gridding(plan: NufftPlan, ksp, dcf):
    """Density-compensated adjoint: ``adjoint(dcf * ksp) / prod(shape)``.

    Args:
        plan: the trajectory's plan (``n_trans`` images).
        ksp: ``(n_trans, npts)`` complex, numpy or cupy.
        dcf: ``(npts,)`` (or any shape of ``npts`` elements), the module docstring's scale.

    Returns:
        ``(n_trans, *plan.shape)`` complex: a Nyquist-sampled object at the scale of its image.
    """
    xp = sp.get_array_module(ksp)
    w = _weights(dcf, plan, xp)
    return plan.adjoint(ksp * w[None]) / float(np.prod(plan.shape))


def _weights(dcf, plan: NufftPlan, xp):
    w = xp.asarray(dcf).reshape(-1)
    if w.shape[0] != plan.npts:
        raise ReconError(f"dcf has {w.shape[0]} values for a plan of {plan.npts} points")
    return w.astype(np.float32)


def _fft1(x, axis: int, inverse: bool, n: int | None, threads: int | None):
    """One unnormalised forward (inverse: normalised by ``1/n``) FFT along ``axis``, host or device."""
    if sp.get_array_module(x) is np:
        fn = scipy.fft.ifft if inverse else scipy.fft.fft
        return fn(x, n=n, axis=axis, workers=threads or fft.WORKERS)
    xp = sp.get_array_module(x)
    return (xp.fft.ifft if inverse else xp.fft.fft)(x, n=n, axis=axis)


def _fftn_padded(x, axes: tuple[int, ...], threads: int | None):
    """FFT of ``x`` zero-padded to twice its size on ``axes``, skipping the all-zero lines."""
    for axis in reversed(axes):
        x = _fft1(x, axis, False, 2 * x.shape[axis], threads)
    return x


def _ifftn_cropped(x, axes: tuple[int, ...], threads: int | None):
    """Inverse of a twice-size FFT on ``axes``, keeping the first half of each axis as it goes."""
    for axis in axes:
        x = _fft1(x, axis, True, None, threads)
        x = x[(slice(None),) * axis + (slice(0, x.shape[axis] // 2),)]
    return x


class ToeplitzKernel:
    """The DCF-weighted normal operator ``A^H W A / prod(shape)`` as a convolution on the 2x grid.

    Built once from the trajectory with a 1-transform NUFFT on the twice-larger grid (the
    point-spread function ``h[d] = sum_j w_j exp(2 pi i k_j . d / N)`` for ``d`` in ``-N .. N-1``);
    :meth:`apply` is then a zero-padded FFT pair per image.

    Args:
        coord: ``(npts, ndim)`` cycles per FOV (the plan's points), numpy or cupy.
        shape: the image grid.
        dcf: ``(npts,)`` weights.
        eps: NUFFT tolerance for the kernel.
        threads: host threads (finufft and FFTs).
        batch: images per FFT batch (bounds memory: ``batch * 2^ndim * prod(shape)`` complex64).
    """

    def __init__(self, coord, shape: Sequence[int], dcf, eps: float = 1e-4, threads: int | None = None,
                 batch: int = 4):
        self.shape = tuple(int(n) for n in shape)
        self.threads, self.batch = threads, max(1, int(batch))
        xp = sp.get_array_module(coord)
        big = tuple(2 * n for n in self.shape)
        plan = NufftPlan(2 * coord.reshape(-1, len(self.shape)), big, n_trans=1, eps=eps, threads=threads)
        w = xp.asarray(dcf, dtype=np.float32).reshape(1, -1).astype(np.complex64)
        psf = plan.adjoint(w)[0] / float(np.prod(self.shape))  # index d + N
        axes = tuple(range(len(big)))
        psf = xp.fft.ifftshift(psf, axes=axes)
        if xp is np:
            self.spectrum = scipy.fft.fftn(psf, axes=axes, workers=threads or fft.WORKERS).astype(np.complex64)
        else:
            self.spectrum = xp.fft.fftn(psf, axes=axes).astype(np.complex64)

    def apply(self, x):
        """``A^H W A x / prod(shape)`` for ``x (B, *shape)``; same shape and dtype."""
        xp = sp.get_array_module(x)
        axes = tuple(range(1, x.ndim))
        out = xp.empty_like(x)
        for start in range(0, x.shape[0], self.batch):
            part = _fftn_padded(x[start:start + self.batch], axes, self.threads)
            part *= self.spectrum[None]
            out[start:start + self.batch] = _ifftn_cropped(part, axes, self.threads)
        return out


def cg(plan: NufftPlan, ksp, dcf, niter: int, maps=None, lamda: float = 0.0, x0=None,
       toeplitz: ToeplitzKernel | None = None):
    """DCF-weighted conjugate gradients on ``(A^H W A / P + lamda I) x = A^H W y / P``, ``P = prod(shape)``.

    Without maps, ``A`` is the NUFFT of each image: ``x`` is ``(n_trans, *shape)``, every coil of every
    volume its own system. With maps ``(ncoil, *shape)``, ``A`` is the NUFFT of ``maps * x``: ``x`` is
    ``(nvol, *shape)``, ``nvol = n_trans // ncoil``, and ``ksp`` row ``v * ncoil + c`` is coil ``c`` of
    volume ``v``. Each system has its own step sizes (batched CG). The start is :func:`gridding`
    (combined with the maps, ``sum conj(m) x / sum |m|^2``) unless ``x0`` is given.

    Args:
        plan: the trajectory's plan, ``n_trans = nvol * ncoil``.
        ksp: ``(n_trans, npts)`` complex.
        dcf: ``(npts,)`` weights ``W``.
        niter: CG iterations (0 returns the start).
        maps: None, or ``(ncoil, *shape)`` complex coil maps.
        lamda: Tikhonov weight, relative to the normalised operator (eigenvalues about 1).
        x0: the start, ``(n_trans, *shape)`` without maps, ``(nvol, *shape)`` with.
        toeplitz: a :class:`ToeplitzKernel` of the same trajectory and DCF: the normal operator as
            FFTs (3 times faster than a NUFFT pair on a 64^3 kooshball); None: the plan's forward and adjoint.

    Returns:
        ``x``, complex64, the shape of ``x0``.
    """
    if niter < 0:
        raise ReconError(f"niter must be >= 0, got {niter}")
    if lamda < 0:
        raise ReconError(f"lamda must be >= 0, got {lamda}")
    xp = sp.get_array_module(ksp)
    shape, n_trans = plan.shape, plan.n_trans
    if tuple(ksp.shape) != (n_trans, plan.npts):
        raise ReconError(f"ksp must be (n_trans, npts) = ({n_trans}, {plan.npts}), got {tuple(ksp.shape)}")
    w = _weights(dcf, plan, xp)
    scale = 1.0 / float(np.prod(shape))
    if maps is not None:
        maps = xp.asarray(maps, dtype=np.complex64)
        ncoil = maps.shape[0]
        if tuple(maps.shape[1:]) != shape or n_trans % ncoil:
            raise ReconError(f"maps {tuple(maps.shape)} do not fit a plan of {n_trans} images of {shape}")
        nvol = n_trans // ncoil

        def expand(x):
            return (x[:, None] * maps[None]).reshape((n_trans, *shape))

        def reduce(c):
            return xp.sum(xp.conj(maps)[None] * c.reshape((nvol, ncoil, *shape)), axis=1)
    else:
        def expand(x):
            return x

        def reduce(c):
            return c

    def normal(x):
        c = expand(x)
        c = toeplitz.apply(c) if toeplitz is not None else plan.adjoint(w[None] * plan.forward(c)) * scale
        out = reduce(c)
        return out + lamda * x if lamda else out

    grid = plan.adjoint(ksp * w[None]) * scale
    b = reduce(grid)
    if x0 is not None:
        x = xp.array(x0, dtype=np.complex64)
        if x.shape != b.shape:
            raise ReconError(f"x0 must be {tuple(b.shape)}, got {tuple(x.shape)}")
    elif maps is not None:
        x = combine_with_maps(grid.reshape((nvol, ncoil, *shape)).swapaxes(0, 1), maps[:, None]).astype(np.complex64)
    else:
        x = grid.astype(np.complex64)
    if niter == 0:
        return x
    axes = tuple(range(1, x.ndim))
    view = (-1,) + (1,) * len(shape)

    def dot(a, c):
        return xp.sum((xp.conj(a) * c).real, axis=axes)

    r = b - normal(x)
    p = r.copy()
    rr = dot(r, r)
    for _ in range(int(niter)):
        ap = normal(p)
        den = dot(p, ap)
        alpha = xp.where(den > 0, rr / xp.where(den > 0, den, 1), 0).astype(np.float32)
        x += alpha.reshape(view) * p
        r -= alpha.reshape(view) * ap
        rr_new = dot(r, r)
        beta = xp.where(rr > 0, rr_new / xp.where(rr > 0, rr, 1), 0).astype(np.float32)
        p = r + beta.reshape(view) * p
        rr = rr_new
    return x


# ------------------------------------------------------------------------------------------ coil maps


def trajectory_kind(coord: np.ndarray) -> str:
    """``"2d"``, ``"stack"`` (3D coordinates whose every readout keeps one integer ``kz``, several of them:
    a stack of stars, its density in-plane) or ``"3d"``, from ``coord (nreadouts, ns, ndim)`` on the host."""
    if coord.shape[-1] == 2:
        return "2d"
    kz = coord[..., 0]
    if np.all(np.abs(kz - kz[:, :1]) < 1e-6) and np.all(np.abs(kz - np.round(kz)) < 1e-6) \
            and len(np.unique(kz[:, 0])) > 1:
        return "stack"
    return "3d"


def lowres_maps(coord, ksp, shape: Sequence[int], nvol: int, ncoil: int, radius: float = 12.0,
                threads: int | None = None, dcf=None):
    """Coil maps from the centre of k-space of the first volume.

    Samples with ``|k| < radius`` (cycles per FOV), weighted by the DCF and a Hann taper
    ``(1 + cos(pi |k| / radius)) / 2``, are gridded on a grid of ``2 ceil(radius) + 2`` points per
    axis (at most ``shape``), Fourier-interpolated (zero-padded k-space) to ``shape`` and divided by
    their root sum of squares.

    Args:
        coord: ``(nreadouts, ns, ndim)`` cycles per FOV (or ``(npts, ndim)`` when ``dcf`` is given).
        ksp: ``nvol * ncoil * npts`` complex values, e.g. ``(nvol, ncoil, nreadouts, ns)`` or
            ``(nvol * ncoil, npts)``, volume-major.
        shape: the image grid.
        nvol: volumes (echoes) in ``ksp``; the first is used.
        ncoil: coils.
        radius: the low-resolution radius, cycles per FOV.
        threads: finufft threads.
        dcf: weights of the samples (``npts`` values); None: :func:`analytic_dcf` of the kind that
            ``coord`` looks like (2D, stack of stars with integer partitions, or 3D).

    Returns:
        ``(ncoil, *shape)`` complex64 maps of unit root sum of squares (where there is signal).
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if not radius > 0:
        raise ReconError(f"the low-resolution radius must be positive, got {radius}")
    if coord.shape[-1] != ndim:
        raise ReconError(f"coord has {coord.shape[-1]} columns for a {ndim}D grid {shape}")
    xp = sp.get_array_module(ksp)
    if dcf is None:
        dcf = analytic_dcf(coord, trajectory_kind(np.asarray(sp.to_device(coord, sp.cpu_device))))
    flat = xp.asarray(coord).reshape(-1, ndim)
    npts = flat.shape[0]
    if ksp.size != nvol * ncoil * npts:
        raise ReconError(f"ksp has {ksp.size} values, not nvol * ncoil * npts = {nvol} * {ncoil} * {npts}")
    y = ksp.reshape(nvol, ncoil, npts)[0]
    r = xp.sqrt(xp.sum(flat.astype(np.float32) ** 2, axis=-1))
    keep = r < radius
    if int(keep.sum()) == 0:
        raise ReconError(f"no samples within the low-resolution radius {radius}")
    taper = 0.5 * (1 + xp.cos(np.pi * r[keep] / radius))
    w = xp.asarray(dcf, dtype=np.float32).reshape(-1)[keep] * taper
    small = tuple(min(n, 2 * math.ceil(radius) + 2) for n in shape)
    plan = NufftPlan(flat[keep], small, n_trans=ncoil, eps=1e-4, threads=threads)
    img = plan.adjoint(y[:, keep] * w[None].astype(np.complex64))
    axes = tuple(range(-ndim, 0))
    img = fft.ifft(sp.resize(fft.fft(img, axes=axes), (ncoil, *shape)), axes=axes)
    mag = sos(img, axis=0)
    floor = 1e-6 * float(mag.max()) if mag.size else 0.0
    return (img / (mag + floor + 1e-30)[None]).astype(np.complex64)


# ------------------------------------------------------------------------------------ reconstruction


@dataclass(frozen=True)
class RadialOptions:
    """Options of :func:`reconstruct`.

    Attributes:
        dcf: ``"analytic"`` (:func:`analytic_dcf`) or ``"pipe"`` (:func:`pipe_menon_dcf`).
        niter: CG iterations (0: gridding only).
        combine: ``"sos"`` (root sum of squares of the coil images) or ``"maps"`` (low-resolution
            maps, :func:`lowres_maps`; the images are ``|x|``).
        lamda: CG's Tikhonov weight (relative, see :func:`cg`).
        eps: NUFFT tolerance. 1e-4 keeps the transforms within about 1e-4 relative (well under
            1e-3) and is 1.25 times faster than 1e-6 on a 64^3 kooshball.
        lowres: the maps' low-resolution radius, cycles per FOV.
        toeplitz: CG's normal operator by Toeplitz embedding (faster) rather than NUFFT pairs.
    """

    dcf: str = "analytic"
    niter: int = 0
    combine: str = "sos"
    lamda: float = 0.0
    eps: float = 1e-4
    lowres: float = 12.0
    toeplitz: bool = True

    def validate(self) -> None:
        """Raises ReconError naming the first option with a bad value."""
        if self.dcf not in ("analytic", "pipe"):
            raise ReconError(f"radial dcf must be 'analytic' or 'pipe', got {self.dcf!r}")
        if self.combine not in ("sos", "maps"):
            raise ReconError(f"radial combine must be 'sos' or 'maps', got {self.combine!r}")
        if isinstance(self.niter, bool) or not isinstance(self.niter, int | np.integer) or self.niter < 0:
            raise ReconError(f"radial niter must be a whole number >= 0, got {self.niter!r}")
        if not (isinstance(self.lamda, int | float) and math.isfinite(self.lamda) and self.lamda >= 0):
            raise ReconError(f"radial lamda must be a finite number >= 0, got {self.lamda!r}")
        if not (isinstance(self.eps, int | float) and 1e-15 < self.eps <= 1e-2):
            raise ReconError(f"radial eps (NUFFT tolerance) must be within 1e-15 .. 1e-2, got {self.eps!r}")
        if not (isinstance(self.lowres, int | float) and self.lowres > 0):
            raise ReconError(f"radial lowres (maps radius, cycles per FOV) must be positive, got {self.lowres!r}")


def inside_grid(coord, shape: Sequence[int]):
    """Boolean mask ``coord.shape[:-1]``: the samples within ``-N/2 .. N/2`` on every axis of ``shape``."""
    xp = sp.get_array_module(coord)
    half = xp.asarray(np.asarray(shape, dtype=np.float32) / 2)
    return xp.all(xp.abs(coord) <= half, axis=-1)


def reconstruct(coord, ksp, shape: Sequence[int], kind: str, options: RadialOptions | None = None,
                threads: int | None = None):
    """Radial images of every volume from one trajectory: gridding, optionally CG, coil combination.

    One :class:`NufftPlan` of ``nvol * ncoil`` transforms serves every forward and adjoint.
    Samples outside the grid (``|k| > N/2`` on an axis: a grid coarser than the encoding) are
    dropped, with a debug log. The DCF is computed on the whole trajectory (analytic) or on the
    kept samples (Pipe-Menon).

    Args:
        coord: ``(nreadouts, ns, ndim)`` cycles per FOV, image-axis column order; numpy or cupy.
        ksp: ``(nvol, ncoil, nreadouts, ns)`` complex64 (``nvol``: echoes sharing this trajectory).
        shape: the image grid, ``(ny, nx)`` or ``(nz, ny, nx)``.
        kind: the trajectory for the analytic DCF: ``"2d"``, ``"3d"`` or ``"stack"``.
        options: :class:`RadialOptions` (None: the defaults).
        threads: host threads for finufft and the FFTs (None: all cores).

    Returns:
        ``(nvol, *shape)`` float32 magnitudes, on the device of ``ksp``.

    Raises:
        ReconError: a bad option, kind or shape (the message names it), or no sample on the grid.
    """
    options = options or RadialOptions()
    options.validate()
    if kind not in KINDS:
        raise ReconError(f"unknown radial kind {kind!r}: expected one of {', '.join(KINDS)}")
    shape = tuple(int(n) for n in shape)
    xp = sp.get_array_module(ksp)
    if coord.ndim != 3 or coord.shape[-1] != len(shape):
        raise ReconError(f"coord must be (nreadouts, ns, {len(shape)}) for the grid {shape}, got {tuple(coord.shape)}")
    if ksp.ndim != 4 or tuple(ksp.shape[2:]) != tuple(coord.shape[:2]):
        raise ReconError(f"ksp must be (nvol, ncoil, {coord.shape[0]}, {coord.shape[1]}), got {tuple(ksp.shape)}")
    nvol, ncoil = int(ksp.shape[0]), int(ksp.shape[1])
    coord = xp.asarray(sp.to_device(coord, sp.get_device(ksp)), dtype=np.float32)
    dcf = analytic_dcf(coord, kind).reshape(-1) if options.dcf == "analytic" else None
    flat = coord.reshape(-1, len(shape))
    keep = inside_grid(flat, shape)
    dropped = int(flat.shape[0] - keep.sum())
    data = ksp.reshape(nvol * ncoil, -1)
    if dropped:
        logger.debug("radial: %d of %d samples lie outside the %s grid and are dropped", dropped, flat.shape[0], shape)
        if dropped == flat.shape[0]:
            raise ReconError(f"no sample of the trajectory lies within the grid {shape}")
        flat, data = flat[keep], data[:, keep]
        dcf = dcf[keep] if dcf is not None else None
    data = xp.ascontiguousarray(data, dtype=np.complex64)
    if dcf is None:
        dcf = pipe_menon_dcf(flat, shape, threads=threads)
    plan = NufftPlan(flat, shape, n_trans=nvol * ncoil, eps=options.eps, threads=threads)
    toeplitz = (ToeplitzKernel(flat, shape, dcf, eps=options.eps, threads=threads)
                if options.niter > 0 and options.toeplitz else None)
    if options.combine == "maps":
        maps = lowres_maps(flat, data, shape, nvol, ncoil, radius=options.lowres, threads=threads, dcf=dcf)
        x = cg(plan, data, dcf, options.niter, maps=maps, lamda=options.lamda, toeplitz=toeplitz)
        return xp.abs(x).astype(np.float32)
    x = cg(plan, data, dcf, options.niter, lamda=options.lamda, toeplitz=toeplitz)
    return sos(x.reshape((nvol, ncoil, *shape)), axis=1).astype(np.float32)
