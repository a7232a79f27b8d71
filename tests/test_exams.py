"""When to retrieve: run-time history per device class, the exam picture (series, queue places, expected
finishes, progress that moves with time), ``GET /api/exams``, ``reconq exams`` and the gateway's ack."""

from __future__ import annotations

import json
import re
import time
from datetime import date

import pytest
import redis
from fastapi.testclient import TestClient

from reconq.api.auth import hash_token
from reconq.cli import main
from reconq.core.constants import WORKER_HEARTBEAT, WORKERS_INDEX
from reconq.core.jobs import Job, JobStore
from reconq.core.states import JobState
from reconq.gateway import client as mrd_client
from reconq.recon.simulate import synthetic_scan
from reconq.scheduler.estimate import CPU, GPU, history_seconds, record_runtime
from reconq.scheduler.exams import day_bounds, exams_of_day, shown_progress
from reconq.services import make_api, make_gateway

TOKEN = "test-token-0123456789abcdef"
STAFF = {"Authorization": f"Bearer {TOKEN}"}


def alive(client: redis.Redis, name: str, gpu_id: str = "") -> None:
    """A live worker's heartbeat (``gpu_id`` '' : a CPU worker)."""
    client.sadd(WORKERS_INDEX, name)
    client.set(WORKER_HEARTBEAT + name, json.dumps({"host": "n1", "pid": 1, "gpu_id": gpu_id, "job": "",
                                                    "job_since": None, "seen": time.time(), "queues": []}),
               ex=60)


def add(store: JobStore, job_id: str, scan_id: str, *, patient: str = "P0000001", study: str = "1.2.3",
        protocol: str = "t1", at: float, state: JobState = JobState.QUEUED, started: float | None = None,
        **fields) -> Job:
    job = Job(id=job_id, scan_id=scan_id, pipeline=fields.pop("pipeline", "cartesian"), patient_id=patient,
              study_uid=study, protocol=protocol, created_at=at, queued_at=at, **fields)
    assert store.create(job)
    if state in (JobState.RUNNING, JobState.DONE, JobState.FAILED):
        assert store.set_state(job_id, JobState.RUNNING, started_at=started or at, gpu="cpu")
    if state in (JobState.DONE, JobState.FAILED):
        assert store.set_state(job_id, state, progress=1.0 if state is JobState.DONE else 0.0,
                               error="" if state is JobState.DONE else "recon error: bad data")
    return store.get(job_id)


def today(now: float) -> tuple[float, float]:
    return day_bounds(date.fromtimestamp(now))


def only_series(exams):
    return {s.job_id: s for e in exams for s in e.series}


def test_run_times_are_kept_per_device_class(store):
    client = store.redis
    for s in (10.0, 20.0, 30.0):
        record_runtime(client, "sense", "t1", s, GPU)
    record_runtime(client, "sense", "t1", 300.0, CPU)
    assert history_seconds(client, "sense", "t1", GPU) == 20.0
    assert history_seconds(client, "sense", "t1") == 20.0  # GPU placement reads the GPU history
    assert history_seconds(client, "sense", "t1", CPU) == 300.0
    assert history_seconds(client, "sense", "t2", CPU) is None
    with pytest.raises(ValueError, match="device class"):
        record_runtime(client, "sense", "t1", 1.0, "tpu")


