"""Faults injected for real into a running system: worker processes stopped or killed mid-job, Redis killed,
restarted or cut off by a paused proxy. Every job ends ``done`` exactly once, nothing is left reserved.

The recons are the ``sleep`` test pipeline (``RECONQ_ENABLE_TEST_PIPELINES``), which counts each run that
reaches its end (:data:`reconq.workers.testpipelines.COMPLETED`), so a job run to the end twice shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import ROOT

from reconq.core.celeryapp import make_celery
from reconq.core.jobs import Job, JobStore
from reconq.core.redisconn import PrivateRedis
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings, load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.scheduler.submit import enqueue
from reconq.stack import settings_env
from reconq.workers.testpipelines import COMPLETED

FAST_BEATS = {"heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 2.0, "dispatch_poll_s": 0.2}


class Workers:
    """Real ``reconq worker`` processes, each in a process group of its own (so a test can kill one whole)."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings, self.folder = settings, folder
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, ready: str = "ready.") -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
        env.update(settings_env(self.settings))
        log_path = self.folder / f"worker-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "reconq.cli", "worker", *(args or ("--concurrency", "1"))],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        proc.log_path = log_path  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60
        while log_path.read_bytes().count(ready.encode()) < 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("worker did not start:\n" + log_path.read_text(errors="replace"))
            time.sleep(0.1)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL to the worker's whole process group: its main process and its pool processes."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone (AOF on), which the test may kill and start again on its port."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def fault_settings(tmp_path: Path, url: str, **overrides: object) -> Settings:
    return load_settings(data_dir=tmp_path / "data", redis_url=url, enable_test_pipelines=True, mrd_port=0,
                         min_free_bytes=0, **{**FAST_BEATS, **overrides})


def make_jobs(settings: Settings, store: JobStore, n: int, seconds: float, prefix: str = "f") -> list[str]:
    """``n`` ``sleep`` jobs of ``seconds`` each, one scan each, queued."""
    scans = ScanStore(settings.data_dir)
    sender = TaskSender(make_celery(settings))
    ids = []
    for i in range(n):
        scan_id = f"{prefix}{i:02d}"
        raw = scans.raw_path(scan_id)
        raw.parent.mkdir(parents=True)
        write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), raw)
        job = Job(id=f"{scan_id}-j1", scan_id=scan_id, pipeline="sleep",
                  params={"seconds": seconds, "memory_gb": 1})
        store.create(job)
        enqueue(store, sender, job)
        ids.append(job.id)
    return ids


def completions(client: redis.Redis, settings: Settings, job_ids: list[str]) -> dict[str, int]:
    """How many runs of each job's recon reached their end."""
    scans = ScanStore(settings.data_dir)
    counts = client.hgetall(COMPLETED)
    return {j: int(counts.get(str(scans.raw_path(j.rsplit("-", 1)[0])), 0)) for j in job_ids}


