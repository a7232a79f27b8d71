"""Synthetic radial scans: a header and readouts for any trajectory and any analytic k-space.

The k-space comes from the caller (:mod:`reconq.recon.phantoms` computes it analytically: never with the
NUFFT under test), sampled at the trajectory's points, so the ``radial`` pipeline is checked against an
object it did not make. The readouts carry their trajectory in ``acq.traj`` in the header's stated units
(normalised ±0.5 by default, or cycles per encoded FOV), or none at all, as a Pulseq scan sends them
(its trajectory then comes from the ``.seq`` file the header names by signature).

Geometry follows the scanner's conventions, as :mod:`reconq.recon.simulate` does for Cartesian scans:
every readout carries the slab (or slice) centre and the read, phase and slice directions; a 3D
volume's partitions lie along the slice direction.

References:
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from reconq.recon.simulate import SyntheticScan, _measurement_uid, scan_header  # noqa: PLC2701

#: ``kspace(coord, echo)``: ``(ncoil, npts)`` complex samples at ``coord`` ``(npts, ndim)`` (cycles per
#: recon FOV, image-axis order: (ky, kx) or (kz, ky, kx)) for echo ``echo``.
KspaceFn = Callable[[np.ndarray, int], np.ndarray]


def radial_scan(
    coord: np.ndarray,
    kspace: KspaceFn,
    ncoil: int,
    matrix: tuple[int, int, int],
    fov_mm: tuple[float, float, float],
    kind: str = "3d",
    echoes: int = 1,
    te_ms: Sequence[float] = (2.0, 6.0),
    half_spokes: bool = False,
    units: str = "normalised",
    with_trajectory: bool = True,
    patient_id: str = "RADIAL01",
    patient_name: str = "Phantom^Radial",
    study_uid: str = "1.2.826.0.1.3680043.2.1125.2",
    protocol: str = "reconq_radial",
    measurement_id: str = "66001_1000001_1000002_201",
    position: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: np.ndarray | None = None,
    noise: float = 0.0,
    noise_readouts: int = 0,
    seed: int = 0,
    user_strings: Mapping[str, str] | None = None,
) -> SyntheticScan:
    """Simulate a multi-coil, multi-echo radial scan.

    Args:
        coord: ``(nreadouts, ns, ndim)`` k-space points in cycles per recon FOV, image-axis order
            (the generators of :mod:`reconq.recon.radial`); for ``kind="stack"`` column 0 is the
            partition's integer ``kz``.
        kspace: the analytic k-space of the object, per echo.
        matrix: recon matrix ``(x, y, z)``; ``z`` 1 for 2D.
        fov_mm: recon FOV ``(x, y, z)``: z the slice thickness (2D) or the slab (3D).
        kind: ``"2d"``, ``"3d"`` (kooshball) or ``"stack"`` (stack of stars).
        echoes: echoes per readout position (``idx.contrast``), each its own readout.
        te_ms: echo times, written to the header.
        half_spokes: centre-out spokes (``center_sample`` 0) rather than full ones (``ns // 2``).
        units: ``"normalised"`` (±0.5) or ``"cycles_per_fov"`` (stated in ``trajectoryDescription``).
        with_trajectory: write ``acq.traj``; False for a scan whose trajectory lives in a sequence file.
        rotation: 3x3 applied to the axial read, phase and slice directions (oblique scans).
        noise: std of complex Gaussian noise per real and imaginary part; ``noise_readouts`` of pure noise
            are prepended.
        user_strings: ``userParameterString`` entries of the header (e.g. ``seq_signature``).

    Returns:
        The scan (``truth`` and ``mps`` empty: the phantom has them).
    """
    nx, ny, nz = matrix
    nread, ns, ndim = coord.shape
    # rows: read, phase, slice; the rotation turns the axial directions (its columns are the new ones)
    dirs = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64).T
    rng = np.random.default_rng(seed)
    header = _header(kind, ncoil, matrix, fov_mm, nread, ns, echoes, te_ms, units, patient_id, patient_name,
                     study_uid, protocol, measurement_id, user_strings)
    traj = _trajectory(coord, kind, matrix, units, ns / nx)
    acqs = []
    for _ in range(noise_readouts):
        acq = _acquisition(_noise((ncoil, ns), max(noise, 1e-3), rng), position, dirs, ns, half_spokes)
        acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        acqs.append(acq)
    flat = coord.reshape(-1, ndim).astype(np.float64)
    samples = [np.asarray(kspace(flat, e)).reshape(ncoil, nread, ns).astype(np.complex64) for e in range(echoes)]
    for r in range(nread):
        for e in range(echoes):
            data = samples[e][:, r]
            if noise > 0:
                data = data + _noise(data.shape, noise, rng)
            acq = _acquisition(data, position, dirs, ns, half_spokes, traj[r] if with_trajectory else None)
            acq.idx.kspace_encode_step_1 = r
            acq.idx.contrast = e
            if kind == "stack":
                acq.idx.kspace_encode_step_2 = int(round(coord[r, 0, 0])) + nz // 2
            acqs.append(acq)
    uid = _measurement_uid(measurement_id)
    for counter, acq in enumerate(acqs, start=1):
        acq.scan_counter, acq.measurement_uid, acq.acquisition_time_stamp = counter, uid, 1000 + counter
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    return SyntheticScan(header=header, acquisitions=acqs, truth=np.zeros((0,), np.float32),
                         mps=np.zeros((0,), np.complex64))


def _trajectory(coord: np.ndarray, kind: str, matrix: tuple[int, int, int], units: str,
                readout_oversampling: float) -> np.ndarray:
    """``(nreadouts, ns, tdim)`` in the header's units, columns x, y(, z): the file's order.

    Normalised: k over the recon matrix (the encoded resolution is the recon one). Cycles per encoded
    FOV: the readout's encoded FOV is ``readout_oversampling`` times the recon FOV, the others equal."""
    per_axis = np.array(coord[..., ::-1], dtype=np.float64)  # image-axis order (.., ky, kx) to x, y(, z)
    if kind == "stack":
        per_axis = per_axis[..., :2]
    if units == "cycles_per_fov":
        per_axis[..., 0] *= readout_oversampling
        return per_axis.astype(np.float32)
    return (per_axis / np.asarray(matrix[: per_axis.shape[-1]], dtype=np.float64)).astype(np.float32)


def _header(kind, ncoil, matrix, fov_mm, nread, ns, echoes, te_ms, units, patient_id, patient_name, study_uid,
            protocol, measurement_id, user_strings) -> xsd.ismrmrdHeader:
    nx, ny, nz = matrix
    fov = xsd.fieldOfViewMm(x=fov_mm[0], y=fov_mm[1], z=fov_mm[2])
    description = xsd.trajectoryDescriptionType(
        identifier="ReconQ simulator", userParameterString=[xsd.userParameterStringType(name="units", value=units)])
    encoding = xsd.encodingType(
        encodedSpace=xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=ns, y=ny, z=nz),
                                           fieldOfView_mm=xsd.fieldOfViewMm(x=fov_mm[0] * ns / nx, y=fov_mm[1],
                                                                            z=fov_mm[2])),
        reconSpace=xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=nz), fieldOfView_mm=fov),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=nread - 1, center=0),
            kspace_encoding_step_2=(xsd.limitType(minimum=0, maximum=nz - 1, center=nz // 2)
                                    if kind == "stack" else None),
            contrast=xsd.limitType(minimum=0, maximum=echoes - 1, center=0),
            slice=xsd.limitType(minimum=0, maximum=0, center=0)),
        trajectory=xsd.trajectoryType.RADIAL if kind == "2d" else xsd.trajectoryType.OTHER,
        trajectoryDescription=description)
    strings = [xsd.userParameterStringType(name=k, value=v) for k, v in (user_strings or {}).items()]
    sequence = xsd.sequenceParametersType(TR=[20.0], TE=[float(t) for t in te_ms[:echoes]], flipAngle_deg=[10.0])
    return scan_header(encoding, ncoil, patient_id, patient_name, study_uid, protocol, measurement_id, sequence,
                       xsd.userParametersType(userParameterString=strings) if strings else None, field_t=7.0,
                       frequency_hz=297_200_000)


def _acquisition(data: np.ndarray, position, dirs: np.ndarray, ns: int, half: bool,
                 traj: np.ndarray | None = None) -> ismrmrd.Acquisition:
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64),
                                         None if traj is None else np.ascontiguousarray(traj, dtype=np.float32))
    acq.center_sample = 0 if half else ns // 2
    acq.sample_time_us = 5.0
    acq.position[:] = np.asarray(position, dtype=np.float32)
    acq.read_dir[:] = dirs[0].astype(np.float32)
    acq.phase_dir[:] = dirs[1].astype(np.float32)
    acq.slice_dir[:] = dirs[2].astype(np.float32)
    acq.patient_table_position[:] = (0.0, 0.0, -1200.0)
    return acq


def _noise(shape, std: float, rng: np.random.Generator) -> np.ndarray:
    return (std * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(np.complex64)
