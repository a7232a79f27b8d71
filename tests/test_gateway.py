"""The gateway on real TCP and a real Redis: client styles, durable storage, refusals, reconciliation."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import ismrmrd
import numpy as np
import pytest

from reconq.core.jobs import JobStore
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.core.storage import ScanState, ScanStore
from reconq.gateway import client
from reconq.gateway import protocol as p
from reconq.gateway.server import Gateway
from reconq.recon.simulate import synthetic_scan
from reconq.services import make_gateway


@pytest.fixture
def gw(settings: Settings) -> Iterator[Gateway]:
    gateway = make_gateway(settings)
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(matrix=(32, 32), ncoil=4, nslices=2, protocol="gw_test", patient_id="GW01")


def only_scan(settings: Settings):
    records = list(ScanStore(settings.data_dir).scans())
    assert len(records) == 1
    return records[0]


def wait_for_scan(settings: Settings, done, timeout: float = 10.0):
    """The one stored scan, once ``done(record)`` holds (the session ends in the gateway's thread)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(ScanStore(settings.data_dir).scans())
        if records and done(records[0]) or time.monotonic() > deadline:
            return only_scan(settings)
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("style", "expected_pipeline", "expected_params"),
    [
        ("config_file", "cartesian", {}),
        ("config_text_name", "cartesian", {}),
        ("config_text_json", "cartesian", {"filter": "hann"}),
        ("no_config", "cartesian", {}),  # the C++ ismrmrd tools send none: the default pipeline applies
        ("json_text_after_header", "cartesian", {"coil_maps": "espirit", "lambda": 0.01}),
    ],
)
def test_client_styles_are_accepted(gw, settings, store, scan, style, expected_pipeline, expected_params):
    host, port = gw.address
    kwargs: dict = {
        "config_file": {"config": "cartesian"},
        "config_text_name": {"config": "cartesian", "config_text": True},
        "config_text_json": {"config": json.dumps({"pipeline": "cartesian", "parameters": {"filter": "hann"}}),
                             "config_text": True},
        "no_config": {},
        "json_text_after_header": {"config": "cartesian", "params": expected_params},
    }[style]
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, **kwargs)
    assert reply.closed and not reply.errors(), reply.texts
    job = store.get(reply.job_id() or "")
    assert job is not None and job.state is JobState.QUEUED
    assert job.pipeline == expected_pipeline and job.params == expected_params
    assert (job.patient_id, job.protocol) == ("GW01", "gw_test")
    record = only_scan(settings)
    assert record.state is ScanState.COMPLETE and record.acquisitions == len(scan.acquisitions)


def test_config_additional_json_of_python_ismrmrd_server_clients(gw, store, scan):
    """client.py sends ``{"parameters": {...}}`` as a TEXT after the header: its parameters reach the job."""
    host, port = gw.address
    sent = {"version": "1.0", "parameters": {"customconfig": "", "sense_lambda": 0.02}}
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian", params=sent)
    job = store.get(reply.job_id() or "")
    assert job is not None and job.params == {"customconfig": "", "sense_lambda": 0.02}


def test_parameter_text_that_is_not_json_is_refused(gw, settings, scan):
    host, port = gw.address
    head = client.opening("cartesian", scan.header) + p.write_text('{"lambda": 0.1,')
    reply = client.stream_session(host, port, head, [p.write_acquisition(a) for a in scan.acquisitions[:3]])
    assert reply.closed and reply.texts[0].startswith("ERR parameter TEXT is not valid JSON")
    assert only_scan(settings).state is ScanState.INCOMPLETE


