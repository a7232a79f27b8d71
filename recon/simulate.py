"""Synthetic multi-coil Cartesian scans of an object that lives in patient coordinates.

A :class:`Body` (a 3D Shepp-Logan phantom and a birdcage receive array, both placed in patient
coordinates) is sampled on each scan's encoded voxel grid (:class:`reconq.recon.geometry.Grid`), so scans
of any orientation, resolution and field of view see the same object and the same coil
sensitivities: a reference scan and the scan it serves agree, as on a scanner. The k-space is the
centered unitary FFT (:mod:`reconq.recon.fft`) of the coil images on the encoded grid (readout and phase
oversampling included), so the Cartesian recon inverts it exactly.

The scan can be accelerated (every ``R``-th line in ky, and kz for 3D, with calibration lines
flagged ``ACQ_IS_PARALLEL_CALIBRATION(_AND_IMAGING)`` and the header's ``parallelImaging`` block),
partial Fourier in ky/kz (the first lines left out), with an asymmetric echo (the first readout
samples left out), with readouts in alternate directions (``ACQ_IS_REVERSE``), with noise readouts
and coil-correlated noise.

References:
    Shepp LA, Logan BF. The Fourier reconstruction of a head section. IEEE Trans Nucl Sci 1974.
    Ong F, Lustig M. SigPy. ISMRM 2019 (``sigpy.sim`` ellipsoids, ``sigpy.mri.birdcage_maps``).
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import sigpy as sp
import sigpy.sim
from pydicom.uid import generate_uid
from xsdata.models.datatype import XmlDate, XmlTime

from reconq.recon import fft
from reconq.recon.geometry import Grid

Vec3 = Sequence[float]


@dataclass(frozen=True)
class Body:
    """An object and a receive array in patient coordinates.

    Attributes:
        centre: ``(3,)`` mm, the phantom centre.
        axes: ``(3, 3)``, rows: the phantom's x, y, z unit vectors in patient coordinates.
        semi_axes: ``(3,)`` mm: the phantom's half extent along its axes (Shepp-Logan's unit cube).
        ncoil: receive channels: rings of 8 loops around the phantom's z axis, radius
            1.5 x the larger in-plane semi-axis, rings one such radius apart.
        markers: ``((x, y, z), amplitude)`` point objects, each put in the voxel nearest to it.
    """

    centre: np.ndarray
    axes: np.ndarray
    semi_axes: np.ndarray
    ncoil: int
    markers: tuple[tuple[tuple[float, float, float], float], ...] = ()

    def local(self, points: np.ndarray) -> np.ndarray:
        """``(..., 3)`` patient mm to phantom coordinates (Shepp-Logan's [-1, 1] cube)."""
        return (np.asarray(points, dtype=np.float64) - self.centre) @ self.axes.T / self.semi_axes

    def object(self, points: np.ndarray) -> np.ndarray:
        """Magnitude ``(...)`` float32 of the phantom at patient coordinates ``(..., 3)``."""
        u = self.local(points)
        flat = u.reshape(-1, 3).T  # (3, n)
        out = np.zeros(flat.shape[1], dtype=np.float64)
        for amp, scale, offset, angle in zip(sigpy.sim.sl_amps, sigpy.sim.sl_scales,
                                             sigpy.sim.sl_offsets, sigpy.sim.sl_angles, strict=True):
            rot = np.asarray(sigpy.sim.rotation_matrix(angle))
            r = (rot @ flat - np.reshape(offset, (3, 1))) / np.reshape(scale, (3, 1))
            out[np.sum(r**2, axis=0) <= 1] += amp
        return np.abs(out).reshape(u.shape[:-1]).astype(np.float32)

    def maps(self, points: np.ndarray) -> np.ndarray:
        """Coil sensitivities ``(ncoil, ...)`` complex64 at ``(..., 3)``, root sum of squares 1."""
        radius = float(max(self.semi_axes[0], self.semi_axes[1]))
        u = (np.asarray(points, dtype=np.float64) - self.centre) @ self.axes.T / radius
        c = np.arange(self.ncoil).reshape((-1,) + (1,) * (u.ndim - 1))
        nring, per_ring = -(-self.ncoil // 8), min(self.ncoil, 8)
        angle = (c % per_ring) * (2 * np.pi / per_ring)
        x = u[..., 0] - 1.5 * np.cos(angle)
        y = u[..., 1] - 1.5 * np.sin(angle)
        z = u[..., 2] - (c // per_ring - 0.5 * (nring - 1))
        rr = np.sqrt(x**2 + y**2 + z**2 + 0.05)  # finite where the oversampled FOV passes a loop
        out = np.exp(1j * (np.arctan2(x, -y) - angle - c // per_ring)) / rr
        return (out / np.sqrt(np.sum(np.abs(out) ** 2, axis=0))).astype(np.complex64)

    def sample(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """Object ``(nz, ny, nx)`` float32 and maps ``(ncoil, nz, ny, nx)`` complex64 on ``grid``."""
        points = grid.points()
        img = self.object(points)
        for point, amp in self.markers:
            idx = np.rint(grid.index_of(np.asarray(point))).astype(int)
            if all(0 <= i < n for i, n in zip(idx, grid.shape, strict=True)):
                img[tuple(idx)] += amp
        return img, self.maps(points)


@dataclass
class SyntheticScan:
    """A simulated scan.

    Attributes:
        header: the MRD header.
        acquisitions: the readouts in acquisition order.
        truth: float32 magnitude in the recon space: ``(nslices, ny, nx)`` for 2D multi-slice,
            ``(nz, ny, nx)`` for 3D.
        mps: complex64 coil maps in the recon space, ``(ncoil, nslices or nz, ny, nx)``, root sum
            of squares 1.
        body: the object and coils (sample them on any grid).
        grids: the encoded grid of each slice (one for 3D): readout and phase oversampling included.
    """

    header: xsd.ismrmrdHeader
    acquisitions: list[ismrmrd.Acquisition]
    truth: np.ndarray
    mps: np.ndarray
    body: Body | None = None
    grids: list[Grid] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    ny: int  # recon matrix
    nx: int
    nz: int  # 1 for 2D
    ny_enc: int  # with phase oversampling
    nslices: int
    os: int
    dirs: np.ndarray  # (3, 3): read, phase, slice
    centres: np.ndarray  # (nslices, 3) slice (or slab) centres in mm
    spacing: tuple[float, float, float]
    accel: tuple[int, int]
    acs: tuple[int, int]
    calibration: str
    pf_start: tuple[int, int]  # first acquired ky, kz line
    ns: int  # readout samples acquired (asymmetric echo)
    reverse_odd: bool

    @property
    def is3d(self) -> bool:
        return self.nz > 1

    def grid(self, s: int) -> Grid:
        return Grid.make(self.centres[s], self.dirs, self.spacing, (self.nz, self.ny_enc, self.nx * self.os))


def synthetic_scan(
    matrix: tuple[int, int] = (128, 128),
    ncoil: int = 8,
    nslices: int = 1,
    nz: int | None = None,
    readout_oversampling: int = 2,
    patient_id: str = "PAT001",
    patient_name: str = "Phantom^Demo",
    study_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    protocol: str = "reconq_demo",
    measurement_id: str = "66001_1000001_1000002_101",
    fov_mm: tuple[float, float, float] = (256.0, 256.0, 5.0),
    slice_gap: float = 0.0,
    read_dir: Vec3 = (1.0, 0.0, 0.0),
    phase_dir: Vec3 = (0.0, 1.0, 0.0),
    slice_dir: Vec3 = (0.0, 0.0, 1.0),
    rotation: np.ndarray | None = None,
    position: Vec3 = (0.0, 0.0, 0.0),
    noise: float = 0.0,
    seed: int = 0,
    bits_stored: int | None = None,
    nrepetitions: int = 1,
    naverages: int = 1,
    noise_readouts: int = 0,
    acceleration: tuple[int, int] = (1, 1),
    acs_lines: tuple[int, int] = (24, 24),
    calibration: str = "embedded",
    partial_fourier: tuple[float, float] = (1.0, 1.0),
    asymmetric_echo: float = 1.0,
    phase_oversampling: float = 0.0,
    reverse_odd_lines: bool = False,
    noise_cov: np.ndarray | None = None,
    body: Body | None = None,
    markers: Sequence[tuple[Vec3, float]] = (),
) -> SyntheticScan:
    """Simulate a Cartesian multi-coil scan.

    Args:
        matrix: recon matrix ``(ny, nx)``: phase encodes, readout samples before oversampling.
        ncoil: receiver channels (ignored when ``body`` is given).
        nslices: 2D slices (ignored when ``nz`` is given).
        nz: 3D partitions; None for 2D.
        readout_oversampling: encoded readout matrix / recon readout matrix.
        fov_mm: recon FOV ``(x, y, z)``: z is the slice thickness (2D) or the slab thickness (3D).
        slice_gap: gap between 2D slices in mm.
        read_dir, phase_dir, slice_dir: orientation (default axial); ``rotation`` (3x3), when
            given, is applied to all three, which gives oblique scans.
        position: centre of the slice stack (2D) or slab (3D) in patient coordinates, mm.
        noise: std of complex Gaussian noise added to k-space (per real/imaginary part).
        bits_stored: adds a ``BitsStored`` user parameter when given.
        nrepetitions, naverages: repeated acquisitions of the same object.
        noise_readouts: noise-measurement readouts prepended to the scan.
        acceleration: ``(Ry, Rz)``: every R-th line in ky (and kz for 3D); the centre line is sampled.
        acs_lines: ``(ny, nz)`` fully sampled calibration lines at the k-space centre when accelerated.
        calibration: ``"embedded"`` (calibration lines among the imaging lines) or ``"separate"``
            (calibration lines acquired apart, before the imaging lines).
        partial_fourier: fraction of ky (and kz) acquired; the first lines are left out.
        asymmetric_echo: fraction of the oversampled readout acquired; the first samples left out.
        phase_oversampling: extra phase FOV, e.g. 0.25 encodes 25 % more lines over 25 % more FOV.
        reverse_odd_lines: odd ky lines stored in reverse sample order, flagged ``ACQ_IS_REVERSE``.
        noise_cov: ``(ncoil, ncoil)`` relative noise covariance between channels (identity if None).
        body: the object and coils; by default a phantom filling the recon FOV, aligned with the scan.
        markers: point objects ``((x, y, z) mm, amplitude)`` added to the default body.

    Returns:
        The scan, its truth images and coil maps.
    """
    plan = _plan(matrix, nz, nslices, readout_oversampling, fov_mm, slice_gap,
                 (read_dir, phase_dir, slice_dir), rotation, position, acceleration, acs_lines,
                 calibration, partial_fourier, asymmetric_echo, phase_oversampling, reverse_odd_lines)
    body = body or _default_body(plan, ncoil, fov_mm, markers)
    truth, mps, ksp = _sample(body, plan)
    header = _header(plan, body.ncoil, fov_mm, patient_id, patient_name, study_uid, protocol,
                     measurement_id, bits_stored, nrepetitions, naverages)
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(noise_cov) if noise_cov is not None else None
    acqs = _noise_acquisitions(noise_readouts, body.ncoil, plan, noise, rng, chol)
    acqs += _acquisitions(ksp, plan, nrepetitions, naverages, noise, rng, chol)
    uid = _measurement_uid(measurement_id)
    for counter, acq in enumerate(acqs, start=1):
        acq.scan_counter = counter
        acq.measurement_uid = uid
        acq.acquisition_time_stamp = 1000 + counter
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    return SyntheticScan(header=header, acquisitions=acqs, truth=truth, mps=mps, body=body,
                         grids=[plan.grid(s) for s in range(plan.nslices)])


def _plan(matrix, nz, nslices, os_, fov_mm, slice_gap, dirs, rotation, position, accel, acs,
          calibration, partial_fourier, asymmetric_echo, phase_os, reverse_odd) -> _Plan:
    ny, nx = matrix
    dirs = np.asarray(dirs, dtype=np.float64)
    if rotation is not None:
        dirs = dirs @ np.asarray(rotation, dtype=np.float64).T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    nslices = 1 if nz is not None else nslices
    spacing = fov_mm[2] + slice_gap
    offsets = (np.arange(nslices) - (nslices - 1) / 2) * spacing
    centres = np.asarray(position, dtype=np.float64) + offsets[:, None] * dirs[2]
    nz = nz or 1
    ny_enc = int(round(ny * (1 + phase_os)))
    is3d = nz > 1
    accel = (int(accel[0]), int(accel[1]) if is3d else 1)
    pf_start = (ny_enc - int(round(partial_fourier[0] * ny_enc)),
                nz - int(round(partial_fourier[1] * nz)) if is3d else 0)
    if calibration not in ("embedded", "separate"):
        raise ValueError(f"calibration must be 'embedded' or 'separate', got {calibration!r}")
    return _Plan(ny=ny, nx=nx, nz=nz, ny_enc=ny_enc, nslices=nslices, os=os_, dirs=dirs, centres=centres,
                 spacing=(fov_mm[0] / nx, fov_mm[1] / ny, fov_mm[2] / nz), accel=accel,
                 acs=(min(acs[0], ny_enc), min(acs[1], nz) if is3d else 1), calibration=calibration,
                 pf_start=pf_start, ns=int(round(asymmetric_echo * nx * os_)), reverse_odd=reverse_odd)


def _default_body(plan: _Plan, ncoil: int, fov_mm, markers) -> Body:
    """A phantom filling the recon FOV, aligned with the scan; 2D stacks lie strictly inside it."""
    if plan.is3d:
        half_z = fov_mm[2] / 2
    else:
        half_z = (plan.nslices + 2) * np.linalg.norm(plan.centres[-1] - plan.centres[0]) / max(plan.nslices - 1, 1) / 2
        half_z = half_z if plan.nslices > 1 else 1.5 * fov_mm[2]
    centre = plan.centres.mean(axis=0)
    return Body(centre=centre, axes=plan.dirs.copy(), semi_axes=np.array([fov_mm[0] / 2, fov_mm[1] / 2, half_z]),
                ncoil=ncoil, markers=tuple(((float(p[0]), float(p[1]), float(p[2])), float(a)) for p, a in markers))


def _sample(body: Body, plan: _Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth, maps (recon space) and k-space ``(nslices, ncoil, nz, ny_enc, nx * os)`` complex64."""
    truths, maps, ksps = [], [], []
    recon_shape = (plan.nz, plan.ny, plan.nx)
    axes = (-3, -2, -1) if plan.is3d else (-2, -1)
    for s in range(plan.nslices):
        img, mps = body.sample(plan.grid(s))
        ksps.append(fft.fft(mps * img, axes=axes).astype(np.complex64))
        truths.append(sp.resize(img, recon_shape))
        maps.append(sp.resize(mps, (body.ncoil,) + recon_shape))
    truth = np.concatenate(truths).astype(np.float32)  # (nslices * nz, ny, nx)
    return truth, np.concatenate(maps, axis=1), np.stack(ksps)


def _header(plan: _Plan, ncoil, fov_mm, patient_id, patient_name, study_uid, protocol,
            measurement_id, bits_stored, nrepetitions, naverages) -> xsd.ismrmrdHeader:
    thickness = fov_mm[2]
    recon_fov = xsd.fieldOfViewMm(x=fov_mm[0], y=fov_mm[1], z=thickness)
    enc_fov = xsd.fieldOfViewMm(x=fov_mm[0] * plan.os, y=fov_mm[1] * plan.ny_enc / plan.ny, z=thickness)
    encoding = xsd.encodingType(
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=plan.nx * plan.os, y=plan.ny_enc, z=plan.nz),
            fieldOfView_mm=enc_fov),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=plan.nx, y=plan.ny, z=plan.nz),
            fieldOfView_mm=recon_fov),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=_limit(plan.ny_enc, minimum=plan.pf_start[0]),
            kspace_encoding_step_2=_limit(plan.nz, minimum=plan.pf_start[1]) if plan.is3d else None,
            slice=_limit(plan.nslices, centre=0),
            repetition=_limit(nrepetitions, centre=0),
            average=_limit(naverages, centre=0)),
        trajectory=xsd.trajectoryType.CARTESIAN,
        parallelImaging=_parallel_imaging(plan))
    user = None
    if bits_stored is not None:
        user = xsd.userParametersType(
            userParameterLong=[xsd.userParameterLongType(name="BitsStored", value=bits_stored)])
    return scan_header(encoding, ncoil, patient_id, patient_name, study_uid, protocol, measurement_id,
                       xsd.sequenceParametersType(TR=[10.0], TE=[5.0], flipAngle_deg=[15.0],
                                                  sequence_type="Flash"), user)


def scan_header(encoding: xsd.encodingType, ncoil: int, patient_id: str, patient_name: str, study_uid: str,
                protocol: str, measurement_id: str, sequence: xsd.sequenceParametersType,
                user: xsd.userParametersType | None = None, field_t: float = 3.0,
                frequency_hz: int = 123_200_000, when: datetime | None = None) -> xsd.ismrmrdHeader:
    """A simulated scan's MRD header around its ``encoding``: identity, protocol, system and sequence
    (every simulator of :mod:`reconq.recon` writes its headers through this), with the study and series
    dated ``when`` (default: now) and a frame of reference of the study, as a scanner writes them."""
    when = when or datetime.now().replace(microsecond=0)
    date, time_ = XmlDate.from_date(when.date()), XmlTime.from_time(when.time())
    frame = generate_uid(entropy_srcs=[study_uid, "frame of reference"])  # the study's, the same every time
    return xsd.ismrmrdHeader(
        version=1,
        subjectInformation=xsd.subjectInformationType(
            patientID=patient_id, patientName=patient_name, patientBirthdate=XmlDate(1970, 1, 1),
            patientGender="O", patientWeight_kg=70.0),
        studyInformation=xsd.studyInformationType(studyInstanceUID=study_uid, studyID="1", studyDate=date,
                                                  studyTime=time_, studyDescription="ReconQ simulation"),
        measurementInformation=xsd.measurementInformationType(
            measurementID=measurement_id, patientPosition=xsd.patientPositionType.HFS,
            protocolName=protocol, seriesDescription=protocol, seriesDate=date, seriesTime=time_,
            frameOfReferenceUID=frame),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="ReconQ", systemModel="Simulator", systemFieldStrength_T=field_t,
            receiverChannels=ncoil, institutionName="ReconQ", stationName="simulator"),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=frequency_hz),
        encoding=[encoding],
        sequenceParameters=sequence,
        userParameters=user)


def _parallel_imaging(plan: _Plan) -> xsd.parallelImagingType | None:
    if plan.accel == (1, 1):
        return None
    mode = xsd.calibrationModeType.EMBEDDED if plan.calibration == "embedded" else xsd.calibrationModeType.SEPARATE
    return xsd.parallelImagingType(
        accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=plan.accel[0],
                                                      kspace_encoding_step_2=plan.accel[1]),
        calibrationMode=mode)


def _limit(n: int, centre: int | None = None, minimum: int = 0) -> xsd.limitType:
    return xsd.limitType(minimum=minimum, maximum=n - 1, center=n // 2 if centre is None else centre)


def _measurement_uid(measurement_id: str) -> int:
    tail = measurement_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _base_acquisition(data: np.ndarray, plan: _Plan, centre: np.ndarray, centre_sample: int) -> ismrmrd.Acquisition:
    acq = ismrmrd.Acquisition.from_array(data)
    acq.center_sample = centre_sample
    acq.sample_time_us = 10.0 / plan.os
    acq.position[:] = centre.astype(np.float32)
    acq.read_dir[:] = plan.dirs[0].astype(np.float32)
    acq.phase_dir[:] = plan.dirs[1].astype(np.float32)
    acq.slice_dir[:] = plan.dirs[2].astype(np.float32)
    acq.patient_table_position[:] = (0.0, 0.0, -1200.0)
    return acq


def _noise_acquisitions(n, ncoil, plan, noise, rng, chol) -> list[ismrmrd.Acquisition]:
    acqs = []
    for _ in range(n):
        data = _noise((ncoil, plan.nx * plan.os), max(noise, 1e-3), rng, chol)
        acq = _base_acquisition(data, plan, plan.centres[0], plan.nx * plan.os // 2)
        acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        acqs.append(acq)
    return acqs


def _noise(shape, std, rng, chol=None) -> np.ndarray:
    white = std * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    return (white if chol is None else chol @ white).astype(np.complex64)


def _acquisitions(ksp, plan, nrepetitions, naverages, noise, rng, chol) -> list[ismrmrd.Acquisition]:
    acqs = []
    for rep in range(nrepetitions):
        for avg in range(naverages):
            for s in range(plan.nslices):
                new = _slice_acquisitions(ksp[s], plan, s, noise, rng, chol)
                for acq in new:
                    acq.idx.repetition, acq.idx.average = rep, avg
                acqs += new
    return acqs


def _lines(plan: _Plan) -> list[tuple[int, int, int]]:
    """``(e2, e1, flag)`` in acquisition order; flag 0, or a parallel-calibration flag."""
    def in_acs(e, n, width):
        return n // 2 - width // 2 <= e < n // 2 - width // 2 + width

    accelerated = plan.accel != (1, 1)
    lines: list[tuple[int, int, int]] = []
    for e2 in range(plan.pf_start[1], plan.nz):
        for e1 in range(plan.pf_start[0], plan.ny_enc):
            lattice = ((e1 - plan.ny_enc // 2) % plan.accel[0] == 0
                       and (e2 - plan.nz // 2) % plan.accel[1] == 0)
            acs = accelerated and in_acs(e1, plan.ny_enc, plan.acs[0]) and in_acs(e2, plan.nz, plan.acs[1])
            if acs and plan.calibration == "separate":
                lines.insert(0, (e2, e1, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION))
            if acs and plan.calibration == "embedded":
                lines.append((e2, e1, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING if lattice
                              else ismrmrd.ACQ_IS_PARALLEL_CALIBRATION))
            elif lattice:
                lines.append((e2, e1, 0))
    return lines


def _slice_acquisitions(ksp, plan, s, noise, rng, chol) -> list[ismrmrd.Acquisition]:
    """Readouts of one slice (or slab) from ``ksp`` ``(ncoil, nz, ny_enc, nx_enc)``."""
    acqs = []
    nx_enc = plan.nx * plan.os
    first = nx_enc - plan.ns
    for e2, e1, flag in _lines(plan):
        data = ksp[:, e2, e1, first:]
        if noise > 0:
            data = data + _noise(data.shape, noise, rng, chol)
        reverse = plan.reverse_odd and e1 % 2 == 1
        if reverse:
            data = data[:, ::-1]
        acq = _base_acquisition(np.ascontiguousarray(data), plan, plan.centres[s], nx_enc // 2 - first)
        acq.idx.kspace_encode_step_1, acq.idx.kspace_encode_step_2, acq.idx.slice = e1, e2, s
        if flag:
            acq.set_flag(flag)
        if reverse:
            acq.set_flag(ismrmrd.ACQ_IS_REVERSE)
        acqs.append(acq)
    acqs[0].set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    return acqs


def write_mrd(scan: SyntheticScan, path: str | os.PathLike) -> Path:
    """Write ``scan`` as a raw MRD HDF5 file (``ismrmrd.Dataset`` layout), replacing any file at ``path``
    (``ismrmrd.Dataset`` would append to it); returns the path."""
    path = Path(path)
    path.unlink(missing_ok=True)
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as dataset:
        dataset.write_xml_header(xsd.ToXML(scan.header, encoding="utf-8").encode("utf-8"))  # any patient name
        for acq in scan.acquisitions:
            dataset.append_acquisition(acq)
    return path
