"""Retrieval you can trust: the newest images of the scanner's own exam, or a TEXT that says why not.

The choice rules are checked on job records; the sessions end to end over the real gateway (TCP) with a
real worker process reconstructing.
"""

from __future__ import annotations

import time

import ismrmrd
import numpy as np
import pytest
import redis

from reconq.core.jobs import Job, JobStore, newest_results
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.demo import expected_magnitude, nrmse
from reconq.gateway import client
from reconq.gateway import protocol as p
from reconq.gateway.retrieval import matched_protocol, missing_identity
from reconq.recon.simulate import synthetic_scan


def job(job_id: str, scan: str, seq: int, pipeline: str = "cartesian", state: JobState = JobState.DONE) -> Job:
    return Job(id=job_id, scan_id=scan, pipeline=pipeline, state=state, seq=seq)


# --- the rules, on job records -----------------------------------------------------------------------

def test_the_newest_scan_is_the_answer_even_while_it_runs():
    older_done, newer_running = job("a-j1", "a", 1), job("b-j1", "b", 2, state=JobState.RUNNING)
    assert newest_results([newer_running, older_done]) == [newer_running]


def test_each_pipeline_on_the_newest_scan_gives_its_newest_job():
    first, retro_sense, retro_again = job("b-j1", "b", 5), job("b-j2", "b", 7, "sense"), job("b-j3", "b", 9)
    assert newest_results([job("a-j1", "a", 3), first, retro_sense, retro_again]) == [retro_sense, retro_again]


def test_a_retro_recon_of_an_older_scan_does_not_stand_in_for_a_newer_scan():
    newer, retro_of_older = job("b-j1", "b", 5, state=JobState.FAILED), job("a-j2", "a", 8, "sense")
    assert newest_results([job("a-j1", "a", 3), newer, retro_of_older]) == [newer]


def test_jobs_are_numbered_as_recorded_whatever_the_clock(store: JobStore):
    store.create(Job(id="n-j1", scan_id="n1", pipeline="cartesian", patient_id="P", study_uid="S", protocol="t",
                     created_at=2_000_000_000.0))  # a clock that later steps back an hour
    store.create(Job(id="n2-j1", scan_id="n2", pipeline="cartesian", patient_id="P", study_uid="S", protocol="t",
                     created_at=2_000_000_000.0 - 3600))
    assert [j.id for j in store.exam_jobs("P", "S", "t")] == ["n2-j1", "n-j1"]
    assert [j.id for j in newest_results(store.exam_jobs("P", "S", "t"))] == ["n2-j1"]


def test_a_sites_retrieval_suffix_is_stripped_and_blank_identities_are_named(settings: Settings):
    assert matched_protocol("t1_mprage_retrieve", settings) == "t1_mprage"
    assert matched_protocol("t1_mprage", settings) == "t1_mprage"
    site = settings.model_copy(update={"retrieve_protocol_prefixes": ["RQ_"], "retrieve_protocol_suffixes": []})
    assert matched_protocol("RQ_t1_mprage_retrieve", site) == "t1_mprage_retrieve"
    assert missing_identity({"patient_id": " ", "study_uid": ""}) == ["patient ID", "study instance UID"]
    assert missing_identity({"patient_id": "P1", "study_uid": "1.2"}) == []


# --- end to end ---------------------------------------------------------------------------------------

def exam(n: int, matrix: tuple[int, int] = (64, 64), ncoil: int = 4, nslices: int = 1, protocol: str = "rq_t1"):
    """A scan of exam ``n`` (its own patient and study), so that tests sharing one Redis never match."""
    return synthetic_scan(matrix=matrix, ncoil=ncoil, nslices=nslices, protocol=protocol, patient_id=f"RQ{n}",
                          study_uid=f"1.2.826.0.1.3680043.2.1125.{n}")


def sent(reply: client.Reply, job_id: str) -> bool:
    return any(t.startswith("INF") and "images of job" in t and job_id in t for t in reply.texts)


@pytest.fixture
def jobs(e2e_settings: Settings) -> JobStore:
    return JobStore(redis.Redis.from_url(e2e_settings.redis_url or "", decode_responses=True))


def wait_done(jobs: JobStore, job_id: str, timeout: float = 60.0) -> Job:
    deadline = time.monotonic() + timeout
    while not (j := jobs.get(job_id)).state.finished:
        assert time.monotonic() < deadline, j
        time.sleep(0.1)
    return j


def test_a_newer_scan_still_running_is_waited_for_and_its_images_come_back(gateway, worker, jobs):
    host, port = gateway
    first = exam(1)
    j1 = client.send_scan(host, port, first.header, first.acquisitions, config="cartesian").job_id()
    assert wait_done(jobs, j1).state is JobState.DONE
    repeat = exam(1, matrix=(160, 160), ncoil=12, nslices=4)  # the patient moved: the series is repeated
    j2 = client.send_scan(host, port, repeat.header, repeat.acquisitions, config="cartesian").job_id()
    back = client.retrieve(host, port, repeat.header)
    assert back.closed and sent(back, j2) and not sent(back, j1), back.texts
    assert any(t.startswith(f"INF job {j2} ") and "waiting" in t for t in back.texts), back.texts
    got = np.stack([np.asarray(img.data)[0, 0].astype(np.float32) for img in back.images])
    assert got.shape == repeat.truth.shape
    assert nrmse(got, expected_magnitude(repeat.truth, repeat.mps)) < 0.01


