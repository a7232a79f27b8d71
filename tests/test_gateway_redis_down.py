"""The gateway with Redis down: scans are stored, the scanner is told so (never an ERR), and the jobs are
queued, once each, within seconds of Redis coming back; the gateway starts and serves without Redis.

Real parts: a redis-server of the test's own (AOF on), stopped and started again on the same port and data
folder to make an outage, or paused (SIGSTOP) to make one that hangs; the gateway on loopback TCP.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from reconq.core.jobs import JobStore
from reconq.core.redisconn import PrivateRedis
from reconq.core.settings import Settings, load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.gateway import client
from reconq.gateway.server import CATCH_UP_INTERVAL_S, Gateway
from reconq.recon.simulate import synthetic_scan
from reconq.scheduler.submit import announce_scan
from reconq.services import make_gateway

ACK_BOUND_S = 10.0  # what the scanner may wait for the gateway's answer after its CLOSE, Redis down
BACK_BOUND_S = 10.0  # how soon after Redis is back its jobs must be queued (the normal interval is 60 s)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """This test's own redis-server: stopping it does not touch the other tests' one."""
    own = PrivateRedis(tmp_path / "redis")
    own.start()
    yield own
    if own.proc is not None and own.proc.poll() is None:
        os.kill(own.proc.pid, signal.SIGCONT)  # in case a test left it paused
    own.stop()


@pytest.fixture
def settings(tmp_path: Path, server: PrivateRedis) -> Settings:
    # reconcile_interval_s is the production default: queueing within seconds is the catch-up's doing
    return load_settings(data_dir=tmp_path / "data", redis_url=server.url, mrd_port=0, min_free_bytes=0,
                         idle_timeout_s=20.0, reconcile_interval_s=60.0)


@pytest.fixture
def store(server: PrivateRedis) -> Iterator[JobStore]:
    jobs = JobStore(redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=2.0))
    yield jobs
    jobs.redis.close()


@pytest.fixture
def gateway(settings: Settings) -> Iterator[Gateway]:
    """Made while Redis is up (``make_gateway`` checks the data root in Redis), started by the test."""
    gw = make_gateway(settings)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(matrix=(32, 32), ncoil=2, nslices=1, protocol="down_test", patient_id="DOWN01")


def send(gw: Gateway, scan) -> tuple[client.Reply, float]:
    """One scan sent as a scanner would; the reply and how long the whole session took."""
    host, port = gw.address
    t0 = time.monotonic()
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
    return reply, time.monotonic() - t0


def assert_told_stored(reply: client.Reply, record: ScanRecord) -> None:
    assert reply.closed, reply.texts
    assert not [t for t in reply.texts if t.startswith(("ERR", "WRN"))], reply.texts
    assert reply.texts == [
        f"INF scan {record.scan_id} stored ({record.acquisitions} readouts); the job queue is unreachable just "
        f"now: job {record.scan_id}-j1 will be queued when it is back"
    ]
    assert reply.job_id() is None  # the scanner is not told a job is queued that is not


def complete_scans(settings: Settings) -> list[ScanRecord]:
    return [r for r in ScanStore(settings.data_dir).scans() if r.state is ScanState.COMPLETE]


def queued_task_ids(store: JobStore, queue: str) -> list[str]:
    """The Celery messages waiting in ``queue`` (a Redis list), by task id (``<job id>.<attempt>``)."""
    return sorted(json.loads(m)["headers"]["id"] for m in store.redis.lrange(queue, 0, -1))


def wait_until(what: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``what()`` held (Redis errors count as not yet); fails the test past ``timeout``."""
    t0 = time.monotonic()
    while True:
        try:
            if what():
                return time.monotonic() - t0
        except redis.RedisError:
            pass
        assert time.monotonic() - t0 < timeout, f"not within {timeout:g} s"
        time.sleep(0.1)


def assert_queued_once(store: JobStore, settings: Settings, records: list[ScanRecord]) -> None:
    """Every scan has exactly one job, queued, and one Celery message; nothing else is queued."""
    job_ids = sorted(f"{r.scan_id}-j1" for r in records)
    for record in records:
        assert store.jobs_for_scan(record.scan_id) == [f"{record.scan_id}-j1"]
        job = store.get(f"{record.scan_id}-j1")
        assert job is not None and job.state is JobState.QUEUED, job
        assert (job.pipeline, job.patient_id, job.protocol) == ("cartesian", "DOWN01", "down_test")
    assert store.count() == len(records)
    assert queued_task_ids(store, settings.queue) == [f"{j}.0" for j in job_ids]


