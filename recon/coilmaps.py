"""Coil sensitivity maps: ESPIRiT or Walsh from calibration lines, or from a reference scan.

Maps are smooth, so they are estimated on a coarse grid (the calibration region zero-padded to
``lowres`` points per axis over the encoded FOV) and interpolated, a batch of readout columns at a
time, onto the grid SENSE solves on (:class:`GridMaps`). A reference scan's maps are resampled the
same way, from its own voxel grid (another orientation, resolution or FOV) into the target's, by
the patient coordinates of the headers' positions and directions.

References:
    Uecker M et al. ESPIRiT: an eigenvalue approach to autocalibrating parallel MRI: where SENSE
    meets GRAPPA. Magn Reson Med 2014;71:990-1001 (``sigpy.mri.app.EspiritCalib``).
    Walsh DO, Gmitro AF, Marcellin MW. Adaptive reconstruction of phased array MR imagery.
    Magn Reson Med 2000;43:682-690.
    Pruessmann KP et al. SENSE: sensitivity encoding for fast MRI. Magn Reson Med 1999;42:952-962
    (maps from a separate reference scan).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sigpy as sp
import sigpy.mri

from reconq.recon import fft
from reconq.recon.errors import ReconError
from reconq.recon.geometry import Grid


def lowres_shape(shape: Sequence[int], lowres: int) -> tuple[int, ...]:
    """The coarse grid: ``min(n, lowres)`` per axis."""
    return tuple(min(int(n), lowres) for n in shape)


def espirit_maps(calib, calib_width: int, lowres: int = 48, thresh: float = 0.02, kernel_width: int | None = None,
                 crop: float = 0.8, max_iter: int = 30):
    """ESPIRiT maps (the first eigenvector set) on a coarse grid.

    Args:
        calib: ``(ncoil, *shape)`` complex64 k-space with the calibration region filled (1 to 3
            spatial axes; a 2D scan's ``nz = 1`` axis may be present and is kept).
        calib_width: calibration region width (the smallest of the fully sampled extents).
        lowres: coarse grid points per axis.
        thresh, kernel_width, crop, max_iter: as ``sigpy.mri.app.EspiritCalib``; the kernel is 6
            wide in 2D and 4 in 3D (the calibration matrix has ``kernel_width ** ndim`` columns per coil).

    Returns:
        ``(ncoil, *coarse shape)`` complex64 maps (zero where the eigenvalue is below ``crop``).
    """
    ncoil, shape = calib.shape[0], calib.shape[1:]
    keep = [i for i, n in enumerate(shape) if n > 1]
    small = sp.resize(calib.reshape((ncoil,) + tuple(shape[i] for i in keep)),
                      (ncoil,) + lowres_shape([shape[i] for i in keep], lowres))
    width = min([calib_width, *small.shape[1:]])
    kernel_width = kernel_width or (6 if len(keep) < 3 else 4)
    if width < kernel_width + 2:
        raise ReconError(f"{calib_width} calibration lines are too few for ESPIRiT (kernel {kernel_width})")
    mps = sigpy.mri.app.EspiritCalib(small, calib_width=width, thresh=thresh, kernel_width=kernel_width,
                                     crop=crop, max_iter=max_iter, device=sp.get_device(calib),
                                     show_pbar=False).run()
    return mps.reshape((ncoil,) + tuple(small.shape[1 + keep.index(i)] if i in keep else 1
                                        for i in range(len(shape))))


def walsh_maps(coil_img, kernel: int = 5, niter: int = 8):
    """Adaptive-combination (Walsh) maps: the dominant eigenvector of the local coil correlation.

    Args:
        coil_img: ``(ncoil, *shape)`` complex64 coil images (pre-whitened), numpy or cupy.
        kernel: side of the box over which the correlation ``x x^H`` is averaged.
        niter: power iterations.

    Returns:
        ``(ncoil, *shape)`` complex64 maps of unit norm per voxel, phase relative to the strongest coil.
    """
    xp = sp.get_array_module(coil_img)
    ncoil = coil_img.shape[0]
    corr = coil_img[:, None] * xp.conj(coil_img[None])  # (ncoil, ncoil, *shape)
    for axis in range(2, corr.ndim):
        corr = _box(corr, axis, kernel)
    v = xp.ones(coil_img.shape, dtype=coil_img.dtype)
    for _ in range(niter):
        v = xp.einsum("cd...,d...->c...", corr, v)
        v /= xp.sqrt(xp.sum(xp.abs(v) ** 2, axis=0)) + 1e-30
    ref = int(xp.argmax(xp.sum(xp.abs(coil_img) ** 2, axis=tuple(range(1, coil_img.ndim)))))
    v *= xp.conj(v[ref]) / (xp.abs(v[ref]) + 1e-30)
    return v.reshape((ncoil,) + coil_img.shape[1:]).astype(coil_img.dtype)


def _box(x, axis: int, width: int):
    """Moving average of ``width`` along ``axis`` (periodic), by cumulative sums."""
    xp = sp.get_array_module(x)
    n = x.shape[axis]
    if n == 1 or width <= 1:
        return x
    width = min(width, n)
    lo = width // 2
    padded = xp.concatenate([xp.take(x, xp.arange(n - lo, n), axis=axis), x,
                             xp.take(x, xp.arange(0, width - lo), axis=axis)], axis=axis)
    c = xp.cumsum(padded, axis=axis)
    upper = xp.take(c, xp.arange(width, width + n), axis=axis)
    lower = xp.take(c, xp.arange(0, n), axis=axis)
    return (upper - lower) / width


def walsh_calibration_maps(calib, lowres: int = 48, kernel: int = 5):
    """Walsh maps on the coarse grid from calibration k-space ``(ncoil, *shape)``; see :func:`espirit_maps`."""
    ncoil, shape = calib.shape[0], calib.shape[1:]
    small = sp.resize(calib, (ncoil,) + lowres_shape(shape, lowres))
    axes = tuple(range(-len(shape), 0))
    return walsh_maps(fft.ifft(small * _hann(small.shape[1:], sp.get_array_module(calib)), axes=axes), kernel)


def _hann(shape, xp):
    window = 1.0
    for i, n in enumerate(shape):
        view = [1] * len(shape)
        view[i] = n
        window = window * xp.asarray(np.hanning(n + 2)[1:-1].reshape(view) if n > 1 else np.ones(view))
    return window.astype(np.float32)


class GridMaps:
    """Coil maps on a source grid, served on a target grid a batch of readout columns at a time.

    Args:
        mps: ``(ncoil, nz, ny, nx)`` complex64 maps on ``source`` (numpy or cupy).
        source: the maps' voxel grid.
        target: the grid SENSE solves on.
        wrap: interpolate periodically (maps on the same FOV from FFTs); otherwise (a reference
            scan's grid) the edge values extend outside the source grid.
    """

    def __init__(self, mps, source: Grid, target: Grid, wrap: bool = True):
        if mps.ndim != 4 or tuple(mps.shape[1:]) != source.shape:
            raise ReconError(f"maps {mps.shape} do not match their grid {source.shape}")
        self.mps, self.source, self.target, self.wrap = mps, source, target, wrap
        self.ncoil = mps.shape[0]
        self._aligned = (np.allclose(source.dirs, target.dirs, atol=1e-6)
                         and np.allclose(source.centre, target.centre, atol=1e-3))

    def batch(self, x_index: np.ndarray):
        """Maps at the target's readout columns ``x_index`` ``(B,)``: ``(ncoil, nz, ny, B)`` complex64."""
        if self._aligned:
            return self._separable(np.asarray(x_index))
        return self._general(np.asarray(x_index))

    def full(self):
        """All of the target grid: ``(ncoil, nz, ny, nx)`` complex64."""
        return self.batch(np.arange(self.target.shape[2]))

    def _separable(self, x_index: np.ndarray):
        out = self.mps
        for axis, (dst, spacing_d, spacing_s) in enumerate(zip(
                self.target.offsets(), self.target.spacing[::-1], self.source.spacing[::-1], strict=True)):
            if axis == 2:
                dst = dst[x_index]
            n_src = out.shape[1 + axis]
            frac = dst * spacing_d / spacing_s + n_src // 2
            out = _interp_axis(out, 1 + axis, frac, self.wrap)
        return out

    def _general(self, x_index: np.ndarray):
        from scipy import ndimage

        xp = sp.get_array_module(self.mps)
        coords = self.source.index_of(self.target.points(x_index))  # (nz, ny, B, 3)
        coords = np.moveaxis(coords, -1, 0)
        mode = "grid-wrap" if self.wrap else "nearest"
        mps = sp.to_device(self.mps, sp.cpu_device)
        out = np.stack([ndimage.map_coordinates(m.real, coords, order=1, mode=mode)
                        + 1j * ndimage.map_coordinates(m.imag, coords, order=1, mode=mode) for m in mps])
        return xp.asarray(out.astype(np.complex64))


def _interp_axis(a, axis: int, frac: np.ndarray, wrap: bool):
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``frac`` ``(m,)``."""
    xp = sp.get_array_module(a)
    n = a.shape[axis]
    if n == 1:
        return xp.repeat(a, len(frac), axis=axis)
    i0 = np.floor(frac).astype(np.int64)
    w = (frac - i0).astype(np.float32)
    if wrap:
        i1, i0 = (i0 + 1) % n, i0 % n
    else:
        i1, i0 = np.clip(i0 + 1, 0, n - 1), np.clip(i0, 0, n - 1)
    view = [1] * a.ndim
    view[axis] = len(frac)
    w = xp.asarray(w.reshape(view))
    return xp.take(a, xp.asarray(i0), axis=axis) * (1 - w) + xp.take(a, xp.asarray(i1), axis=axis) * w
