"""One MRD session on the wire: config, header, then data until the client's CLOSE.

An acquisition scan is written to disk as it arrives and, after the client's CLOSE, made durable,
recorded and queued; then the gateway answers with a TEXT naming the job and its own CLOSE. A
retrieval scan is handed to :mod:`reconq.gateway.retrieval`.

Errors go back to the scanner as an ``ERR`` TEXT that says what was wrong, then CLOSE (also when the
client closed its side mid-stream and may still read): bad messages, lengths past the limits, a
silent client (``idle_timeout_s``), a full disk. What was received of a scan is kept, its
``scan.json`` says ``incomplete`` with the error, and nothing is queued. A session refused before its
HEADER was read (no header, an unparseable one, data first) stores nothing: no scan began.

Gadgetron's QUERY message (id 6) is not part of MRD and the gateway answers no queries: it reads the
query, sends a ``WRN`` TEXT saying so, and the session goes on (a query-only session, QUERY then
CLOSE, gets that TEXT and CLOSE).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ismrmrd.xsd

from reconq.core.storage import ScanRecord, ScanState
from reconq.gateway import protocol as p
from reconq.gateway.rawfile import RawFileWriter, WriteError, write_error
from reconq.scheduler.submit import fail_receiving

if TYPE_CHECKING:
    from reconq.gateway.server import Gateway

log = logging.getLogger(__name__)


class SessionError(Exception):
    """A session cannot go on; the message is sent to the scanner as an ERR TEXT."""


@dataclass
class Opening:
    """What came before the data: the config and the header."""

    config_file: str | None
    config_text: str | None
    xml: str
    header: ismrmrd.xsd.ismrmrdHeader


def text(level: str, message: str) -> bytes:
    """A TEXT message with the level prefix the scanner's log viewer expects (DBG/INF/WRN/ERR)."""
    return p.write_text(f"{level} {message}")


def identity(header: ismrmrd.xsd.ismrmrdHeader) -> dict[str, str]:
    """Patient, study, protocol and measurement identifiers of a header ('' where absent)."""
    subject, study, meas = header.subjectInformation, header.studyInformation, header.measurementInformation
    return {
        "patient_id": str(getattr(subject, "patientID", None) or ""),
        "study_uid": str(getattr(study, "studyInstanceUID", None) or getattr(study, "studyID", None) or ""),
        "protocol": str(getattr(meas, "protocolName", None) or ""),
        "measurement_id": str(getattr(meas, "measurementID", None) or ""),
    }


def json_object(body: str, what: str) -> dict[str, Any]:
    """``body`` parsed as a JSON object; SessionError saying what is wrong otherwise."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise SessionError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise SessionError(f"{what} must be a JSON object")
    return data


def config_name(opening: Opening) -> tuple[str | None, dict[str, Any]]:
    """The config name and any parameters carried in CONFIG_TEXT (a name, or JSON ``{"pipeline": ...}``)."""
    if opening.config_file is not None:
        name = opening.config_file.strip()  # path separators and '..' are refused as it is read
        if not name:
            raise SessionError("CONFIG_FILE names no config")
        return name.removesuffix(".xml"), {}
    if opening.config_text is None:
        return None, {}
    body = opening.config_text.strip()
    if body.startswith("{"):
        data = json_object(body, "CONFIG_TEXT")
        name = data.pop("pipeline", None) or data.pop("config", None)
        if not isinstance(name, str) or not name:
            raise SessionError("CONFIG_TEXT JSON names no pipeline: give {\"pipeline\": NAME, ...}")
        parameters = data.pop("parameters", {})
        if not isinstance(parameters, dict):
            raise SessionError("CONFIG_TEXT JSON \"parameters\" must be an object")
        return name, {**parameters, **data}
    if body and body.replace("_", "").replace("-", "").isalnum():
        return body, {}
    raise SessionError("CONFIG_TEXT must be a pipeline name or JSON {\"pipeline\": NAME, \"parameters\": {...}}")


def parameters_from_text(body: str) -> dict[str, Any]:
    """Job parameters from a JSON TEXT: a flat object, or python-ismrmrd-server's ``configAdditional``
    form ``{"parameters": {...}, ...}`` (whose ``parameters`` are taken)."""
    data = json_object(body, "parameter TEXT")
    inner = data.get("parameters")
    return dict(inner) if isinstance(inner, dict) else data


def describe(msg: int) -> str:
    """A message id as the scanner's log should show it."""
    try:
        return f"{p.MessageId(msg).name} (message id {msg})"
    except ValueError:
        return f"unknown message id {msg}"