def all_queued(store: JobStore, settings: Settings, records: list[ScanRecord]) -> Callable[[], bool]:
    def check() -> bool:
        jobs = [store.get(f"{r.scan_id}-j1") for r in records]
        return all(j is not None and j.state is JobState.QUEUED for j in jobs) and \
            store.redis.llen(settings.queue) >= len(records)
    return check


def test_a_scan_sent_while_redis_is_down_is_stored_and_queued_when_redis_is_back(server, settings, store, gateway,
                                                                                  scan):
    gateway.start()
    server.stop()  # a real outage: the server process is gone (its AOF data stays)
    reply, took = send(gateway, scan)
    print(f"\nsession with Redis down (scan sent, ack read): {1e3 * took:.0f} ms")
    assert took < ACK_BOUND_S
    (record,) = complete_scans(settings)  # durable and complete on disk
    assert record.acquisitions == len(scan.acquisitions)
    assert_told_stored(reply, record)

    server.start()  # the same port and data folder
    back = wait_until(all_queued(store, settings, [record]), BACK_BOUND_S)
    print(f"queued {back:.1f} s after Redis was back")
    assert_queued_once(store, settings, [record])
    time.sleep(CATCH_UP_INTERVAL_S + 1)  # the loop is back at its normal interval: nothing is sent again
    assert_queued_once(store, settings, [record])


def test_two_scans_sent_while_redis_is_down_are_each_queued_once(server, settings, store, gateway, scan):
    gateway.start()
    server.stop()
    replies = [send(gateway, scan)[0] for _ in range(2)]
    records = sorted(complete_scans(settings), key=lambda r: r.created_at)
    assert len(records) == 2
    for reply, record in zip(replies, records, strict=True):
        assert_told_stored(reply, record)

    server.start()
    wait_until(all_queued(store, settings, records), BACK_BOUND_S)
    time.sleep(CATCH_UP_INTERVAL_S + 1)  # later rounds find the jobs and queue nothing more
    assert_queued_once(store, settings, records)


def test_the_gateway_starts_and_serves_while_redis_is_down(server, settings, store, scan):
    """Started with Redis down, it still marks at once, from the disk, the scan a stopped gateway left
    receiving; it listens and stores scans; once Redis is back the stored scan is queued and the cut-off
    scan's job (shown receiving before the stop) is failed."""
    scans = ScanStore(settings.data_dir)
    cut = ScanRecord(scan_id=scans.new_scan_id(), config="cartesian", pipeline="cartesian", patient_id="DOWN01",
                     protocol="down_test")
    scans.create(cut)  # left receiving by a gateway that stopped mid-scan
    assert announce_scan(store, cut, settings.queue)  # its job, shown receiving then
    server.stop()

    t0 = time.monotonic()
    gateway = make_gateway(settings)  # the data root is checked once Redis answers
    gateway.start()
    print(f"\ngateway made and started with Redis down in {1e3 * (time.monotonic() - t0):.0f} ms")
    assert time.monotonic() - t0 < ACK_BOUND_S
    marked = scans.load(cut.scan_id)
    assert marked.state is ScanState.INCOMPLETE and marked.error  # before any session, without Redis

    reply, took = send(gateway, scan)
    assert took < ACK_BOUND_S
    (record,) = complete_scans(settings)
    assert_told_stored(reply, record)

    server.start()
    wait_until(all_queued(store, settings, [record]), BACK_BOUND_S)
    wait_until(lambda: (j := store.get(f"{cut.scan_id}-j1")) is not None and j.state is JobState.FAILED, BACK_BOUND_S)
    cut_job = store.get(f"{cut.scan_id}-j1")
    assert cut_job is not None and cut_job.state is JobState.FAILED
    assert cut_job.error.startswith("scan incomplete: ")
    assert store.count() == 2  # the cut scan's failed job and the stored scan's queued one
    assert queued_task_ids(store, settings.queue) == [f"{record.scan_id}-j1.0"]
    gateway.stop()