def read_available(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


def test_job_is_shown_receiving_while_the_scan_streams_in(gw, store, scan):
    host, port = gw.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(client.opening("cartesian", scan.header))
        deadline = time.monotonic() + 5
        while not store.count() and time.monotonic() < deadline:
            time.sleep(0.05)
        (receiving,), _ = store.query()
        assert receiving.state is JobState.RECEIVING and store.redis.llen("routine") == 0
        sock.sendall(p.write_text('{"late": true}'))  # the parameter TEXT comes after the job was shown
        for acq in scan.acquisitions:
            sock.sendall(p.write_acquisition(acq))
        sock.sendall(p.write_close())
        reply = client.read_reply(sock)
    assert reply.job_id() == receiving.id
    job = store.get(receiving.id)
    assert job.state is JobState.QUEUED and job.params == {"late": True}
    assert store.redis.llen("routine") == 1 and store.count() == 1


def test_gateway_closes_only_after_the_clients_close(gw, scan):
    """python-ismrmrd-server's client.py aborts if the server closes first: nothing may come before CLOSE."""
    host, port = gw.address
    with socket.create_connection((host, port)) as sock:
        sock.sendall(client.opening("cartesian", scan.header))
        for acq in scan.acquisitions:
            sock.sendall(p.write_acquisition(acq))
        assert read_available(sock, 1.0) == b""  # all data sent, no CLOSE yet: the server says nothing
        sock.sendall(p.write_close())
        sock.settimeout(10)
        reply = client.read_reply(sock)
    assert reply.closed and reply.texts[0].startswith("INF job ")


def test_stored_raw_file_is_bit_identical(gw, settings):
    """Every readout (header, trajectory, data) and waveform as sent, readable with ismrmrd.Dataset."""
    host, port = gw.address
    rng = np.random.default_rng(1)
    scan = synthetic_scan(matrix=(24, 24), ncoil=3, protocol="bits")
    acqs = []
    for acq in scan.acquisitions:  # add a 2D trajectory and random bits to every readout
        a = ismrmrd.Acquisition.from_array(acq.data + rng.normal(size=acq.data.shape).astype(np.float32),
                                           trajectory=rng.normal(size=(acq.number_of_samples, 2)).astype(np.float32))
        head = acq.getHead()
        head.trajectory_dimensions = 2
        a.setHead(head)
        acqs.append(a)
    waves = [ismrmrd.Waveform.from_array(rng.integers(0, 2**32, size=(2, 50), dtype=np.uint32)) for _ in range(3)]
    for i, w in enumerate(waves):
        w.waveform_id, w.time_stamp = 1, 100 + i
    messages = [p.write_waveform(w) for w in waves] + [p.write_acquisition(a) for a in acqs]
    reply = client.stream_session(host, port, client.opening("cartesian", scan.header), messages)
    assert reply.closed and not reply.errors(), reply.texts

    record = only_scan(settings)
    with ismrmrd.Dataset(str(ScanStore(settings.data_dir).raw_path(record.scan_id)), "dataset",
                         create_if_needed=False, mode="r") as dset:
        assert dset.number_of_acquisitions() == len(acqs)
        for i, sent in enumerate(acqs):
            stored = dset.read_acquisition(i)
            assert bytes(stored.getHead()) == bytes(sent.getHead())
            assert stored.data.tobytes() == sent.data.tobytes()
            assert stored.traj.tobytes() == sent.traj.tobytes()
        assert dset.number_of_waveforms() == len(waves)
        for i, sent in enumerate(waves):
            stored = dset.read_waveform(i)
            assert bytes(stored.getHead()) == bytes(sent.getHead())
            assert stored.data.tobytes() == sent.data.tobytes()
        xml = dset.read_xml_header()
        assert ismrmrd.xsd.CreateFromDocument(xml).measurementInformation.protocolName == "bits"


def test_unknown_pipeline_is_refused_and_the_data_kept(gw, settings, store, scan):
    host, port = gw.address
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="no_such_recon")
    assert reply.closed
    assert reply.texts[0].startswith("ERR unknown pipeline 'no_such_recon'"), reply.texts
    assert "cartesian" in reply.texts[0]  # says what is known
    assert reply.job_id() is None and store.count() == 0
    record = only_scan(settings)
    assert record.state is ScanState.COMPLETE and record.pipeline is None
    assert record.acquisitions == len(scan.acquisitions)


