"""The SENSE reconstruction of one scan: pre-processing, coil maps, SENSE, partial Fourier, recon space.

One :func:`sense_volume` per volume: noise pre-whitening, readout transform with oversampling
removed, coil maps (ESPIRiT or Walsh from the scan's calibration lines, ESPIRiT in hybrid space
for 3D scans, or resampled from a reference scan), SENSE over readout columns in batches, POCS
for partial Fourier and asymmetric echoes on the combined image, and the crop to the header's
recon space.

References:
    Pruessmann KP et al. SENSE: sensitivity encoding for fast MRI. Magn Reson Med 1999;42:952-962.
    Uecker M et al. ESPIRiT. Magn Reson Med 2014;71:990-1001.
    Haacke EM et al. Partial-Fourier POCS. J Magn Reson 1991;92:126-145.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import ismrmrd.xsd as xsd
import numpy as np
import sigpy as sp

from reconq.recon import fft
from reconq.recon.coilmaps import GridMaps, espirit_maps, lowres_shape, walsh_calibration_maps
from reconq.recon.errors import ReconError
from reconq.recon.geometry import Grid
from reconq.recon.kspace import CartesianEncoding, KspaceBuffer, VolumeKey, kspace_matrix, partial_fourier_extents
from reconq.recon.noise import noise_covariance, prewhiten, whitening_matrix
from reconq.recon.partialfourier import Extents, pocs_image
from reconq.recon.sense import sense_columns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenseOptions:
    """Parameters of a SENSE reconstruction.

    Attributes:
        maps: ``"espirit"`` or ``"walsh"`` (from calibration lines; ignored with a reference).
        method: ``"auto"``, ``"unfold"`` or ``"cg"``.
        lamda: Tikhonov weight relative to the largest ``sum_c |S_c|^2``.
        niter: CG iterations.
        batch: readout columns solved together.
        lowres: coarse-grid points per axis for the maps.
        prewhiten: use the scan's noise readouts, when there are any.
    """

    maps: str = "espirit"
    method: str = "auto"
    lamda: float = 1e-4
    niter: int = 20
    batch: int = 32
    lowres: int = 48
    prewhiten: bool = True


def acceleration(header: xsd.ismrmrdHeader, sampled: np.ndarray) -> tuple[int, int]:
    """``(Ry, Rz)`` from the header's ``parallelImaging``, else from the commonest gap between lines."""
    pi = header.encoding[0].parallelImaging if header.encoding else None
    factor = pi.accelerationFactor if pi is not None else None
    if factor is not None:
        return int(factor.kspace_encoding_step_1 or 1), int(factor.kspace_encoding_step_2 or 1)
    return _gap(np.asarray(sampled.any(axis=0))), _gap(np.asarray(sampled.any(axis=1)))


def _gap(lines: np.ndarray) -> int:
    gaps = np.diff(np.flatnonzero(lines))
    return int(Counter(gaps.tolist()).most_common(1)[0][0]) if gaps.size else 1


def calibration_width(calib_lines: np.ndarray) -> int:
    """Width of the contiguous block of lines around the centre of each axis of ``(nz, ny)``; the smaller."""
    widths = []
    for lines in (np.asarray(calib_lines.any(axis=1)), np.asarray(calib_lines.any(axis=0))):
        n = len(lines)
        if n == 1:
            continue
        lo = hi = n // 2
        if not lines[lo]:
            return 0
        while lo > 0 and lines[lo - 1]:
            lo -= 1
        while hi < n - 1 and lines[hi + 1]:
            hi += 1
        widths.append(hi - lo + 1)
    return min(widths)


class NoiseSource(Protocol):
    """What holds a scan's noise readouts: a :class:`KspaceBuffer`, or radial data."""

    noise_dwell_us: float | None
    dwell_us: float | None

    def noise_samples(self) -> np.ndarray | None: ...


def whitener(buffer: NoiseSource) -> np.ndarray | None:
    """The whitening matrix of the noise readouts, or None without any."""
    noise = buffer.noise_samples()
    if noise is None:
        return None
    return whitening_matrix(noise_covariance(noise), buffer.noise_dwell_us, buffer.dwell_us)


def solve_grid(head: np.void, enc: CartesianEncoding) -> Grid:
    """The grid SENSE solves on: encoded y and z, readout at the recon pixel size and FOV."""
    nx_r = enc.recon_matrix[0]
    nz = enc.enc_matrix[2] if enc.is3d else 1
    dz = enc.enc_fov[2] / nz
    return Grid.make(head["position"], [head["read_dir"], head["phase_dir"], head["slice_dir"]],
                     (enc.recon_fov[0] / nx_r, enc.enc_fov[1] / enc.enc_matrix[1], dz),
                     (nz, enc.enc_matrix[1], nx_r))


