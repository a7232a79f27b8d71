"""Faults injected for real into a running system (:mod:`reconq.faultkit`): worker processes stopped or
killed mid-job, Redis killed, restarted or cut off by a paused proxy. Every job ends ``done`` exactly once
(one run of each reached its end), the workers live on, nothing is left reserved on a GPU.

``bench/faults.py`` runs the same scenarios and prints their recovery times.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from reconq import faultkit
from reconq.core.jobs import Job, JobStore
from reconq.core.redisconn import PrivateRedis
from reconq.core.states import JobState


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone (AOF on), which the test may kill and start again on its port."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def assert_came_through(run: faultkit.FaultRun) -> None:
    assert all(j.state is JobState.DONE for j in run.jobs), [(j.id, j.state, j.error, j.stage) for j in run.jobs]
    sleeps = {j.id: run.runs[j.id] for j in run.jobs if j.pipeline == "sleep"}
    assert sleeps == dict.fromkeys(sleeps, 1), sleeps  # done exactly once
    assert run.reservations_left == {}
    assert run.workers_alive


def test_workers_killed_whole_three_times_over_ten_jobs_every_job_done_once(own_redis, tmp_path):
    """SIGKILL to a worker's whole process group mid-job, three times over 10 jobs on 2 workers: each killed
    job was handed back within ``heartbeat_ttl_s`` plus a beat (where the broker alone would take its 6 h
    visibility timeout), counted as one lost run, and done once by a live worker."""
    run = faultkit.worker_kills(own_redis, tmp_path, jobs=10, kills=3)
    assert_came_through(run)
    lost = [j for j in run.jobs if j.lost_runs]
    assert len(lost) == 3 and all(j.attempts == 2 and j.lost_runs == 1 for j in lost), run.jobs
    assert all(j.attempts == 1 for j in run.jobs if not j.lost_runs)
    ttl, beat = faultkit.FAST_BEATS["heartbeat_ttl_s"], faultkit.FAST_BEATS["heartbeat_interval_s"]
    # (plus a margin for a loaded 2-CPU machine; the broker alone would take hours)
    assert len(run.recover_s) == 3 and all(s < ttl + beat + 5.0 for s in run.recover_s), run.recover_s


def test_sigterm_hands_a_long_recon_back_after_the_grace_period(own_redis, tmp_path):
    """SIGTERM to a worker mid-job, grace period 2 s: the recon does not end in time, so the job goes back to
    its queue at once (not counted as a lost run) and is done by the other worker."""
    run = faultkit.graceful_stop(own_redis, tmp_path, grace_s=2.0, seconds=8.0)
    assert_came_through(run)
    [job] = run.jobs
    assert job.attempts == 2 and job.lost_runs == 0, job
    assert 2.0 <= run.recover_s[0] < 2.0 + 6.0, run.recover_s  # the grace period, then at once
    log = JobStore(redis.Redis.from_url(own_redis.url, decode_responses=True)).log_lines(job.id)
    assert any("stopping, the recon did not end within 2 s (RECONQ_WORKER_STOP_GRACE_S)" in line for line in log), log


def test_sigterm_lets_a_recon_that_ends_within_the_grace_period_finish(own_redis, tmp_path):
    settings = faultkit.fault_settings(tmp_path, own_redis.url, worker_stop_grace_s=20.0)
    store = JobStore(redis.Redis.from_url(own_redis.url, decode_responses=True))
    workers = faultkit.Workers(settings, tmp_path)
    try:
        worker = workers.start()
        [job_id] = faultkit.sleep_jobs(settings, store, 1, seconds=3)
        running = faultkit.wait_until(lambda: (j := store.get(job_id)).state is JobState.RUNNING and j, 30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
        done = store.get(job_id)
    finally:
        workers.stop_all()
    assert done is not None and done.state is JobState.DONE, done
    assert done.attempts == 1 and done.worker == running.worker


def assert_redis_outage_came_through(run: faultkit.FaultRun) -> None:
    assert_came_through(run)
    assert all(j.lost_runs == 0 for j in run.jobs), [(j.id, j.lost_runs) for j in run.jobs]
    sent = run.jobs[-1]  # the scan a scanner sent while Redis was away: stored, told so, queued, done
    assert sent.pipeline == "cartesian" and sent.attempts == 1, sent
    assert len(run.acks) == 1 and run.acks[0].startswith(f"INF scan {sent.scan_id} stored"), run.acks
    assert "will be queued when it is back" in run.acks[0]


def test_redis_killed_and_restarted_mid_recon_every_job_done_once(own_redis, tmp_path):
    """Redis SIGKILLed while 2 jobs run on 2 simulated GPUs and 5 wait, started again 4 s later (AOF)."""
    assert_redis_outage_came_through(faultkit.redis_outage(own_redis, tmp_path, "kill"))


def test_redis_stopped_cleanly_and_restarted_mid_recon_every_job_done_once(own_redis, tmp_path):
    assert_redis_outage_came_through(faultkit.redis_outage(own_redis, tmp_path, "stop"))


def test_a_20_s_network_outage_between_worker_and_redis_is_survived(own_redis, tmp_path):
    """The worker reaches Redis through a proxy paused for 20 s during a recon: the recon completes, its
    outcome is recorded once, and the GPU goes on taking jobs afterwards."""
    run = faultkit.network_outage(own_redis, tmp_path, pause_s=20.0)
    assert_came_through(run)
    first, second = run.jobs
    assert first.attempts == 1 and second.gpu == first.gpu, run.jobs


def test_a_job_running_on_a_live_worker_that_no_longer_runs_it_is_handed_back(settings, store):
    """A run whose message was lost (a live worker's heartbeats name another job, or none) would stay
    ``running`` for good: a live worker's heartbeat hands it back, once seen so on two beats, never a job
    its worker's heartbeat names, and nothing while heartbeats cannot be trusted yet."""
    import json

    from reconq.core.constants import WORKER_HEARTBEAT, WORKERS_INDEX
    from reconq.scheduler.admission import Admission
    from reconq.scheduler.inventory import SimulatedInventory
    from reconq.workers.heartbeat import Heartbeat
    from reconq.workers.slot import Slot

    quick = settings.model_copy(update={"heartbeat_ttl_s": 5.0, "heartbeat_interval_s": 0.1})
    long_ago = time.time() - 5
    for job_id, worker in (("o-j1", "w-idle"), ("k-j1", "w-busy")):
        store.create(Job(id=job_id, scan_id=job_id[0], pipeline="cartesian"))
        assert store.set_state(job_id, JobState.RUNNING, attempts=1, worker=worker, started_at=long_ago)

    def beats() -> None:  # the two live workers: one runs k-j1, the other nothing
        for worker, job in (("w-idle", ""), ("w-busy", "k-j1")):
            store.redis.set(WORKER_HEARTBEAT + worker, json.dumps({"worker": worker, "job": job, "seen": time.time()}),
                            px=5000)
            store.redis.sadd(WORKERS_INDEX, worker)

    sent: list[str] = []
    judge = Heartbeat(quick, store.redis, Admission(store.redis, 300.0, 600.0), Slot(None, "", False, ("routine",)),
                      SimulatedInventory([24]), "w-judge", send=lambda job, queue: sent.append(job))
    faultkit.wait_until(judge.settled, 10)
    beats()
    judge.prune()  # seen once: could be a run between its end and its outcome's write
    assert store.get("o-j1").state is JobState.RUNNING and sent == []
    time.sleep(0.3)
    beats()
    judge.prune()
    orphan, busy = store.get("o-j1"), store.get("k-j1")
    assert orphan.state is JobState.QUEUED and orphan.lost_runs == 0 and sent == ["o-j1"], orphan  # not its doing
    assert any("is alive but no longer runs it" in line for line in store.log_lines("o-j1"))
    assert busy.state is JobState.RUNNING and busy.worker == "w-busy"
