"""The gateway against bad input, full disks, many scanners at once and a crash (real TCP, real Redis).

Every refusal gets an ``ERR`` TEXT that says what was wrong, then the gateway's CLOSE; what was
received of a scan is kept and marked incomplete, nothing is queued, and the gateway goes on serving:
each test ends with a good scan through the same gateway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.hdf5
import numpy as np
import pytest
import redis

from reconq.core.jobs import JobStore
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.gateway import client
from reconq.gateway import protocol as p
from reconq.gateway.rawfile import RawFileWriter
from reconq.gateway.server import Gateway
from reconq.recon.simulate import synthetic_scan
from reconq.stack import settings_env

ROOT = Path(__file__).resolve().parents[1]
_ACQ_FIELDS = ismrmrd.hdf5.acquisition_header_dtype.fields


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(matrix=(32, 32), ncoil=4, protocol="robust", patient_id="ROB01")


@pytest.fixture
def gw(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


# -- helpers ---------------------------------------------------------------------------------------------------

def exchange(gw: Gateway, data: bytes, shut: bool = False, timeout: float = 10.0) -> client.Reply:
    """Send ``data`` (then close our sending side if ``shut``) and read the gateway's reply to its CLOSE."""
    with socket.create_connection(gw.address, timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        return client.read_reply(sock)


def assert_refused(reply: client.Reply, *fragments: str) -> str:
    assert reply.closed, f"no CLOSE after {reply.texts}"
    errors = [t for t in reply.texts if t.startswith("ERR ")]
    assert errors, reply.texts
    for fragment in fragments:
        assert fragment in errors[-1], errors[-1]
    return errors[-1]


def acquisitions(scan, stop: int | None = None, start: int = 0, repeat: int = 1) -> bytes:
    """ACQUISITION messages of ``scan.acquisitions[start:stop]``, ``repeat`` times over."""
    return b"".join(p.write_acquisition(a) for a in scan.acquisitions[start:stop]) * repeat


def with_sizes(message: bytes, samples: int, channels: int) -> bytes:
    """An ACQUISITION message whose header declares other sizes (the payload is not changed)."""
    out = bytearray(message)
    for name, value in (("number_of_samples", samples), ("active_channels", channels)):
        struct.pack_into("<H", out, 2 + _ACQ_FIELDS[name][1], value)
    return bytes(out)


def scans_of(settings: Settings) -> list[ScanRecord]:
    return list(ScanStore(settings.data_dir).scans())


def settled_scan(settings: Settings, timeout: float = 10.0) -> ScanRecord:
    """The one stored scan once it is no longer receiving (the session ends in the gateway's thread)."""
    deadline = time.monotonic() + timeout
    while True:
        records = scans_of(settings)
        if records and records[0].state is not ScanState.RECEIVING or time.monotonic() > deadline:
            assert len(records) == 1, records
            return records[0]
        time.sleep(0.02)


def assert_kept_incomplete(settings: Settings, store: JobStore, readouts: int, error: str) -> ScanRecord:
    record = settled_scan(settings)
    assert record.state is ScanState.INCOMPLETE and error in (record.error or ""), record
    assert record.acquisitions == readouts
    with h5py.File(ScanStore(settings.data_dir).raw_path(record.scan_id), "r") as f:  # kept, readable
        assert f["dataset/data"].shape == (readouts,) if readouts else "data" not in f["dataset"]
    # not queued: the job shown while the scan streamed in failed, saying why, and no task was sent
    jobs = [store.get(j) for j in store.jobs_for_scan(record.scan_id)]
    assert [(j.state, j.error.startswith("scan incomplete: ")) for j in jobs if j] == [(JobState.FAILED, True)]
    assert store.redis.llen("routine") == 0
    return record


def assert_still_serves(gw: Gateway, store: JobStore, scan) -> None:
    reply = client.send_scan(*gw.address, scan.header, scan.acquisitions, config="cartesian")
    assert reply.closed and not reply.errors(), reply.texts
    job = store.get(reply.job_id() or "")
    assert job is not None and job.state is JobState.QUEUED


# -- refused before a scan begins: nothing stored -----------------------------------------------------------------

HEADER = p.MessageId.HEADER


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("bad_xml", "HEADER is not a valid MRD XML header"),
        ("data_before_header", "expected the HEADER, got ACQUISITION"),
        ("config_parent_dir", "is not a plain name"),
        ("config_path", "is not a plain name"),
        ("config_backslash", "is not a plain name"),
        ("header_too_long", "HEADER of 4294967295 bytes exceeds the limit"),
        ("config_text_too_long", "CONFIG_TEXT of 4000000000 bytes exceeds the limit"),
        ("unknown_first_message", "unknown message id 4242"),
    ],
)
def test_refused_before_the_header_stores_nothing(gw, settings, store, scan, case, fragment):
    data = {
        "bad_xml": p.write_config_file("cartesian") + p.write_length_prefixed(HEADER, "<ismrmrdHeader><oops"),
        "data_before_header": p.write_config_file("cartesian") + acquisitions(scan, 2),
        "config_parent_dir": p.write_config_file("../../etc/passwd"),
        "config_path": p.write_config_file("/opt/recon/cartesian.xml"),
        "config_backslash": p.write_config_file("..\\cartesian"),
        # declared lengths past the limits, and nothing after them: refused at once, nothing allocated
        "header_too_long": p.write_config_file("cartesian") + p.ID.pack(HEADER) + p.LENGTH.pack(2**32 - 1),
        "config_text_too_long": p.ID.pack(p.MessageId.CONFIG_TEXT) + p.LENGTH.pack(4_000_000_000),
        "unknown_first_message": p.ID.pack(4242) + b"\0" * 64,
    }[case]
    t0 = time.monotonic()
    assert_refused(exchange(gw, data), fragment)
    assert time.monotonic() - t0 < 5  # did not wait for the declared bytes
    assert scans_of(settings) == []
    assert_still_serves(gw, store, scan)