def readout_transform(ksp, enc: CartesianEncoding):
    """Inverse FFT along the readout, oversampling cropped: ``(ncoil, nz, ny, nx_enc)`` -> ``(..., nx_recon)``."""
    nkx = kspace_matrix(enc)[2]
    ksp = sp.resize(ksp, ksp.shape[:-1] + (nkx,))
    return sp.resize(fft.ifft(ksp, axes=(-1,)), ksp.shape[:-1] + (enc.recon_matrix[0],))


def calibration_maps(calib, grid: Grid, enc: CartesianEncoding, opts: SenseOptions,
                     espirit: str = "auto") -> GridMaps:
    """Maps from calibration k-space ``(ncoil, nz, ny, nx_enc)`` (pre-whitened) on the grid ``grid``.

    Only the central ``opts.lowres`` lines in y and z reach the coarse grid, so the rest is dropped
    before the readout transform. ESPIRiT runs as ``espirit`` says (see
    :func:`reconq.recon.coilmaps.espirit_maps`: by default in hybrid space for 3D scans, sigpy's for 2D).
    """
    sampled = np.asarray(sp.to_device(sp.get_array_module(calib).abs(calib).sum(axis=(0, 3)) > 0))
    width = calibration_width(sampled)
    if width < 8:
        raise ReconError(f"{width} calibration lines: too few for coil maps; add calibration lines or "
                         "name a reference scan")
    xp = sp.get_array_module(calib)
    lines = lowres_shape(sampled.shape, opts.lowres)
    calib = sp.resize(calib, calib.shape[:1] + lines + calib.shape[3:])
    hybrid = readout_transform(calib, enc)  # maps over the recon readout FOV
    calib = fft.fft(hybrid, axes=(-1,))
    if opts.maps == "espirit":
        mps = espirit_maps(calib, width, opts.lowres, method=espirit)
    elif opts.maps == "walsh":
        block = sp.resize(_block(sampled, width), lines)
        mps = walsh_calibration_maps(calib * xp.asarray(block)[None, :, :, None], opts.lowres)
    else:
        raise ReconError(f"maps={opts.maps!r}: must be 'espirit' or 'walsh'")
    shape = mps.shape[1:]
    spacing = grid.spacing * np.asarray(grid.shape[::-1]) / np.asarray(shape[::-1])
    return GridMaps(mps, Grid.make(grid.centre, grid.dirs, spacing, shape), grid, wrap=True)


