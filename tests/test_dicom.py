"""The DICOM export a PACS accepts: result files made as the worker makes them (a simulated scan, the
Cartesian pipeline, :func:`reconq.core.results.write_images`), exported, and checked by Debian's ``dciodvfy``
(dicom3tools) and against the scan's MRD header."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import ismrmrd
import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation
from xsdata.models.datatype import XmlDate, XmlTime

from reconq.api import exports
from reconq.core.results import read_images, write_images
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan, write_mrd

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed")

PATIENT = "Müller^Jørgen"
REFERRER = "Weiß^Anna"
FRAME_UID = "1.3.12.2.1107.5.2.43.166003.1.20261130140203123.0.0.0"
UID_ROOT = "1.2.826.0.1.3680043.10.999"
ORIENTATIONS = {
    "axial": None,
    "double-oblique": Rotation.from_euler("xy", [25, -35], degrees=True).as_matrix(),  # normal tilted twice
}


def scanner_scan(rotation: np.ndarray | None = None, *, bits: int | None = None, frame: bool = True,
                 sequence_type: str = "Flash"):
    """A simulated scan whose header says what a scanner's does: patient, study, series, system, sequence."""
    scan = synthetic_scan(matrix=(24, 32), ncoil=2, nslices=3, rotation=rotation, position=(12.0, -8.0, 40.0),
                          fov_mm=(240.0, 180.0, 4.0), slice_gap=1.0, patient_name=PATIENT, bits_stored=bits)
    h = scan.header
    h.subjectInformation.patientBirthdate = XmlDate(1970, 5, 17)
    h.subjectInformation.patientGender = "F"
    h.subjectInformation.patientWeight_kg = 68.5
    h.studyInformation.studyDate, h.studyInformation.studyTime = XmlDate(2026, 11, 30), XmlTime(14, 2, 3, 250_000_000)
    h.studyInformation.accessionNumber = 4711
    h.studyInformation.referringPhysicianName = REFERRER
    h.measurementInformation.seriesDate, h.measurementInformation.seriesTime = XmlDate(2026, 11, 30), XmlTime(14, 9, 0)
    h.measurementInformation.frameOfReferenceUID = FRAME_UID if frame else None
    h.measurementInformation.sequenceName = "*fl2d1"
    system = h.acquisitionSystemInformation
    system.institutionName, system.stationName, system.deviceSerialNumber = "Klinikum Süd", "MRC40001", "166003"
    h.sequenceParameters.TI, h.sequenceParameters.sequence_type = [300.0], sequence_type
    return scan


def result_of(scan, tmp_path: Path) -> Path:
    """The result file the worker writes for ``scan``: the Cartesian pipeline's images and the scan's header."""
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        images = get_pipeline("cartesian").run(raw, {}, lambda fraction, stage: None)
        xml = raw.xml
    write_images(tmp_path / "result.h5", images, xml)
    return tmp_path / "result.h5"


def unpacked(data: bytes, folder: Path) -> list[Path]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(folder)
        return [folder / name for name in sorted(zf.namelist())]


def dciodvfy(path: Path) -> list[str]:
    """What dciodvfy says of ``path`` (its errors and warnings go to stderr), line by line."""
    assert DCIODVFY is not None
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).splitlines()


def exported(path: Path, tmp_path: Path, uid_root: str = UID_ROOT) -> list[tuple[Path, pydicom.Dataset]]:
    files = unpacked(exports.dicom_zip(path, "job-7", "t1 cartesian ReconQ", uid_root=uid_root), tmp_path / "dcm")
    return [(f, pydicom.dcmread(f)) for f in files]


@needs_dciodvfy
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_dciodvfy_finds_no_errors(tmp_path, orientation):
    files = exported(result_of(scanner_scan(ORIENTATIONS[orientation]), tmp_path), tmp_path)
    assert len(files) == 3
    for f, _ in files:
        said = dciodvfy(f)
        assert not [line for line in said if line.startswith("Error")], "\n".join(said)
        # the one warning left: Laterality is empty because the header does not say (PS3.3 C.7.3.1)
        assert [line for line in said if line.startswith("Warning")] == [
            line for line in said if line.startswith("Warning") and "<Laterality>" in line]


@needs_dciodvfy
def test_an_inversion_recovery_has_its_inversion_time(tmp_path):
    [(f, ds), *_] = exported(result_of(scanner_scan(sequence_type="MPRAGE"), tmp_path), tmp_path)
    said = dciodvfy(f)
    assert not [line for line in said if line.startswith("Error")], "\n".join(said)
    assert (ds.ScanningSequence, ds.SequenceVariant, float(ds.InversionTime)) == ("IR", "MP", 300.0)