def test_expected_finish_of_running_and_queued_jobs(store):
    now = time.time()
    record_runtime(store.redis, "cartesian", "t1", 100.0, CPU)
    record_runtime(store.redis, "cartesian", "t1", 10.0, GPU)  # not used: no GPU worker is alive
    alive(store.redis, "n1:1")
    add(store, "run", "s-run", at=now - 60, state=JobState.RUNNING, started=now - 30)
    add(store, "q1", "s-q1", patient="P2", at=now - 50)
    add(store, "q2", "s-q2", patient="P3", at=now - 40)
    add(store, "q-stat", "s-q3", patient="P4", at=now - 20, queue="stat")
    series = only_series(exams_of_day(store, store.redis, *today(now), now))
    assert series["run"].expected_finish == pytest.approx(now - 30 + 100)
    assert series["run"].progress == pytest.approx(0.3, abs=0.01)  # 30 s of 100: progress moves with time
    # the stat job is taken first; then q1, then q2 (each 100 s on the one CPU worker, after the 70 s left)
    assert (series["q-stat"].queue_position, series["q1"].queue_position, series["q2"].queue_position) == (0, 0, 1)
    assert series["q-stat"].expected_finish == pytest.approx(now + 70 + 100)
    assert series["q1"].expected_finish == pytest.approx(now + 170 + 100)
    assert series["q2"].expected_finish == pytest.approx(now + 270 + 100)
    assert series["run"].queue_position is None and not series["run"].ready

    alive(store.redis, "n1:2", gpu_id="n1:gpu0")  # now a GPU worker is alive: queued jobs will run there
    series = only_series(exams_of_day(store, store.redis, *today(now), now))
    assert series["run"].expected_finish == pytest.approx(now + 70)  # it runs on the CPU still
    assert series["q-stat"].expected_finish == pytest.approx(now + 70 + 10)  # one GPU worker
    assert series["q1"].expected_finish == pytest.approx(now + 80 + 10)


def test_expected_run_time_falls_back_to_the_jobs_estimate(store):
    now = time.time()
    add(store, "est", "s-est", at=now - 10, state=JobState.RUNNING, started=now - 5, runtime_estimate_s=50.0)
    add(store, "unknown", "s-unk", patient="P9", protocol="t9", at=now - 5)
    add(store, "done", "s-done", patient="P8", at=now - 100, state=JobState.DONE)
    series = only_series(exams_of_day(store, store.redis, *today(now), now))
    assert series["est"].expected_finish == pytest.approx(now - 5 + 50)
    assert series["unknown"].expected_finish is None and series["unknown"].queue_position == 0
    assert series["done"].ready and series["done"].expected_finish is None and series["done"].progress == 1.0


def test_progress_reflects_time():
    now = 1000.0
    job = Job(id="j", scan_id="s", pipeline="cartesian", state=JobState.RUNNING, progress=0.5, started_at=990.0)
    assert shown_progress(job, 100.0, now) == 0.5  # reported progress ahead of the clock
    assert shown_progress(job, 12.5, now) == pytest.approx(0.8)
    assert shown_progress(job, 5.0, now) == 0.99  # past its expected time: not done until the worker says so
    assert shown_progress(job, None, now) == 0.5
    queued = Job(id="q", scan_id="s", pipeline="cartesian", progress=0.0)
    assert shown_progress(queued, 100.0, now) == 0.0


def test_exams_group_by_patient_and_study_and_the_newest_scan_wins(store):
    now = time.time()
    lo, hi = today(now)
    add(store, "old-day", "s0", at=lo - 3600, state=JobState.DONE)  # yesterday: not in today's picture
    add(store, "a-t1", "sa1", at=lo + 10, state=JobState.DONE)
    add(store, "a-t2", "sa2", protocol="t2", at=lo + 20, state=JobState.FAILED)
    add(store, "a-t1-again", "sa3", at=lo + 30)  # the repeated t1 scan: its job is what counts
    add(store, "b-t1", "sb1", patient="Q0000002", study="9.9", at=lo + 15, state=JobState.RUNNING)
    add(store, "anon1", "sx1", patient="", study="", at=lo + 40)
    add(store, "anon2", "sx2", patient="", study="", at=lo + 41)
    exams = exams_of_day(store, store.redis, lo, hi, now)
    assert [(e.patient_id, e.study_uid, e.identified) for e in exams] == [
        ("", "", False), ("", "", False), ("P0000001", "1.2.3", True), ("Q0000002", "9.9", True)]
    assert [e.series[0].job_id for e in exams[:2]] == ["anon2", "anon1"]  # a scan of its own each
    p1 = exams[2]
    assert p1.first_at == lo + 10
    assert [(s.protocol, s.job_id, s.state) for s in p1.series] == [("t1", "a-t1-again", "queued"),
                                                                   ("t2", "a-t2", "failed")]
    assert p1.series[1].error == "recon error: bad data" and not p1.series[1].ready
    assert [s.job_id for s in exams[3].series] == ["b-t1"]


