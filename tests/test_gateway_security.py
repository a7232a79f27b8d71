"""The MRD gateway against hostile clients (issue 16, "MRD clients"): each test makes the attack over real
TCP on loopback, against a real Redis, and sees it refused, the gateway serving others meanwhile.

- a client outside ``mrd_allowed_clients`` is closed as it is accepted: no thread, no slot, no scan
  folder; logged by address and counted;
- a gateway set to listen beyond loopback with no allow-list does not start (``reconq gateway`` exits 2
  with one ``reconq:`` line);
- one address holds at most ``mrd_max_sessions_per_client`` sessions;
- silent (and slow) clients are dropped at the opening deadline, freeing their slots;
- a client that declares a huge message and stalls costs the gateway what it sent, not what it declared;
- a scan may not bring more than its header declares (times a factor, plus a floor);
- a HEADER with a DTD is refused before any parser sees it;
- the header parser's warnings reach the log without the values they quote (a birth date);
- scheduling hints and recon parameters out of their ranges get an ``ERR``: the scan is stored, no job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import ismrmrd.hdf5
import pytest

from reconq.core.constants import GATEWAY_STATS
from reconq.core.jobs import JobStore
from reconq.core.settings import Settings, SettingsError
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.gateway import client
from reconq.gateway import protocol as p
from reconq.gateway import stream as gateway_stream
from reconq.gateway.opening import declared_bytes, refused_parameters
from reconq.gateway.server import Gateway, allowed_networks, client_ip, is_allowed
from reconq.recon.pipeline import Param, Pipeline, parameter_refusal
from reconq.recon.simulate import synthetic_scan
from reconq.scheduler.estimate import EstimateError, estimate_bytes, estimate_seconds
from reconq.services import make_gateway
from reconq.stack import settings_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(matrix=(32, 32), ncoil=4, protocol="security", patient_id="SEC01")


# -- helpers ---------------------------------------------------------------------------------------------------

def connect(gw: Gateway, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the gateway from ``source`` (loopback holds the whole of 127/8)."""
    return socket.create_connection(gw.address, timeout=timeout, source_address=(source, 0))


def scans_of(settings: Settings) -> list[ScanRecord]:
    return list(ScanStore(settings.data_dir).scans())


def scan_folders(settings: Settings) -> list[str]:
    folder = Path(settings.data_dir) / "scans"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def settled(settings: Settings, count: int = 1, timeout: float = 10.0) -> list[ScanRecord]:
    """The stored scans once ``count`` of them are no longer receiving."""
    deadline = time.monotonic() + timeout
    while True:
        records = scans_of(settings)
        done = [r for r in records if r.state is not ScanState.RECEIVING]
        if len(done) >= count or time.monotonic() > deadline:
            assert len(done) == count, records
            return done
        time.sleep(0.02)


def stat(store: JobStore, name: str, at_least: int = 1, timeout: float = 5.0) -> int:
    """Gateway counter ``name`` (written to Redis by the gateway's counter thread), once it reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        value = int(store.redis.hget(GATEWAY_STATS, name) or 0)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def last_error(reply: client.Reply) -> str:
    assert reply.closed, f"no CLOSE after {reply.texts}"
    errors = [t for t in reply.texts if t.startswith("ERR ")]
    assert errors, reply.texts
    return errors[-1]


def assert_serves(gw: Gateway, store: JobStore, scan, source: str = "127.0.0.1") -> None:
    with connect(gw, source) as sock:
        sock.sendall(client.opening("cartesian", scan.header)
                     + b"".join(p.write_acquisition(a) for a in scan.acquisitions) + p.write_close())
        reply = client.read_reply(sock)
    assert reply.closed and not reply.errors(), reply.texts
    job = store.get(reply.job_id() or "")
    assert job is not None and job.state is JobState.QUEUED


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def gateway_threads() -> set[str]:
    """The gateway's threads that are not its own three (sessions, refusals)."""
    own = {"mrd-accept", "mrd-reconcile", "mrd-counters"}
    return {t.name for t in threading.enumerate() if t.name.startswith("mrd-") and t.name not in own}