@needs_dciodvfy
def test_dciodvfy_finds_no_errors_without_a_header(tmp_path):
    image = ismrmrd.Image.from_array(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80)
    image.image_index, image.image_series_index, image.field_of_view = 1, 1, (240.0, 180.0, 4.0)
    image.read_dir, image.phase_dir, image.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    write_images(tmp_path / "bare.h5", [image])  # no MRD header: every Type 2 attribute empty
    [(f, ds)] = exported(tmp_path / "bare.h5", tmp_path)
    said = dciodvfy(f)
    assert not [line for line in said if line.startswith("Error")], "\n".join(said)
    assert (ds.ScanningSequence, ds.SequenceVariant, ds.BitsStored) == ("RM", "NONE", 16)
    assert ds.StudyDate == "" and ds.Manufacturer == "" and ds.EchoTime is None and ds.PatientSex == ""
    assert np.array_equal(ds.pixel_array, np.asarray(image.data)[0, 0])  # 16 bits: nothing clipped


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_the_headers_values_are_carried(tmp_path, orientation):
    scan = scanner_scan(ORIENTATIONS[orientation])
    for f, ds in exported(result_of(scan, tmp_path), tmp_path):
        assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == PATIENT
        assert PATIENT.encode("utf-8") in f.read_bytes() and REFERRER.encode("utf-8") in f.read_bytes()
        assert (ds.PatientBirthDate, ds.PatientSex, float(ds.PatientWeight)) == ("19700517", "F", 68.5)
        assert (ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber) == ("20261130", "140203.250000", "1",
                                                                                 "4711")
        assert str(ds.ReferringPhysicianName) == REFERRER
        assert (ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime) == ("20261130", "140900") * 2
        assert ds.StudyInstanceUID == scan.header.studyInformation.studyInstanceUID
        assert ds.FrameOfReferenceUID == FRAME_UID  # the scanner's: the images overlay its own
        assert ds.PatientPosition == "HFS" and ds.ProtocolName == "reconq_demo"
        assert (ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName, ds.StationName,
                ds.DeviceSerialNumber) == ("ReconQ", "Simulator", "Klinikum Süd", "MRC40001", "166003")
        assert float(ds.MagneticFieldStrength) == 3.0 and float(ds.ImagingFrequency) == pytest.approx(123.2)
        assert [float(ds.RepetitionTime), float(ds.EchoTime), float(ds.FlipAngle)] == [10.0, 5.0, 15.0]
        assert "InversionTime" not in ds  # a FLASH: the header's TI is no inversion's (dciodvfy refuses it)
        assert (ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType) == ("GR", "SP", "2D")
        assert ds.SequenceName == "*fl2d1" and ds.ImageType == ["DERIVED", "PRIMARY", "OTHER"]
        assert ds.SeriesNumber == 1 and ds.AcquisitionNumber == 1
    assert [ds.InstanceNumber for _, ds in exported(result_of(scan, tmp_path), tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("bits", [None, 10])
def test_bits_stored_is_the_scalings(tmp_path, bits):
    files = exported(result_of(scanner_scan(bits=bits), tmp_path), tmp_path)
    stored = bits or 12  # recon.images scales to 2**BitsStored - 1, 12 bits by default
    for _, ds in files:
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, stored, stored - 1, 0)
        assert ds.pixel_array.max() <= 2**stored - 1
    assert max(int(ds.pixel_array.max()) for _, ds in files) == 2**stored - 1  # the series' peak


def test_pixels_beyond_bits_stored_are_clipped_not_wrapped(tmp_path, caplog):
    scan = scanner_scan()
    data = np.full((24, 32), 1000, dtype=np.uint16)
    data[0, :4] = (4095, 4096, 5000, 65535)  # 5000 wrapped to 12 bits would be 904
    image = ismrmrd.Image.from_array(data)
    image.image_index, image.image_series_index, image.field_of_view = 1, 1, (240.0, 180.0, 4.0)
    image.read_dir, image.phase_dir, image.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    write_images(tmp_path / "over.h5", [image], ismrmrd.xsd.ToXML(scan.header))
    with caplog.at_level(logging.WARNING, logger="reconq.api.exports"):
        [(_, ds)] = exported(tmp_path / "over.h5", tmp_path)
    assert ds.BitsStored == 12 and list(ds.pixel_array[0, :5]) == [4095, 4095, 4095, 4095, 1000]
    assert "job job-7: 3 pixels outside 0..4095 (BitsStored 12) clipped" in caplog.text


def test_generated_uids_are_under_the_root_and_the_same_every_time(tmp_path):
    path = result_of(scanner_scan(frame=False), tmp_path)  # no frame of reference from the scanner

    def uids(files):
        return [(ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID, ds.SeriesInstanceUID,
                 ds.FrameOfReferenceUID) for _, ds in files]

    made = uids(exported(path, tmp_path))
    for row in made:
        for uid in row:
            assert uid.startswith(UID_ROOT + ".") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    assert made == uids(exported(path, tmp_path / "again"))  # derived from the job, not random
    assert len({row[0] for row in made}) == 3 and len({row[3] for row in made}) == 1
    default = uids(exported(path, tmp_path / "default", uid_root=""))
    assert all(uid.startswith(pydicom.uid.PYDICOM_ROOT_UID) for row in default for uid in row)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_geometry_is_the_images(tmp_path, orientation):
    path = result_of(scanner_scan(ORIENTATIONS[orientation]), tmp_path)
    for image, (_, ds) in zip(read_images(path), exported(path, tmp_path), strict=True):
        read_dir, phase_dir = np.asarray(image.read_dir, float), np.asarray(image.phase_dir, float)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [*read_dir, *phase_dir],
                                   atol=1e-6)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        assert (ds.Rows, ds.Columns, dy, dx) == (24, 32, 7.5, 7.5)
        # MRD's position is the centre pixel's, (rows // 2, columns // 2): the centred FFT's
        centre = (np.asarray([float(v) for v in ds.ImagePositionPatient]) + read_dir * dx * (ds.Columns // 2)
                  + phase_dir * dy * (ds.Rows // 2))
        np.testing.assert_allclose(centre, image.position[:], atol=1e-5)
        normal = np.cross(read_dir, phase_dir)
        assert float(ds.SliceLocation) == pytest.approx(float(np.dot(image.position[:], normal)), abs=1e-5)
        assert float(ds.SliceThickness) == pytest.approx(4.0)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_a_point_is_found_where_it_is_in_the_patient(tmp_path, orientation):
    """Ground truth for the geometry: a bright point put at a known patient position, reconstructed and
    exported, is found there by a DICOM reader's arithmetic (IPP + column * dc * row direction + row * dr *
    column direction), to well under a pixel."""
    geometry = dict(matrix=(24, 32), ncoil=2, nslices=1, rotation=ORIENTATIONS[orientation],
                    position=(12.0, -8.0, 40.0), fov_mm=(240.0, 180.0, 4.0))
    grid = synthetic_scan(**geometry).grids[0]
    (read, phase, _), (dx, dy, _) = grid.dirs, grid.spacing
    point = grid.centre + 5 * dx * read - 3 * dy * phase  # a voxel centre off the middle in both directions
    path = result_of(synthetic_scan(**geometry, markers=[(tuple(point), 50.0)]), tmp_path)
    ((_, ds),) = exported(path, tmp_path)
    row, column = np.unravel_index(np.argmax(ds.pixel_array), ds.pixel_array.shape)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    found = ipp + column * dc * iop[:3] + row * dr * iop[3:]
    np.testing.assert_allclose(found, point, atol=1e-3)


@pytest.mark.parametrize(("sequence_type", "scanning", "variant"), [
    ("Flash", ["GR"], ["SP"]),
    ("Gradient echo", ["GR"], ["NONE"]),
    ("TrueFISP", ["GR"], ["SS"]),
    ("TurboSpinEcho", ["SE"], ["NONE"]),
    ("spin echo EPI", ["SE", "EP"], ["NONE"]),
    ("EPI", ["EP"], ["NONE"]),
    ("inversion recovery spin echo", ["SE", "IR"], ["NONE"]),
    ("MPRAGE", ["IR"], ["MP"]),
    ("SENSE calibration", ["RM"], ["NONE"]),  # "se" only as a word
    (None, ["RM"], ["NONE"]),
])
def test_sequence_type_gives_the_mr_image_terms(sequence_type, scanning, variant):
    assert exports._sequence_terms(sequence_type) == (scanning, variant)


def test_identifiers_too_long_for_dicom_are_left_empty_never_cut(tmp_path, caplog):
    """A cut accession number or patient ID could be another order's or patient's: left empty, with a
    warning that does not show the value."""
    scan = scanner_scan()
    scan.header.studyInformation.accessionNumber = 12345678901234567890  # 20 digits; SH holds 16
    scan.header.subjectInformation.patientID = "P" * 70  # LO holds 64
    caplog.set_level(logging.WARNING)
    (_, ds), *_ = exported(result_of(scan, tmp_path), tmp_path)
    assert ds.AccessionNumber == "" and ds.PatientID == ""
    assert "accession number is longer than DICOM's 16 characters" in caplog.text
    assert "patient ID is longer than DICOM's 64 characters" in caplog.text
    assert "1234567890123456" not in caplog.text and "P" * 64 not in caplog.text
