"""parametermaps: the twix-like scan of synthetic MRD files, and the parameter map.

Every synthetic readout holds samples that name it (row number and channel), so a test can say where
each one must land and check that it landed there and nowhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest
import yaml

from reconq.parametermaps import (
    DIMS,
    ParameterMap,
    ParameterMapError,
    TwixError,
    default_map,
    load_map,
    read_twix,
)
from reconq.parametermaps.sources import ScanContext

LOOP = (
    "kspace_encode_step_1",
    "kspace_encode_step_2",
    "slice",
    "average",
    "phase",
    "contrast",
    "repetition",
    "set",
    "segment",
)
NOISE, CALIB, CALIB_IMG = (
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
    ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,
    ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
)


# --- synthetic scans ---------------------------------------------------------------------------------


@dataclass
class Scan:
    """A synthetic scan: its header and readouts as (flags, counters, samples (cha, col))."""

    nx: int = 32
    ny: int = 16
    nz: int = 1
    ncha: int = 4
    nslices: int = 1
    ncontrasts: int = 1
    accel: int = 1
    readouts: list[tuple[list[int], dict[str, int], np.ndarray]] = field(default_factory=list)
    trajs: dict[int, np.ndarray] = field(default_factory=dict)  # row → (samples, dims) float32

    def add(self, flags: list[int] = (), ncol: int | None = None, **counters: int) -> None:
        row = len(self.readouts)
        col = np.arange(ncol or 2 * self.nx)
        cha = np.arange(self.ncha)[:, None]
        samples = ((row + 1) * 1000 + col + 1j * (cha + 1)).astype(np.complex64)
        self.readouts.append((list(flags), counters, samples))

    def header(self) -> xsd.ismrmrdHeader:
        limits = xsd.encodingLimitsType(
            kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=self.ny - 1, center=self.ny // 2),
            kspace_encoding_step_2=xsd.limitType(minimum=0, maximum=self.nz - 1, center=self.nz // 2),
            slice=xsd.limitType(minimum=0, maximum=self.nslices - 1, center=0),
            contrast=xsd.limitType(minimum=0, maximum=self.ncontrasts - 1, center=0),
        )
        encoding = xsd.encodingType(
            encodedSpace=xsd.encodingSpaceType(
                matrixSize=xsd.matrixSizeType(x=2 * self.nx, y=self.ny, z=self.nz),
                fieldOfView_mm=xsd.fieldOfViewMm(x=512.0, y=256.0, z=5.0 * self.nz),
            ),
            reconSpace=xsd.encodingSpaceType(
                matrixSize=xsd.matrixSizeType(x=self.nx, y=self.ny, z=self.nz),
                fieldOfView_mm=xsd.fieldOfViewMm(x=256.0, y=256.0, z=5.0 * self.nz),
            ),
            encodingLimits=limits,
            trajectory=xsd.trajectoryType.CARTESIAN,
            parallelImaging=xsd.parallelImagingType(
                accelerationFactor=xsd.accelerationFactorType(
                    kspace_encoding_step_1=self.accel, kspace_encoding_step_2=1
                ),
                calibrationMode=xsd.calibrationModeType.EMBEDDED,
            ),
        )
        return xsd.ismrmrdHeader(
            subjectInformation=xsd.subjectInformationType(patientID="P0042", patientName="Doe^Jane"),
            studyInformation=xsd.studyInformationType(studyInstanceUID="1.2.3.4", studyID="S1"),
            measurementInformation=xsd.measurementInformationType(
                measurementID="M7",
                patientPosition=xsd.patientPositionType.HFS,
                protocolName="gre_test",
                sequenceName="%SiemensSeq%\\gre",
            ),
            acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
                systemVendor="SIEMENS", systemFieldStrength_T=2.89362, receiverChannels=self.ncha
            ),
            experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_251_815),
            encoding=[encoding],
            sequenceParameters=xsd.sequenceParametersType(
                TR=[7.5],
                TE=[2.46 + 2.5 * i for i in range(self.ncontrasts)],
                TI=[900.0],
                flipAngle_deg=[15.0],
                sequence_type="Flash",
                echo_spacing=[2.5],
            ),
            userParameters=xsd.userParametersType(
                userParameterLong=[xsd.userParameterLongType(name="BitsStored", value=12)],
                userParameterDouble=[xsd.userParameterDoubleType(name="RefVoltage", value=231.5)],
                userParameterString=[xsd.userParameterStringType(name="Coil", value="Head_32")],
            ),
        )

    def write(self, path: Path) -> Path:
        with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as dset:
            dset.write_xml_header(xsd.ToXML(self.header()))
            for row, (flags, counters, samples) in enumerate(self.readouts):
                acq = ismrmrd.Acquisition.from_array(
                    samples, self.trajs.get(row), sample_time_us=2.5, center_sample=samples.shape[1] // 2
                )
                for name, value in counters.items():
                    setattr(acq.idx, name, value)
                acq.position[:] = (0.0, 0.0, 5.0 * counters.get("slice", 0))
                acq.slice_dir[:] = (0.0, 0.0, 1.0)
                for flag in flags:
                    acq.set_flag(flag)
                dset.append_acquisition(acq)
        return path

    def expected(self, rows: list[int]) -> np.ndarray:
        """The full twix array (Col, Cha, Lin, ...) of the readouts ``rows``, placed by counters."""
        counters = np.array([[self.readouts[r][1].get(c, 0) for c in LOOP] for r in rows]).reshape(-1, 9)
        shape = (max(self.readouts[r][2].shape[1] for r in rows), self.ncha, *(counters.max(axis=0) + 1))
        out = np.zeros(shape, np.complex64)
        for r, c in zip(rows, counters, strict=True):
            out[(slice(None), slice(None), *c)] = self.readouts[r][2].T
        return out

    def rows(self, *flags: int, without: tuple[int, ...] = ()) -> list[int]:
        return [
            i
            for i, (f, _, _) in enumerate(self.readouts)
            if (not flags or set(f) & set(flags)) and not set(f) & set(without)
        ]


def scan_2d() -> Scan:
    s = Scan()
    for lin in range(s.ny):
        s.add(kspace_encode_step_1=lin)
    return s


def scan_3d() -> Scan:
    s = Scan(nz=6)
    for par in range(s.nz):
        for lin in range(s.ny):
            s.add(kspace_encode_step_1=lin, kspace_encode_step_2=par)
    return s


def scan_multislice() -> Scan:
    s = Scan(nslices=5)
    for lin in range(s.ny):
        for sli in (0, 2, 4, 1, 3):  # interleaved
            s.add([ismrmrd.ACQ_LAST_IN_SLICE] if lin == s.ny - 1 else [], kspace_encode_step_1=lin, slice=sli)
    return s


def scan_multiecho() -> Scan:
    s = Scan(ncontrasts=3)
    for lin in range(s.ny):
        for eco in range(s.ncontrasts):
            s.add([ismrmrd.ACQ_IS_REVERSE] if eco % 2 else [], kspace_encode_step_1=lin, contrast=eco)
    return s


def scan_accelerated() -> Scan:
    """R = 2 with 8 reference lines around the centre (calibration-and-imaging on the sampled ones,
    calibration only in between), noise readouts first, a phase-correction and a navigator readout."""
    s = Scan(ny=32, accel=2)
    for _ in range(3):
        s.add([NOISE])
    s.add([ismrmrd.ACQ_IS_PHASECORR_DATA], segment=1)
    for lin in range(s.ny):
        ref = 12 <= lin < 20
        if lin % 2 == 0:
            s.add([CALIB_IMG] if ref else [], kspace_encode_step_1=lin)
        elif ref:
            s.add([CALIB], kspace_encode_step_1=lin)
    s.add([ismrmrd.ACQ_IS_NAVIGATION_DATA], kspace_encode_step_1=0)
    return s


SCANS = {
    "2d": scan_2d,
    "3d": scan_3d,
    "multislice": scan_multislice,
    "multiecho": scan_multiecho,
    "accelerated": scan_accelerated,
}


@pytest.fixture(params=sorted(SCANS))
def scan_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Scan, Path]:
    scan = SCANS[request.param]()
    return scan, scan.write(tmp_path / f"{request.param}.h5")


# --- the twix-like scan -------------------------------------------------------------------------------


def test_every_readout_lands_at_its_counters(scan_file: tuple[Scan, Path]) -> None:
    scan, path = scan_file
    with read_twix(path) as twix:
        image_rows = scan.rows(
            without=(NOISE, CALIB, ismrmrd.ACQ_IS_PHASECORR_DATA, ismrmrd.ACQ_IS_NAVIGATION_DATA)
        )
        assert twix.image.full_dims == DIMS
        np.testing.assert_array_equal(twix.image[...], scan.expected(image_rows))
        assert list(twix.image.rows) == image_rows
        refs = scan.rows(CALIB, CALIB_IMG)
        assert len(twix.refscan) == len(refs)
        if refs:
            np.testing.assert_array_equal(twix["refscan"][...], scan.expected(refs))


def test_accelerated_parts(tmp_path: Path) -> None:
    scan = scan_accelerated()
    with read_twix(scan.write(tmp_path / "acc.h5")) as twix:
        assert {n: len(p) for n, p in twix.parts.items()} == {
            "image": 16,
            "refscan": 8,
            "noise": 3,
            "phasecor": 1,
            "navigator": 1,
        }
        img = twix.image[...]
        assert img.shape[DIMS.index("Lin")] == 31  # last sampled line is 30
        assert not img[:, :, 1::2].any() and img[:, :, ::2].all()  # odd lines not measured
        ref = twix.refscan[...]
        assert ref.shape[2] == 20 and not ref[:, :, :12].any() and ref[:, :, 12:20].all()
        # calibration-and-imaging readouts are the same samples in both parts
        np.testing.assert_array_equal(img[:, :, 12:20:2], ref[:, :, 12:20:2])
        # noise readouts carry no counters: the k-th one is at Lin = k
        noise = twix.noise
        noise.squeeze = True
        assert noise.dims == ("Col", "Cha", "Lin") and noise.shape == (64, 4, 3)
        np.testing.assert_array_equal(noise[:, :, 2], scan.readouts[2][2].T)
        assert twix.phasecor.Seg.tolist() == [1]
        assert twix.hdr.Meas.lRefLinesPE == 8 and twix.hdr.Meas.lAccelFactPE == 2


def test_header_entries_equal_the_mrd_header(tmp_path: Path) -> None:
    scan = scan_multiecho()
    mrd = scan.header()
    enc = mrd.encoding[0]
    with read_twix(scan.write(tmp_path / "me.h5")) as twix:
        hdr = twix.hdr
        assert hdr is twix["hdr"] and hdr["Meas"]["lBaseResolution"] == hdr.Meas.lBaseResolution
    assert hdr.Meas.lBaseResolution == enc.reconSpace.matrixSize.x == 32
    assert hdr.Config.NColMeas == enc.encodedSpace.matrixSize.x
    assert hdr.Meas.lPhaseEncodingLines == enc.encodedSpace.matrixSize.y
    assert hdr.Meas.lPartitions == enc.encodedSpace.matrixSize.z
    assert (hdr.Config.NImageCols, hdr.Config.NImageLins, hdr.Config.NImagePar) == (32, 16, 1)
    assert hdr.Meas.dReadoutFOV == enc.reconSpace.fieldOfView_mm.x
    assert hdr.Meas.dPhaseFOV == enc.reconSpace.fieldOfView_mm.y
    assert hdr.Meas.dThickness == enc.reconSpace.fieldOfView_mm.z
    assert hdr.Config.ReadFoV == enc.encodedSpace.fieldOfView_mm.x
    assert hdr.Meas.alTR == [7500]
    assert hdr.Meas.alTE == [round(te * 1000) for te in mrd.sequenceParameters.TE] == [2460, 4960, 7460]
    assert hdr.Meas.alTI == [900000] and hdr.Meas.adFlipAngleDegree == [15.0]
    assert hdr.Meas.lEchoSpacing == 2500 and hdr.Meas.SequenceType == "Flash"
    assert hdr.Meas.alDwellTime == 2500
    assert hdr.Meas.BandwidthPerPixel == pytest.approx(1e6 / (2.5 * 64))
    assert hdr.Dicom.flReadoutOSFactor == 2.0
    assert hdr.Meas.dPhaseOversamplingForDialog == 0.0
    assert hdr.Meas.PhasePartialFourier == 1.0 and hdr.Meas.ReadoutPartialFourier == 1.0
    assert hdr.Meas.lAccelFactPE == 1 and hdr.Meas.lAccelFact3D == 1 and hdr.Meas.RefScanMode == "embedded"
    assert hdr.Config.NChaMeas == 4
    assert (hdr.Config.NEcoMeas, hdr.Meas.lContrasts, hdr.Config.NSlcMeas, hdr.Config.NLinMeas) == (
        3,
        3,
        1,
        16,
    )
    assert (hdr.Config.NRepMeas, hdr.Config.NSetMeas, hdr.Config.NSegMeas, hdr.Config.NAveMeas) == (
        1,
        1,
        1,
        1,
    )
    assert hdr.Meas.Trajectory == "cartesian" and hdr.Meas.ucTrajectory == 1
    assert hdr.Config.ProtocolName == "gre_test" and hdr.Config.SequenceFileName == "%SiemensSeq%\\gre"
    assert hdr.Config.PatientID == "P0042" and hdr.Config.StudyInstanceUID == "1.2.3.4"
    assert hdr.Config.MeasUID == "M7" and hdr.Config.PatientPosition == "HFS"
    assert hdr.Dicom.flMagneticFieldStrength == pytest.approx(2.89362)
    assert hdr.Dicom.lFrequency == 123_251_815 and hdr.Dicom.Manufacturer == "SIEMENS"
    assert hdr.Meas.SlicePositions == [[0.0, 0.0, 0.0]] and hdr.Meas.SliceNormal == [0.0, 0.0, 1.0]
    assert hdr.UserParameters == {"BitsStored": 12, "RefVoltage": 231.5, "Coil": "Head_32"}


def test_multislice_positions_and_flags(tmp_path: Path) -> None:
    scan = scan_multislice()
    with read_twix(scan.write(tmp_path / "ms.h5")) as twix:
        assert twix.hdr.Meas.SlicePositions == [[0.0, 0.0, 5.0 * s] for s in range(5)]
        assert twix.image.is_last_in_slice.sum() == 5
        assert twix.image.Sli[:5].tolist() == [0, 2, 4, 1, 3]


def test_reverse_flag_is_exposed(tmp_path: Path) -> None:
    scan = scan_multiecho()
    with read_twix(scan.write(tmp_path / "me.h5")) as twix:
        img = twix.image
        np.testing.assert_array_equal(img.is_reverse, img.Eco % 2 == 1)
        assert img.has_flag("ACQ_IS_REVERSE").sum() == 16
        with pytest.raises(TwixError, match="NOT_A_FLAG"):
            img.has_flag("NOT_A_FLAG")


def test_selection_squeeze_and_names(tmp_path: Path) -> None:
    scan = scan_3d()
    with read_twix(scan.write(tmp_path / "3d.h5")) as twix:
        img = twix.image
        full = img[...]
        assert full.shape == (64, 4, 16, 6, 1, 1, 1, 1, 1, 1, 1) == img.shape
        np.testing.assert_array_equal(img[:, 1:3, ::2, -1], full[:, 1:3, ::2, -1])
        np.testing.assert_array_equal(img[:, [3, 0, 3], [5, 1]], full[:, [3, 0, 3]][:, :, [5, 1]])
        np.testing.assert_array_equal(img.select(Par=2, Cha=0), full[:, 0, :, 2])
        img.squeeze = True
        assert img.dims == ("Col", "Cha", "Lin", "Par") and img.shape == (64, 4, 16, 6)
        np.testing.assert_array_equal(img[..., 4], full[:, :, :, 4, 0, 0, 0, 0, 0, 0, 0])
        np.testing.assert_array_equal(img[10, :, 3], full[10, :, 3, :, 0, 0, 0, 0, 0, 0, 0])
        assert img[:].flags.f_contiguous
        with pytest.raises(TwixError, match="out of range for Par"):
            img[:, :, :, 6]
        with pytest.raises(TwixError, match="unknown dimensions"):
            img.select(Slice=0)
        with pytest.raises(TwixError, match="5 indices"):
            img[0, 0, 0, 0, 0]


def test_selection_reads_only_the_readouts_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = scan_multislice()
    with read_twix(scan.write(tmp_path / "ms.h5")) as twix:
        read: list[int] = []
        original = twix._readouts

        def spy(rows: np.ndarray, *args: object):  # noqa: ANN202
            read.extend(rows.tolist())
            return original(rows, *args)

        monkeypatch.setattr(twix, "_readouts", spy)
        sli3 = twix.image.select(Sli=3)
        assert sorted(read) == [i for i, (_, c, _) in enumerate(scan.readouts) if c["slice"] == 3]
        np.testing.assert_array_equal(sli3, scan.expected(list(range(len(scan.readouts))))[:, :, :, :, 3])


def test_remove_os_crops_the_readout_fov(tmp_path: Path) -> None:
    scan = Scan(ny=2)
    img = np.zeros((scan.ncha, 64), np.complex64)
    img[:, 16:48] = np.arange(32) + 1j
    ksp = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1), axes=-1)
    scan.readouts = [([], {"kspace_encode_step_1": 0}, ksp.astype(np.complex64))]
    with read_twix(scan.write(tmp_path / "os.h5")) as twix:
        twix.image.remove_os = True
        assert twix.image.full_shape[0] == 32
        ro = twix.image[:, :, 0, 0, 0, 0, 0, 0, 0, 0, 0].T
    back = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(ro, axes=-1), axis=-1), axes=-1)
    np.testing.assert_allclose(back, img[:, 16:48], atol=1e-3)


def test_trajectories_are_placed_like_the_samples(tmp_path: Path) -> None:
    """Radial 2D: every spoke's (kx, ky) trajectory lands at its Lin, as float32 (Col, Dim, Lin, ...);
    with another echo of 3D trajectories, Dim is the largest and the 2D ones are zero-padded."""
    scan = Scan(ny=5, ncontrasts=2)
    ncol = 2 * scan.nx
    radius = np.linspace(-0.5, 0.5, ncol, dtype=np.float32)
    for spoke in range(scan.ny):
        angle = np.pi * spoke / scan.ny
        kxy = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        scan.trajs[len(scan.readouts)] = kxy.astype(np.float32)
        scan.add(kspace_encode_step_1=spoke)
    scan.trajs[len(scan.readouts)] = np.full((ncol, 3), 7, np.float32)
    scan.add(kspace_encode_step_1=2, contrast=1)
    with read_twix(scan.write(tmp_path / "radial.h5")) as twix:
        img = twix.image
        traj = img.traj
        assert traj.full_dims == ("Col", "Dim", *DIMS[2:])
        assert traj.shape == (ncol, 3, 5, 1, 1, 1, 1, 2, 1, 1, 1)
        full = traj[...]
        assert full.dtype == np.float32 and full.flags.f_contiguous
        sq = full.reshape(ncol, 3, 5, 2, order="F")  # Col, Dim, Lin, Eco
        for row in range(scan.ny):
            np.testing.assert_array_equal(sq[:, :2, row, 0], scan.trajs[row])
            assert not sq[:, 2, row, 0].any()
        assert (sq[:, :, 2, 1] == 7).all() and not sq[:, :, [0, 1, 3, 4], 1].any()
        img.squeeze = True
        assert traj.dims == ("Col", "Dim", "Lin", "Eco")
        np.testing.assert_array_equal(traj.select(Lin=3, Dim=1, Eco=0), scan.trajs[3][:, 1])
        np.testing.assert_array_equal(traj[::2, 0, 1:3, 0], sq[::2, 0, 1:3, 0])
        expected = scan.expected(list(range(scan.ny)))
        np.testing.assert_array_equal(img[:, :, :, 0], expected[:, :, :, 0, 0, 0, 0, 0, 0, 0, 0])
    with read_twix(scan_2d().write(tmp_path / "cartesian.h5")) as twix:  # no trajectories: Dim is 0
        assert twix.image.traj.shape[:3] == (64, 0, 16) and twix.image.traj[...].size == 0


def _large_scan(path: Path, n: int = 384, ncha: int = 16, ncol: int = 1024, **storage: object) -> np.ndarray:
    """A raw MRD file of ``n`` readouts of ncha × ncol (384 × 16 × 1024: 48 MiB of samples), one per
    Lin; returns the samples, (n, ncha, ncol) complex64."""
    import h5py

    rng = np.random.default_rng(1)
    samples = (rng.standard_normal((n, ncha, ncol)) + 1j * rng.standard_normal((n, ncha, ncol))).astype(np.complex64)
    xml = xsd.ToXML(Scan(nx=ncol // 2, ny=n, ncha=ncha).header()).encode()
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset/xml", data=[xml], dtype=h5py.string_dtype())
        ds = f.create_dataset("dataset/data", (n,), ismrmrd.hdf5.acquisition_dtype, **storage)
        for start in range(0, n, 64):
            rows = np.zeros(min(64, n - start), ismrmrd.hdf5.acquisition_dtype)
            rows["head"]["version"] = 1
            rows["head"]["number_of_samples"], rows["head"]["active_channels"] = ncol, ncha
            rows["head"]["idx"]["kspace_encode_step_1"] = np.arange(start, start + len(rows))
            for i in range(len(rows)):
                rows["data"][i] = samples[start + i].view(np.float32).ravel()
                rows["traj"][i] = np.zeros(0, np.float32)
            ds[start: start + len(rows)] = rows
    return samples


LARGE_STORAGE = {"chunked": {"chunks": (64,), "maxshape": (None,)}, "contiguous": {}}


@pytest.mark.parametrize("storage", sorted(LARGE_STORAGE))
def test_selection_scratch_memory_is_bounded(tmp_path: Path, storage: str) -> None:
    """Selecting all 48 MiB of a scan allocates the output and little else (traced allocations): the
    samples are read straight into their places, not through a block buffer."""
    import tracemalloc

    samples = _large_scan(tmp_path / "large.h5", **LARGE_STORAGE[storage])
    with read_twix(tmp_path / "large.h5") as twix:
        twix.image[:, :, :2]  # warm: first-use allocations of numpy and h5py are not the reader's
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            data = twix.image[...]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert data.nbytes == samples.nbytes
        print(f"traced peak {(peak - data.nbytes) / 2**20:.2f} MiB beyond the output")
        assert peak - data.nbytes < 1 << 20, f"{(peak - data.nbytes) / 2**20:.1f} MiB beyond the output"
        np.testing.assert_array_equal(data[:, :, :, 0, 0, 0, 0, 0, 0, 0, 0], samples.transpose(2, 1, 0))


_RSS_PROBE = """
import sys
import numpy as np
from reconq.parametermaps import read_twix

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

