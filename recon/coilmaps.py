"""Coil sensitivity maps: ESPIRiT or Walsh from calibration lines, or from a reference scan.

Maps are smooth, so they are estimated on a coarse grid (the calibration region zero-padded to
``lowres`` points per axis over the encoded FOV) and interpolated, a batch of readout columns at a
time, onto the grid SENSE solves on (:class:`GridMaps`). A reference scan's maps are resampled the
same way, from its own voxel grid (another orientation, resolution or FOV) into the target's, by
the patient coordinates of the headers' positions and directions.

3D ESPIRiT runs in hybrid space (:func:`espirit_hybrid`), as BART's ``ecalib`` does: the kernels
come once from the 3D calibration region (an eigendecomposition of the calibration matrix's Gram
matrix, not an SVD of the matrix), their image-space operator is built from the kernels'
autocorrelation (``2 w - 1`` points per axis) transformed along the readout once, and the
per-voxel eigenproblems are solved a batch of readout positions at a time over (y, z). The maps
are those of ``sigpy.mri.app.EspiritCalib`` (the same kernels, operator and power iterations) at
a fraction of the cost; 1D and 2D maps are sigpy's.

References:
    Uecker M et al. ESPIRiT: an eigenvalue approach to autocalibrating parallel MRI: where SENSE
    meets GRAPPA. Magn Reson Med 2014;71:990-1001 (``sigpy.mri.app.EspiritCalib``; the hybrid-space
    eigenproblem per readout position, as in BART's ``ecalib``).
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
                 crop: float = 0.8, max_iter: int = 30, method: str = "auto"):
    """ESPIRiT maps (the first eigenvector set) on a coarse grid.

    Args:
        calib: ``(ncoil, *shape)`` complex64 k-space with the calibration region filled (1 to 3
            spatial axes; a 2D scan's ``nz = 1`` axis may be present and is kept).
        calib_width: calibration region width (the smallest of the fully sampled extents).
        lowres: coarse grid points per axis.
        thresh, kernel_width, crop, max_iter: as ``sigpy.mri.app.EspiritCalib``; the kernel is 6
            wide in 2D and 4 in 3D (the calibration matrix has ``kernel_width ** ndim`` columns per coil).
        method: ``"hybrid"`` (:func:`espirit_hybrid`: the kernels' image-space operator built from
            their correlations, a batch of readout positions at a time), ``"sigpy"``
            (``sigpy.mri.app.EspiritCalib``: an SVD of the calibration matrix and one FFT per
            kernel), or ``"auto"``: hybrid in 3D, sigpy in 1D and 2D.

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
    if method == "auto":
        method = "hybrid" if len(keep) == 3 else "sigpy"
    if method == "hybrid":
        mps = espirit_hybrid(small, width, thresh=thresh, kernel_width=kernel_width, crop=crop,
                             max_iter=max_iter)
    elif method == "sigpy":
        mps = sigpy.mri.app.EspiritCalib(small, calib_width=width, thresh=thresh, kernel_width=kernel_width,
                                         crop=crop, max_iter=max_iter, device=sp.get_device(calib),
                                         show_pbar=False).run()
    else:
        raise ReconError(f"ESPIRiT method {method!r}: must be 'auto', 'hybrid' or 'sigpy'")
    return mps.reshape((ncoil,) + tuple(small.shape[1 + keep.index(i)] if i in keep else 1
                                        for i in range(len(shape))))


def espirit_hybrid(ksp, calib_width: int, thresh: float = 0.02, kernel_width: int = 4, crop: float = 0.8,
                   max_iter: int = 30, batch_voxels: int = 1 << 15):
    """ESPIRiT maps on the grid of ``ksp``, the eigenproblem solved in hybrid space.

    The calibration kernels (the right singular vectors of the calibration matrix above
    ``thresh`` times the largest singular value) come from the eigendecomposition of the
    calibration matrix's Gram matrix (``ncoil * kernel_width ** ndim`` square). The image-space
    operator ``sum_k g_k g_k^H`` of the kernels (Uecker 2014) is the Fourier transform of
    the kernels' autocorrelation ``Q_cd(s) = sum_k sum_{p - q = s} v_k(c, p) conj(v_k(d, q))``,
    which has ``2 kernel_width - 1`` points per axis: it is transformed along the readout (last)
    axis once, then a batch of readout positions at a time over the other axes, and each voxel's
    ``ncoil x ncoil`` matrix gets the same power iterations as ``sigpy.mri.app.EspiritCalib``
    (phase relative to the first coil, zero where the eigenvalue is below ``crop``). The cost is
    one Gram matrix and one eigendecomposition of fixed size, ``ncoil ** 2`` FFTs of the grid,
    and ``max_iter`` ``ncoil x ncoil`` products per voxel, instead of an SVD of the calibration
    matrix and ``ncoil`` FFTs and outer products of the grid for each kernel.

    Args:
        ksp: ``(ncoil, *shape)`` complex64 k-space (1 to 3 spatial axes, each > 1), numpy or cupy;
            the maps are on the grid of ``shape``.
        calib_width: the central ``calib_width`` points per axis are the calibration region.
        thresh: kernels kept: singular values above ``thresh`` times the largest.
        kernel_width: kernel points per axis.
        crop: eigenvalue below which the maps are zero.
        max_iter: power iterations per voxel.
        batch_voxels: voxels whose matrices are formed together (memory: a few times ``8 ncoil ** 2``
            bytes each).

    Returns:
        ``(ncoil, *shape)`` complex64 maps.
    """
    xp = sp.get_array_module(ksp)
    ncoil, shape = ksp.shape[0], tuple(ksp.shape[1:])
    ndim = len(shape)
    if min(shape) < calib_width or calib_width < kernel_width:
        raise ReconError(f"a {calib_width}-point calibration region does not fit the grid {shape} "
                         f"or a {kernel_width}-point kernel")
    kernels = calibration_kernels(sp.resize(ksp, (ncoil,) + (calib_width,) * ndim), kernel_width, thresh)
    # P[(c, p), (d, q)] = sum_k v_k(c, p) conj(v_k(d, q)), rows of ``kernels`` being conj(v_k)
    proj = (kernels.T @ xp.conj(kernels)).reshape((ncoil,) + (kernel_width,) * ndim + (ncoil,)
                                                 + (kernel_width,) * ndim)
    corr = _correlation(proj, ncoil, kernel_width, ndim)
    # along the readout once: (ncoil, ncoil, *(2w - 1,) * (ndim - 1), nx)
    corr = fft.ifft(sp.resize(corr, corr.shape[:-1] + (shape[-1],)), axes=(-1,))
    scale = float(np.sqrt(np.prod(shape))) / kernel_width**ndim
    per_x = int(np.prod(shape[:-1]))
    step = max(1, batch_voxels // per_x)
    mps = xp.zeros((ncoil,) + shape, dtype=np.complex64)
    for x0 in range(0, shape[-1], step):
        xs = slice(x0, min(x0 + step, shape[-1]))
        block = corr[..., xs]
        if ndim > 1:
            block = fft.ifft(sp.resize(block, (ncoil, ncoil) + shape[:-1] + (block.shape[-1],)),
                             axes=tuple(range(-ndim, -1)))
        aha = xp.moveaxis(block.reshape(ncoil, ncoil, -1), -1, 0) * scale  # (nvox, ncoil, ncoil)
        vec = _power_maps(xp.ascontiguousarray(aha, dtype=np.complex64), max_iter, crop)
        mps[(slice(None),) * ndim + (xs,)] = vec.T.reshape((ncoil,) + shape[:-1] + (block.shape[-1],))
    return mps


def calibration_kernels(calib, kernel_width: int, thresh: float):
    """The ESPIRiT kernels of a calibration region: rows ``(nkernel, ncoil * kernel_width ** ndim)``.

    The rows are the conjugated right singular vectors of the calibration (block Hankel) matrix
    whose singular values exceed ``thresh`` times the largest, as ``V^H`` of its SVD, found from
    the eigenvectors of its Gram matrix (entries ordered coil first, then kernel position).

    Args:
        calib: ``(ncoil, *calibration shape)`` complex64 k-space, numpy or cupy.
        kernel_width: kernel points per axis.
        thresh: relative singular-value threshold.
    """
    xp = sp.get_array_module(calib)
    ncoil, shape = calib.shape[0], calib.shape[1:]
    blocks = tuple(n - kernel_width + 1 for n in shape)
    if min(blocks) < 1:
        raise ReconError(f"calibration region {tuple(shape)} is smaller than the {kernel_width}-point kernel")
    offsets = list(np.ndindex(*(kernel_width,) * len(shape)))
    mat = xp.empty((int(np.prod(blocks)), ncoil, len(offsets)), dtype=np.complex64)
    for j, p in enumerate(offsets):
        window = calib[(slice(None),) + tuple(slice(a, a + b) for a, b in zip(p, blocks, strict=True))]
        mat[:, :, j] = window.reshape(ncoil, -1).T
    eig, vec = _top_eigenvectors(mat.reshape(mat.shape[0], -1), thresh**2)
    return xp.conj(vec.T).astype(np.complex64)


def _top_eigenvectors(mat, rel: float):
    """Eigenpairs of ``mat^H mat`` with eigenvalues above ``rel`` times the largest, ascending.

    On the host the Gram matrix is one ``herk`` and the eigenproblem is solved for the kept
    eigenvalues alone (LAPACK ``heevr``), the bound from a Rayleigh quotient (at most the largest
    eigenvalue, so the kept set is complete) and applied exactly afterwards.
    """
    xp = sp.get_array_module(mat)
    if xp is not np:
        gram = (xp.conj(mat.T) @ mat).astype(np.complex128)
        eig, vec = xp.linalg.eigh((gram + xp.conj(gram.T)) / 2)
    else:
        import scipy.linalg

        upper = scipy.linalg.blas.cherk(1.0, np.asfortranarray(mat), trans=2, lower=0).astype(np.complex128)
        gram = np.triu(upper) + np.conj(np.triu(upper, 1).T)
        x = np.ones(gram.shape[0], dtype=np.complex128)
        for _ in range(20):
            x = gram @ x
            x /= np.linalg.norm(x)
        bound = rel * float(np.real(np.vdot(x, gram @ x)))
        eig, vec = scipy.linalg.eigh(gram, subset_by_value=(bound, np.inf), driver="evr")
    kept = eig > rel * eig[-1]
    return eig[kept], vec[:, kept]


def _correlation(proj, ncoil: int, width: int, ndim: int):
    """``Q[c, d, s] = sum_{p - q = s} P[c, p, d, q]``, ``s`` from ``-(width - 1)`` at index 0."""
    xp = sp.get_array_module(proj)
    out = xp.zeros((ncoil, ncoil) + (2 * width - 1,) * ndim, dtype=proj.dtype)
    flip = (Ellipsis,) + (slice(None, None, -1),) * ndim
    for p in np.ndindex(*(width,) * ndim):
        out[(slice(None), slice(None)) + tuple(slice(a, a + width) for a in p)] += proj[(slice(None),) + p][flip]
    return out


def _power_maps(aha, max_iter: int, crop: float):
    """Dominant eigenvectors of ``(nvox, ncoil, ncoil)`` Hermitian matrices: ``(nvox, ncoil)``.

    ``max_iter`` power iterations from all ones; phase relative to the first coil; zero where the
    eigenvalue is at most ``crop``.
    """
    xp = sp.get_array_module(aha)
    vec = xp.ones(aha.shape[:2] + (1,), dtype=aha.dtype)
    eig = xp.ones(aha.shape[:1] + (1, 1), dtype=np.float32)
    for _ in range(max_iter):
        vec = aha @ vec
        eig = xp.sqrt(xp.sum(xp.abs(vec) ** 2, axis=1, keepdims=True))
        vec /= xp.maximum(eig, np.finfo(np.float32).tiny)
    vec = vec[..., 0]
    ref = vec[:, :1]
    vec *= xp.conj(ref) / xp.maximum(xp.abs(ref), np.finfo(np.float32).tiny)
    return (vec * (eig[:, 0] > crop)).astype(np.complex64)


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