# -- refused mid-scan: what came is kept, incomplete, not queued ---------------------------------------------------

def test_unknown_message_id_mid_scan(gw, settings, store, scan):
    data = client.opening("cartesian", scan.header) + acquisitions(scan, 3) + p.ID.pack(999) + b"\x07" * 100
    assert_refused(exchange(gw, data), "unknown message id 999")
    assert_kept_incomplete(settings, store, 3, "unknown message id 999")
    assert_still_serves(gw, store, scan)


def test_message_cut_off_mid_way(gw, settings, store, scan):
    cut = p.write_acquisition(scan.acquisitions[2])[:200]
    reply = exchange(gw, client.opening("cartesian", scan.header) + acquisitions(scan, 2) + cut, shut=True)
    assert_refused(reply, "stream cut off before the client's CLOSE", "connection closed after")
    assert_kept_incomplete(settings, store, 2, "connection closed after")
    assert_still_serves(gw, store, scan)


def test_eof_between_messages(gw, settings, store, scan):
    reply = exchange(gw, client.opening("cartesian", scan.header) + acquisitions(scan, 5), shut=True)
    assert_refused(reply, "stream cut off before the client's CLOSE")
    assert_kept_incomplete(settings, store, 5, "connection closed after 0 of 2 expected bytes")
    assert_still_serves(gw, store, scan)


def test_second_header(gw, settings, store, scan):
    data = (client.opening("cartesian", scan.header) + acquisitions(scan, 4)
            + p.write_length_prefixed(HEADER, scan.header.toXML()) + p.write_close())
    assert_refused(exchange(gw, data), "a second HEADER in one session")
    assert_kept_incomplete(settings, store, 4, "a second HEADER")
    assert_still_serves(gw, store, scan)


