"""Acquisition scans: the stream written to disk as it arrives, then made durable, recorded and queued.

After the client's CLOSE the raw file is fsynced, ``scan.json`` says ``complete``, the job is recorded
and queued, and the gateway answers with a TEXT naming the job and its own CLOSE. A scan cut off or
refused midway is kept, marked ``incomplete`` with the reason, and not queued.

Redis down does not cost a scan nor an ``ERR``: the scan is complete on disk, so the scanner is told
(``INF``) that it is stored and that its job is queued when the job queue is back, which the gateway's
reconcile loop then does. While the gateway knows Redis is down, a session skips what is best effort
(the job shown ``receiving``, the run-time history, failing a cut-off scan's job: the reconciler does
that later), so no Redis time-out delays the session.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ismrmrd.xsd
import redis

from reconq.core.jobs import Job
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState
from reconq.gateway import protocol as p
from reconq.gateway.context import SessionContext
from reconq.gateway.opening import Opening, identity, parameters_from_text, refused_parameters, session_byte_cap
from reconq.gateway.rawfile import RawFileWriter, write_error
from reconq.gateway.stream import MessageStream, SessionError, text
from reconq.scheduler import scanindex
from reconq.scheduler.exams import history_now
from reconq.scheduler.submit import QUEUE_UNREACHABLE, fail_receiving, first_job_id

log = logging.getLogger(__name__)


def reason(error: BaseException, idle_timeout_s: float) -> str:
    """What went wrong, as the scanner and ``scan.json`` should say it."""
    if isinstance(error, TimeoutError):
        return f"no data from the client for {idle_timeout_s:g} s; session ended"
    return str(error) or type(error).__name__


class Acquisition:
    """Receives one acquisition scan; :meth:`run` raises what ends the session (the session reports it)."""

    def __init__(self, stream: MessageStream, ctx: SessionContext, opening: Opening, name: str | None,
                 params: dict[str, Any]) -> None:
        self.stream, self.ctx, self.opening, self.name, self.params = stream, ctx, opening, name, params
        self.history_s: float | None = None  # the run-time history for the ack, read as the scan begins
        self.refusal: str | None = None  # why the scan is stored but gets no job (pipeline, parameters)

    def run(self) -> None:
        ctx, name = self.ctx, self.name
        pipeline = name or ctx.settings.default_pipeline
        refusal = None if pipeline in ctx.pipelines else (
            f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(ctx.pipelines))}. "
            "The scan is stored but no job is made"
        )
        if refusal is None and (why := refused_parameters(pipeline, self.params)):
            refusal = f"{why}. The scan is stored but no job is made"
        self.refusal = refusal
        if ctx.scans.free_bytes() < ctx.settings.min_free_bytes:
            raise SessionError(
                f"not enough free disk space in the data folder ({ctx.scans.free_bytes() >> 20} MiB free, "
                f"{ctx.settings.min_free_bytes >> 20} MiB required); scan refused"
            )
        who = identity(self.opening.header)
        record = ScanRecord(
            scan_id=ctx.scans.new_scan_id(), client=self.stream.peer, config=name,
            pipeline=None if refusal else pipeline, params=self.params, patient_id=who["patient_id"],
            study_uid=who["study_uid"], protocol=who["protocol"], measurement_id=who["measurement_id"],
        )
        try:
            ctx.scans.create(record)
        except OSError as e:
            raise write_error(e) from e
        try:
            writer = RawFileWriter(ctx.scans.raw_path(record.scan_id), ctx.settings.write_batch_bytes,
                                   ctx.settings.write_sync_bytes, ctx.settings.disk_floor_bytes)
        except OSError as e:
            error = write_error(e)
            self._mark_incomplete(record, None, error)
            raise error from e
        log.info("scan %s from %s: config %s, protocol %r", record.scan_id, self.stream.peer, name, record.protocol)
        if refusal:
            self.stream.send(text("ERR", refusal))
        elif ctx.redis_up():  # best effort: not worth a Redis time-out each while Redis is known down
            ctx.announce(record)
            if ctx.redis_up():  # the announce may just have found it down
                self.history_s = self._history(pipeline, record.protocol)
        try:
            writer.write_header(self.opening.xml)
            writer.write_config(self.opening.config_file, self.opening.config_text)
            self._receive_data(writer, record)
            t_close = time.perf_counter()
            writer.finish()
        except BaseException as e:
            writer.abort()
            self._mark_incomplete(record, writer, e)
            raise
        self._complete(record, self.opening.header, writer, self.refusal, t_close)

    def _receive_data(self, writer: RawFileWriter, record: ScanRecord) -> None:
        stream = self.stream
        src, limits = stream.src, stream.limits
        seen_data = False
        settings = self.ctx.settings
        cap = session_byte_cap(self.opening.header, settings.mrd_session_bytes_factor, settings.mrd_session_bytes_floor)

        def room(size: int) -> int:
            """``size``, if that many more bytes keep the session within its header's cap."""
            if cap is not None and src.bytes_read + size > cap:
                raise SessionError(
                    f"more data than its header declares: {(src.bytes_read + size) / 2**20:.0f} MiB with this "
                    f"message, and the header's encoding allows {cap / 2**20:.0f} MiB (RECONQ_MRD_SESSION_BYTES_"
                    "FACTOR x its readouts + RECONQ_MRD_SESSION_BYTES_FLOOR); the data received so far is kept")
            return size

        def acquisition() -> None:
            nonlocal seen_data
            seen_data = True
            head, size = p.read_acquisition_head(src, limits)
            writer.add_acquisition_into(head, room(size), src.read_into)

        def waveform() -> None:
            head, size = p.read_waveform_head(src, limits)
            writer.add_waveform_into(head, room(size), src.read_into)

        def image() -> None:
            received = stream.read(p.MessageId.IMAGE)
            room(0)
            writer.add_image(received)

        def text_message() -> None:
            body = str(stream.read(p.MessageId.TEXT))
            room(0)
            if not seen_data and body.lstrip().startswith("{"):
                record.params.update(parameters_from_text(body))
                if self.refusal is None and record.pipeline and (why := refused_parameters(record.pipeline,
                                                                                          record.params)):
                    self._refuse_job(record, f"{why}. The scan is stored but no job is made")
                return
            log.info("scan %s: client says: %.200s", record.scan_id, body)

        stream.read_until_close({
            p.MessageId.ACQUISITION: acquisition, p.MessageId.WAVEFORM: waveform,
            p.MessageId.IMAGE: image, p.MessageId.TEXT: text_message,
        })

    def _refuse_job(self, record: ScanRecord, refusal: str) -> None:
        """Parameters refused after the scan began: ``ERR`` at once, the scan stored (for a retro-recon) with no
        pipeline, so nothing queues it, and the job shown while it streamed in failed, saying why."""
        self.refusal, record.pipeline = refusal, None
        self.stream.send(text("ERR", refusal))
        if self.ctx.redis_up():
            try:
                job = self.ctx.jobs.get(first_job_id(record.scan_id))
                if job is not None and job.state is JobState.RECEIVING:
                    self.ctx.jobs.set_state(job.id, JobState.FAILED, error=refusal, stage="failed")
            except redis.RedisError as e:
                log.warning("scan %s: its job could not be marked failed (%s)", record.scan_id, e)

    def _mark_incomplete(self, record: ScanRecord, writer: RawFileWriter | None, error: BaseException) -> None:
        record.state, record.error = ScanState.INCOMPLETE, reason(error, self.ctx.settings.idle_timeout_s)
        if writer is not None:
            self._count(record, writer)
        try:
            self.ctx.scans.save(record)
        except OSError:
            log.exception("scan %s: could not record it as incomplete", record.scan_id)
        log.warning("scan %s incomplete (%s); kept, not queued", record.scan_id, record.error)
        if record.pipeline and self.ctx.redis_up():  # else the reconciler fails its job when Redis is back
            fail_receiving(self.ctx.jobs, record.scan_id, record.error or "cut off")

    def _history(self, pipeline: str, protocol: str) -> float | None:
        """The run-time history of this scan's pipeline and protocol, read while the scan streams in (not
        between the client's CLOSE and the ack); None where there is none or Redis cannot say."""
        try:
            return history_now(self.ctx.jobs.redis, pipeline, protocol)
        except redis.RedisError as e:
            log.info("no run-time history for the ack (%s)", e)
            return None

    def _expected(self, job: Job) -> str:
        """``; images expected about HH:MM`` (local time) where the job's run time is expected (its estimate
        from placement, else the history read as the scan began), else ''. Reads nothing: the ack does
        not wait on it."""
        seconds = job.runtime_estimate_s or self.history_s
        if not seconds:
            return ""
        return f"; images expected about {time.strftime('%H:%M', time.localtime(time.time() + seconds))}"

    def _count(self, record: ScanRecord, writer: RawFileWriter) -> None:
        record.acquisitions, record.waveforms = writer.written_acquisitions, writer.written_waveforms
        record.images = writer.images
        record.bytes_received = self.stream.bytes_read

    def _complete(self, record: ScanRecord, header: ismrmrd.xsd.ismrmrdHeader, writer: RawFileWriter,
                  refusal: str | None, t_close: float) -> None:
        t_durable = time.perf_counter()
        record.state, record.completed_at = ScanState.COMPLETE, time.time()
        self._count(record, writer)
        try:
            self.ctx.scans.save(record)
        except OSError as e:  # a full disk at the last moment: the scanner gets the ERR (the scan stays receiving,
            raise write_error(e) from e  # marked incomplete at the gateway's next start, its readouts counted)
        t_recorded = time.perf_counter()
        if refusal:
            self.stream.send(text("ERR", f"scan {record.scan_id} stored; no job made: {refusal}"), p.write_close())
            self._index(record)
            return
        try:
            job = self.ctx.submit(record, header)  # parsed already: placing the job reads no file before the ack
        except QUEUE_UNREACHABLE as e:
            self._stored_unqueued(record, e, t_close)
            return  # indexed by the reconciler once Redis is back
        self.stream.send(
            text("INF", f"job {job.id} queued: pipeline {job.pipeline}, {record.acquisitions} readouts stored"
                        f"{self._expected(job)}"),
            p.write_close(),
        )
        t_ack = time.perf_counter()
        self._index(record)
        log.info("scan %s complete: %d readouts, %.1f MB; job %s; ack %.1f ms (file durable %.1f, scan.json %.1f, "
                 "job queued %.1f)", record.scan_id, record.acquisitions, record.bytes_received / 1e6, job.id,
                 1e3 * (t_ack - t_close), 1e3 * (t_durable - t_close), 1e3 * (t_recorded - t_durable),
                 1e3 * (t_ack - t_recorded))

    def _index(self, record: ScanRecord) -> None:
        """The complete scan into the reference-scan index (after the ack: jobs that name it as their
        reference find it there); best effort, the reconciler rebuilds the index from the disk."""
        if self.ctx.redis_up():
            scanindex.record_scan(self.ctx.jobs.redis, record)

    def _stored_unqueued(self, record: ScanRecord, error: BaseException, t_close: float) -> None:
        """The scan is complete on disk but its job could not be recorded or queued (Redis unreachable):
        the scanner is told it is stored and will be queued, never an ``ERR`` (nothing is lost, the exam
        goes on); the gateway's reconcile loop queues it once Redis is back."""
        self.stream.send(
            text("INF", f"scan {record.scan_id} stored ({record.acquisitions} readouts); the job queue is "
                        f"unreachable just now: job {first_job_id(record.scan_id)} will be queued when it is back"),
            p.write_close(),
        )
        log.warning("scan %s complete: %d readouts, %.1f MB; its job is not queued yet (job queue unreachable: "
                    "%s): the reconciler queues it when Redis is back; ack %.1f ms", record.scan_id,
                    record.acquisitions, record.bytes_received / 1e6, error, 1e3 * (time.perf_counter() - t_close))
