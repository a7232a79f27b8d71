"""Any patient name: UTF-8 in the MRD header (a patient ``Müller^Jørgen``, a protocol ``t1_séance``) goes
through the wire, the raw file, the worker, the result file, retrieval and DICOM export unchanged."""

from __future__ import annotations

import io
import zipfile

import h5py
import ismrmrd
import numpy as np
import pydicom
import pytest
import redis
from fastapi.testclient import TestClient

from reconq.api import exports
from reconq.api.auth import hash_token
from reconq.core.jobs import JobStore
from reconq.core.mrdfile import MrdFile, parse_header, read_header, read_xml
from reconq.core.results import read_images, read_result_xml, result_file, write_images
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.gateway import client
from reconq.gateway import protocol as p
from reconq.gateway.rawfile import RawFileWriter
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.services import make_api

PATIENT = "Müller^Jørgen"
PROTOCOL = "t1_séance"
TOKEN = "unicode-token-0123456789abcdef"


def unicode_scan(patient_id: str = "UNI001"):
    return synthetic_scan(matrix=(32, 32), ncoil=2, nslices=2, patient_id=patient_id, patient_name=PATIENT,
                          protocol=PROTOCOL)


def an_image(series: int = 1, index: int = 1) -> ismrmrd.Image:
    image = ismrmrd.Image.from_array(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16))
    image.image_series_index, image.image_index = series, index
    image.field_of_view = (200.0, 200.0, 5.0)
    image.read_dir, image.phase_dir, image.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    image.meta = {"SequenceDescription": PROTOCOL}
    return image


# -- the MRD protocol's strings ------------------------------------------------------------------------------


@pytest.mark.parametrize("msg_id", [p.MessageId.TEXT, p.MessageId.HEADER, p.MessageId.CONFIG_TEXT])
def test_length_prefix_counts_utf8_bytes(msg_id: p.MessageId) -> None:
    text = f"<x patient='{PATIENT}' protocol='{PROTOCOL}'/>"
    wire = p.write_length_prefixed(msg_id, text)
    encoded = text.encode("utf-8")
    assert len(encoded) == len(text) + 3  # ü, ø and é take two bytes each
    assert wire == p.ID.pack(msg_id) + p.LENGTH.pack(len(encoded)) + encoded
    src = p.BytesSource(wire)
    assert p.read_message_id(src) == msg_id
    assert p.read_body(src, p.Limits(), msg_id) == text
    assert src.bytes_read == len(wire)  # nothing of the next message was eaten


def test_length_prefixed_text_that_is_not_utf8_is_refused() -> None:
    latin1 = PATIENT.encode("latin-1")
    src = p.BytesSource(p.LENGTH.pack(len(latin1)) + latin1)
    with pytest.raises(p.ProtocolError, match="HEADER is not UTF-8 text: byte 0xfc at offset 1"):
        p.read_length_prefixed(src, 1 << 10, "HEADER")


def test_client_sends_a_header_declared_utf8_that_parses() -> None:
    scan = unicode_scan()
    src = p.BytesSource(client.opening("cartesian", scan.header))
    assert p.read_message_id(src) == p.MessageId.CONFIG_FILE and p.read_config_file(src) == "cartesian"
    assert p.read_message_id(src) == p.MessageId.HEADER
    xml = p.read_body(src, p.Limits(), p.MessageId.HEADER)
    assert xml.startswith('<?xml version="1.0" encoding="utf-8"?>')
    header = ismrmrd.xsd.CreateFromDocument(xml)  # a plain MRD parser reads it too
    assert header.subjectInformation.patientName == PATIENT
    assert header.measurementInformation.protocolName == PROTOCOL


def test_a_header_declared_ascii_with_non_ascii_text_still_parses() -> None:
    """``ismrmrd.xsd.ToXML`` declares ASCII whatever the header holds; the text is what counts."""
    xml = ismrmrd.xsd.ToXML(unicode_scan().header)
    assert 'encoding="ascii"' in xml and PATIENT in xml
    header = parse_header(xml, "test")
    assert header.subjectInformation.patientName == PATIENT
    assert header.measurementInformation.protocolName == PROTOCOL


# -- raw files and result files ------------------------------------------------------------------------------


def test_raw_file_stores_a_utf8_header_byte_exact(tmp_path) -> None:
    xml = client.header_xml(unicode_scan().header)
    writer = RawFileWriter(tmp_path / "raw.h5")
    writer.write_header(xml)
    writer.write_config("cartesian", None)
    writer.finish()
    with h5py.File(tmp_path / "raw.h5", "r") as f:
        assert f["dataset/xml"][0] == xml.encode("utf-8")
    assert read_xml(tmp_path / "raw.h5") == xml
    header = read_header(tmp_path / "raw.h5")
    assert header.subjectInformation.patientName == PATIENT
    assert header.measurementInformation.protocolName == PROTOCOL
    with MrdFile(tmp_path / "raw.h5") as raw:  # as the worker reads it
        assert raw.xml == xml and raw.header.subjectInformation.patientName == PATIENT


