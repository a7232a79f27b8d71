"""Staff actions on jobs: retry, cancel, change priority, retro-recon. Each one is recorded on the job.

Celery's Redis transport keeps a queue as a Redis list of JSON messages whose ``headers.id`` is the
task id (``<job id>.<attempts at enqueue>``, see :func:`gateway.submit.enqueue`). A queued job is moved
or cancelled by taking its message out of that list (``LREM``, atomic: either the action or a worker
gets it). A job a worker has already taken is revoked through Celery's control channel; stopping the
running recon is the worker's part.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any, Concatenate, ParamSpec, TypeVar

from celery import Celery

from gateway.submit import enqueue, job_for_scan
from reconq.constants import JobState, Queue
from reconq.jobs import Job, JobStore
from reconq.storage import ScanState, ScanStore

log = logging.getLogger(__name__)

CANCELLABLE = (JobState.RECEIVING, JobState.QUEUED, JobState.WAITING_INPUTS, JobState.RUNNING)


class ActionError(Exception):
    """An action that cannot be done; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def task_ids(job: Job) -> list[str]:
    """Every Celery task id the job may have had: one per attempt (see :func:`gateway.submit.enqueue`)."""
    return [f"{job.id}.{n}" for n in range(job.attempts + 1)]


def take_from_queue(store: JobStore, queue: str, task_id: str) -> bool:
    """Remove the message of ``task_id`` from a Celery queue list; False if no worker-free copy is left."""
    for raw in store.redis.lrange(queue, 0, -1):
        try:
            headers = json.loads(raw).get("headers") or {}
        except (ValueError, AttributeError):
            continue
        if headers.get("id") == task_id:
            return bool(store.redis.lrem(queue, 1, raw))
    return False


P = ParamSpec("P")
R = TypeVar("R")


def _serialised(method: Callable[Concatenate[Actions, P], R]) -> Callable[Concatenate[Actions, P], R]:
    """One action at a time: Celery's producer is not meant to be shared between threads unguarded."""

    @functools.wraps(method)
    def wrapper(self: Actions, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


class Actions:
    """The staff actions, on one job store, Celery app and data root."""

    def __init__(self, store: JobStore, celery: Celery, scans: ScanStore, pipelines: Collection[str]) -> None:
        self.store, self.celery, self.scans, self.pipelines = store, celery, scans, pipelines
        self.lock = threading.Lock()

    def _job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise ActionError(404, f"no job {job_id!r}")
        return job

    @_serialised
    def retry(self, job_id: str, who: str) -> Job:
        """Queue a failed job again (same id, same queue; its attempts go on counting)."""
        job = self._job(job_id)
        if job.state is not JobState.FAILED:
            raise ActionError(409, f"job {job_id} is {job.state.value}; only a failed job can be retried")
        self.store.update(job_id, error="", progress=0.0, stage="")
        self.store.clear_fields(job_id, "finished_at", "started_at")
        self.store.record_action(job_id, who, "retry", f"previous error: {job.error}" if job.error else "")
        enqueue(self.store, self.celery, job)
        log.info("job %s retried by %s", job_id, who)
        return self._job(job_id)

    @_serialised
    def cancel(self, job_id: str, who: str) -> Job:
        """Cancel a queued, waiting or running job: take it off its queue, or revoke its task."""
        job = self._job(job_id)
        if job.state not in CANCELLABLE:
            raise ActionError(409, f"job {job_id} is {job.state.value}; only a queued, waiting or running "
                                   "job can be cancelled")
        taken = job.state is JobState.QUEUED and take_from_queue(self.store, job.queue, f"{job.id}.{job.attempts}")
        if not taken:
            self.celery.control.revoke(task_ids(job))
        self.store.set_state(job_id, JobState.CANCELLED, stage="cancelled")
        how = "taken off queue " + job.queue if taken else f"task revoked while {job.state.value}"
        self.store.record_action(job_id, who, "cancel", how)
        log.info("job %s cancelled by %s (%s)", job_id, who, how)
        return self._job(job_id)

    @_serialised
    def set_priority(self, job_id: str, queue: Queue, who: str) -> Job:
        """Move a queued job to another queue (``stat`` before ``routine`` before ``bulk``)."""
        job = self._job(job_id)
        if job.queue == queue.value:
            raise ActionError(409, f"job {job_id} is on queue {queue.value} already")
        if job.state is not JobState.QUEUED:
            raise ActionError(409, f"job {job_id} is {job.state.value}; only a queued job can change priority")
        if not take_from_queue(self.store, job.queue, f"{job.id}.{job.attempts}"):
            raise ActionError(409, f"job {job_id} has just been taken by a worker; it is no longer queued")
        enqueue(self.store, self.celery, dataclasses.replace(job, queue=queue.value))
        if job.queued_at is not None:
            self.store.update(job_id, queued_at=job.queued_at)  # still waiting since it was first queued
        self.store.record_action(job_id, who, "priority", f"queue {job.queue} -> {queue.value}")
        log.info("job %s moved from %s to %s by %s", job_id, job.queue, queue.value, who)
        return self._job(job_id)

    @_serialised
    def retro_recon(self, scan_id: str, pipeline: str, params: dict[str, Any] | None, queue: Queue,
                    who: str) -> Job:
        """A new job ``<scan_id>-j<n>`` on a stored scan, with another pipeline or parameters."""
        try:
            record = self.scans.load(scan_id)
        except (ValueError, OSError) as e:
            raise ActionError(404, f"no stored scan {scan_id!r}") from e
        if record.state is not ScanState.COMPLETE:
            raise ActionError(409, f"scan {scan_id} is {record.state.value}; only a complete scan can be "
                                   "reconstructed again")
        if pipeline not in self.pipelines:
            raise ActionError(422, f"unknown pipeline {pipeline!r}; known pipelines: "
                                   + ", ".join(sorted(self.pipelines)))
        job = job_for_scan(record, self.store.next_job_id(scan_id), queue.value, pipeline, params)
        self.store.create(job)
        enqueue(self.store, self.celery, job)
        self.store.record_action(job.id, who, "retro-recon", f"pipeline {pipeline} on queue {queue.value}, "
                                                             f"params {json.dumps(job.params, sort_keys=True)}")
        log.info("job %s: retro-recon of scan %s with %s by %s", job.id, scan_id, pipeline, who)
        return self._job(job.id)