def test_a_gateway_started_without_redis_stops_when_redis_records_another_data_root(server, settings, store):
    """Started while Redis is down, the gateway cannot check its data root; when Redis answers and records
    another root's id (this data dir is not the shared root), it stops and says why, and queues nothing."""
    from reconq.core.constants import DATA_ROOT_KEY

    store.redis.set(DATA_ROOT_KEY, "another-root")
    server.stop()
    gateway = make_gateway(settings)
    gateway.start()
    try:
        server.start()
        wait_until(lambda: gateway.fatal, BACK_BOUND_S)
    finally:
        gateway.stop()
    assert "Redis records data root id another-root" in (gateway.fatal or ""), gateway.fatal
    assert store.redis.get(DATA_ROOT_KEY) == "another-root"  # not overwritten


def test_redis_that_hangs_costs_a_session_its_timeout_not_a_hang(server, settings, store, scan):
    """A Redis that stops answering (paused: connections open, no replies) is given up after
    ``redis_timeout_s`` by the job store and the Celery producer alike; the scanner is told the scan is
    stored, and the job is queued once Redis answers again."""
    quick = settings.model_copy(update={"redis_timeout_s": 1.0})
    gw = make_gateway(quick)
    gw.start()
    assert server.proc is not None
    try:
        os.kill(server.proc.pid, signal.SIGSTOP)
        reply, took = send(gw, scan)
        print(f"\nsession with Redis hung (redis_timeout_s=1): {1e3 * took:.0f} ms")
        assert took < 3 * quick.redis_timeout_s + 2  # a receiving record tried, then the job: one time-out each
        (record,) = complete_scans(settings)
        assert_told_stored(reply, record)
        again, took = send(gw, scan)  # known down now: only the job is tried
        print(f"next session with Redis hung: {1e3 * took:.0f} ms")
        assert took < 2 * quick.redis_timeout_s + 2
        records = sorted(complete_scans(settings), key=lambda r: r.created_at)
        assert_told_stored(again, records[1])
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    try:
        wait_until(all_queued(store, settings, records), BACK_BOUND_S)
        time.sleep(CATCH_UP_INTERVAL_S + 1)
        assert_queued_once(store, settings, records)
    finally:
        gw.stop()


def test_a_job_whose_message_a_reconcile_lost_is_sent_again(settings, server, store, tmp_path):
    """The reconciler marks a job queued, then its Celery message cannot go (the producer's connection to
    Redis hangs: a TCP proxy the test pauses; the job store's own connection is direct). The job is queued
    with no message; the next reconcile, Redis reachable again, sends it (a later reconcile alone would
    skip a queued job)."""
    from reconq.core.celeryapp import make_celery
    from reconq.core.sender import TaskSender
    from reconq.faultkit import PausableProxy
    from reconq.recon.simulate import write_mrd
    from reconq.services import build_services

    scans = ScanStore(settings.data_dir)
    record = ScanRecord(scan_id="20261201T000000-lost0001", state=ScanState.COMPLETE, pipeline="cartesian",
                        patient_id="DOWN01", study_uid="1.2.3", protocol="down_test", acquisitions=32)
    scans.create(record)
    write_mrd(synthetic_scan(matrix=(32, 32), ncoil=2), scans.raw_path(record.scan_id))
    proxy = PausableProxy(server.port)
    broker = settings.model_copy(update={"redis_url": server.url_on(proxy.port), "redis_timeout_s": 1.0})
    services = build_services(settings)
    gw = Gateway(settings, services.jobs, services.scans, TaskSender(make_celery(broker)), None, services.pipelines)
    try:
        proxy.pause()
        assert gw.reconcile_once() is False  # the message did not go
        job = store.get(f"{record.scan_id}-j1")
        assert job is not None and job.state is JobState.QUEUED and queued_task_ids(store, "routine") == []
        proxy.resume()
        assert gw.reconcile_once() is True
        assert queued_task_ids(store, "routine") == [f"{record.scan_id}-j1.0"]  # sent again, once
        assert gw.reconcile_once() is True and queued_task_ids(store, "routine") == [f"{record.scan_id}-j1.0"]
    finally:
        proxy.close()
        gw.stop()