def test_header_less_session_gets_close(gw, settings):
    host, port = gw.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(p.write_config_file("default") + p.write_close())
        reply = client.read_reply(sock)
    assert reply.closed and reply.texts == [] and reply.images == []
    assert list(ScanStore(settings.data_dir).scans()) == []


def test_bad_header_gets_err_and_the_server_keeps_serving(gw, store, scan):
    host, port = gw.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(p.write_config_file("cartesian") + p.write_length_prefixed(p.MessageId.HEADER, "<not xml"))
        reply = client.read_reply(sock)
    assert reply.closed and reply.texts[0].startswith("ERR HEADER is not a valid MRD XML header")
    good = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
    assert good.job_id() and store.count() == 1


def test_cut_off_stream_is_kept_incomplete_and_not_queued(gw, settings, store, scan):
    host, port = gw.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(client.opening("cartesian", scan.header))
        for acq in scan.acquisitions[:10]:
            sock.sendall(p.write_acquisition(acq))
        sock.sendall(p.write_acquisition(scan.acquisitions[10])[:100])  # cut mid-message
    record = wait_for_scan(settings, lambda r: r.state is not ScanState.RECEIVING)
    assert record.state is ScanState.INCOMPLETE and "connection closed" in (record.error or "")
    assert record.acquisitions == 10  # what was received is kept
    job = store.get(f"{record.scan_id}-j1")  # shown as receiving while it streamed; now failed, not queued
    assert job is not None and job.state is JobState.FAILED and "connection closed" in job.error
    assert store.redis.llen("routine") == 0


def test_start_up_queues_complete_scans_redis_lost_exactly_once(gw, settings, store, scan):
    host, port = gw.address
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
    job_id = reply.job_id()
    store.redis.flushdb()  # Redis lost its job records (but the scan is on disk)
    gw.stop()
    for _ in range(2):  # two restarts: the job is made once
        again = make_gateway(settings)
        again.start()
        again.stop()
    job = store.get(job_id or "")
    assert job is not None and job.state is JobState.QUEUED
    assert store.count() == 1
    assert store.redis.llen("routine") == 1  # one Celery message for it, not two


