"""GPU-aware scheduling with real worker processes on a simulated inventory of mixed sizes.

One launcher (``reconq worker --gpus 0,1 --per-gpu 2 --cpu 1``) on simulated GPUs of 8 and 24 GB runs
the ``sleep`` test pipeline (a timed sleep with a declared memory need) through the real Redis queues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import claim_data_root

from reconq.core.celeryapp import make_celery
from reconq.core.constants import GPU_RESERVATIONS, GPU_WAITING
from reconq.core.jobs import Job, JobStore
from reconq.core.redisconn import PrivateRedis
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings, load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.registry import pipeline_names
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.scheduler.actions import Actions
from reconq.scheduler.estimate import GB, history_seconds
from reconq.scheduler.monitor import cluster_status, live_workers
from reconq.scheduler.placement import Placement
from reconq.scheduler.submit import enqueue
from reconq.stack import settings_env
from reconq.workers.testpipelines import OVERCOMMITS, SIMULATED_PEAK

ROOT = Path(__file__).resolve().parents[1]
SLOTS = 5  # 2 per GPU, 1 CPU


@pytest.fixture(scope="module")
def sched_settings(redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    redis.Redis.from_url(url).flushdb()
    settings = load_settings(data_dir=tmp_path_factory.mktemp("sched") / "data", redis_url=url,
                             simulated_gpus=[8, 24], heartbeat_interval_s=0.3, heartbeat_ttl_s=1.5,
                             dispatch_poll_s=0.1, enable_test_pipelines=True, node_name="testnode")
    claim_data_root(settings)  # the workers start with no gateway: the data root is recorded as its start would
    return settings


@pytest.fixture(scope="module")
def client(sched_settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(sched_settings.redis_url or "", decode_responses=True)


@pytest.fixture(scope="module")
def launcher(sched_settings: Settings, client: redis.Redis,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(settings_env(sched_settings))
    log_path = tmp_path_factory.mktemp("launcher") / "workers.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "reconq.cli", "worker", "--gpus", "0,1", "--per-gpu", "2",
                                 "--cpu", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 90
    while log_path.read_bytes().count(b" ready.") < SLOTS or len(live_workers(client)) < SLOTS:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("workers did not start:\n" + log_path.read_text(errors="replace"))
        time.sleep(0.2)
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0  # stopping the launcher stops every worker
    time.sleep(0.5)
    assert live_workers(client) == [] or all(w.seen < time.time() - 1 for w in live_workers(client))


@pytest.fixture(scope="module")
def scan_id(sched_settings: Settings) -> str:
    scans = ScanStore(sched_settings.data_dir)
    path = scans.raw_path("sched-scan")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), path)
    return "sched-scan"


class Submitter:
    def __init__(self, settings: Settings, client: redis.Redis, scan_id: str) -> None:
        self.store = JobStore(client)
        self.sender = TaskSender(make_celery(settings))
        self.scan_id = scan_id
        self.actions = Actions(self.store, self.sender, ScanStore(settings.data_dir), pipeline_names())

    def submit(self, job_id: str, gb: float, seconds: float, queue: str = "routine", pipeline: str = "sleep",
               **params: object) -> str:
        job = Job(id=job_id, scan_id=self.scan_id, pipeline=pipeline, queue=queue,
                  params={"memory_gb": gb, "seconds": seconds, **params})
        assert self.store.create(job)
        enqueue(self.store, self.sender, job)
        return job_id

    def wait(self, ids: list[str], timeout: float = 60) -> dict[str, Job]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = {i: self.store.get(i) for i in ids}
            if all(j is not None and j.state.finished for j in jobs.values()):
                return jobs  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise AssertionError({i: (j.state, j.stage) for i, j in jobs.items() if j})
            time.sleep(0.1)

    def wait_state(self, job_id: str, state: JobState, timeout: float = 30) -> Job:
        deadline = time.monotonic() + timeout
        while (job := self.store.get(job_id)) is None or job.state is not state:
            assert time.monotonic() < deadline, (job.state, job.stage) if job else None
            time.sleep(0.05)
        return job


@pytest.fixture
def sub(sched_settings: Settings, client: redis.Redis, scan_id: str, launcher: subprocess.Popen[bytes]) -> Submitter:
    return Submitter(sched_settings, client, scan_id)


def reserved_total(client: redis.Redis) -> int:
    return sum(int(v) for key in client.keys(GPU_RESERVATIONS + "*") for v in client.hvals(key))


def wait_reservations_zero(client: redis.Redis, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while reserved_total(client) or client.zcard(GPU_WAITING):
        assert time.monotonic() < deadline, (reserved_total(client), client.zrange(GPU_WAITING, 0, -1))
        time.sleep(0.1)


def test_jobs_run_only_on_gpus_they_fit(sub: Submitter, client: redis.Redis) -> None:
    big = [sub.submit(f"fit-big{i}", 16, 0.6) for i in range(3)]
    small = [sub.submit(f"fit-small{i}", 3, 0.3) for i in range(5)]
    cpu = sub.submit("fit-cpu", 30, 0.2)
    never = sub.submit("fit-never", 30, 0.2, pipeline="sleep_gpu_only")
    jobs = sub.wait([*big, *small, cpu, never])
    for i in big:
        assert jobs[i].state is JobState.DONE and jobs[i].gpu == "testnode:sim1", jobs[i]  # 24 GB only
        assert jobs[i].mem_estimate_bytes == 16 * GB
    assert all(jobs[i].state is JobState.DONE and jobs[i].gpu.startswith("testnode:sim") for i in small)
    assert jobs[cpu].state is JobState.DONE and jobs[cpu].gpu == "cpu"
    assert jobs[never].state is JobState.FAILED
    assert "more than any GPU has (largest: 24.0 GB)" in jobs[never].error
    assert "cannot run on the CPU" in jobs[never].error
    assert client.hgetall(OVERCOMMITS) == {}
    peaks = client.hgetall(SIMULATED_PEAK)
    assert int(peaks.get("testnode:sim0", 0)) <= 8 * GB and int(peaks["testnode:sim1"]) <= 24 * GB
    wait_reservations_zero(client)


def test_reservations_return_to_zero_after_failure_and_cancel(sub: Submitter, client: redis.Redis) -> None:
    failed = sub.submit("rz-fail", 20, 0.2, fail=True)
    assert sub.wait([failed])[failed].state is JobState.FAILED
    wait_reservations_zero(client)
    long = sub.submit("rz-cancel", 20, 30)
    sub.wait_state(long, JobState.RUNNING)
    assert reserved_total(client) == 20 * GB
    sub.actions.cancel(long, "test")
    assert sub.wait([long], timeout=10)[long].state is JobState.CANCELLED
    wait_reservations_zero(client)


def test_reservation_of_a_killed_worker_is_reclaimed(sub: Submitter, client: redis.Redis) -> None:
    job_id = sub.submit("kill-me", 20, 3)
    job = sub.wait_state(job_id, JobState.RUNNING)
    pid = int(job.worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while any(w.pid == pid for w in live_workers(client)):  # its heartbeat expires
        assert time.monotonic() - t0 < 10
        time.sleep(0.1)
    done = sub.wait([job_id], timeout=60)[job_id]  # delivered again (reject on worker lost) and run
    assert done.state is JobState.DONE and done.attempts == 2
    wait_reservations_zero(client)


def test_stat_job_overtakes_waiting_routine_jobs(sub: Submitter, client: redis.Redis) -> None:
    routine = [sub.submit(f"prio-r{i}", 20, 0.5) for i in range(6)]  # one at a time, on the 24 GB GPU only
    sub.wait_state(routine[0], JobState.RUNNING)
    stat = sub.submit("prio-stat", 20, 0.5, queue="stat")
    jobs = sub.wait([*routine, stat])
    later = [r for r in routine if jobs[r].started_at > jobs[stat].queued_at]  # not started when stat came
    assert len(later) >= 3
    assert all(jobs[stat].started_at < jobs[r].started_at for r in later), \
        sorted((jobs[i].started_at, i) for i in [*routine, stat])
    wait_reservations_zero(client)


def test_gpu_out_of_memory_sends_the_job_back_to_wait(sub: Submitter, client: redis.Redis) -> None:
    job_id = sub.submit("oom-once", 4, 0.2, oom_times=1, oom_key="oom-once")
    job = sub.wait([job_id])[job_id]
    assert job.state is JobState.DONE and job.oom_count == 1 and job.attempts == 2
    assert job.mem_estimate_bytes == 6 * GB  # 4 GB x 1.5 after the OOM
    wait_reservations_zero(client)


def test_gpus_table_and_api(sub: Submitter, client: redis.Redis, sched_settings: Settings) -> None:
    status = cluster_status(client)
    assert [g.name for g in status.gpus] == ["SIMULATED GPU 0 (8 GB)", "SIMULATED GPU 1 (24 GB)"]
    assert [len(g.workers) for g in status.gpus] == [2, 2] and len(status.cpu_workers) == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(settings_env(sched_settings))
    out = subprocess.run([sys.executable, "-m", "reconq.cli", "gpus"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "SIMULATED GPU 1 (24 GB)" in out.stdout, out.stdout + out.stderr
    from fastapi.testclient import TestClient

    from reconq.services import make_api

    api = make_api(sched_settings.model_copy(update={"dashboard_public_read": True}), client)
    r = TestClient(api).get("/api/gpus")
    assert r.status_code == 200 and [g["id"] for g in r.json()["gpus"]] == ["testnode:sim0", "testnode:sim1"]


def test_jobs_placed_at_submit_run_where_they_fit(sub: Submitter, client: redis.Redis,
                                                  sched_settings: Settings) -> None:
    """The gateway's path: the submitter estimates each job (here ``cartesian``, a pipeline it has, with the
    memory stated) and places the batch in the waiting set; the workers only run what was reserved."""
    placement = Placement(sched_settings, sub.store, ScanStore(sched_settings.data_dir), sub.sender)
    sizes = {"pl-a": 20, "pl-b": 6, "pl-c": 3, "pl-huge": 40}
    jobs = [Job(id=i, scan_id=sub.scan_id, pipeline="cartesian", queue="routine", protocol="pl-proto",
                params={"gpu_memory_gb": gb, "expected_seconds": 2}) for i, gb in sizes.items()]
    for job in jobs:
        assert sub.store.create(job)
        assert sub.store.set_state(job.id, JobState.QUEUED)
    left = placement.place_many(jobs)
    assert [j.id for j in left] == ["pl-huge"]  # larger than every GPU: left to its queue and a CPU worker
    enqueue(sub.store, sub.sender, left[0])
    done = sub.wait(list(sizes))
    assert all(j.state is JobState.DONE for j in done.values()), {i: j.error for i, j in done.items()}
    assert done["pl-a"].gpu == "testnode:sim1"  # 20 GB: only the 24 GB GPU
    assert done["pl-b"].gpu.startswith("testnode:sim") and done["pl-c"].gpu.startswith("testnode:sim")
    assert done["pl-huge"].gpu == "cpu"
    for i, gb in sizes.items():  # the estimates are kept on the job
        assert done[i].mem_estimate_bytes == gb * GB and done[i].runtime_estimate_s == 2
    assert history_seconds(client, "cartesian", "pl-proto") is not None  # run times feed later estimates
    wait_reservations_zero(client)