def test_result_file_keeps_a_utf8_header_and_image_attributes(tmp_path) -> None:
    xml = ismrmrd.xsd.ToXML(unicode_scan().header)  # as a scanner's client may send it: declared ASCII
    path = tmp_path / "result.h5"
    write_images(path, [an_image(1, 1), an_image(1, 2)], xml)
    assert read_result_xml(path) == xml
    with h5py.File(path, "r") as f:
        assert f["dataset/xml"][0] == xml.encode("utf-8")
    images = read_images(path)
    assert len(images) == 2 and all(im.meta["SequenceDescription"] == PROTOCOL for im in images)
    write_images(tmp_path / "bare.h5", [an_image()])
    assert read_result_xml(tmp_path / "bare.h5") is None


def test_a_simulated_raw_file_keeps_a_non_ascii_name(tmp_path) -> None:
    path = write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2, patient_name="Müller^Jørgen"), tmp_path / "raw.h5")
    assert read_header(path).subjectInformation.patientName == "Müller^Jørgen"


def test_a_raw_file_header_that_is_not_utf8_is_named(tmp_path) -> None:
    with h5py.File(tmp_path / "latin1.h5", "w") as f:
        f.create_dataset("dataset/xml", data=[PATIENT.encode("latin-1")], dtype=h5py.special_dtype(vlen=bytes))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_xml(tmp_path / "latin1.h5")


def test_dicom_export_is_utf8(tmp_path) -> None:
    path = tmp_path / "result.h5"
    write_images(path, [an_image(1, 1), an_image(1, 2)], ismrmrd.xsd.ToXML(unicode_scan().header))
    for ds in dicom_files(exports.dicom_zip(path, "job1", f"{PROTOCOL} cartesian ReconQ")):
        assert_utf8_dicom(ds)


def dicom_files(data: bytes) -> list[pydicom.Dataset]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [pydicom.dcmread(io.BytesIO(zf.read(name))) for name in sorted(zf.namelist())]


def assert_utf8_dicom(ds: pydicom.Dataset) -> None:
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == PATIENT
    assert ds.PatientName.family_name == "Müller" and ds.PatientName.given_name == "Jørgen"
    assert ds.ProtocolName == PROTOCOL and ds.SeriesDescription.startswith(PROTOCOL)
    assert PATIENT.encode("utf-8") in ds["PatientName"].value.original_string  # stored as UTF-8 bytes


# -- the whole flow ------------------------------------------------------------------------------------------


def test_unicode_patient_end_to_end(gateway, worker, e2e_settings) -> None:
    host, port = gateway
    scan = unicode_scan("UNI_E2E")
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
    assert reply.closed and not reply.errors(), reply.texts
    job_id = reply.job_id()
    assert job_id is not None

    back = client.retrieve(host, port, scan.header)  # waits for the job
    assert back.closed and len(back.images) == 2, back.texts
    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url, decode_responses=True))
    job = store.get(job_id)
    assert job is not None and job.state is JobState.DONE, job
    assert job.protocol == PROTOCOL and job.patient_id == "UNI_E2E"
    result = result_file(ScanStore(e2e_settings.data_dir), job)  # derived from the job's ids and run
    assert read_header(result).subjectInformation.patientName == PATIENT

    by_identity = client.retrieve(host, port, client.retrieval_header("UNI_E2E", scan.header.studyInformation
                                                                      .studyInstanceUID, PROTOCOL))
    assert by_identity.closed and len(by_identity.images) == 2, by_identity.texts

    settings = e2e_settings.model_copy(update={"staff_tokens": {"robot": hash_token(TOKEN)}})
    api = TestClient(make_api(settings, redis.Redis.from_url(settings.redis_url, decode_responses=True)))
    staff = {"Authorization": f"Bearer {TOKEN}"}
    one = api.get(f"/api/jobs/{job_id}", headers=staff)
    assert one.status_code == 200 and one.json()["protocol"] == PROTOCOL
    z = api.get(f"/api/jobs/{job_id}/dicom", headers=staff)
    assert z.status_code == 200, z.text
    files = dicom_files(z.content)
    assert len(files) == 2
    for ds in files:
        assert_utf8_dicom(ds)
        assert ds.PatientID == "UNI_E2E"
