"""The NUFFT adapter: finufft plans (cufinufft on cupy arrays) for one trajectory, every coil at once.

A :class:`NufftPlan` is made once per trajectory: the non-uniform points are set once, and each call
transforms ``n_trans`` images (every coil and echo) together. ``forward`` is the type-2 NUFFT (grid to
non-uniform points), ``adjoint`` the type-1 (non-uniform points to grid, "gridding"); ``adjoint`` is
the exact adjoint of ``forward``, to the NUFFT's tolerance.

Conventions:
    ``coord``: ``(npts, ndim)`` real, in cycles per field of view (BART's and sigpy's units), each
    within ``-N/2 .. N/2`` of its axis; column ``d`` goes with image axis ``d``.
    The image is centred: pixel ``N // 2`` of each axis is the origin. The transforms are
    unnormalised, as the non-uniform DFT they approximate::

        forward:  y[j] = sum_x img[x] exp(-2 pi i k_j . (x - N//2) / N)
        adjoint:  img[x] = sum_j y[j] exp(+2 pi i k_j . (x - N//2) / N)

    so ``adjoint(forward(img))`` is not ``img`` (no density compensation, no 1/npts).

References:
    Barnett AH, Magland J, af Klinteberg L. A parallel nonuniform fast Fourier transform library
    based on an "exponential of semicircle" kernel. SIAM J Sci Comput 2019;41(5):C479-C504.
    Shih Y, Wright G, Anden J, Blaschke J, Barnett AH. cuFINUFFT: a load-balanced GPU library for
    general-purpose nonuniform FFTs. IEEE IPDPSW 2021, pp. 688-697.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import sigpy as sp

from reconq.recon.errors import ReconError

logger = logging.getLogger(__name__)

_REAL = {np.dtype(np.complex64): np.float32, np.dtype(np.complex128): np.float64}


def _radians(coord, shape: tuple[int, ...], real_dtype) -> list:
    """Coordinates in cycles per FOV, checked against the grid, as one contiguous radian array per axis."""
    xp = sp.get_array_module(coord)
    if coord.ndim != 2 or coord.shape[1] != len(shape):
        raise ReconError(f"coord must be (npts, {len(shape)}) for a {len(shape)}D grid, got {tuple(coord.shape)}")
    if not xp.isrealobj(coord):
        raise ReconError(f"coord must be real (cycles per FOV), got {coord.dtype}")
    axes = []
    for d, n in enumerate(shape):
        k = coord[:, d]
        worst = float(xp.abs(k).max()) if k.size else 0.0
        if not np.isfinite(worst) or worst > n / 2:
            bad = float(k[int(xp.argmax(xp.abs(k)))]) if np.isfinite(worst) else worst
            raise ReconError(f"coord axis {d} holds {bad:g}, outside the grid's -{n / 2:g}..{n / 2:g} "
                             f"(cycles per FOV, {n} pixels)")
        axes.append(xp.ascontiguousarray((2 * np.pi / n) * k, dtype=real_dtype))
    return axes


def _library(xp):
    """finufft for numpy arrays, cufinufft for cupy ones (None where it is not installed)."""
    if xp is np:
        import finufft

        return finufft
    try:
        import cufinufft
    except ImportError:
        return None
    return cufinufft


class NufftPlan:
    """Forward (type 2) and adjoint (type 1) NUFFTs for one trajectory and ``n_trans`` images at once.

    Args:
        coord: ``(npts, ndim)`` float, cycles per FOV within ``-N/2 .. N/2``; numpy or cupy. On cupy the
            plans are cufinufft's (device arrays in and out); where cufinufft is not installed they are
            finufft's on the host, arrays copied to and fro, and a warning says so.
        shape: the image grid, ``(ny, nx)`` or ``(nz, ny, nx)``.
        n_trans: how many images each call transforms (coils times echoes).
        eps: the NUFFT's requested relative tolerance.
        dtype: ``complex64`` or ``complex128``; inputs are cast to it.
        threads: host threads for finufft (None: finufft's default, all cores); ignored on the GPU.

    Raises:
        ReconError: a coordinate outside the grid (the message names the axis and the value), a shape
            that is not 2D or 3D, or an unsupported dtype.
    """

    def __init__(self, coord, shape: Sequence[int], n_trans: int = 1, eps: float = 1e-6,
                 dtype=np.complex64, threads: int | None = None):
        self.shape = tuple(int(n) for n in shape)
        self.n_trans = int(n_trans)
        self.dtype = np.dtype(dtype)
        if len(self.shape) not in (2, 3) or min(self.shape) < 1:
            raise ReconError(f"a NUFFT grid must be 2D or 3D with positive sizes, got {self.shape}")
        if self.dtype not in _REAL:
            raise ReconError(f"NUFFT dtype must be complex64 or complex128, got {self.dtype}")
        if self.n_trans < 1:
            raise ReconError(f"n_trans must be at least 1, got {self.n_trans}")
        self._xp = sp.get_array_module(coord)
        lib = _library(self._xp)
        if lib is None:
            logger.warning("cufinufft is not installed: NUFFTs of device arrays run on the host")
            coord, lib = sp.to_device(coord, sp.cpu_device), _library(np)
        self._host = lib.__name__ == "finufft"
        self._device = sp.cpu_device if self._host else sp.get_device(coord)
        points = _radians(coord, self.shape, _REAL[self.dtype])
        self.npts = int(points[0].shape[0])
        options = {"modeord": 0}
        if self._host and threads is not None:
            options["nthreads"] = int(threads)
        # finufft's default signs are the ones above: type 2 exp(-i k.x), type 1 exp(+i k.x)
        self._forward = lib.Plan(2, self.shape, self.n_trans, eps, isign=-1, dtype=self.dtype.name, **options)
        self._adjoint = lib.Plan(1, self.shape, self.n_trans, eps, isign=+1, dtype=self.dtype.name, **options)
        self._forward.setpts(*points)
        self._adjoint.setpts(*points)

    def _run(self, plan, x, expected: tuple[int, ...], out_shape: tuple[int, ...], what: str):
        if tuple(x.shape) != expected:
            raise ReconError(f"NUFFT {what} expects {expected}, got {tuple(x.shape)}")
        data = sp.to_device(x, self._device)
        data = sp.get_array_module(data).ascontiguousarray(data, dtype=self.dtype)
        return sp.to_device(plan.execute(data).reshape(out_shape), sp.get_device(x))

    def forward(self, img):
        """The type-2 NUFFT, grid to points: ``img (n_trans, *shape)`` to ``(n_trans, npts)``, dtype of the plan."""
        return self._run(self._forward, img, (self.n_trans, *self.shape), (self.n_trans, self.npts), "forward")

    def adjoint(self, ksp):
        """The type-1 NUFFT, points to grid: ``ksp (n_trans, npts)`` to ``(n_trans, *shape)``; forward's adjoint."""
        return self._run(self._adjoint, ksp, (self.n_trans, self.npts), (self.n_trans, *self.shape), "adjoint")