def wait_until(what: Callable[[], object], timeout: float, poll: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while not (value := what()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(poll)
    return value


def all_finished(store: JobStore, ids: list[str]) -> bool:
    return all(JobState(s).finished for s in store.states(ids) if s)


def test_sigterm_hands_a_long_recon_back_after_the_grace_period(own_redis, tmp_path):
    """SIGTERM to a worker mid-job, grace period 2 s: the recon does not end in time, so the job goes back to
    its queue at once (not counted as a lost run) and is done by the other worker; the stopped worker exits."""
    settings = fault_settings(tmp_path, own_redis.url, worker_stop_grace_s=2.0)
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    store = JobStore(client)
    workers = Workers(settings, tmp_path)
    try:
        stopping = workers.start()
        [job_id] = make_jobs(settings, store, 1, seconds=8)
        first = wait_until(lambda: (j := store.get(job_id)).state is JobState.RUNNING and j, 30)
        other = workers.start()
        t0 = time.monotonic()
        stopping.send_signal(signal.SIGTERM)
        handed = wait_until(lambda: (j := store.get(job_id)).worker != first.worker and j, 20)
        handed_after = time.monotonic() - t0
        stopping.wait(timeout=20)
        stopped_after = time.monotonic() - t0
        done = wait_until(lambda: (j := store.get(job_id)).state.finished and j, 30)
        assert other.poll() is None
    finally:
        workers.stop_all()
    assert 2.0 <= handed_after < 2.0 + 6.0, handed_after  # the grace period, then at once
    assert stopped_after < 2.0 + 10.0, stopped_after
    assert handed.attempts == 2
    assert done.state is JobState.DONE and done.attempts == 2 and done.lost_runs == 0, done
    assert completions(client, settings, [job_id]) == {job_id: 1}  # the stopped run never reached its end
    log = store.log_lines(job_id)
    assert any("stopping, the recon did not end within 2 s (RECONQ_WORKER_STOP_GRACE_S)" in line for line in log), log


def test_sigterm_lets_a_recon_that_ends_within_the_grace_period_finish(own_redis, tmp_path):
    settings = fault_settings(tmp_path, own_redis.url, worker_stop_grace_s=20.0)
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    store = JobStore(client)
    workers = Workers(settings, tmp_path)
    try:
        worker = workers.start()
        [job_id] = make_jobs(settings, store, 1, seconds=3)
        running = wait_until(lambda: (j := store.get(job_id)).state is JobState.RUNNING and j, 30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
        done = store.get(job_id)
    finally:
        workers.stop_all()
    assert done is not None and done.state is JobState.DONE, done
    assert done.attempts == 1 and done.worker == running.worker


def pool_parent(worker: str) -> int:
    """The pid of the Celery main process whose pool process is ``worker`` (``<node>:<pid>``)."""
    pid = worker.rsplit(":", 1)[1]
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_workers_killed_whole_three_times_over_ten_jobs_every_job_done_once(own_redis, tmp_path):
    """SIGKILL to a worker's whole process group mid-job, three times over 10 jobs on 2 workers (a new
    worker started in place of each killed one): every job ends ``done`` with one run that reached its
    end, and each killed job was handed back within ``heartbeat_ttl_s`` plus a beat, not hours."""
    settings = fault_settings(tmp_path, own_redis.url)
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    store = JobStore(client)
    workers = Workers(settings, tmp_path)
    killed: dict[str, float] = {}
    try:
        by_pid = {p.pid: p for p in (workers.start(), workers.start())}
        ids = make_jobs(settings, store, 10, seconds=2.5)
        while len(killed) < 3:
            victim = wait_until(lambda: next((j for j in store.get_many(ids) if j.state is JobState.RUNNING
                                              and j.progress > 0.2 and j.id not in killed), None), 60, poll=0.05)
            assert isinstance(victim, Job)
            proc = by_pid.pop(pool_parent(victim.worker))
            workers.kill(proc)
            t0 = time.monotonic()
            wait_until(lambda v=victim: (j := store.get(v.id)).state is not JobState.RUNNING
                       or j.worker != v.worker, 30, poll=0.05)
            killed[victim.id] = time.monotonic() - t0
            new = workers.start()  # in place of the killed one
            by_pid[new.pid] = new
        wait_until(lambda: all_finished(store, ids), 120, poll=0.2)
        jobs = store.get_many(ids)
        runs = completions(client, settings, ids)
    finally:
        workers.stop_all()
    assert all(j.state is JobState.DONE for j in jobs), [(j.id, j.state, j.error) for j in jobs]
    assert runs == dict.fromkeys(ids, 1), runs  # done exactly once: one run of each reached its end
    for job in jobs:
        lost = 1 if job.id in killed else 0
        assert (job.lost_runs, job.attempts) == (lost, 1 + lost), job
    # handed back within the heartbeat's lifetime plus a beat of the live worker (and a margin for a loaded
    # machine), where the broker alone would take its visibility timeout (6 h)
    ttl, beat = settings.heartbeat_ttl_s, settings.heartbeat_interval_s
    assert all(s < ttl + beat + 2.0 for s in killed.values()), killed
    print("\nhanded back after kill (s):", {k: round(v, 2) for k, v in killed.items()})
