"""Job submission: record a job for a stored scan and put its id on a Celery queue.

Also the start-up reconciler: files on disk are the truth. A scan still ``receiving`` when the gateway
starts was cut off by the gateway stopping (killed, crashed, machine lost): it is marked
``incomplete`` and never queued. A complete scan whose job Redis lost is queued again, exactly once.
The reconciler assumes one gateway per data root (another live gateway's scans would look cut off).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import redis

from reconq.core.jobs import Job, JobStore
from reconq.core.sender import TaskSender
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.scheduler.placement import Placement

log = logging.getLogger(__name__)


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


def announce_scan(store: JobStore, record: ScanRecord, queue: str) -> None:
    """Record the scan's first job in state ``receiving`` while the scan streams in (not queued yet), so
    the dashboard shows a long upload. Best effort: without Redis the job is made at the end instead."""
    job = job_for_scan(record, first_job_id(record.scan_id), queue)
    job.state = JobState.RECEIVING
    try:
        store.create(job)
    except redis.RedisError as e:
        log.warning("job %s: not recorded as receiving (%s); it is made when the scan is complete", job.id, e)


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
    header, where the caller has it."""
    job = job_for_scan(record, first_job_id(record.scan_id), queue)
    if store.create(job):
        enqueue(store, sender, job, placement, header=header)
        return job
    existing = store.get(job.id)
    assert existing is not None
    if existing.state is JobState.RECEIVING:
        store.update(job.id, params=job.params)  # a parameter TEXT may have come after the header
        enqueue(store, sender, job, placement, header=header)
        return job
    log.info("job %s exists already (%s); not queued again", job.id, existing.state)
    return existing


def readouts_in(path: Path) -> tuple[int, int]:
    """(readouts, waveforms) readable in a raw file that may have been cut off; (0, 0) if unreadable."""
    try:
        with h5py.File(path, "r") as f:
            group = f["dataset"]
            return (int(group["data"].shape[0]) if "data" in group else 0,
                    int(group["waveforms"].shape[0]) if "waveforms" in group else 0)
    except Exception:  # noqa: BLE001 - a file cut off mid-write may be unreadable in many ways
        return 0, 0


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
        scans.save(record)
        log.warning("scan %s incomplete: %s", record.scan_id, record.error)
        marked.append(record.scan_id)
    return marked


def reconcile(scans: ScanStore, store: JobStore, sender: TaskSender, queue: str, at_start: bool = True,
              placement: Placement | None = None) -> list[str]:
    """Queue every complete scan that has no job in Redis; at start-up, first mark the scans that a
    stopped gateway left receiving as incomplete (later, such a scan may be a session still running).

    Returns the job ids queued.
    """
    if at_start:
        for scan_id in mark_interrupted(scans):
            fail_receiving(store, scan_id, "the gateway stopped mid-scan")
    queued: list[str] = []
    for record in scans.scans():
        if record.state is not ScanState.COMPLETE or not record.pipeline:
            continue
        first = store.get(first_job_id(record.scan_id))
        if first is not None and first.state is not JobState.RECEIVING:
            continue  # complete, with its job (a scan marked complete whose job was never queued is not)
        if first is None and store.jobs_for_scan(record.scan_id):
            continue
        job = submit_scan(store, sender, record, queue, placement)
        log.warning("job %s re-queued from disk: Redis had no job for complete scan %s", job.id, record.scan_id)
        queued.append(job.id)
    return queued
