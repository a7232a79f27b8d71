"""A job's other scans (reference coil scans): found by id or protocol, waited for, refused when unusable."""

from __future__ import annotations

import pytest

from reconq.jobs import Job
from reconq.storage import ScanRecord, ScanState, ScanStore
from workers.inputs import InputsMissing, InputsNotReady, resolve_inputs


@pytest.fixture
def scans(tmp_path) -> ScanStore:
    return ScanStore(tmp_path)


def add_scan(scans: ScanStore, scan_id: str, protocol: str, state=ScanState.COMPLETE, patient="P1",
             created_at=0.0) -> ScanRecord:
    record = ScanRecord(scan_id=scan_id, state=state, patient_id=patient, study_uid="S1", protocol=protocol,
                        created_at=created_at)
    scans.create(record)
    return record


def job_with(**params) -> Job:
    return Job(id="target-j1", scan_id="target", pipeline="sense", params=params, patient_id="P1", study_uid="S1")


def test_no_reference_named_leaves_params_alone(scans):
    assert resolve_inputs(job_with(lam=0.1), scans) == {"lam": 0.1}


def test_reference_by_protocol_takes_the_newest_complete_scan_of_the_same_patient(scans):
    add_scan(scans, "old", "AdjCoilSens", created_at=1.0)
    add_scan(scans, "new", "AdjCoilSens", created_at=2.0)
    add_scan(scans, "other-patient", "AdjCoilSens", patient="P2", created_at=3.0)
    add_scan(scans, "cut", "AdjCoilSens", state=ScanState.INCOMPLETE, created_at=4.0)
    params = resolve_inputs(job_with(reference_protocol="AdjCoilSens"), scans)
    assert params["reference"] == str(scans.raw_path("new"))


def test_reference_not_yet_acquired_is_waited_for(scans):
    with pytest.raises(InputsNotReady, match="protocol 'AdjCoilSens' of this patient and study"):
        resolve_inputs(job_with(reference_protocol="AdjCoilSens"), scans)
    add_scan(scans, "rx", "x", state=ScanState.RECEIVING)
    with pytest.raises(InputsNotReady, match="reference scan rx"):
        resolve_inputs(job_with(reference_scan="rx"), scans)


def test_unusable_reference_is_an_error(scans):
    with pytest.raises(InputsMissing, match="does not exist"):
        resolve_inputs(job_with(reference_scan="nope"), scans)
    add_scan(scans, "cut", "x", state=ScanState.INCOMPLETE)
    with pytest.raises(InputsMissing, match="incomplete"):
        resolve_inputs(job_with(reference_scan="cut"), scans)
    add_scan(scans, "ok", "x")
    assert resolve_inputs(job_with(reference_scan="ok"), scans)["reference"].endswith("ok/raw.h5")