def test_api_exams_shape_and_masking(settings, store):
    now = time.time()
    lo, _ = today(now)
    record_runtime(store.redis, "cartesian", "t1", 300.0, CPU)
    add(store, "e1", "s1", patient="P1234561", at=lo + 5)
    settings = settings.model_copy(update={"staff_tokens": {"robot": hash_token(TOKEN)},
                                           "dashboard_public_read": True})
    api = TestClient(make_api(settings, redis.Redis.from_url(settings.redis_url, decode_responses=True)))
    day = date.fromtimestamp(now).isoformat()
    got = api.get("/api/exams").json()
    assert got["day"] == day
    named = api.get(f"/api/exams?day={day}").json()  # the default day is today's
    assert named["day"] == day and [e["series"][0]["job_id"] for e in named["exams"]] == ["e1"]
    (exam,) = got["exams"]
    assert exam["patient"].startswith("P-") and exam["identified"] is True  # masked (keyed hash prefixes)
    assert exam["study_uid"].startswith("S-") and "1.2.3" not in json.dumps(got)
    assert set(exam) == {"patient", "study_uid", "identified", "first_at", "series"}
    (series,) = exam["series"]
    assert set(series) == {"protocol", "job_id", "scan_id", "pipeline", "state", "progress", "expected_finish",
                           "ready", "queue_position", "error"}
    assert series["state"] == "queued" and series["queue_position"] == 0 and series["ready"] is False
    assert series["expected_finish"] == pytest.approx(time.time() + 300, abs=5)
    assert api.get("/api/exams", headers=STAFF).json()["exams"][0]["patient"] == "P1234561"
    assert api.get("/api/exams?day=2001-01-01").json() == {"day": "2001-01-01", "exams": []}
    assert api.get("/api/exams?day=yesterday").status_code == 422
    closed = TestClient(make_api(settings.model_copy(update={"dashboard_public_read": False}),
                                 redis.Redis.from_url(settings.redis_url, decode_responses=True)))
    assert closed.get("/api/exams").status_code == 401
    assert closed.get("/api/exams", headers=STAFF).status_code == 200


def test_reconq_exams_prints_each_series(settings, store, monkeypatch, capsys):
    now = time.time()
    lo, _ = today(now)
    record_runtime(store.redis, "cartesian", "t1", 600.0, CPU)
    add(store, "c1", "s1", at=lo + 5, state=JobState.DONE)
    add(store, "c2", "s2", protocol="t1", patient="P7", study="4.5", at=lo + 6)
    monkeypatch.setenv("RECONQ_REDIS_URL", settings.redis_url)
    assert main(["exams"]) == 0
    out = capsys.readouterr().out
    assert "P0000001 / 1.2.3" in out and "ready to retrieve" in out
    assert re.search(r"t1 +cartesian +queued +0%  expected \d\d:\d\d \(#1 in its queue\)", out), out
    assert "(2 exams on" in out
    assert main(["exams", "--json", "--day", date.fromtimestamp(now).isoformat()]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["patient"] for e in data["exams"]] == ["P7", "P0000001"]  # staff's view, newest first
    assert main(["exams", "--day", "01/02/2003"]) == 2


def test_gateway_ack_says_when_images_are_expected(settings, store):
    scan = synthetic_scan(matrix=(32, 32), ncoil=2, protocol="ack_t1", patient_id="GW02")
    gateway = make_gateway(settings)
    gateway.start()
    try:
        host, port = gateway.address
        first = mrd_client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
        assert first.texts[0].startswith("INF job ") and "expected" not in first.texts[0]  # nothing known yet
        record_runtime(store.redis, "cartesian", "ack_t1", 120.0, CPU)  # no GPU worker alive: the CPU's
        before = time.time()
        reply = mrd_client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
        after = time.time()
    finally:
        gateway.stop()
    line = reply.texts[0]
    assert line.startswith(f"INF job {reply.job_id()} queued: pipeline cartesian, ")
    assert re.search(r"readouts stored; images expected about \d\d:\d\d$", line), line
    minutes = {time.strftime("%H:%M", time.localtime(at + 120.0)) for at in (before, after)}
    assert line.rsplit(" ", 1)[1] in minutes, (line, minutes)  # now + the 120 s history
