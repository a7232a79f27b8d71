"""Job submission: record a job for a stored scan and put its id on a Celery queue.

Also the reconciler: files on disk are the truth. A scan still ``receiving`` when the gateway starts
was cut off by the gateway stopping (killed, crashed, machine lost): it is marked ``incomplete`` and
never queued. A complete scan whose job Redis lost, or never got (Redis down at the ack), is queued
again, exactly once; the job of a scan cut off is failed, also where Redis was down when it was cut.
The reconciler assumes one gateway per data root (another live gateway's scans would look cut off).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from kombu.exceptions import OperationalError

from reconq.core.jobs import Job, JobStore
from reconq.core.rawcheck import readable_counts_isolated
from reconq.core.sender import TaskSender
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.scheduler import scanindex
from reconq.scheduler.placement import Placement

log = logging.getLogger(__name__)

#: What recording or queueing a job raises when the job queue cannot be reached: Redis itself (refused,
#: timed out, the connection cut, still loading its data) or the Celery producer on it, which wraps the
#: same errors in kombu's ``OperationalError``. The scan on disk is not affected: the reconciler queues it.
QUEUE_UNREACHABLE: tuple[type[Exception], ...] = (redis.RedisError, OperationalError)


def first_job_id(scan_id: str) -> str:
    """The id of the job made when a scan arrives (stable: the same scan never gets a second one)."""
    return f"{scan_id}-j1"


def enqueue(store: JobStore, sender: TaskSender, job: Job, placement: Placement | None = None,
            since: float | None = None, header: Any = None) -> None:
    """Mark ``job`` queued and place it in the waiting set (with ``placement``, where it can: see
    :mod:`reconq.scheduler.placement`), else send its id to its queue (the task id is the job id plus attempt).
    ``since``: the time it has been queued since (a job moved to another queue keeps its place in time);
    ``header``: its scan's parsed MRD header, where the caller has it (else placement reads it)."""
    enqueue_many(store, sender, [job], placement, since, {job.scan_id: header} if header is not None else None)


def enqueue_many(store: JobStore, sender: TaskSender, jobs: Sequence[Job], placement: Placement | None = None,
                 since: float | None = None, headers: Mapping[str, Any] | None = None) -> None:
    """:func:`enqueue` for a batch: with ``placement``, the jobs are placed as one batch, so the scheduler
    chooses among all of them rather than starting them in the order they are listed. Should placement
    fail (Redis, a broker error), every job still goes to its priority queue: none is left queued with
    no message (a worker that takes one already waiting just admits it again)."""
    when = since or time.time()
    queued = []
    for job in jobs:
        if store.set_state(job.id, JobState.QUEUED, queue=job.queue, queued_at=when):
            queued.append(dataclasses.replace(job, queued_at=when))
    rest: Sequence[Job] = queued
    if placement is not None:
        try:
            rest = placement.place_many(queued, headers)
        except Exception:
            log.exception("placing %d job(s) failed; they go to their priority queues", len(queued))
    sent = {job.id for job in rest}
    for job in queued:
        if job.id not in sent:
            log.info("job %s queued (%s, pipeline %s): waiting for GPU memory", job.id, job.queue, job.pipeline)
    for job in rest:
        sender.send(job.id, job.queue, job.attempts)
        log.info("job %s queued on %s (pipeline %s)", job.id, job.queue, job.pipeline)


def job_for_scan(record: ScanRecord, job_id: str, queue: str, pipeline: str | None = None,
                 params: dict | None = None) -> Job:
    return Job(
        id=job_id,
        scan_id=record.scan_id,
        pipeline=pipeline or record.pipeline or "",
        params=dict(record.params if params is None else params),
        queue=queue,
        patient_id=record.patient_id,
        study_uid=record.study_uid,
        protocol=record.protocol,
        measurement_id=record.measurement_id,
    )


def announce_scan(store: JobStore, record: ScanRecord, queue: str) -> bool:
    """Record the scan's first job in state ``receiving`` while the scan streams in (not queued yet), so
    the dashboard shows a long upload. Best effort: without Redis the job is made at the end instead
    (False returned)."""
    job = job_for_scan(record, first_job_id(record.scan_id), queue)
    job.state = JobState.RECEIVING
    try:
        store.create(job)
    except redis.RedisError as e:
        log.warning("job %s: not recorded as receiving (%s); it is made when the scan is complete", job.id, e)
        return False
    return True


def fail_cut_off(store: JobStore, record: ScanRecord) -> None:
    """An incomplete scan's job still ``receiving`` (its session, or the gateway, could not fail it: Redis
    was down, the gateway was killed) fails with the scan's error. Raises what Redis raises."""
    job = store.get(first_job_id(record.scan_id))
    if job is not None and job.state is JobState.RECEIVING:
        why = record.error or "cut off"
        store.set_state(job.id, JobState.FAILED, error=f"scan incomplete: {why}", stage="failed")
        log.warning("job %s failed: its scan %s is incomplete (%s)", job.id, record.scan_id, why)