@pytest.mark.parametrize(
    ("what", "fragment"),
    [
        ("samples_x_channels", "acquisition of 65535 samples x 1024 channels"),
        ("text", "TEXT of 3000000000 bytes exceeds the limit"),
    ],
)
def test_lengths_past_the_limits_mid_scan_are_refused_before_allocating(gw, settings, store, scan, what, fragment):
    first = acquisitions(scan, 2)
    bad = {
        # 65535 x 1024 x 8 bytes = 512 MiB declared; only the header is sent
        "samples_x_channels": with_sizes(p.write_acquisition(scan.acquisitions[2]), 65535, 1024)[:2 + 340],
        "text": p.ID.pack(p.MessageId.TEXT) + p.LENGTH.pack(3_000_000_000),
    }[what]
    t0 = time.monotonic()
    assert_refused(exchange(gw, client.opening("cartesian", scan.header) + first + bad), fragment, "limit")
    assert time.monotonic() - t0 < 5
    assert_kept_incomplete(settings, store, 2, "exceeds the limit")
    assert_still_serves(gw, store, scan)


def test_silent_client_is_dropped_after_the_idle_timeout(start_gateway, settings, store, scan):
    gw = start_gateway(idle_timeout_s=0.5)
    t0 = time.monotonic()
    with socket.create_connection(gw.address, timeout=10) as sock:
        sock.sendall(client.opening("cartesian", scan.header) + acquisitions(scan, 3))
        reply = client.read_reply(sock)  # and say nothing more
    assert_refused(reply, "no data from the client for 0.5 s")
    assert 0.4 < time.monotonic() - t0 < 5
    assert_kept_incomplete(settings, store, 3, "no data from the client for 0.5 s")
    assert_still_serves(gw, store, scan)


def test_sessions_past_the_maximum_are_refused_and_the_others_go_on(start_gateway, settings, store, scan):
    gw = start_gateway(max_connections=2)
    first, second = (socket.create_connection(gw.address, timeout=10) for _ in range(2))
    try:
        for sock in (first, second):
            sock.sendall(client.opening("cartesian", scan.header) + acquisitions(scan, 3))
        time.sleep(0.2)
        assert_refused(exchange(gw, client.opening("cartesian", scan.header) + acquisitions(scan)), "gateway busy",
                       "2 sessions already open")
        for sock in (first, second):
            sock.sendall(acquisitions(scan, start=3) + p.write_close())
            assert client.read_reply(sock).job_id()
    finally:
        first.close()
        second.close()
    assert [r.state for r in scans_of(settings)] == [ScanState.COMPLETE] * 2
    assert_still_serves(gw, store, scan)


def test_a_bad_session_leaves_a_concurrent_good_one_alone(gw, settings, store, scan):
    with socket.create_connection(gw.address, timeout=10) as good:
        good.sendall(client.opening("cartesian", scan.header) + acquisitions(scan, 5))
        assert_refused(exchange(gw, client.opening("cartesian", scan.header) + p.ID.pack(31337)), "31337")
        good.sendall(b"".join(p.write_acquisition(a) for a in scan.acquisitions[5:]) + p.write_close())
        reply = client.read_reply(good)
    assert reply.job_id() and not reply.errors(), reply.texts
    states = sorted(r.state.value for r in scans_of(settings))
    assert states == ["complete", "incomplete"]


# -- disk space ----------------------------------------------------------------------------------------------------

def test_below_the_free_space_floor_a_scan_is_refused_before_any_data(start_gateway, settings, scan):
    gw = start_gateway(min_free_bytes=1 << 62)
    with socket.create_connection(gw.address, timeout=10) as sock:
        sock.sendall(client.opening("cartesian", scan.header))  # the data is never needed
        reply = client.read_reply(sock)
    assert_refused(reply, "not enough free disk space", "scan refused")
    assert scans_of(settings) == []