class Session:
    """Serves one connection; :meth:`run` never raises."""

    def __init__(self, gateway: Gateway, sock: socket.socket, peer: str) -> None:
        self.gw = gateway
        self.sock = sock
        self.peer = peer
        self.src = p.SocketSource(sock)
        self.limits = gateway.limits
        self.failed = False  # ended with an ERR TEXT
        self.retrieval = False

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def run(self) -> None:
        try:
            opening = self.read_opening()
            if opening is None:  # header-less session (Gadgetron's dependency queries)
                self.send(p.write_close())
                return
            name, params = config_name(opening)
            if name is not None and name in self.gw.settings.retrieve_configs:
                from reconq.gateway.retrieval import Retrieval

                self.retrieval = True
                Retrieval(self, opening, params).run()
            else:
                self.receive_scan(opening, name, params)
        except p.StreamClosed as e:
            if self.src.bytes_read == 0:  # a port probe (health check), not a session
                log.debug("connection from %s closed before any message", self.peer)
            else:  # the client may have closed only its sending side and still read
                self.fail(f"stream cut off before the client's CLOSE: {e}")
        except (SessionError, p.ProtocolError, WriteError) as e:
            self.fail(str(e))
        except TimeoutError as e:
            self.fail(self.reason(e))
        except OSError as e:
            log.warning("session from %s: connection error: %s", self.peer, e)
        except Exception:
            log.exception("session from %s: internal error", self.peer)
            self.fail("internal error in the gateway; the data received so far is kept")
        finally:
            self.src.close()

    def fail(self, message: str) -> None:
        self.failed = True
        log.warning("session from %s refused: %s", self.peer, message)
        with contextlib.suppress(OSError):
            self.send(text("ERR", message), p.write_close())

    def next_message(self) -> int:
        """The id of the next message, answering (and skipping) Gadgetron QUERY messages on the way."""
        while (msg := p.read_message_id(self.src)) == p.MessageId.QUERY:
            query = p.read_query(self.src, self.limits)
            log.info("session from %s: Gadgetron QUERY %.100r not supported", self.peer, query)
            self.send(text("WRN", f"Gadgetron QUERY messages are not supported by this MRD gateway "
                                  f"(query {query[:100]!r} not answered); the session goes on"))
        return msg

    def read_opening(self) -> Opening | None:
        config_file = config_text = None
        msg = self.next_message()
        if msg == p.MessageId.CONFIG_FILE:
            config_file = p.read_config_file(self.src)
            msg = self.next_message()
        elif msg == p.MessageId.CONFIG_TEXT:
            config_text = p.read_length_prefixed(self.src, self.limits.max_header_bytes, "CONFIG_TEXT")
            msg = self.next_message()
        if msg == p.MessageId.CLOSE:
            return None
        if msg != p.MessageId.HEADER:
            raise p.ProtocolError(f"expected the HEADER, got {describe(msg)}; nothing was stored")
        xml = p.read_length_prefixed(self.src, self.limits.max_header_bytes, "HEADER")
        try:
            header = ismrmrd.xsd.CreateFromDocument(xml)
        except Exception as e:  # the xsd binding raises several unrelated types
            raise p.ProtocolError(f"HEADER is not a valid MRD XML header: {e}") from e
        return Opening(config_file, config_text, xml, header)

    def read_until_close(self, handlers: dict[int, Callable[[], None]]) -> None:
        """Dispatch messages to ``handlers`` by id until the client's CLOSE."""
        while True:
            msg = self.next_message()
            if msg == p.MessageId.CLOSE:
                return
            handler = handlers.get(msg)
            if handler is None:
                raise p.ProtocolError(self.unexpected(msg))
            handler()

    @staticmethod
    def unexpected(msg: int) -> str:
        if msg == p.MessageId.HEADER:
            return "a second HEADER in one session"
        if msg in (p.MessageId.CONFIG_FILE, p.MessageId.CONFIG_TEXT):
            return "a config message after the HEADER"
        return f"unexpected {describe(msg)}"

    # -- acquisition scans ------------------------------------------------------------------------

    def receive_scan(self, opening: Opening, name: str | None, params: dict[str, Any]) -> None:
        gw = self.gw
        pipeline = name or gw.settings.default_pipeline
        refusal = None if pipeline in gw.pipelines else (
            f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(gw.pipelines))}. "
            "The scan is stored but no job is made"
        )
        if gw.scans.free_bytes() < gw.settings.min_free_bytes:
            raise SessionError(
                f"not enough free disk space in the data folder ({gw.scans.free_bytes() >> 20} MiB free, "
                f"{gw.settings.min_free_bytes >> 20} MiB required); scan refused"
            )
        who = identity(opening.header)
        record = ScanRecord(
            scan_id=gw.scans.new_scan_id(), client=self.peer, config=name, pipeline=None if refusal else pipeline,
            params=params, patient_id=who["patient_id"], study_uid=who["study_uid"], protocol=who["protocol"],
            measurement_id=who["measurement_id"],
        )
        try:
            gw.scans.create(record)
        except OSError as e:
            raise write_error(e) from e
        try:
            writer = RawFileWriter(gw.scans.raw_path(record.scan_id), gw.settings.write_batch_bytes,
                                   gw.settings.write_sync_bytes)
        except OSError as e:
            error = write_error(e)
            self._mark_incomplete(record, None, error)
            raise error from e
        log.info("scan %s from %s: config %s, protocol %r", record.scan_id, self.peer, name, record.protocol)
        if refusal:
            self.send(text("ERR", refusal))
        else:
            gw.announce(record)
        try:
            writer.write_header(opening.xml)
            writer.write_config(opening.config_file, opening.config_text)
            self._receive_data(writer, record)
            t_close = time.perf_counter()
            writer.finish()
        except BaseException as e:
            writer.abort()
            self._mark_incomplete(record, writer, e)
            raise
        self._complete(record, opening.header, writer, refusal, t_close)

    def _receive_data(self, writer: RawFileWriter, record: ScanRecord) -> None:
        src, limits = self.src, self.limits
        seen_data = False

        def acquisition() -> None:
            nonlocal seen_data
            seen_data = True
            writer.add_acquisition_into(*p.read_acquisition_head(src, limits), src.read_into)

        def waveform() -> None:
            writer.add_waveform_into(*p.read_waveform_head(src, limits), src.read_into)

        def image() -> None:
            writer.add_image(p.read_image(src, limits))

        def text_message() -> None:
            body = p.read_length_prefixed(src, limits.max_text_bytes, "TEXT")
            if not seen_data and body.lstrip().startswith("{"):
                record.params.update(parameters_from_text(body))
                return
            log.info("scan %s: client says: %.200s", record.scan_id, body)

        self.read_until_close({
            p.MessageId.ACQUISITION: acquisition, p.MessageId.WAVEFORM: waveform,
            p.MessageId.IMAGE: image, p.MessageId.TEXT: text_message,
        })

    def reason(self, error: BaseException) -> str:
        """What went wrong, as the scanner and ``scan.json`` should say it."""
        if isinstance(error, TimeoutError):
            return f"no data from the client for {self.gw.settings.idle_timeout_s:g} s; session ended"
        return str(error) or type(error).__name__

    def _mark_incomplete(self, record: ScanRecord, writer: RawFileWriter | None, error: BaseException) -> None:
        record.state, record.error = ScanState.INCOMPLETE, self.reason(error)
        if writer is not None:
            self._count(record, writer)
        try:
            self.gw.scans.save(record)
        except OSError:
            log.exception("scan %s: could not record it as incomplete", record.scan_id)
        log.warning("scan %s incomplete (%s); kept, not queued", record.scan_id, record.error)
        if record.pipeline:
            fail_receiving(self.gw.jobs, record.scan_id, record.error or "cut off")

    def _count(self, record: ScanRecord, writer: RawFileWriter) -> None:
        record.acquisitions, record.waveforms = writer.written_acquisitions, writer.written_waveforms
        record.images = writer.images
        record.bytes_received = self.src.bytes_read

    def _complete(self, record: ScanRecord, header: ismrmrd.xsd.ismrmrdHeader, writer: RawFileWriter,
                  refusal: str | None, t_close: float) -> None:
        gw = self.gw
        t_durable = time.perf_counter()
        record.state, record.completed_at = ScanState.COMPLETE, time.time()
        self._count(record, writer)
        gw.scans.save(record)
        t_recorded = time.perf_counter()
        if refusal:
            self.send(text("ERR", f"scan {record.scan_id} stored; no job made: {refusal}"), p.write_close())
            return
        job = gw.submit(record, header)  # parsed already: placing the job reads no file before the ack
        self.send(
            text("INF", f"job {job.id} queued: pipeline {job.pipeline}, {record.acquisitions} readouts stored"),
            p.write_close(),
        )
        t_ack = time.perf_counter()
        log.info("scan %s complete: %d readouts, %.1f MB; job %s; ack %.1f ms (file durable %.1f, scan.json %.1f, "
                 "job queued %.1f)", record.scan_id, record.acquisitions, record.bytes_received / 1e6, job.id,
                 1e3 * (t_ack - t_close), 1e3 * (t_durable - t_close), 1e3 * (t_recorded - t_durable),
                 1e3 * (t_ack - t_recorded))
