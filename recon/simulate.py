"""Synthetic multi-coil Cartesian scans (Shepp-Logan phantom, birdcage coil maps).

The object covers the recon FOV; the encoded readout FOV is ``readout_oversampling`` times
larger (the image is zero-padded along readout before the FFT), as on a scanner. The k-space
uses the centered unitary FFT of :mod:`recon.fft`, so the Cartesian recon inverts it exactly.

References:
    Shepp LA, Logan BF. The Fourier reconstruction of a head section. IEEE Trans Nucl Sci 1974.
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import sigpy as sp
import sigpy.mri

from recon import fft

Vec3 = Sequence[float]


@dataclass
class SyntheticScan:
    """A simulated scan.

    Attributes:
        header: the MRD header.
        acquisitions: the readouts in acquisition order.
        truth: float32 magnitude images in the recon space: ``(nslices, ny, nx)`` for 2D
            multi-slice (one per slice), ``(nz, ny, nx)`` for 3D.
        mps: complex64 coil maps, ``(ncoil, ny, nx)`` for 2D (the same for every slice),
            ``(ncoil, nz, ny, nx)`` for 3D.
    """

    header: xsd.ismrmrdHeader
    acquisitions: list[ismrmrd.Acquisition]
    truth: np.ndarray
    mps: np.ndarray


@dataclass(frozen=True)
class _Plan:
    ny: int
    nx: int
    nz: int  # 1 for 2D
    nslices: int
    os: int
    dirs: np.ndarray  # (3, 3): read, phase, slice
    centres: np.ndarray  # (nslices, 3) slice (or slab) centres in mm


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
) -> SyntheticScan:
    """Simulate a Cartesian multi-coil scan.

    Args:
        matrix: recon matrix ``(ny, nx)``: phase encodes, readout samples before oversampling.
        ncoil: receiver channels.
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

    Returns:
        The scan, its truth images and coil maps.
    """
    ny, nx = matrix
    plan = _plan(ny, nx, nz, nslices, readout_oversampling, fov_mm, slice_gap,
                 (read_dir, phase_dir, slice_dir), rotation, position)
    truth, mps = _object(plan, ncoil)
    ksp = _kspace(truth, mps, plan)  # (nslices, ncoil, nz, ny, nx*os)
    header = _header(plan, ncoil, fov_mm, patient_id, patient_name, study_uid, protocol,
                     measurement_id, bits_stored, nrepetitions, naverages)
    rng = np.random.default_rng(seed)
    acqs = _noise_acquisitions(noise_readouts, ncoil, plan, noise, rng)
    acqs += _acquisitions(ksp, plan, nrepetitions, naverages, noise, rng)
    uid = _measurement_uid(measurement_id)
    for counter, acq in enumerate(acqs, start=1):
        acq.scan_counter = counter
        acq.measurement_uid = uid
        acq.acquisition_time_stamp = 1000 + counter
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    return SyntheticScan(header=header, acquisitions=acqs, truth=truth, mps=mps)


def _plan(ny, nx, nz, nslices, os_, fov_mm, slice_gap, dirs, rotation, position) -> _Plan:
    dirs = np.asarray(dirs, dtype=np.float64)
    if rotation is not None:
        dirs = dirs @ np.asarray(rotation, dtype=np.float64).T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    nslices = 1 if nz is not None else nslices
    spacing = fov_mm[2] + slice_gap
    offsets = (np.arange(nslices) - (nslices - 1) / 2) * spacing
    centres = np.asarray(position, dtype=np.float64) + offsets[:, None] * dirs[2]
    return _Plan(ny=ny, nx=nx, nz=nz or 1, nslices=nslices, os=os_, dirs=dirs, centres=centres)


def _object(plan: _Plan, ncoil: int) -> tuple[np.ndarray, np.ndarray]:
    """Truth ``(nslices or nz, ny, nx)`` float32 and coil maps complex64."""
    is3d = plan.nz > 1
    if is3d or plan.nslices == 1:
        shape = (plan.nz, plan.ny, plan.nx) if is3d else (plan.ny, plan.nx)
        truth = np.abs(sp.shepp_logan(shape)).reshape(-1, plan.ny, plan.nx)
    else:  # slices strictly inside the 3D phantom (its end planes are empty)
        truth = np.abs(sp.shepp_logan((plan.nslices + 2, plan.ny, plan.nx)))[1:-1]
    truth = truth.astype(np.float32)
    mshape = (ncoil, plan.nz, plan.ny, plan.nx) if is3d else (ncoil, plan.ny, plan.nx)
    mps = sigpy.mri.birdcage_maps(mshape).astype(np.complex64)
    return truth, mps


def _kspace(truth: np.ndarray, mps: np.ndarray, plan: _Plan) -> np.ndarray:
    """Oversampled k-space ``(nslices, ncoil, nz, ny, nx * os)`` complex64."""
    # (1, ncoil, nz, ny, nx) for 3D, (nslices, ncoil, 1, ny, nx) for 2D
    is3d = plan.nz > 1
    coil_img = (mps * truth)[None] if is3d else (mps[None] * truth[:, None])[:, :, None]
    nx_enc = plan.nx * plan.os
    padded = sp.resize(coil_img, coil_img.shape[:-1] + (nx_enc,))
    axes = (-3, -2, -1) if plan.nz > 1 else (-2, -1)
    return fft.fft(padded, axes=axes).astype(np.complex64)


def _header(plan: _Plan, ncoil, fov_mm, patient_id, patient_name, study_uid, protocol,
            measurement_id, bits_stored, nrepetitions, naverages) -> xsd.ismrmrdHeader:
    is3d = plan.nz > 1
    thickness = fov_mm[2]
    recon_fov = xsd.fieldOfViewMm(x=fov_mm[0], y=fov_mm[1], z=thickness)
    enc_fov = xsd.fieldOfViewMm(x=fov_mm[0] * plan.os, y=fov_mm[1], z=thickness)
    encoding = xsd.encodingType(
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=plan.nx * plan.os, y=plan.ny, z=plan.nz),
            fieldOfView_mm=enc_fov),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=plan.nx, y=plan.ny, z=plan.nz),
            fieldOfView_mm=recon_fov),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=_limit(plan.ny),
            kspace_encoding_step_2=_limit(plan.nz) if is3d else None,
            slice=_limit(plan.nslices, centre=0),
            repetition=_limit(nrepetitions, centre=0),
            average=_limit(naverages, centre=0)),
        trajectory=xsd.trajectoryType.CARTESIAN)
    user = None
    if bits_stored is not None:
        user = xsd.userParametersType(
            userParameterLong=[xsd.userParameterLongType(name="BitsStored", value=bits_stored)])
    return xsd.ismrmrdHeader(
        version=1,
        subjectInformation=xsd.subjectInformationType(patientID=patient_id, patientName=patient_name),
        studyInformation=xsd.studyInformationType(studyInstanceUID=study_uid, studyID="1"),
        measurementInformation=xsd.measurementInformationType(
            measurementID=measurement_id, patientPosition=xsd.patientPositionType.HFS,
            protocolName=protocol, seriesDescription=protocol),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="ReconQ", systemModel="Simulator", systemFieldStrength_T=3.0,
            receiverChannels=ncoil),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_200_000),
        encoding=[encoding],
        sequenceParameters=xsd.sequenceParametersType(TR=[10.0], TE=[5.0], flipAngle_deg=[15.0]),
        userParameters=user)


def _limit(n: int, centre: int | None = None) -> xsd.limitType:
    return xsd.limitType(minimum=0, maximum=n - 1, center=n // 2 if centre is None else centre)


def _measurement_uid(measurement_id: str) -> int:
    tail = measurement_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _base_acquisition(data: np.ndarray, plan: _Plan, centre: np.ndarray) -> ismrmrd.Acquisition:
    acq = ismrmrd.Acquisition.from_array(data)
    acq.center_sample = data.shape[1] // 2
    acq.sample_time_us = 10.0 / plan.os
    acq.position[:] = centre.astype(np.float32)
    acq.read_dir[:] = plan.dirs[0].astype(np.float32)
    acq.phase_dir[:] = plan.dirs[1].astype(np.float32)
    acq.slice_dir[:] = plan.dirs[2].astype(np.float32)
    acq.patient_table_position[:] = (0.0, 0.0, -1200.0)
    return acq


def _noise_acquisitions(n, ncoil, plan, noise, rng) -> list[ismrmrd.Acquisition]:
    acqs = []
    for _ in range(n):
        data = _noise((ncoil, plan.nx * plan.os), max(noise, 1e-3), rng)
        acq = _base_acquisition(data, plan, plan.centres[0])
        acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        acqs.append(acq)
    return acqs


def _noise(shape, std, rng) -> np.ndarray:
    return (std * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(np.complex64)


def _acquisitions(ksp, plan, nrepetitions, naverages, noise, rng) -> list[ismrmrd.Acquisition]:
    acqs = []
    for rep in range(nrepetitions):
        for avg in range(naverages):
            for s in range(plan.nslices):
                acqs += _slice_acquisitions(ksp[s], plan, s, noise, rng)
                for acq in acqs[-plan.nz * plan.ny:]:
                    acq.idx.repetition, acq.idx.average = rep, avg
    return acqs


def _slice_acquisitions(ksp, plan, s, noise, rng) -> list[ismrmrd.Acquisition]:
    """Readouts of one slice (or slab) from ``ksp`` ``(ncoil, nz, ny, nx_enc)``."""
    acqs = []
    for e2 in range(plan.nz):
        for e1 in range(plan.ny):
            data = ksp[:, e2, e1, :]
            if noise > 0:
                data = data + _noise(data.shape, noise, rng)
            acq = _base_acquisition(np.ascontiguousarray(data), plan, plan.centres[s])
            acq.idx.kspace_encode_step_1, acq.idx.kspace_encode_step_2, acq.idx.slice = e1, e2, s
            acqs.append(acq)
    acqs[0].set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    return acqs


def write_mrd(scan: SyntheticScan, path: str | os.PathLike) -> Path:
    """Write ``scan`` as a raw MRD HDF5 file (``ismrmrd.Dataset`` layout); returns the path."""
    path = Path(path)
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as dataset:
        dataset.write_xml_header(xsd.ToXML(scan.header))
        for acq in scan.acquisitions:
            dataset.append_acquisition(acq)
    return path
