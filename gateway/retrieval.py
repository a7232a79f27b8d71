"""Retrieval scans: find the finished job of this patient, study and protocol and send its images.

The retrieval session's own data (a short dummy scan) is read and dropped. A job still queued or
running is waited for, up to ``retrieve_wait_s``, with ``INF`` progress TEXT every
``retrieve_poll_s``. The session never ends silently: no match, a failed job or a time-out each get a
TEXT that says why, then CLOSE.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from reconq.core.jobs import Job
from reconq.core.results import read_images
from reconq.core.states import JobState
from reconq.gateway import protocol as p
from reconq.gateway.context import SessionContext
from reconq.gateway.opening import Opening, identity, parameters_from_text
from reconq.gateway.stream import MessageStream, SessionError, text

log = logging.getLogger(__name__)


class Retrieval:
    """Serves one retrieval scan; :meth:`run` raises what ends the session (the session reports it)."""

    def __init__(self, stream: MessageStream, ctx: SessionContext, opening: Opening, params: dict[str, Any]) -> None:
        self.stream, self.ctx, self.opening, self.params = stream, ctx, opening, params

    def run(self) -> None:
        s, ctx = self.stream, self.ctx
        s.read_until_close({p.MessageId.TEXT: self._text},
                           drop=(p.MessageId.ACQUISITION, p.MessageId.WAVEFORM, p.MessageId.IMAGE))
        who = identity(self.opening.header)
        protocol = str(self.params.get("protocol") or who["protocol"])
        job = self._find(who, protocol)
        if job is None:
            s.send(text("WRN", f"no reconstruction found for this patient, study and protocol {protocol!r}"),
                   p.write_close())
            log.info("retrieval from %s: no job for protocol %r", s.peer, protocol)
            ctx.jobs.record_retrieval(False)
            return
        job = self._wait(job)
        if job.state is JobState.DONE:
            self._send_images(job)
            ctx.jobs.record_retrieval(True)
            return
        ctx.jobs.record_retrieval(False)
        if job.state is JobState.FAILED:
            s.send(text("ERR", f"job {job.id} failed: {job.error}"), p.write_close())
        elif job.state is JobState.CANCELLED:
            s.send(text("WRN", f"job {job.id} was cancelled"), p.write_close())
        else:
            s.send(text("WRN", f"job {job.id} is still {job.state.value} ({100 * job.progress:.0f} %) after "
                               f"{ctx.settings.retrieve_wait_s:g} s; run the retrieval scan again later"),
                   p.write_close())

    def _find(self, who: dict[str, str], protocol: str) -> Job | None:
        jobs = self.ctx.jobs
        job_id = self.params.get("job") or self.params.get("job_id")
        if not job_id:
            return jobs.find_for_retrieval(who["patient_id"], who["study_uid"], protocol)
        job = jobs.get(str(job_id))
        if job is not None and (job.patient_id, job.study_uid) != (who["patient_id"], who["study_uid"]):
            log.warning("retrieval from %s asked for job %s of another patient or study; refused",
                        self.stream.peer, job_id)
            raise SessionError(f"job {job_id} belongs to another patient or study than this exam")
        return job

    def _text(self) -> None:
        """A JSON TEXT carries parameters (``job``, ``protocol``), as in acquisition scans; others are logged."""
        s = self.stream
        body = str(s.read(p.MessageId.TEXT))
        if body.lstrip().startswith("{"):
            self.params.update(parameters_from_text(body))
        else:
            log.info("retrieval from %s: client says: %.200s", s.peer, body)

    def _wait(self, job: Job) -> Job:
        s = self.stream
        settings = self.ctx.settings
        deadline = time.monotonic() + settings.retrieve_wait_s
        next_report = 0.0
        while not job.state.finished and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_report:
                stage = f", {job.stage}" if job.stage else ""
                s.send(text("INF", f"job {job.id} {job.state.value} {100 * job.progress:.0f} %{stage}; waiting"))
                next_report = now + settings.retrieve_poll_s
            time.sleep(min(0.2, max(0.0, deadline - now)))
            job = self.ctx.jobs.get(job.id) or job
        return job

    def _send_images(self, job: Job) -> None:
        s = self.stream
        images = read_images(Path(job.result_path))
        for image in images:
            s.send(p.write_image(image))
        s.send(text("INF", f"{len(images)} images of job {job.id} sent"), p.write_close())
        log.info("retrieval from %s: %d images of job %s sent", s.peer, len(images), job.id)