def fail_receiving(store: JobStore, scan_id: str, why: str) -> None:
    """The scan of a ``receiving`` job was cut off: the job fails with the reason (best effort)."""
    try:
        job = store.get(first_job_id(scan_id))
        if job is not None and job.state is JobState.RECEIVING:
            store.set_state(job.id, JobState.FAILED, error=f"scan incomplete: {why}", stage="failed")
    except redis.RedisError as e:
        log.warning("job %s: could not be marked failed (%s)", first_job_id(scan_id), e)


def submit_scan(store: JobStore, sender: TaskSender, record: ScanRecord, queue: str,
                placement: Placement | None = None, header: Any = None) -> Job:
    """Create (or take the ``receiving`` record of) the scan's first job and enqueue it; a scan already
    submitted gets its existing job back and is not queued twice. ``header``: the scan's parsed MRD
    header, where the caller has it.

    A new job is recorded ``receiving`` and only then moved to ``queued``: should Redis go away in
    between (or a reply be lost, the write done), the record says the job was never queued, and the
    reconciler queues it. Raises one of :data:`QUEUE_UNREACHABLE` when Redis cannot be reached."""
    job = job_for_scan(record, first_job_id(record.scan_id), queue)
    job.state = JobState.RECEIVING
    if store.create(job):
        enqueue(store, sender, job, placement, header=header)
        job.state = JobState.QUEUED
        return job
    existing = store.get(job.id)
    assert existing is not None
    if existing.state is JobState.RECEIVING:
        store.update(job.id, params=job.params)  # a parameter TEXT may have come after the header
        enqueue(store, sender, job, placement, header=header)
        job.state = JobState.QUEUED
        return job
    log.info("job %s exists already (%s); not queued again", job.id, existing.state)
    return existing


def readouts_in(path: Path) -> tuple[int, int]:
    """(readouts, waveforms) readable in a raw file that may have been cut off; (0, 0) if unreadable.

    Checked by reading the rows, not taken from the datasets' shapes (which a cut-off file can overstate),
    in a child process: a damaged file that crashes HDF5 costs the caller nothing
    (:func:`reconq.core.rawcheck.readable_counts_isolated`)."""
    return readable_counts_isolated(path)


def mark_interrupted(scans: ScanStore) -> list[str]:
    """Mark every scan still ``receiving`` as ``incomplete``: the gateway stopped while it streamed in."""
    marked = []
    for record in scans.scans():
        if record.state is not ScanState.RECEIVING:
            continue
        record.acquisitions, record.waveforms = readouts_in(scans.raw_path(record.scan_id))
        record.state = ScanState.INCOMPLETE
        record.error = ("the gateway stopped mid-scan (found still receiving at start-up); "
                        f"{record.acquisitions} readouts readable in the raw file; not queued")
        try:
            scans.save(record)
        except OSError as e:  # a full disk: the scan stays receiving and is marked at the next start
            log.error("scan %s: could not be recorded as incomplete (%s); left receiving", record.scan_id, e)
            continue
        log.warning("scan %s incomplete: %s", record.scan_id, record.error)
        marked.append(record.scan_id)
    return marked


def reconcile(scans: ScanStore, store: JobStore, sender: TaskSender, queue: str, at_start: bool = True,
              placement: Placement | None = None, owed: Callable[[str], None] | None = None) -> list[str]:
    """Queue every complete scan that has no job in Redis (or only one still ``receiving``), and fail the
    ``receiving`` job of every incomplete scan; at start-up, first mark the scans that a stopped gateway
    left receiving as incomplete (later, such a scan may be a session still running). The disk part
    (:func:`mark_interrupted`) needs no Redis: a gateway that starts while Redis is down runs it alone
    and this with ``at_start=False`` once Redis is back.

    Returns the job ids queued; raises one of :data:`QUEUE_UNREACHABLE` when Redis cannot be reached
    (what was done stays done: running it again is safe), after calling ``owed`` with the scan whose job it
    was queueing: that job may be marked ``queued`` with its message lost, which a later reconcile skips, so
    the caller sends it again (the gateway's :meth:`~reconq.gateway.server.Gateway.reconcile_once`).
    """
    if at_start:
        mark_interrupted(scans)
    queued: list[str] = []
    for record in (records := list(scans.scans())):
        if not record.pipeline:
            continue
        if record.state is ScanState.INCOMPLETE:
            fail_cut_off(store, record)
            continue
        if record.state is not ScanState.COMPLETE:
            continue
        first = store.get(first_job_id(record.scan_id))
        if first is not None and first.state is not JobState.RECEIVING:
            continue  # complete, with its job (a scan marked complete whose job was never queued is not)
        if first is None and store.jobs_for_scan(record.scan_id):
            continue
        try:
            job = submit_scan(store, sender, record, queue, placement)
        except QUEUE_UNREACHABLE:
            if owed is not None:
                owed(record.scan_id)
            raise
        log.warning("job %s queued from disk: Redis had no queued job for complete scan %s", job.id, record.scan_id)
        queued.append(job.id)
    scanindex.rebuild(store.redis, scans, records)  # the reference-scan index, made whole from the disk
    return queued