def test_disk_full_while_writing_keeps_the_data_and_says_so(start_gateway, settings, store, scan, monkeypatch):
    original = RawFileWriter._append
    calls = {"n": 0}

    def fill_up(self, name, dtype, rows):  # noqa: ANN001 - the writer's signature
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, dtype, rows)

    monkeypatch.setattr(RawFileWriter, "_append", fill_up)
    gw = start_gateway(write_batch_bytes=1 << 16)  # a few readouts per batch: the second batch fails
    per_batch = (1 << 16) // (len(p.write_acquisition(scan.acquisitions[0])) - 2 - p.ACQ_HEADER_SIZE)
    replies: list[client.Reply] = []
    with socket.create_connection(gw.address, timeout=10) as sock:
        reader = threading.Thread(target=lambda: replies.append(client.read_reply(sock)))
        reader.start()
        with contextlib.suppress(OSError):  # the gateway stops reading once the disk is full
            sock.sendall(client.opening("cartesian", scan.header) + acquisitions(scan, repeat=4) + p.write_close())
        reader.join(10)
    assert_refused(replies[0], "disk full", "No space left on device")
    monkeypatch.setattr(RawFileWriter, "_append", original)
    record = assert_kept_incomplete(settings, store, per_batch, "disk full")
    assert 0 < record.acquisitions < 4 * len(scan.acquisitions)
    assert_still_serves(gw, store, scan)


# -- other clients -------------------------------------------------------------------------------------------------

def test_header_less_session_gets_close(gw, settings):
    reply = exchange(gw, p.write_config_file("default") + p.write_close())
    assert reply.closed and reply.texts == []
    assert scans_of(settings) == []


def test_gadgetron_query_is_answered_as_unsupported_and_the_session_goes_on(gw, settings, store, scan):
    """A QUERY gets a WRN TEXT (no answer) and the session goes on: alone, before the config, or mid-scan."""
    only = exchange(gw, p.write_query("gadgetron::version", correlation_id=7) + p.write_close())
    assert only.closed and len(only.texts) == 1
    assert only.texts[0].startswith("WRN Gadgetron QUERY messages are not supported") and "gadgetron::version" in \
        only.texts[0]

    data = (p.write_query("ismrmrd::version") + client.opening("cartesian", scan.header) + acquisitions(scan, 3)
            + p.write_query("gadgetron::info") + acquisitions(scan, start=3) + p.write_close())
    reply = exchange(gw, data)
    assert [t.split(" ", 1)[0] for t in reply.texts] == ["WRN", "WRN", "INF"], reply.texts
    job = store.get(reply.job_id() or "")
    assert job is not None and job.state is JobState.QUEUED
    assert settled_scan(settings).acquisitions == len(scan.acquisitions)


# -- many scanners at once -----------------------------------------------------------------------------------------

def test_eight_simultaneous_sessions_are_stored_bit_identical_and_queued_once(gw, settings, store, scan):
    rng = np.random.default_rng(3)
    n_sessions, n_readouts = 8, 48
    sent: list[list[ismrmrd.Acquisition]] = []
    for _ in range(n_sessions):
        acqs = []
        for i in range(n_readouts):
            acq = ismrmrd.Acquisition.from_array(rng.standard_normal((8, 256), dtype=np.float32).astype(np.complex64))
            acq.scan_counter = i
            acqs.append(acq)
        sent.append(acqs)
    replies: list[client.Reply | None] = [None] * n_sessions

    host, port = gw.address

    def one(i: int) -> None:
        replies[i] = client.send_scan(host, port, scan.header, sent[i], config="cartesian")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    scans = ScanStore(settings.data_dir)
    for acqs, reply in zip(sent, replies, strict=True):
        assert reply is not None and reply.closed and not reply.errors(), reply
        job = store.get(reply.job_id() or "")
        assert job is not None and job.state is JobState.QUEUED
        assert store.jobs_for_scan(job.scan_id) == [job.id]
        record = scans.load(job.scan_id)
        assert record.state is ScanState.COMPLETE and record.acquisitions == n_readouts
        with ismrmrd.Dataset(str(scans.raw_path(job.scan_id)), "dataset", create_if_needed=False, mode="r") as dset:
            assert dset.number_of_acquisitions() == n_readouts
            for i, acq in enumerate(acqs):
                stored = dset.read_acquisition(i)
                assert bytes(stored.getHead()) == bytes(acq.getHead())
                assert stored.data.tobytes() == acq.data.tobytes()
    assert store.count() == n_sessions
    assert redis.Redis.from_url(settings.redis_url or "").llen(settings.queue) == n_sessions  # one message each