# -- who may connect ----------------------------------------------------------------------------------------------

def test_a_client_outside_the_allow_list_is_closed_before_any_session_state(start_gateway, settings, store, scan,
                                                                             caplog):
    caplog.set_level(logging.INFO)
    gw = start_gateway(mrd_allowed_clients=["127.0.0.2", "10.0.0.0/8", "fd00::/64"])
    assert gw.address[0] == "127.0.0.1"  # on loopback, with a list: only the list
    threads_before = gateway_threads()
    # a silent client from 127.0.0.1: told (best effort) and closed at once
    with connect(gw) as sock:
        reply = client.read_reply(sock)
    assert reply.closed and reply.texts == ["ERR this MRD gateway does not accept sessions from this address"]
    # one that sends a whole scan at once: closed as well, nothing of it read or stored
    with connect(gw) as sock:
        try:
            sock.sendall(client.opening("cartesian", scan.header)
                         + b"".join(p.write_acquisition(a) for a in scan.acquisitions) + p.write_close())
            reply = client.read_reply(sock)
            assert reply.job_id() is None
        except OSError:
            pass  # reset: the gateway closed with the client's bytes unread
    assert stat(store, "connections_refused_total", 2) == 2
    assert scan_folders(settings) == [] and scans_of(settings) == []
    assert gateway_threads() - threads_before == set()  # no session (nor refusal) thread was started
    assert gw._slots._value == gw.settings.max_connections and gw._per_client == {}  # no slot taken
    logged = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert logged and "127.0.0.1" in logged[0] and "RECONQ_MRD_ALLOWED_CLIENTS" in logged[0]
    assert "SEC01" not in caplog.text  # the address, never patient data
    # a listed address is served by the same gateway
    assert_serves(gw, store, scan, source="127.0.0.2")


def test_the_refused_counter_reaches_the_metrics(start_gateway, store):
    from reconq.api.prometheus import render

    gw = start_gateway(mrd_allowed_clients=["127.0.0.2"])
    with connect(gw) as sock:
        client.read_reply(sock)
    assert stat(store, "connections_refused_total") == 1
    assert "reconq_gateway_connections_refused_total 1" in render(store, []).splitlines()


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::"])
def test_the_gateway_refuses_to_listen_beyond_loopback_without_an_allow_list(settings, host):
    with pytest.raises(SettingsError, match="RECONQ_MRD_ALLOWED_CLIENTS is not set"):
        make_gateway(settings.model_copy(update={"mrd_host": host}))
    # with a list it starts (not started here: the list is what it checks)
    gw = make_gateway(settings.model_copy(update={"mrd_host": host, "mrd_allowed_clients": ["10.1.2.0/24"]}))
    assert [str(n) for n in gw.allowed] == ["10.1.2.0/24"]


