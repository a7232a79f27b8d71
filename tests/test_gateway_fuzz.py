"""Property-based tests: random and mutated MRD streams never crash or hang the message reader or a session.

The message reader (the readers of :mod:`reconq.gateway.protocol` over bytes in memory) may only end with the
client's CLOSE or a :class:`ProtocolError` (:class:`StreamClosed` included). A session fed the same
streams over a socket pair ends within a deadline, never with an internal error, answers with CLOSE
(after an ERR TEXT when it refused), and leaves no scan marked ``receiving``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

import ismrmrd
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reconq.core.storage import ScanState, ScanStore
from reconq.gateway import client
from reconq.gateway import protocol as p
from reconq.gateway.server import Gateway
from reconq.gateway.session import Session
from reconq.recon.simulate import synthetic_scan
from reconq.services import make_gateway

LIMITS = p.Limits(max_header_bytes=64 << 10, max_text_bytes=4 << 10, max_acquisition_bytes=64 << 10,
                  max_image_bytes=64 << 10)
M = p.MessageId


def _base_stream() -> bytes:
    """A valid session: config, header, JSON parameters, readouts, a waveform, an image, a text, CLOSE."""
    scan = synthetic_scan(matrix=(16, 16), ncoil=2, protocol="fuzz", patient_id="FZ01")
    wav = ismrmrd.Waveform.from_array(np.arange(20, dtype=np.uint32).reshape(2, 10))
    img = ismrmrd.Image.from_array(np.ones((4, 4), np.float32))
    acqs = [p.write_acquisition(a) for a in scan.acquisitions[:6]]
    return (client.opening("cartesian", scan.header, {"fuzz": 1}) + acqs[0] + p.write_waveform(wav)
            + b"".join(acqs[1:4]) + p.write_image(img) + p.write_text("hello") + b"".join(acqs[4:])
            + p.write_close())


BASE = _base_stream()


def read_all(data: bytes) -> int:
    """Read messages until CLOSE; returns how many were read."""
    src = p.BytesSource(data)
    n = 0
    while (msg := p.read_message_id(src)) != M.CLOSE:
        p.read_body(src, LIMITS, msg)  # the gateway's own reader table
        n += 1
    return n


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """The valid stream with a few bytes flipped, cut, inserted, deleted or overwritten by large lengths."""
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "big_length", "id"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 400))]
        elif op == "big_length":
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x01\x00", b"\xff\xff\x00\x00"]))
        else:
            data[at:at + 2] = p.ID.pack(draw(st.sampled_from([*M, 0, 7, 999, 1009, 65535])))
    return bytes(data)


@st.composite
def random_messages(draw: st.DrawFn) -> bytes:
    """Message ids, known or not, followed by random bodies."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        parts.append(p.ID.pack(draw(st.sampled_from([*M, 0, 8, 1000, 4242, 65535]))))
        parts.append(draw(st.binary(max_size=600)))
    return b"".join(parts)


streams = st.one_of(mutated(), random_messages(), st.binary(max_size=3000))


def test_the_valid_stream_reads_to_its_close():
    assert read_all(BASE) == 12  # config, header, parameters, 6 readouts, waveform, image, text


@settings(max_examples=400, deadline=2000)
@given(data=streams)
def test_the_message_reader_only_ends_with_close_or_a_protocol_error(data: bytes):
    with contextlib.suppress(p.ProtocolError):  # StreamClosed is one: the bytes ran out; anything else fails
        read_all(data)


@pytest.fixture
def fuzz_gateway(settings) -> Gateway:  # noqa: ANN001 - conftest's settings
    """A gateway that is never started: sessions are driven over socket pairs."""
    return make_gateway(settings.model_copy(update={
        "idle_timeout_s": 5.0, "max_header_bytes": LIMITS.max_header_bytes, "max_text_bytes": LIMITS.max_text_bytes,
        "max_acquisition_bytes": LIMITS.max_acquisition_bytes, "max_image_bytes": LIMITS.max_image_bytes,
    }))


def run_session(gw: Gateway, data: bytes, timeout: float = 10.0) -> client.Reply:
    ours, theirs = socket.socketpair()
    ours.settimeout(gw.settings.idle_timeout_s)
    theirs.settimeout(timeout)
    session = threading.Thread(target=lambda: Session(gw.context, ours, "fuzz").run(), daemon=True)
    session.start()

    def send() -> None:
        with contextlib.suppress(OSError):  # the session may stop reading (and close) first
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    session.join(timeout)
    assert not session.is_alive(), "the session hung"
    ours.close()
    reply = client.read_reply(theirs)
    sender.join(timeout)
    theirs.close()
    return reply


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=streams)
def test_a_session_on_any_stream_ends_cleanly(fuzz_gateway, caplog, data: bytes):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reconq.gateway"):
        reply = run_session(fuzz_gateway, data)
    assert not [r for r in caplog.records if "internal error" in r.getMessage()], caplog.text
    if reply.texts and reply.texts[-1].startswith("ERR"):
        assert reply.closed
    event("refused" if reply.errors() else "queued" if reply.job_id() else "other")
    assert all(r.state is not ScanState.RECEIVING for r in ScanStore(fuzz_gateway.settings.data_dir).scans())


def test_a_session_on_the_valid_stream_queues_a_job(fuzz_gateway):
    reply = run_session(fuzz_gateway, BASE)
    assert reply.closed and reply.job_id(), reply.texts