# -- a crash -------------------------------------------------------------------------------------------------------

def _spawn_gateway(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(settings_env(settings))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "reconq.cli", "gateway"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection((settings.mrd_host, settings.mrd_port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("gateway did not start:\n" + log_path.read_text(errors="replace")) from None
            time.sleep(0.1)


def test_sigkill_mid_stream_then_restart(settings, store, scan, tmp_path):
    """Killed mid-scan and started again: the cut-off scan is incomplete and not queued; the scans completed
    before the kill are intact and queued exactly once, even though Redis lost every job record."""
    from reconq.core.redisconn import free_port

    # small batches, each synced: the cut-off scan keeps what came before the last sync
    settings = settings.model_copy(update={"mrd_port": free_port(), "write_batch_bytes": 1 << 16,
                                           "write_sync_bytes": 1 << 16})
    address = (settings.mrd_host, settings.mrd_port)
    proc = _spawn_gateway(settings, tmp_path / "gateway.log")
    try:
        done = [client.send_scan(*address, scan.header, scan.acquisitions, config="cartesian") for _ in range(2)]
        job_ids = [r.job_id() for r in done]
        assert all(job_ids), [r.texts for r in done]
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(client.opening("cartesian", scan.header) + acquisitions(scan, repeat=3))
            deadline = time.monotonic() + 10
            while not any(r.state is ScanState.RECEIVING for r in scans_of(settings)):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.3)  # let the gateway write (and sync) some of it
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cut = next(r for r in scans_of(settings) if r.state is ScanState.RECEIVING)

    store.redis.flushdb()  # Redis lost its job records (and its queue)
    proc = _spawn_gateway(settings, tmp_path / "gateway.log")
    try:
        scans = ScanStore(settings.data_dir)
        record = scans.load(cut.scan_id)
        assert record.state is ScanState.INCOMPLETE
        assert "the gateway stopped mid-scan" in (record.error or "")
        assert record.acquisitions >= len(scan.acquisitions)  # batches written and synced before the kill
        with ismrmrd.Dataset(str(scans.raw_path(cut.scan_id)), "dataset", create_if_needed=False, mode="r") as dset:
            assert dset.number_of_acquisitions() == record.acquisitions  # kept, readable as it was at the sync
            assert dset.read_acquisition(3).data.tobytes() == scan.acquisitions[3].data.tobytes()
        assert store.jobs_for_scan(cut.scan_id) == []
        for job_id in job_ids:
            job = store.get(job_id or "")
            assert job is not None and job.state is JobState.QUEUED
            with ismrmrd.Dataset(str(scans.raw_path(job.scan_id)), "dataset", create_if_needed=False,
                                 mode="r") as dset:
                assert dset.number_of_acquisitions() == len(scan.acquisitions)
                assert dset.read_acquisition(7).data.tobytes() == scan.acquisitions[7].data.tobytes()
        assert store.count() == 2
        assert store.redis.llen(settings.queue) == 2  # queued once each
        assert_still_serves_at(address, store, scan)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert store.count() == 3


def assert_still_serves_at(address: tuple[str, int], store: JobStore, scan) -> None:
    reply = client.send_scan(*address, scan.header, scan.acquisitions, config="cartesian")
    assert reply.closed and not reply.errors() and store.get(reply.job_id() or "") is not None, reply.texts
