"""Retrieval scans: the newest reconstruction of this exam and protocol, in the retrieval scan's form.

The retrieval session's own data (a short dummy scan) is read and dropped; its first readout gives the
session's ``measurement_uid``. The answer is chosen by these rules, which never put another exam's or
an older scan's images into the exam:

- The retrieval matches jobs of the same patient ID, study instance UID and protocol name (the
  retrieval's protocol name with a site's suffixes and prefixes stripped, ``retrieve_protocol_*``). An
  empty patient ID or study UID matches nothing: the scanner gets an ``ERR`` naming the missing field.
- Among the matching jobs, the **newest scan** is the answer (ordered by job number, not by clock),
  with the newest job of each pipeline run on it (a retro-recon with another pipeline is another
  series). A job still queued or running is waited for, up to ``retrieve_wait_s``, with ``INF``
  progress every ``retrieve_poll_s`` (a line that says the same again only every ``retrieve_repeat_s``).
  A failed job gets an ``ERR`` with its error, never an older job's images.
- ``{"job": ID}`` asks for one job by name (still of this patient and study); a job that is not the
  newest is sent with a ``WRN`` saying so.
- The images are re-stamped with the session's ``measurement_uid`` and fitted to the retrieval
  header's recon matrix and field of view (:mod:`reconq.recon.refit`), the ``INF`` saying what was done;
  what the recon warned of (a job's ``warnings``, e.g. motion that could not be corrected) follows as ``WRN``.

The session never ends silently: no match, a failed job, a time-out, a result file that cannot be read
and Redis out of reach each get a TEXT that says why, then CLOSE.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import ismrmrd
import redis

from reconq.core.jobs import Job, newest_results
from reconq.core.results import read_images, result_file
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.gateway import protocol as p
from reconq.gateway.context import SessionContext
from reconq.gateway.opening import Opening, identity, parameters_from_text
from reconq.gateway.stream import MessageStream, SessionError, text
from reconq.recon.errors import ReconError
from reconq.recon.refit import fit_images

log = logging.getLogger(__name__)


def matched_protocol(name: str, settings: Settings) -> str:
    """The retrieval scan's protocol name as the acquisition's would be: a site's retrieval suffix or prefix
    (``_retrieve``, say) stripped."""
    for suffix in settings.retrieve_protocol_suffixes:
        if suffix and name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    for prefix in settings.retrieve_protocol_prefixes:
        if prefix and name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix):]
            break
    return name


def missing_identity(who: dict[str, str]) -> list[str]:
    """The identifiers a retrieval needs that its header lacks."""
    return [what for key, what in (("patient_id", "patient ID"), ("study_uid", "study instance UID"))
            if not who[key].strip()]


def gives_form(header: Any) -> bool:
    """Whether a retrieval header names a recon matrix and field of view to fit the images to (a header
    made only to name an exam, as ``reconq retrieve --patient ...`` sends, gives zeros)."""
    space = header.encoding[0].reconSpace if header.encoding else None
    if space is None or space.matrixSize is None or space.fieldOfView_mm is None:
        return False
    return min(space.matrixSize.x or 0, space.matrixSize.y or 0) > 0 and \
        min(space.fieldOfView_mm.x or 0, space.fieldOfView_mm.y or 0) > 0


class Retrieval:
    """Serves one retrieval scan; :meth:`run` raises what ends the session (the session reports it)."""

    def __init__(self, stream: MessageStream, ctx: SessionContext, opening: Opening, params: dict[str, Any]) -> None:
        self.stream, self.ctx, self.opening, self.params = stream, ctx, opening, params
        self.measurement_uid: int | None = None

    def run(self) -> None:
        s = self.stream
        s.read_until_close({p.MessageId.TEXT: self._text, p.MessageId.ACQUISITION: self._acquisition},
                           drop=(p.MessageId.WAVEFORM, p.MessageId.IMAGE))
        try:
            self._answer()
        except redis.RedisError as e:
            log.warning("retrieval from %s: Redis unreachable: %s", s.peer, e)
            raise SessionError(f"the job records cannot be read (Redis unreachable: {e}); no images were sent, "
                               "none are lost: run the retrieval scan again shortly") from e

    def _answer(self) -> None:
        s, ctx = self.stream, self.ctx
        who = identity(self.opening.header)
        protocol = str(self.params.get("protocol") or matched_protocol(who["protocol"], ctx.settings))
        jobs, warning = self._find(who, protocol)
        if not jobs:
            s.send(text("WRN", f"no reconstruction found for this patient, study and protocol {protocol!r}"),
                   p.write_close())
            log.info("retrieval from %s: no job for protocol %r", s.peer, protocol)
            ctx.jobs.record_retrieval(False)
            return
        if warning:
            s.send(text("WRN", warning))
        jobs = self._wait(jobs)
        self._deliver(jobs)

    def _find(self, who: dict[str, str], protocol: str) -> tuple[list[Job], str]:
        """The jobs to answer with, and a warning to send first ('' for none)."""
        jobs = self.ctx.jobs
        job_id = self.params.get("job") or self.params.get("job_id")
        if not job_id:
            missing = missing_identity(who)
            if missing:
                raise SessionError(
                    f"retrieval refused: the retrieval scan's header has no {' and no '.join(missing)}, so it "
                    "cannot be matched to an exam; ask for the job by name (JSON parameter {\"job\": ID}) or "
                    "download the images from the dashboard")
            return newest_results(jobs.exam_jobs(who["patient_id"], who["study_uid"], protocol)), ""
        job = jobs.get(str(job_id))
        if job is None:
            return [], ""
        if (job.patient_id, job.study_uid) != (who["patient_id"], who["study_uid"]):
            log.warning("retrieval from %s asked for job %s of another patient or study; refused",
                        self.stream.peer, job_id)
            raise SessionError(f"job {job_id} belongs to another patient or study than this exam")
        newest = newest_results(jobs.exam_jobs(job.patient_id, job.study_uid, job.protocol))
        if job.id in {j.id for j in newest} or not newest:
            return [job], ""
        return [job], (f"job {job.id} is not the newest reconstruction of this exam and protocol (newest: "
                       f"{', '.join(j.id for j in newest)}); sending it as asked")

    def _text(self) -> None:
        """A JSON TEXT carries parameters (``job``, ``protocol``), as in acquisition scans; others are logged."""
        s = self.stream
        body = str(s.read(p.MessageId.TEXT))
        if body.lstrip().startswith("{"):
            self.params.update(parameters_from_text(body))
        else:
            log.info("retrieval from %s: client says: %.200s", s.peer, body)

    def _acquisition(self) -> None:
        """A readout of the retrieval scan: dropped; the first gives the session's ``measurement_uid``."""
        head, _payload = cast(tuple[bytes, bytes], self.stream.read(p.MessageId.ACQUISITION))
        if self.measurement_uid is None:
            self.measurement_uid = p.acquisition_measurement_uid(head)

    def _wait(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` once all are finished, or as they are when ``retrieve_wait_s`` has passed."""
        s, settings = self.stream, self.ctx.settings
        deadline = time.monotonic() + settings.retrieve_wait_s
        next_report, last_line, last_sent = 0.0, "", 0.0
        while any(not j.state.finished for j in jobs) and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_report:
                line = "; ".join(f"job {j.id} {j.state.value} {100 * j.progress:.0f} %"
                                 + (f", {j.stage}" if j.stage and not j.state.finished else "") for j in jobs)
                if line != last_line or now - last_sent >= settings.retrieve_repeat_s:
                    s.send(text("INF", f"{line}; waiting"))
                    last_line, last_sent = line, now
                next_report = now + settings.retrieve_poll_s
            time.sleep(min(0.2, max(0.0, deadline - now)))
            jobs = [self.ctx.jobs.get(j.id) or j for j in jobs]
        return jobs

    def _deliver(self, jobs: list[Job]) -> None:
        """Send the finished jobs' images; say why for each job that has none."""
        s, ctx = self.stream, self.ctx
        unfinished = [j for j in jobs if not j.state.finished]
        if unfinished:
            ctx.jobs.record_retrieval(False)
            s.send(*[text("WRN", f"job {j.id} is still {j.state.value} ({100 * j.progress:.0f} %) after "
                                 f"{ctx.settings.retrieve_wait_s:g} s; run the retrieval scan again later")
                     for j in unfinished], p.write_close())
            return
        done = [j for j in jobs if j.state is JobState.DONE]
        images = self._images(done)
        for image in images:
            s.send(p.write_image(image))
        refusals = [text("ERR", f"job {j.id} failed: {j.error}") for j in jobs if j.state is JobState.FAILED]
        refusals += [text("WRN", f"job {j.id} was cancelled") for j in jobs if j.state is JobState.CANCELLED]
        ctx.jobs.record_retrieval(bool(images))
        shown = [j for j in done if j.results_purged_at is None]  # the jobs whose images went
        sent = [text("INF", f"{len(images)} images of job{'s' if len(shown) > 1 else ''} "
                            f"{', '.join(j.id for j in shown)} sent")] if images else []
        warned = [text("WRN", f"job {j.id}: {w}") for j in shown for w in j.warnings]  # what its recon warned of
        s.send(*sent, *warned, *refusals, p.write_close())
        log.info("retrieval from %s: %d images of %s sent", s.peer, len(images), ", ".join(j.id for j in done))

    def _images(self, jobs: list[Job]) -> list[ismrmrd.Image]:
        """The images of ``jobs``, each job its own series, fitted to this retrieval scan."""
        out: list[ismrmrd.Image] = []
        series: dict[tuple[str, int], int] = {}  # (job, its series) -> the series sent
        purged = [job for job in jobs if job.results_purged_at is not None]
        for job in purged:  # deleted by retention: said so, never older images instead
            on = time.strftime("%Y-%m-%d", time.localtime(job.results_purged_at or 0.0))
            why = (f"the images of job {job.id} were deleted by retention on {on} (RECONQ_KEEP_RESULTS_DAYS); "
                   + ("its raw data was deleted too: it cannot be reconstructed" if job.raw_purged_at is not None
                      else "reconstruct it again from the dashboard (retro-recon)"))
            if len(purged) == len(jobs):
                raise SessionError(why)
            self.stream.send(text("WRN", why))  # the scan's other pipelines' images still go
        for job in (j for j in jobs if j.results_purged_at is None):
            try:
                images = read_images(result_file(self.ctx.scans, job))  # from its ids: never a path from Redis
            except Exception as e:  # missing, truncated or not MRD: the scanner is told, never left silent
                log.warning("retrieval from %s: result of job %s unreadable: %s", self.stream.peer, job.id, e)
                raise SessionError(f"the images of job {job.id} cannot be read (result file missing or "
                                   f"unreadable: {type(e).__name__}: {e}); reconstruct it again from the "
                                   "dashboard (retro-recon)") from e
            if len(jobs) > 1:  # each job's series apart from the others'
                for image in images:
                    key = (job.id, int(image.image_series_index))
                    image.image_series_index = series.setdefault(key, len(series) + 1)
            if not images:
                raise SessionError(f"job {job.id} is done but its result file holds no images")
            uid = self.measurement_uid if self.measurement_uid is not None else int(images[0].measurement_uid)
            images, how = self._fit(job, images, uid)
            self.stream.send(text("INF", f"job {job.id}: {how}"))
            out += images
        return out

    def _fit(self, job: Job, images: list[ismrmrd.Image], uid: int) -> tuple[list[ismrmrd.Image], str]:
        """The images re-stamped with this session's ``measurement_uid`` and fitted to its recon space."""
        if not gives_form(self.opening.header):
            for image in images:
                image.measurement_uid = uid
            return images, "the retrieval scan names no recon matrix: images sent as reconstructed"
        try:
            return fit_images(images, self.opening.header, uid)
        except ReconError as e:
            raise SessionError(f"the images of job {job.id} cannot be fitted to this retrieval scan: {e}") from e