def test_a_running_gateway_queues_complete_scans_redis_lost(settings, store, scan):
    """A Redis outage at the ack (or a Redis restarted empty) leaves no scan without its job for long."""
    gateway = make_gateway(settings.model_copy(update={"reconcile_interval_s": 0.3}))
    host, port = gateway.start()
    try:
        job_id = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian").job_id()
        store.redis.flushdb()
        deadline = time.monotonic() + 10
        # the reconciler records the job, then sends its message: wait for both
        while (store.get(job_id or "") is None or store.redis.llen("routine") == 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get(job_id or "") is not None and store.redis.llen("routine") == 1
        time.sleep(1.0)  # later rounds find the job and queue nothing more
        assert store.count() == 1 and store.redis.llen("routine") == 1
    finally:
        gateway.stop()


def test_sessions_past_the_maximum_are_refused(settings, scan):
    gateway = make_gateway(settings.model_copy(update={"max_connections": 1}))
    host, port = gateway.start()
    try:
        with socket.create_connection((host, port), timeout=10) as first:
            first.sendall(client.opening("cartesian", scan.header))
            time.sleep(0.2)
            with socket.create_connection((host, port), timeout=10) as second:
                reply = client.read_reply(second)
            assert reply.closed and reply.texts[0].startswith("ERR gateway busy")
            first.sendall(p.write_close())
            assert client.read_reply(first).job_id()
    finally:
        gateway.stop()


def test_job_store_create_is_idempotent(store):
    from reconq.core.jobs import Job

    job = Job(id="s1-j1", scan_id="s1", pipeline="cartesian")
    assert store.create(job) is True
    assert store.create(Job(id="s1-j1", scan_id="s1", pipeline="other")) is False
    assert store.get("s1-j1").pipeline == "cartesian" and store.count() == 1


def test_jobs_are_listed_newest_first_and_by_state(store: JobStore):
    from reconq.core.jobs import Job

    for i in range(5):
        store.create(Job(id=f"j{i}", scan_id=f"s{i}", pipeline="cartesian", created_at=1000.0 + i))
    store.set_state("j1", JobState.RUNNING)
    store.set_state("j1", JobState.DONE)
    assert [j.id for j in store.query(limit=3)[0]] == ["j4", "j3", "j2"]
    assert [j.id for j in store.query(state=JobState.DONE)[0]] == ["j1"]
    page, total = store.query(offset=1, limit=2, state=JobState.QUEUED)
    assert [j.id for j in page] == ["j3", "j2"] and total == 4


def test_gateway_counts_sessions_bytes_and_failures_for_metrics(gw, store, scan):
    from reconq.core.constants import GATEWAY_STATS

    host, port = gw.address
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(p.write_config_file("cartesian") + p.write_length_prefixed(p.MessageId.HEADER, "<bad"))
        client.read_reply(sock)
    client.retrieve(host, port, client.retrieval_header("NOBODY", "1.2", "none"))
    deadline = time.monotonic() + 5
    while int(store.redis.hget(GATEWAY_STATS, "sessions_total") or 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = {k: int(v) for k, v in store.redis.hgetall(GATEWAY_STATS).items()}
    assert reply.job_id()
    assert stats["sessions_total"] == 3 and stats["sessions_failed_total"] == 1
    assert stats["retrieval_sessions_total"] == 1 and stats["sessions_active"] == 0
    sent = sum(len(p.write_acquisition(a)) for a in scan.acquisitions)
    assert stats["bytes_received_total"] > sent


@pytest.mark.parametrize(("config_text", "why"), [
    ('{"pipline": "sense"}', "CONFIG_TEXT JSON names no pipeline"),  # a typo never runs the default
    ('{"pipeline": ["x"]}', "CONFIG_TEXT JSON names no pipeline"),
    ('{"pipeline": "cartesian", "parameters": [1]}', 'CONFIG_TEXT JSON "parameters" must be an object'),
])
def test_config_text_json_that_names_no_pipeline_is_refused(gw, store, scan, config_text, why):
    host, port = gw.address
    reply = client.send_scan(host, port, scan.header, scan.acquisitions[:2], config=config_text, config_text=True)
    assert reply.closed and reply.texts[0].startswith(f"ERR {why}"), reply.texts
    assert store.count() == 0


def test_retrieval_by_job_id_of_another_patient_is_refused(gw, store, scan):
    host, port = gw.address
    job_id = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian").job_id()
    other = client.retrieval_header("SOMEONE_ELSE", "9.9.9", "gw_test")
    back = client.retrieve(host, port, other, params={"job": job_id})
    assert back.closed and not back.images
    assert back.texts[-1] == f"ERR job {job_id} belongs to another patient or study than this exam"


def test_a_cancelled_job_stays_cancelled(store):
    """A worker that took the job just before staff cancelled it cannot set it running (or anything else)."""
    from reconq.core.jobs import Job

    store.create(Job(id="c-j1", scan_id="c", pipeline="cartesian"))
    assert store.set_state("c-j1", JobState.CANCELLED)
    assert store.set_state("c-j1", JobState.RUNNING, stage="starting") is False
    assert store.set_state("c-j1", JobState.QUEUED) is False
    job = store.get("c-j1")
    assert job.state is JobState.CANCELLED and job.stage == ""
    assert store.update("c-j1", progress=0.5)  # fields other than the state may still change
    assert store.update("nope", progress=0.5) is False and not store.redis.exists("reconq:job:nope")
