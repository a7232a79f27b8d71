"""A recon that runs past the job time limit is stopped and its job failed, saying why (a real worker)."""

from __future__ import annotations

import time

import redis
from conftest import start_worker, stop_process

from reconq.core.celeryapp import make_celery, soft_time_limit
from reconq.core.jobs import Job, JobStore
from reconq.core.sender import TaskSender
from reconq.core.settings import load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.scheduler.submit import enqueue


def test_soft_limit_comes_before_the_hard_one():
    assert soft_time_limit(4 * 3600) == 4 * 3600 - 60
    assert soft_time_limit(30) == 27
    assert soft_time_limit(1) == 1


def test_a_recon_past_the_time_limit_fails_with_the_reason(redis_server, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    settings = load_settings(data_dir=tmp_path / "data", redis_url=url, job_time_limit_s=3,
                             enable_test_pipelines=True)
    raw = ScanStore(settings.data_dir).raw_path("slow")
    raw.parent.mkdir(parents=True)
    write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), raw)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        store = JobStore(client)
        job = Job(id="slow-j1", scan_id="slow", pipeline="sleep", params={"seconds": 60, "memory_gb": 1})
        store.create(job)
        enqueue(store, TaskSender(make_celery(settings)), job)
        deadline = time.monotonic() + 40
        while not (done := store.get(job.id)).state.finished and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_process(worker)
    assert done.state is JobState.FAILED, (done.state, done.stage)
    assert "the time limit of a recon is 3 s (RECONQ_JOB_TIME_LIMIT_S)" in done.error
    assert done.finished_at - done.started_at < 6




def test_a_poison_job_that_kills_its_worker_fails_after_the_attempt_limit(redis_server, tmp_path):
    """A recon that SIGKILLs its worker process is redelivered (acks late, rejected on a lost worker),
    found ``running`` each time, and failed at ``RECONQ_MAX_ATTEMPTS`` lost runs, not run forever; a
    healthy job on the same worker is reconstructed meanwhile and afterwards."""
    url = redis_server.url.rsplit("/", 1)[0] + "/4"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    settings = load_settings(data_dir=tmp_path / "data", redis_url=url, max_attempts=3, enable_test_pipelines=True,
                             heartbeat_interval_s=0.5, heartbeat_ttl_s=2.0)
    scans = ScanStore(settings.data_dir)
    for scan_id in ("poison", "healthy"):
        raw = scans.raw_path(scan_id)
        raw.parent.mkdir(parents=True)
        write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), raw)
    worker = start_worker(settings, tmp_path / "worker.log")
    store = JobStore(client)
    sender = TaskSender(make_celery(settings))
    try:
        poison = Job(id="poison-j1", scan_id="poison", pipeline="sleep", params={"kill": True, "memory_gb": 1})
        store.create(poison)
        enqueue(store, sender, poison)
        deadline = time.monotonic() + 90
        while not (done := store.get(poison.id)).state.finished and time.monotonic() < deadline:
            time.sleep(0.2)
        healthy = Job(id="healthy-j1", scan_id="healthy", pipeline="sleep", params={"seconds": 0, "memory_gb": 1})
        store.create(healthy)
        enqueue(store, sender, healthy)
        while not (after := store.get(healthy.id)).state.finished and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_process(worker)
    assert done.state is JobState.FAILED, (done.state, done.stage, store.log_lines(poison.id))
    assert "ended its worker 3 times" in done.error and "RECONQ_MAX_ATTEMPTS=3" in done.error
    assert done.attempts == 3  # three runs started, each killed its worker; the third delivery is refused
    lost = [line for line in store.log_lines(poison.id) if "ended with its worker" in line or "handed back" in line]
    assert len(lost) == 2, store.log_lines(poison.id)  # the first two lost runs were run again
    assert after.state is JobState.DONE


def test_a_redis_outage_neither_aborts_a_recon_nor_loses_its_outcome(tmp_path):
    """A real Redis stopped mid-recon and started again (its AOF kept): the progress writes in between are
    skipped, not fatal, and the outcome is written once Redis is back (tried again with backoff)."""
    import threading

    from reconq.core.redisconn import PrivateRedis
    from reconq.scheduler.inventory import make_inventory
    from reconq.workers.slot import cpu_slot
    from reconq.workers.tasks import JobRunner, ProgressReporter

    first = PrivateRedis(tmp_path / "redis")
    url = first.start()
    settings = load_settings(data_dir=tmp_path / "data", redis_url=url, redis_retry_s=20.0)
    store = JobStore(redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=0.5,
                                          socket_timeout=0.5))
    store.create(Job(id="blip-j1", scan_id="blip", pipeline="cartesian"))
    assert store.set_state("blip-j1", JobState.RUNNING, attempts=1)
    progress = ProgressReporter(store, "blip-j1", interval=0.0, fence=1)
    progress(0.2, "reading")
    first.stop()  # Redis away
    progress(0.5, "fft")  # not fatal: the recon goes on
    progress(0.6, "images")
    again = PrivateRedis(tmp_path / "redis", port=first.port)
    threading.Timer(1.5, again.start).start()  # back in 1.5 s, with its AOF
    runner = JobRunner(settings, store, "w-test", cpu_slot(make_inventory(settings)))
    t0 = time.monotonic()
    try:
        assert runner._recorded("blip-j1", lambda: store.set_state("blip-j1", JobState.DONE, fence=1, progress=1.0))
        assert 1.0 < time.monotonic() - t0 < 15
        job = store.get("blip-j1")
        assert job is not None and job.state is JobState.DONE and job.attempts == 1
    finally:
        again.stop()
