"""A job's other scans (reference coil scans): found by id or protocol, waited for, refused when unusable."""

from __future__ import annotations

import pytest

from reconq.core.jobs import Job
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.workers.inputs import InputsMissing, InputsNotReady, resolve_inputs


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
    # scan ids begin with their creation time, as the gateway makes them
    add_scan(scans, "20261101T080000-old", "AdjCoilSens", created_at=1.0)
    add_scan(scans, "20261101T090000-new", "AdjCoilSens", created_at=2.0)
    add_scan(scans, "20261101T100000-other-patient", "AdjCoilSens", patient="P2", created_at=3.0)
    add_scan(scans, "20261101T110000-cut", "AdjCoilSens", state=ScanState.INCOMPLETE, created_at=4.0)
    params = resolve_inputs(job_with(reference_protocol="AdjCoilSens"), scans)
    assert params["reference"] == str(scans.raw_path("20261101T090000-new"))


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


@pytest.fixture(scope="module")
def e2e_settings(redis_server, tmp_path_factory):
    """conftest's e2e settings with a short poll for waiting inputs (overrides the shared fixture here)."""
    from reconq.core.settings import load_settings

    return load_settings(data_dir=tmp_path_factory.mktemp("inputs") / "data", redis_url=redis_server.url,
                         mrd_port=0, min_free_bytes=0, retrieve_wait_s=60.0, retrieve_poll_s=0.2,
                         inputs_poll_s=0.3)


def test_job_waits_for_its_reference_scan_then_runs(gateway, worker, e2e_settings):
    import time

    import redis

    from reconq.core.jobs import JobStore
    from reconq.core.states import JobState
    from reconq.gateway import client
    from reconq.recon.simulate import synthetic_scan

    host, port = gateway
    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url, decode_responses=True))
    target = synthetic_scan(matrix=(32, 32), ncoil=2, protocol="needs_ref", patient_id="INPUTS1")
    reply = client.send_scan(host, port, target.header, target.acquisitions, config="cartesian",
                             params={"reference_protocol": "RefCoils"})
    job_id = reply.job_id()

    def wait_state(state: JobState, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while (job := store.get(job_id)).state is not state and time.monotonic() < deadline:
            time.sleep(0.1)
        return job

    job = wait_state(JobState.WAITING_INPUTS)
    assert job.state is JobState.WAITING_INPUTS
    assert job.stage == "waiting for a reference scan with protocol 'RefCoils' of this patient and study"
    time.sleep(1.0)
    assert store.get(job_id).state is JobState.WAITING_INPUTS  # still waiting, polling
    reference = synthetic_scan(matrix=(24, 24), ncoil=2, protocol="RefCoils", patient_id="INPUTS1")
    assert client.send_scan(host, port, reference.header, reference.acquisitions, config="cartesian").job_id()
    job = wait_state(JobState.DONE)
    assert job.state is JobState.DONE, (job.state, job.stage, job.error)
    assert any("waiting_inputs" in line for line in store.log_lines(job_id))


def test_a_reference_path_from_a_client_is_never_used(scans):
    """``reference`` names a file: a client's value is dropped, and a reference must be the same patient's."""
    assert "reference" not in resolve_inputs(job_with(reference="/elsewhere/raw.h5"), scans)
    add_scan(scans, "theirs", "AdjCoilSens", patient="P2")
    with pytest.raises(InputsMissing, match="another patient or study"):
        resolve_inputs(job_with(reference_scan="theirs"), scans)