def test_reconq_gateway_beyond_loopback_without_an_allow_list_exits_2_saying_why(settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(settings_env(settings.model_copy(update={"mrd_host": "0.0.0.0", "mrd_port": 0})))
    done = subprocess.run([sys.executable, "-m", "reconq.cli", "gateway"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("reconq:")]
    assert len(said) == 1 and "RECONQ_MRD_ALLOWED_CLIENTS" in said[0] and "0.0.0.0" in said[0], done.stderr
    assert "Traceback" not in done.stderr


def test_allow_list_entries_ipv4_ipv6_and_mapped(settings):
    nets = allowed_networks(settings.model_copy(update={"mrd_allowed_clients": [
        "10.1.2.0/24", "192.168.7.9", "fd00::/64", "2001:db8::7", "::ffff:172.16.0.0/108"]}))
    for ok in ("10.1.2.77", "192.168.7.9", "fd00::1234", "2001:db8::7", "::ffff:10.1.2.5", "172.16.3.4"):
        assert is_allowed(client_ip(ok), nets), ok
    for no in ("10.1.3.1", "192.168.7.10", "fd01::1", "2001:db8::8", "127.0.0.1", "::1", "fe80::1%lo"):
        assert not is_allowed(client_ip(no), nets), no
    loopback = allowed_networks(settings)  # no list, on loopback: loopback clients only
    assert is_allowed(client_ip("127.0.0.1"), loopback) and is_allowed(client_ip("::1"), loopback)
    assert is_allowed(client_ip("::ffff:127.0.0.1"), loopback) and not is_allowed(client_ip("10.0.0.1"), loopback)
    with pytest.raises(SettingsError, match="'10.0.0.300' is not an IP address or network"):
        allowed_networks(settings.model_copy(update={"mrd_allowed_clients": ["10.0.0.300"]}))


def test_an_ipv6_loopback_gateway_serves_ipv6_loopback_clients(start_gateway, store, scan):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0)).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    gw = start_gateway(mrd_host="::1")
    with socket.create_connection(gw.address, timeout=10) as sock:
        sock.sendall(client.opening("cartesian", scan.header)
                     + b"".join(p.write_acquisition(a) for a in scan.acquisitions) + p.write_close())
        assert client.read_reply(sock).job_id()


# -- session limits -----------------------------------------------------------------------------------------------

