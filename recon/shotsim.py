"""Synthetic multi-shot Cartesian scans of a phantom that moves rigidly between shots.

Each shot's lines are sampled from the analytic k-space of the phantom moved to that shot's position
(:meth:`reconq.recon.phantoms.Phantom.moved`: ellipsoids moved exactly, coils left in the scanner
frame), never through the motion model the ``alignsense`` pipeline solves with, so a test of the
pipeline checks it against motion it did not make. The readouts carry ``idx.segment`` (the shot) unless
asked not to, and the header the echo train length (lines per shot).

Orders of the phase-encode lines over the shots: ``interleaved`` (shot ``s`` takes every ``nshot``-th
line from line ``s``), ``random`` (a random partition, DISORDER-like), ``sequential`` (each shot one
contiguous block: motion between shots cannot be told from the image, so it cannot be corrected).

References:
    Cordero-Grande L et al. Motion-corrected MRI with DISORDER. Magn Reson Med 2020;84:713-726.
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421.
"""

from __future__ import annotations

from collections.abc import Sequence

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from reconq.recon.motion import rotation_matrix
from reconq.recon.phantoms import Phantom
from reconq.recon.simulate import SyntheticScan, _measurement_uid, scan_header  # noqa: PLC2701

ORDERS = ("interleaved", "random", "sequential")