twix = read_twix(sys.argv[1])
twix.image[:, :, :2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident set is reset to the current one
base = status("VmRSS")
data = twix.image[...]
print(status("VmHWM") - base - data.nbytes)
"""


def test_selection_peak_resident_memory_is_the_output(tmp_path: Path) -> None:
    """What tracing cannot see (HDF5's own buffers): the process's peak resident set during a
    48 MiB selection is at most the output plus a few MiB."""
    import os
    import subprocess
    import sys

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    _large_scan(tmp_path / "large.h5", **LARGE_STORAGE["chunked"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "large.h5")], check=True,
                         capture_output=True, text=True, env=env).stdout
    beyond = int(out.split()[-1])
    print(f"peak resident set {beyond / 2**20:.1f} MiB beyond the output")
    assert beyond < 8 << 20, f"peak resident set {beyond / 2**20:.1f} MiB beyond the output"


def test_not_an_mrd_file(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["other"] = 1
    with pytest.raises(TwixError, match="not a raw MRD file"):
        read_twix(tmp_path / "x.h5")


# --- the parameter map --------------------------------------------------------------------------------


def _write_map(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_default_map_covers_the_issue_list() -> None:
    names = set(default_map().entries)
    for name in (
        "Meas.lBaseResolution",
        "Config.NImageLins",
        "Meas.dReadoutFOV",
        "Meas.dThickness",
        "Meas.SlicePositions",
        "Meas.alTR",
        "Meas.alTE",
        "Meas.alTI",
        "Meas.adFlipAngleDegree",
        "Meas.BandwidthPerPixel",
        "Meas.alDwellTime",
        "Dicom.flReadoutOSFactor",
        "Meas.dPhaseOversamplingForDialog",
        "Meas.PhasePartialFourier",
        "Meas.lAccelFactPE",
        "Meas.lRefLinesPE",
        "Config.NChaMeas",
        "Config.NSlcMeas",
        "Config.NParMeas",
        "Config.NEcoMeas",
        "Config.NAveMeas",
        "Config.NRepMeas",
        "Config.NSetMeas",
        "Config.NSegMeas",
        "Meas.lEchoSpacing",
        "Meas.Trajectory",
        "Config.SequenceFileName",
        "Config.ProtocolName",
        "Config.PatientID",
        "Config.StudyInstanceUID",
        "Config.MeasUID",
        "Dicom.flMagneticFieldStrength",
    ):
        assert name in names, name


def test_site_map_overrides_and_extends(tmp_path: Path) -> None:
    site = _write_map(
        tmp_path / "site.yaml",
        {
            "user_parameters": "User",
            "drop": ["Meas.alTI"],
            "entries": {
                "Meas.alTR": {"scale": 1.0, "type": "list[float]"},  # keep TR in ms
                "Meas.lBaseResolution": {"source": "encoding[0].encodedSpace.matrixSize.x"},
                "Meas.sCoilSelectMeas.Name": {"source": "user.Coil", "type": "str", "mandatory": True},
                "Meas.lBitsStored": {"source": ["user.Missing", "user.BitsStored"], "type": "int"},
                "Meas.NotThere": {"source": "user.Missing", "type": "int", "default": 3},
            },
        },
    )
    scan = scan_2d()
    with read_twix(scan.write(tmp_path / "2d.h5"), param_map=site) as twix:
        hdr = twix.hdr
    assert hdr.Meas.alTR == [7.5]
    assert hdr.Meas.lBaseResolution == 64
    assert hdr.Meas.sCoilSelectMeas.Name == "Head_32"
    assert hdr.Meas.lBitsStored == 12 and hdr.Meas.NotThere == 3
    assert "alTI" not in hdr.Meas and "UserParameters" not in hdr
    assert hdr.User["RefVoltage"] == 231.5
    assert hdr.Meas.alTE == [2460]  # untouched default entries stay
    # a map object and a list of site maps work the same
    pmap = load_map([site])
    assert pmap.entries["Meas.lBaseResolution"].map_file == str(site)
    assert pmap.entries["Meas.alTE"].map_file == "default_map.yaml"


@pytest.mark.parametrize(
    ("entry", "spec", "match"),
    [
        (
            "Meas.lBaseResolution",
            {"source": "encoding[0].encodedSpace.matrixSize.w"},
            "matrixSizeType has no field 'w'",
        ),
        ("Meas.lX", {"source": "encoding.encodedSpace", "type": "int"}, "encodedSpace"),
        ("Meas.lX", {"source": "encoding[0].encodedSpace", "type": "int"}, "ends at a structure"),
        ("Meas.lX", {"source": "userParameters[0].x", "type": "int"}, "not a list"),
        ("Meas.lX", {"source": "acq.no_such_field", "type": "int"}, "no field 'no_such_field'"),
        ("Meas.lX", {"source": "derived.magic", "type": "int"}, "unknown derived quantity"),
        ("Meas.lX", {"source": "user.A", "type": "integer"}, "unknown type 'integer'"),
        ("Meas.lX", {"source": "user.A", "type": "int", "mandatory": "yes"}, "'mandatory' is true or false"),
        ("Meas.lX", {"source": "user.A", "type": "int", "mandatory": True, "default": 1}, "takes no default"),
        ("Meas.lX", {"source": "user.A", "type": "int", "default": "one"}, "default does not have type int"),
        ("Meas.lX", {"source": "user.A", "type": "int", "scael": 2}, "unknown fields \\['scael'\\]"),
        ("Meas.lX", {"type": "int"}, "'source' is missing"),
        ("lX", {"source": "user.A", "type": "int"}, "<Group>.<Name>"),
        ("Meas.lBaseResolution.x", {"source": "user.A", "type": "int"}, "clashes with entry"),
    ],
)
def test_broken_map_fails_on_load_naming_the_entry(
    tmp_path: Path, entry: str, spec: dict, match: str
) -> None:
    site = _write_map(tmp_path / "broken.yaml", {"entries": {entry: spec}})
    with pytest.raises(ParameterMapError, match=match) as err:
        load_map(site)
    assert err.value.entry == entry and f"map entry {entry!r}" in str(err.value)
    assert err.value.map_file == str(site)
    assert err.value.field == spec.get("source")
    if "source" in spec:
        assert f"field {spec['source']!r}" in str(err.value)


@pytest.mark.parametrize(
    "doc",
    [
        [1, 2],
        {"entries": [1]},
        {"version": 2},
        {"enteries": {}},
        {"drop": ["Meas.nothing"]},
        {"user_parameters": "not a name"},
    ],
)
def test_malformed_map_documents(tmp_path: Path, doc: object) -> None:
    with pytest.raises(ParameterMapError):
        load_map(_write_map(tmp_path / "bad.yaml", doc))
    with pytest.raises(ParameterMapError, match="cannot read"):
        load_map(tmp_path / "missing.yaml")


def _context(header: xsd.ismrmrdHeader) -> ScanContext:
    return ScanContext(header)


def test_missing_mandatory_field_names_field_and_entry() -> None:
    header = scan_2d().header()
    header.measurementInformation = None
    pmap = default_map().extended({"entries": {"Config.ProtocolName": {"mandatory": True}}})
    with pytest.raises(ParameterMapError, match="mandatory field is missing") as err:
        pmap.apply(_context(header))
    assert err.value.entry == "Config.ProtocolName"
    assert err.value.field == "measurementInformation.protocolName"
    assert "'Config.ProtocolName'" in str(err.value) and "measurementInformation.protocolName" in str(
        err.value
    )


def test_ill_typed_mandatory_field_names_field_and_entry() -> None:
    pmap = default_map().extended(
        {"entries": {"Meas.lCoil": {"source": "user.Coil", "type": "int", "mandatory": True}}}
    )
    with pytest.raises(ParameterMapError, match="does not have type int") as err:
        pmap.apply(_context(scan_2d().header()))
    assert (err.value.entry, err.value.field) == ("Meas.lCoil", "user.Coil")
    # a non-integral float is no int either
    header = scan_2d().header()
    header.encoding[0].reconSpace.fieldOfView_mm.x = 255.5
    pmap = default_map().extended({"entries": {"Meas.dReadoutFOV": {"type": "int"}}})
    with pytest.raises(ParameterMapError, match="Meas.dReadoutFOV"):
        pmap.apply(_context(header))


def test_ill_typed_optional_field_falls_back_to_default(caplog: pytest.LogCaptureFixture) -> None:
    pmap = default_map().extended(
        {"entries": {"Meas.lCoil": {"source": "user.Coil", "type": "int", "default": -1}}}
    )
    with caplog.at_level(logging.WARNING, logger="reconq.parametermaps.mapping"):
        hdr = pmap.apply(_context(scan_2d().header()))
    assert hdr.Meas.lCoil == -1
    assert "Meas.lCoil" in caplog.text and "user.Coil" in caplog.text


def test_header_only_mapping_without_readouts() -> None:
    hdr = default_map().apply(_context(scan_2d().header()))
    assert hdr.Meas.lBaseResolution == 32
    assert "alDwellTime" not in hdr.Meas  # needs a readout
    assert hdr.Meas.SlicePositions == [] and hdr.Meas.lRefLinesPE == 0


def test_parameter_map_is_reusable_across_scans(tmp_path: Path) -> None:
    pmap: ParameterMap = load_map()
    for name in ("2d", "3d"):
        scan = SCANS[name]()
        with read_twix(scan.write(tmp_path / f"{name}.h5"), param_map=pmap) as twix:
            assert twix.hdr.Meas.lPartitions == scan.nz


# --- reading the headers without the samples ---------------------------------------------------------


def _rows(n: int) -> np.ndarray:
    rows = np.zeros(n, ismrmrd.hdf5.acquisition_dtype)
    rows["head"]["scan_counter"] = np.arange(n)
    rows["head"]["idx"]["kspace_encode_step_1"] = np.arange(n)[::-1]
    rows["head"]["number_of_samples"], rows["head"]["active_channels"] = 8, 2
    if n > 4:
        rows["head"]["trajectory_dimensions"][4] = 2  # row 4 has a 2D trajectory
    for i in range(n):
        rows["data"][i] = np.full(32, i, np.float32)
        rows["traj"][i] = np.arange(16, dtype=np.float32) + i if i == 4 else np.zeros(0, np.float32)
    return rows


@pytest.mark.parametrize("storage", [{}, {"chunks": (5,)}, {"chunks": (5,), "compression": "gzip"}])
def test_heads_read_from_storage_equal_hdf5s(tmp_path: Path, storage: dict) -> None:
    import h5py

    from reconq.core.mrdfile import MrdFile

    path = tmp_path / "raw.h5"
    rows = _rows(12)  # 12 rows: the last chunk of 5 is partial
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset/xml", data=[xsd.ToXML(scan_2d().header()).encode()], dtype=h5py.string_dtype())
        f.create_dataset("dataset/data", data=rows, **storage)
    mrd = MrdFile(path)
    try:
        np.testing.assert_array_equal(mrd.heads, rows["head"])
        got = list(mrd.readouts(np.array([0, 7, 11])))
        np.testing.assert_array_equal(got[1], np.full((2, 8), 7 + 7j, np.complex64))
        assert (mrd._refs is None) == ("compression" in storage)  # references followed by hand, or HDF5
        trajs = list(mrd.readouts(np.array([3, 4]), "traj"))
        np.testing.assert_array_equal(trajs[1], np.arange(16, dtype=np.float32).reshape(8, 2) + 4)
        assert trajs[0].shape == (8, 0)
        places = np.zeros((3, 2, 8), np.complex64)  # read into the caller's arrays
        assert list(mrd.read(np.array([1, 5, 6]), dest=lambda i, shape: places[i])) == [None] * 3
        np.testing.assert_array_equal(places[:, 0, 0], [1 + 1j, 5 + 5j, 6 + 6j])
    finally:
        mrd.close()


def test_unparsable_header_xml(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset/xml", data=[b"<ismrmrdHeader><oops"], dtype=h5py.string_dtype())
        f.create_dataset("dataset/data", data=_rows(2))
    with pytest.raises(TwixError, match="cannot be parsed"):
        read_twix(path)