def _block(sampled: np.ndarray, width: int) -> np.ndarray:
    """The central ``width`` block of lines (others zeroed), ``(nz, ny)`` float32."""
    out = np.zeros(sampled.shape, dtype=np.float32)
    sl = [slice(n // 2 - width // 2, n // 2 - width // 2 + width) if n > 1 else slice(None) for n in sampled.shape]
    out[tuple(sl)] = 1
    return out


def image_extents(extents: Extents, enc: CartesianEncoding) -> Extents:
    """Partial-Fourier extents on the k-space grid of the SENSE image (readout at the recon FOV)."""
    out = {axis: e for axis, e in extents.items() if axis != -1}
    if -1 in extents:
        n_enc, n_r, nkx = enc.enc_matrix[0], enc.recon_matrix[0], kspace_matrix(enc)[2]
        lo, hi = ((k - n_enc // 2) * n_r / nkx + n_r // 2 for k in (extents[-1][0], extents[-1][1] - 1))
        out[-1] = (int(np.ceil(lo)), int(np.floor(hi)) + 1)
    return out


def to_recon_space(img, enc: CartesianEncoding):
    """Resample ``(nz, ny_enc, nx)`` to the recon pixel size in y and z and crop to the recon matrix."""
    nz_k, ny_k, _ = kspace_matrix(enc)
    if (nz_k, ny_k) != img.shape[:2]:
        axes = (-3, -2) if enc.is3d else (-2,)
        k = sp.resize(fft.fft(img, axes=axes), (nz_k, ny_k, img.shape[2]))
        img = fft.ifft(k, axes=axes)
    nx, ny, nz = enc.recon_matrix
    return sp.resize(img, (nz if enc.is3d else 1, ny, nx))


def volume_maps(buffer: KspaceBuffer, key: VolumeKey, ksp, grid: Grid, opts: SenseOptions,
                device: sp.Device = sp.cpu_device, reference=None, w: np.ndarray | None = None) -> GridMaps:
    """The coil maps of one volume on ``grid``: a reference scan's ``(mps, grid)`` resampled, else from
    the volume's calibration lines (or, without any, its own k-space ``ksp``), pre-whitened by ``w``."""
    if reference is not None:
        mps, ref_grid = reference
        return GridMaps(sp.to_device(mps, device), ref_grid, grid, wrap=False)
    calib = buffer.calibration(key)
    calib = ksp if calib is None else sp.to_device(calib, device)
    if calib is not ksp and w is not None:
        calib = prewhiten(calib, w)
    return calibration_maps(calib, grid, buffer.enc, opts)


def sense_volume(buffer: KspaceBuffer, key: VolumeKey, header: xsd.ismrmrdHeader, opts: SenseOptions,
                 device: sp.Device = sp.cpu_device, reference=None, w: np.ndarray | None = None):
    """SENSE reconstruction of one volume of a buffered scan.

    Args:
        buffer: the scan's readouts.
        key: the volume.
        header: the scan's header (acceleration).
        opts: the options.
        device: where to compute.
        reference: ``(mps, grid)`` maps of a reference scan on its own grid (``(ncoil, nz, ny, nx)``),
            or None for maps from the calibration lines.
        w: whitening matrix, or None.

    Returns:
        ``(nz, ny, nx)`` complex64 image in the recon matrix (``nz`` 1 for 2D), on ``device``.
    """
    enc = buffer.enc
    sampled = buffer.sampled(key)
    accel = acceleration(header, sampled)
    grid = solve_grid(buffer.centre_head(key), enc)
    with device:
        ksp = sp.to_device(buffer.kspace(key), device)
        if w is not None:
            ksp = prewhiten(ksp, w)
        maps = volume_maps(buffer, key, ksp, grid, opts, device, reference, w)
        hybrid = readout_transform(ksp, enc)
        del ksp
        img = sense_columns(hybrid, maps.batch, sampled, accel, opts.method, opts.lamda, opts.niter, opts.batch)
        extents = image_extents(partial_fourier_extents(buffer, key, accel), enc)
        if extents:
            img = pocs_image(img, extents, axes=(-3, -2, -1) if enc.is3d else (-2, -1))
        return to_recon_space(img, enc)


def reference_maps(buffer: KspaceBuffer, header: xsd.ismrmrdHeader, opts: SenseOptions,
                   w: np.ndarray | None = None) -> tuple[np.ndarray, Grid]:
    """Coil maps of a fully sampled reference scan, on a coarse grid of its own geometry.

    A 2D multi-slice reference becomes one volume: its slices must be parallel and equally spaced.

    Returns:
        ``(mps (ncoil, nz, ny, nx) complex64, grid)``.
    """
    enc = buffer.enc
    keys = [k for k in buffer.volume_keys() if k[1:] == buffer.volume_keys()[0][1:]]
    maps, grids = [], []
    for key in keys:
        ksp = buffer.kspace(key)
        if w is not None:
            ksp = prewhiten(ksp, w)
        grid = solve_grid(buffer.centre_head(key), enc)
        hybrid = readout_transform(ksp, enc)
        calib = fft.fft(hybrid, axes=(-1,))
        width = min(n for n in calib.shape[1:] if n > 1)
        mps = espirit_maps(calib, min(width, 24), opts.lowres, crop=0.0) if opts.maps == "espirit" \
            else walsh_calibration_maps(calib, opts.lowres)
        shape = mps.shape[1:]
        spacing = grid.spacing * np.asarray(grid.shape[::-1]) / np.asarray(shape[::-1])
        maps.append(mps)
        grids.append(Grid.make(grid.centre, grid.dirs, spacing, shape))
    if len(maps) == 1:
        return maps[0], grids[0]
    return _stack_slices(maps, grids)


def _stack_slices(maps: list[np.ndarray], grids: list[Grid]) -> tuple[np.ndarray, Grid]:
    normal = grids[0].dirs[2]
    depth = np.array([g.centre @ normal for g in grids])
    order = np.argsort(depth)
    steps = np.diff(depth[order])
    if not np.allclose(steps, steps[0], rtol=1e-3) or steps[0] <= 0:
        raise ReconError("reference slices are not equally spaced: cannot form a volume")
    for g in grids:
        if not np.allclose(g.dirs, grids[0].dirs, atol=1e-5):
            raise ReconError("reference slices are not parallel: cannot form a volume")
    mps = np.concatenate([maps[i] for i in order], axis=1)
    centre = grids[order[len(order) // 2]].centre
    spacing = np.array([grids[0].spacing[0], grids[0].spacing[1], steps[0]])
    return mps, Grid.make(centre, grids[0].dirs, spacing, mps.shape[1:])