def test_a_failed_newest_job_gets_its_error_never_older_images(gateway, worker, jobs):
    host, port = gateway
    first = exam(2)
    j1 = client.send_scan(host, port, first.header, first.acquisitions, config="cartesian").job_id()
    assert wait_done(jobs, j1).state is JobState.DONE
    again = exam(2)
    j2 = client.send_scan(host, port, again.header, again.acquisitions, config="cartesian",
                          params={"device": "no-such-device"}).job_id()
    back = client.retrieve(host, port, again.header)
    assert back.closed and not back.images, back.texts
    assert any(t.startswith(f"ERR job {j2} failed: device 'no-such-device'") for t in back.texts), back.texts
    older = client.retrieve(host, port, again.header, params={"job": j1})  # asked for by name: with a warning
    assert older.closed and len(older.images) == 1 and sent(older, j1), older.texts
    assert f"WRN job {j1} is not the newest reconstruction of this exam and protocol (newest: {j2})" \
        in " ".join(older.texts)


@pytest.mark.parametrize(("patient", "study", "missing"), [
    ("", "1.2.3", "no patient ID"), ("P9", "", "no study instance UID"), ("", "", "no patient ID and no study"),
])
def test_a_retrieval_without_identity_matches_nothing(gateway, patient, study, missing):
    host, port = gateway
    back = client.retrieve(host, port, client.retrieval_header(patient, study, "rq_t1"))
    assert back.closed and not back.images
    assert back.texts[-1].startswith("ERR retrieval refused: the retrieval scan's header has " + missing)
    assert '{"job": ID}' in back.texts[-1] and "dashboard" in back.texts[-1]


def test_images_carry_the_retrieval_sessions_measurement_uid(gateway, worker, jobs):
    host, port = gateway
    scan = exam(3)
    j1 = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian").job_id()
    assert wait_done(jobs, j1).state is JobState.DONE
    dummy = ismrmrd.Acquisition.from_array(np.zeros((1, 16), np.complex64))
    dummy.measurement_uid = 4242
    back = client.stream_session(host, port, client.opening("retrieve", scan.header), [p.write_acquisition(dummy)])
    assert back.closed and back.images and sent(back, j1), back.texts
    assert {img.measurement_uid for img in back.images} == {4242}


def test_a_retrieval_scan_with_another_recon_matrix_gets_images_at_its_own(gateway, worker, jobs):
    host, port = gateway
    scan = exam(4, matrix=(64, 64))
    j1 = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian").job_id()
    assert wait_done(jobs, j1).state is JobState.DONE
    wanted = exam(4, matrix=(96, 96))  # the retrieval protocol reconstructs at 96 x 96 over the same FOV
    back = client.retrieve(host, port, wanted.header)
    assert back.closed and back.images and sent(back, j1), back.texts
    space = wanted.header.encoding[0].reconSpace
    for img in back.images:
        assert tuple(img.matrix_size[:2]) == (space.matrixSize.x, space.matrixSize.y)
        np.testing.assert_allclose(img.field_of_view[:2], (space.fieldOfView_mm.x, space.fieldOfView_mm.y))
    assert any(t.startswith(f"INF job {j1}: ") and "96" in t for t in back.texts), back.texts


def test_a_missing_result_file_is_said_not_silent(gateway, worker, jobs, e2e_settings):
    host, port = gateway
    scan = exam(5)
    j1 = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian").job_id()
    done = wait_done(jobs, j1)
    assert done.state is JobState.DONE
    from reconq.core.results import result_file
    from reconq.core.storage import ScanStore

    result_file(ScanStore(e2e_settings.data_dir), done).unlink()  # where the worker wrote it
    back = client.retrieve(host, port, scan.header)
    assert back.closed and not back.images
    assert back.texts[-1].startswith(f"ERR the images of job {j1} cannot be read (result file missing"), back.texts


def test_redis_out_of_reach_is_an_err_not_silence(tmp_path):
    """Redis stopped under a running gateway: a retrieval scan is told so, and nothing is sent as images."""
    from reconq.core.redisconn import PrivateRedis
    from reconq.core.settings import load_settings
    from reconq.services import make_gateway

    server = PrivateRedis(tmp_path / "redis")
    server.start()
    settings = load_settings(data_dir=tmp_path / "data", redis_url=server.url, mrd_port=0, min_free_bytes=0)
    gw = make_gateway(settings)
    host, port = gw.start()
    try:
        server.stop()  # a real outage: the server process is gone
        back = client.retrieve(host, port, exam(6).header)
    finally:
        gw.stop()
    assert back.closed and not back.images
    assert back.texts[-1].startswith("ERR the job records cannot be read (Redis unreachable"), back.texts