def shot_lines(nlines: int, nshot: int, order: str, seed: int = 0) -> list[np.ndarray]:
    """The line indices ``0..nlines-1`` of each shot, in acquisition order within the shot."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    lines = np.arange(nlines)
    if order == "interleaved":
        return [lines[s::nshot] for s in range(nshot)]
    if order == "sequential":
        return list(np.array_split(lines, nshot))
    perm = np.random.default_rng(seed).permutation(nlines)
    return [np.sort(part) for part in np.array_split(perm, nshot)]


def moving_scan(
    phantom: Phantom,
    matrix: Sequence[int],
    motion: np.ndarray,
    order: str = "interleaved",
    fov_mm: Sequence[float] = (220.0, 220.0, 5.0),
    segments: bool = True,
    calibration: int = 24,
    calibration_motion: Sequence[float] | None = None,
    noise: float = 0.0,
    seed: int = 0,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    patient_id: str = "MOTION01",
    study_uid: str = "1.2.826.0.1.3680043.2.1125.3",
    protocol: str = "reconq_alignsense",
    measurement_id: str = "66001_1000001_1000002_301",
) -> SyntheticScan:
    """Simulate a fully sampled multi-shot Cartesian scan with rigid motion per shot.

    Args:
        phantom: a 2D or 3D phantom (:mod:`reconq.recon.phantoms`).
        matrix: ``(ny, nx)`` or ``(nz, ny, nx)``: encoded = recon matrix, no oversampling.
        motion: ``(nshot, 3 | 6)`` per shot, in voxels and degrees (:mod:`reconq.recon.motion`'s
            parameters): where the object is during that shot.
        order: how the phase-encode lines (ky, or (kz, ky) in 3D, row-major) are shared among shots.
        fov_mm: recon FOV ``(x, y, z)`` (z: slice or slab thickness).
        segments: set ``idx.segment`` to the shot; otherwise only the header's echo train length says.
        calibration: lines (per phase-encode axis) of a calibration block acquired first, in one go,
            flagged ``ACQ_IS_PARALLEL_CALIBRATION`` (the coil maps' data: consistent, as a separate
            calibration or reference scan is); 0 for none.
        calibration_motion: where the object is during the calibration (default: no motion).
        noise: std of complex Gaussian noise per real and imaginary part.

    Returns:
        The scan (``truth``: the unmoved phantom's band-limited image, root sum of squares).
    """
    shape = tuple(int(n) for n in matrix)
    ndim = len(shape)
    motion = np.asarray(motion, dtype=np.float64)
    nshot = motion.shape[0]
    rng = np.random.default_rng(seed)
    axes = [np.arange(n) - n // 2 for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)  # (*shape, ndim), cycles per FOV
    phase_shape = shape[:-1]
    nlines = int(np.prod(phase_shape))
    parts = shot_lines(nlines, nshot, order, seed)
    acqs = []
    if calibration:
        still = np.zeros(motion.shape[1]) if calibration_motion is None else np.asarray(calibration_motion, float)
        moved = phantom.moved(rotation_matrix(still), still[:ndim], grid=shape)
        block = [np.arange(n // 2 - calibration // 2, n // 2 - calibration // 2 + calibration) for n in phase_shape]
        lines = np.ravel_multi_index(np.meshgrid(*block, indexing="ij"), phase_shape).ravel()
        ksp = moved.kspace(grid.reshape(nlines, shape[-1], ndim)[lines])
        for j, line in enumerate(lines):
            acq = _readout(ksp[:, j], shape, int(line), position, noise, rng)
            acq.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            acqs.append(acq)
    for s, lines in enumerate(parts):
        moved = phantom.moved(rotation_matrix(motion[s]), motion[s][:ndim], grid=shape)
        points = grid.reshape(nlines, shape[-1], ndim)[lines]
        ksp = moved.kspace(points)  # (ncoil, nl, nx)
        for j, line in enumerate(lines):
            acq = _readout(ksp[:, j], shape, int(line), position, noise, rng)
            if segments:
                acq.idx.segment = s
            acqs.append(acq)
    uid = _measurement_uid(measurement_id)
    for counter, acq in enumerate(acqs, start=1):
        acq.scan_counter, acq.measurement_uid, acq.acquisition_time_stamp = counter, uid, 1000 + counter
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    header = _header(shape, phantom.ncoil, fov_mm, nshot, len(parts[0]), patient_id, study_uid, protocol,
                     measurement_id)
    return SyntheticScan(header=header, acquisitions=acqs, truth=phantom.truth(shape),
                         mps=np.zeros((0,), np.complex64))


def _readout(data: np.ndarray, shape, line: int, position, noise: float, rng) -> ismrmrd.Acquisition:
    if noise > 0:
        data = data + noise * (rng.standard_normal(data.shape) + 1j * rng.standard_normal(data.shape))
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    acq.center_sample = shape[-1] // 2
    acq.sample_time_us = 5.0
    acq.position[:] = np.asarray(position, dtype=np.float32)
    acq.read_dir[:], acq.phase_dir[:], acq.slice_dir[:] = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    acq.patient_table_position[:] = (0.0, 0.0, -1200.0)
    e2, e1 = divmod(int(line), shape[-2]) if len(shape) == 3 else (0, int(line))
    acq.idx.kspace_encode_step_1, acq.idx.kspace_encode_step_2 = e1, e2
    return acq


def _header(shape, ncoil, fov_mm, nshot, per_shot, patient_id, study_uid, protocol, measurement_id):
    nz = shape[0] if len(shape) == 3 else 1
    ny, nx = shape[-2], shape[-1]
    space = xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=nz),
                                  fieldOfView_mm=xsd.fieldOfViewMm(x=fov_mm[0], y=fov_mm[1], z=fov_mm[2]))
    encoding = xsd.encodingType(
        encodedSpace=space, reconSpace=space,
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=ny - 1, center=ny // 2),
            kspace_encoding_step_2=xsd.limitType(minimum=0, maximum=nz - 1, center=nz // 2) if nz > 1 else None,
            segment=xsd.limitType(minimum=0, maximum=nshot - 1, center=0),
            slice=xsd.limitType(minimum=0, maximum=0, center=0)),
        trajectory=xsd.trajectoryType.CARTESIAN, echoTrainLength=per_shot)
    return scan_header(encoding, ncoil, patient_id, "Phantom^Motion", study_uid, protocol, measurement_id,
                       xsd.sequenceParametersType(TR=[2000.0], TE=[80.0], flipAngle_deg=[90.0]))


def shot_arrays(phantom: Phantom, shape: Sequence[int], theta: np.ndarray, rotation, rng: np.random.Generator,
                accel: int = 1, snr_db: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The arrays :func:`reconq.recon.alignsense.align_sense` takes, for shots in random line order.

    Each shot's lines are the analytic k-space of ``phantom`` moved by ``theta[s]`` (``rotation(theta[s])``
    its rotation matrix: the caller's convention, written independently of the solver's), on the integer
    grid, scaled as the unitary FFT; every ``accel``-th phase line is sampled (the centre one included);
    complex Gaussian noise at ``snr_db`` of the sampled k-space's RMS when given.

    Returns:
        ``(ksp (ncoil, *shape), maps (ncoil, *shape), shots (nshot, *shape[:-1]), truth shape)``: the truth is
        the coil-free band-limited image in the position of no motion.
    """
    shape = tuple(int(n) for n in shape)
    nd, nshot = len(shape), len(theta)
    truth = phantom.without_coils().truth_coils(shape)[0]
    maps = phantom.sensitivity(phantom.pixel_points(shape)).astype(np.complex64)
    pe = shape[:-1]
    sampled = np.zeros(pe, dtype=bool)
    sampled[..., (pe[-1] // 2) % accel::accel] = True
    lines = rng.permutation(np.flatnonzero(sampled.ravel()))
    shots = np.zeros((nshot, int(np.prod(pe))), dtype=bool)
    for s in range(nshot):
        shots[s, lines[s::nshot]] = True
    shots = shots.reshape(nshot, *pe)
    ksp = np.zeros((phantom.ncoil, *shape), dtype=np.complex64)
    for s in range(nshot):
        k = phantom.moved(rotation(theta[s]), theta[s][:nd], grid=shape).cartesian_kspace(shape)
        ksp[:, shots[s]] = k[:, shots[s]] / np.sqrt(np.prod(shape))
    if snr_db is not None:
        m = shots.any(axis=0)
        sd = np.sqrt(np.mean(np.abs(ksp[:, m]) ** 2)) / 10 ** (snr_db / 20)
        noise = sd / np.sqrt(2) * (rng.standard_normal(ksp.shape) + 1j * rng.standard_normal(ksp.shape))
        ksp[:, m] += noise[:, m].astype(np.complex64)
    return ksp, maps, shots, truth