def test_one_client_past_its_session_limit_is_refused_and_others_are_served(start_gateway, settings, store, scan):
    gw = start_gateway(mrd_max_sessions_per_client=2)
    held = [connect(gw) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(client.opening("cartesian", scan.header) + p.write_acquisition(scan.acquisitions[0]))
        time.sleep(0.3)  # both are sessions now
        with connect(gw) as third:
            error = last_error(client.read_reply(third))
        assert "too many sessions from 127.0.0.1: 2 already open" in error
        assert "RECONQ_MRD_MAX_SESSIONS_PER_CLIENT" in error
        assert stat(store, "sessions_refused_client_limit_total") == 1
        assert_serves(gw, store, scan, source="127.0.0.3")  # another scanner is not held up
        for sock in held:  # the two held sessions end well
            sock.sendall(b"".join(p.write_acquisition(a) for a in scan.acquisitions[1:]) + p.write_close())
            assert client.read_reply(sock).job_id()
    finally:
        for sock in held:
            sock.close()
    assert_serves(gw, store, scan)  # its sessions ended, the client may open new ones


def test_silent_clients_are_dropped_at_the_opening_deadline_and_free_every_slot(start_gateway, settings, store,
                                                                                scan):
    """64 silent clients (from 64 addresses, so that the per-client limit does not stop them first) take every
    slot; at the opening deadline, far below the idle timeout, they are dropped with an ERR and a good
    client is served."""
    gw = start_gateway(mrd_opening_timeout_s=1.5, idle_timeout_s=60.0)
    assert gw.settings.max_connections == 64
    t0 = time.monotonic()
    silent = [connect(gw, f"127.0.1.{i + 1}") for i in range(64)]
    slow = silent[0]
    try:
        deadline = time.monotonic() + 5
        while gw._slots._value > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gw._slots._value == 0  # every slot held
        with connect(gw, "127.0.2.1") as late:
            assert "gateway busy" in last_error(client.read_reply(late))
        # one of them a slow loris: a byte of its opening now and then, never idle for idle_timeout_s
        opening = client.opening("cartesian", scan.header)
        for i in range(4):
            slow.sendall(opening[i:i + 1])
            time.sleep(0.3)
        replies = [client.read_reply(sock) for sock in silent]
        took = time.monotonic() - t0
        for reply in replies:
            error = last_error(reply)
            assert "no config and HEADER within 1.5 s of connecting" in error, error
            assert "RECONQ_MRD_OPENING_TIMEOUT_S" in error
        assert took < 10, took  # the deadline, not the idle timeout (60 s)
    finally:
        for sock in silent:
            sock.close()
    deadline = time.monotonic() + 5
    while gw._slots._value < 64 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw._slots._value == 64
    assert scans_of(settings) == []  # nothing began
    assert_serves(gw, store, scan, source="127.0.2.1")


def test_the_opening_deadline_does_not_cut_a_scan_that_sent_its_header(start_gateway, store, scan):
    gw = start_gateway(mrd_opening_timeout_s=0.5)
    with connect(gw) as sock:
        sock.sendall(client.opening("cartesian", scan.header))
        time.sleep(1.0)  # past the opening deadline, within the idle timeout
        sock.sendall(b"".join(p.write_acquisition(a) for a in scan.acquisitions) + p.write_close())
        reply = client.read_reply(sock)
    assert reply.job_id(), reply.texts


# -- memory and bytes ---------------------------------------------------------------------------------------------

def _stalled_image(scan) -> bytes:
    """An opening, then an IMAGE that declares 256 MiB (4096 x 4096 x 4 float32) and brings 2 KB of it."""
    head = bytearray(p.IMAGE_HEADER_SIZE)
    fields = ismrmrd.hdf5.image_header_dtype.fields
    struct.pack_into("<3H", head, fields["matrix_size"][1], 4096, 4096, 4)
    struct.pack_into("<H", head, fields["channels"][1], 1)
    struct.pack_into("<H", head, fields["data_type"][1], 5)  # float32
    assert 4096 * 4096 * 4 * 4 == 256 << 20
    return (client.opening("cartesian", scan.header) + p.ID.pack(p.MessageId.IMAGE) + bytes(head)
            + p.ATTRIBUTE_LENGTH.pack(0) + b"\0" * 2200)


def _stalled_readout(scan) -> bytes:
    """An opening, then a readout that declares 64 MiB (the limit: 4096 samples x 2048 channels) and brings 2 KB."""
    head = bytearray(p.write_acquisition(scan.acquisitions[0])[2:2 + p.ACQ_HEADER_SIZE])
    fields = ismrmrd.hdf5.acquisition_header_dtype.fields
    struct.pack_into("<H", head, fields["number_of_samples"][1], 4096)
    struct.pack_into("<H", head, fields["active_channels"][1], 2047)
    struct.pack_into("<H", head, fields["trajectory_dimensions"][1], 0)
    return client.opening("cartesian", scan.header) + p.ID.pack(p.MessageId.ACQUISITION) + bytes(head) + b"\0" * 2200


def test_stalled_clients_declaring_256_mib_cost_what_they_sent_not_what_they_declared(start_gateway, settings,
                                                                                      store, scan):
    """Before: 4 stalled clients took the gateway from 287 MiB to 1.3 GiB. Now 8 (4 declaring a 256 MiB image,
    4 a 64 MiB readout, each having sent 2.2 KB of it) leave its resident memory within 64 MiB of where it
    was."""
    gw = start_gateway(mrd_max_sessions_per_client=16, max_image_bytes=256 << 20)
    assert_serves(gw, store, scan)  # warm: the first session's imports and buffers are not the stall's
    before = rss_bytes()
    stalled = [connect(gw) for _ in range(8)]
    try:
        for i, sock in enumerate(stalled):
            sock.sendall(_stalled_image(scan) if i < 4 else _stalled_readout(scan))
        deadline = time.monotonic() + 10  # every session has read what was sent and waits in its message
        while sum(1 for r in scans_of(settings) if r.state is ScanState.RECEIVING) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        grown = rss_bytes() - before
        assert grown < 64 << 20, f"resident memory grew by {grown / 2**20:.0f} MiB for 8 stalled clients"
    finally:
        for sock in stalled:
            sock.close()
    settled(settings, 9)
    assert_serves(gw, store, scan)


def test_a_socket_source_allocates_as_bytes_arrive():
    """The reader itself: a declared 256 MiB body, 2 KB sent and the sender stalled, holds about a MiB."""
    import tracemalloc

    ours, theirs = socket.socketpair()
    ours.settimeout(0.5)
    src = p.SocketSource(ours)
    theirs.sendall(b"x" * 2200)
    tracemalloc.start()
    try:
        with pytest.raises(TimeoutError):
            src.read_exactly(256 << 20)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        ours.close()
        theirs.close()
    assert peak < 4 << 20, peak
    # and a body that does come is read whole, bit for bit, across its growing pieces
    ours, theirs = socket.socketpair()
    body = os.urandom(5 << 20) + b"end"
    sender = threading.Thread(target=lambda: (theirs.sendall(body), theirs.close()))
    sender.start()
    src = p.SocketSource(ours)
    assert src.read_exactly(len(body)) == body and src.bytes_read == len(body)
    with pytest.raises(p.StreamClosed, match=f"closed after 0 of {len(body)} expected bytes"):
        src.read_exactly(len(body))
    sender.join()
    ours.close()


def test_a_scan_past_the_bytes_its_header_declares_is_stopped_and_kept(start_gateway, settings, store, scan):
    gw = start_gateway(mrd_session_bytes_factor=1.0, mrd_session_bytes_floor=16 << 10)
    declared = declared_bytes(scan.header)
    readouts = b"".join(p.write_acquisition(a) for a in scan.acquisitions)
    assert len(readouts) < declared  # the scan itself fits its header ...
    assert_serves(gw, store, scan)
    with connect(gw) as sock:  # ... three times over does not
        with contextlib.suppress(OSError):
            sock.sendall(client.opening("cartesian", scan.header) + readouts * 3 + p.write_close())
        error = last_error(client.read_reply(sock))
    assert "more data than its header declares" in error and "the data received so far is kept" in error
    record = [r for r in settled(settings, 2) if r.state is ScanState.INCOMPLETE][0]
    assert "more data than its header declares" in (record.error or "")
    assert len(scan.acquisitions) < record.acquisitions < 3 * len(scan.acquisitions)
    assert record.bytes_received <= declared + (16 << 10) + 512  # the cap, and the refused readout's header
    assert store.redis.llen("routine") == 1  # the good scan's job only
    assert_serves(gw, store, scan)


def test_declared_bytes_follow_the_encoding():
    small = synthetic_scan(matrix=(32, 32), ncoil=4)
    more = synthetic_scan(matrix=(32, 32), ncoil=4, nslices=3, nrepetitions=2)
    per_readout = p.ACQ_HEADER_SIZE + 64 * (4 * 8 + 12)
    assert declared_bytes(small.header) == 32 * per_readout
    assert declared_bytes(more.header) == 6 * 32 * per_readout
    header = small.header
    header.acquisitionSystemInformation.receiverChannels = "lots"  # what a bad header parses to
    assert declared_bytes(header) == 32 * (p.ACQ_HEADER_SIZE + 64 * (128 * 8 + 12))


# -- the header ---------------------------------------------------------------------------------------------------

XXE = '<!DOCTYPE ismrmrdHeader [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
LAUGHS = ('<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
          '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>')


@pytest.mark.parametrize(("dtd", "entity"), [(XXE, "&xxe;"), (LAUGHS, "&lol3;"), ("<!doctype x>", "")])
def test_a_header_with_a_dtd_is_refused_before_parsing(start_gateway, settings, store, scan, monkeypatch, dtd,
                                                       entity):
    parsed: list[str] = []
    real = gateway_stream.parse_header
    monkeypatch.setattr(gateway_stream, "parse_header", lambda xml, source: parsed.append(xml) or real(xml, source))
    gw = start_gateway()
    xml = client.header_xml(scan.header)
    declaration, body = xml.split("?>", 1)
    evil = declaration + "?>" + dtd + body.replace("<patientID>SEC01</patientID>",
                                                   f"<patientID>SEC01{entity}</patientID>")
    with connect(gw) as sock:
        sock.sendall(client.opening("cartesian", evil) + p.write_close())
        error = last_error(client.read_reply(sock))
    assert "HEADER declares a DTD" in error and "not accepted" in error
    assert parsed == [] and scans_of(settings) == []  # no parser saw it, nothing stored
    assert_serves(gw, store, scan)
    assert len(parsed) == 1


def test_the_header_size_limit_is_about_a_mib(settings):
    assert settings.max_header_bytes == 1 << 20 and p.Limits().max_header_bytes == 1 << 20


def test_a_bad_birth_date_is_logged_without_the_date(start_gateway, store, scan, caplog):
    caplog.set_level(logging.DEBUG)
    gw = start_gateway()
    xml = client.header_xml(scan.header).replace(
        "<patientBirthdate>1970-01-01</patientBirthdate>", "<patientBirthdate>1961-13-45</patientBirthdate>")
    with warnings.catch_warnings(record=True) as seen:  # anything that escapes the gateway's own catch
        warnings.simplefilter("always")
        with connect(gw) as sock:
            sock.sendall(client.opening("cartesian", xml)
                         + b"".join(p.write_acquisition(a) for a in scan.acquisitions) + p.write_close())
            reply = client.read_reply(sock)
    assert reply.job_id(), reply.texts  # a warning, not an error: the scan is queued
    assert "1961-13-45" not in caplog.text
    assert not [w for w in seen if "1961-13-45" in str(w.message)]
    noted = [r.getMessage() for r in caplog.records if "the header parser warns" in r.getMessage()]
    assert noted and "subjectInformationType.patientBirthdate" in noted[0] and "XmlDate" in noted[0], noted
    assert "ConverterWarning" in noted[0] and "value is not logged" in noted[0]


def test_parsing_headers_from_many_threads_leaves_the_warnings_filters_as_they_were(scan):
    xml = client.header_xml(scan.header).replace(
        "<patientBirthdate>1970-01-01</patientBirthdate>", "<patientBirthdate>1961-13-45</patientBirthdate>")
    filters = list(warnings.filters)
    threads = [threading.Thread(target=lambda: [gateway_stream.parse_header_quietly(xml, "HEADER", "t")
                                                for _ in range(5)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == filters


# -- parameters -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "params", "why"), [
    ("cartesian", {"gpu_memory_gb": 100_000}, "gpu_memory_gb must be positive and at most 1024, not 100000"),
    ("cartesian", {"gpu_memory_gb": "lots"}, "gpu_memory_gb 'lots' is not a number"),
    ("cartesian", {"gpu_memory_gb": True}, "gpu_memory_gb 'True' is not a number"),
    ("cartesian", {"expected_seconds": 1e9}, "expected_seconds must be positive and at most 604800"),
    ("cartesian", {"expected_seconds": -1}, "expected_seconds must be positive"),
    ("sense", {"niter": 10**6}, "pipeline sense: parameter niter=1000000 is out of range: a whole number in 0..1000"),
    ("sense", {"lamda": "NaN"}, "pipeline sense: parameter lamda='NaN' is not a number in 0..1000"),
    ("radial", {"niter": 2.5}, "pipeline radial: parameter niter=2.5 is not a whole number in 0..1000"),
    ("alignsense", {"shots": [1, 2]}, "pipeline alignsense: parameter shots=[1, 2] is not a whole number"),
])
@pytest.mark.parametrize("where", ["config_text", "text"])
def test_hints_and_parameters_out_of_range_are_refused_and_the_scan_kept(start_gateway, settings, store, scan,
                                                                         config, params, why, where):
    gw = start_gateway()
    if where == "config_text":
        opening = client.opening(json.dumps({"pipeline": config, "parameters": params}), scan.header, config_text=True)
    else:  # the JSON TEXT after the header: the scan has begun (its job shown receiving) when it comes
        opening = client.opening(config, scan.header, params)
    with connect(gw) as sock:
        sock.sendall(opening + b"".join(p.write_acquisition(a) for a in scan.acquisitions) + p.write_close())
        reply = client.read_reply(sock)
    assert reply.closed and reply.job_id() is None, reply.texts
    errors = [t for t in reply.texts if t.startswith("ERR ")]
    assert len(errors) == 2 and why in errors[0] and "The scan is stored but no job is made" in errors[0], errors
    assert errors[1].startswith("ERR scan ") and "stored; no job made" in errors[1]
    (record,) = settled(settings)
    assert record.state is ScanState.COMPLETE and record.pipeline is None
    assert record.acquisitions == len(scan.acquisitions)  # kept, for a retro-recon with better parameters
    assert store.redis.llen("routine") == 0
    jobs = [store.get(j) for j in store.jobs_for_scan(record.scan_id)]
    assert all(j is not None and j.state is JobState.FAILED and why in (j.error or "") for j in jobs), jobs
    gw.reconcile_once()  # the reconciler does not queue it either
    assert store.redis.llen("routine") == 0


def test_hints_and_parameters_within_range_are_queued(start_gateway, store, scan):
    gw = start_gateway()
    params = {"gpu_memory_gb": 2, "expected_seconds": "60", "niter": 30, "lamda": 1e-3, "some_plugin_knob": 1e12}
    reply = client.send_scan(*gw.address, scan.header, scan.acquisitions, config="sense", params=params)
    assert reply.job_id() and not reply.errors(), reply.texts
    job = store.get(reply.job_id() or "")
    assert job is not None and job.state is JobState.QUEUED and job.params["niter"] == 30


def test_the_estimates_refuse_what_the_gateway_refuses(scan):
    """Jobs made elsewhere (a retro-recon through the API) meet the same checks when they are estimated:
    the worker fails such a job, saying why."""
    from reconq.recon.registry import get_pipeline

    for bad in ({"gpu_memory_gb": math.nan}, {"gpu_memory_gb": 2000}, {"gpu_memory_gb": math.inf}):
        with pytest.raises(EstimateError, match="gpu_memory_gb"):
            estimate_bytes(scan.header, bad)
    with pytest.raises(EstimateError, match="expected_seconds"):
        estimate_seconds(scan.header, {"expected_seconds": 8 * 24 * 3600})
    with pytest.raises(EstimateError, match="niter=5000 is out of range"):
        estimate_bytes(scan.header, {"niter": 5000}, get_pipeline("sense"))
    assert estimate_bytes(scan.header, {"gpu_memory_gb": "3"}) == 3 * 10**9
    assert refused_parameters("not-registered-here", {"niter": 10**9}) is None  # undeclared: as before
    assert "gpu_memory_gb" in (refused_parameters("not-registered-here", {"gpu_memory_gb": -2}) or "")

    class Plugin(Pipeline):  # a plugin declares nothing: its parameters pass as they come
        name = "plugin"

        def run(self, scan, params, progress):  # noqa: ANN001, ANN201
            return []

    assert parameter_refusal(Plugin(), {"niter": 10**9, "anything": "goes"}) is None
    declared = Param(int, 1, 10)
    assert declared.refusal("n", "7") is None and declared.refusal("n", 10.0) is None
    assert "out of range" in (declared.refusal("n", 11) or "") and "whole" in (declared.refusal("n", "7.5") or "")


def test_workers_and_the_api_parse_stored_headers_without_logging_the_birth_date(scan, caplog):
    """The same header read back from a stored file (as a worker or the API does, core.mrdfile)."""
    from reconq.core.mrdfile import parse_header

    caplog.set_level(logging.DEBUG)
    xml = client.header_xml(scan.header).replace(
        "<patientBirthdate>1970-01-01</patientBirthdate>", "<patientBirthdate>1961-13-45</patientBirthdate>")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        header = parse_header(xml, "raw.h5")
    assert header.subjectInformation.patientID == "SEC01"
    assert "1961-13-45" not in caplog.text and not [w for w in seen if "1961-13-45" in str(w.message)]
    assert any("raw.h5: the header parser warns" in r.getMessage() for r in caplog.records)
