"""Staff actions on jobs: retry, cancel, change priority, retro-recon. Each one is recorded on the job.

Celery's Redis transport keeps a queue as a Redis list of JSON messages whose ``headers.id`` is the
task id (``<job id>.<attempts>``, see :func:`reconq.scheduler.submit.enqueue`). A ``queued`` job is in one of
these places:

- its priority queue (``job.queue``: ``stat``, ``routine``, ``bulk``), not yet taken by a worker;
- the waiting set of :mod:`reconq.scheduler.admission`, waiting for GPU memory (no Celery message at all);
- a GPU's own queue ``gpu.<id>`` (memory reserved there, no worker started it yet) or the ``cpu`` queue;
- in a worker's hands, about to be admitted or started.

A queued job is moved or cancelled by taking its message out of its list (``LREM``, atomic: either the
action or a worker gets it), or its entry out of the waiting set (one Lua script). A job a worker has
already taken is revoked through Celery's control channel; stopping the running recon is the worker's
part. A cancelled job's state is never overwritten by a worker (:meth:`reconq.core.jobs.JobStore.set_state`).

An action that cannot be done raises one of the :class:`ActionError` family (:class:`JobNotFound`,
:class:`ScanNotFound`, :class:`ActionRefused`, :class:`InvalidAction`), whose message says why; the callers
(the HTTP API, the command line) decide how to answer each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from reconq.core.constants import CPU_QUEUE, GPU_QUEUE_PREFIX, GPU_WAITING, Queue
from reconq.core.jobs import Job, JobStore
from reconq.core.sender import TaskSender, task_id
from reconq.core.states import CANCELLABLE, FINISHED, JobState, can_move
from reconq.core.storage import ScanState, ScanStore
from reconq.scheduler.admission import PENDING_SUFFIX, Admission
from reconq.scheduler.placement import Placement
from reconq.scheduler.retention import ScanBusy, scan_guard
from reconq.scheduler.routing import gpu_queue, waiting_score
from reconq.scheduler.submit import enqueue, enqueue_many, job_for_scan

log = logging.getLogger(__name__)

#: Finished states a staff retry queues again (the transition table's way back from an end).
RETRYABLE: frozenset[JobState] = frozenset(s for s in FINISHED if can_move(s, JobState.QUEUED))
#: States in which a job may change queue (priority): not yet taken to run.
REPRIORITISABLE: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.WAITING_INPUTS})


class ActionError(Exception):
    """A staff action that cannot be done; the message says why."""


class JobNotFound(ActionError):
    """No job has the id given."""


class ScanNotFound(ActionError):
    """No stored scan has the id given."""


class ActionRefused(ActionError):
    """The action is not possible in the state the job or scan is in now."""


class InvalidAction(ActionError):
    """The action itself is malformed: no scans named, an unknown pipeline."""


def task_ids(job: Job) -> list[str]:
    """Every Celery task id the job may have had: one per attempt (see :func:`reconq.scheduler.submit.enqueue`)."""
    return [task_id(job.id, n) for n in range(job.attempts + 1)]


def _messages(store: JobStore, queue: str, ids: Collection[str]) -> list[str]:
    """The raw messages in a Celery queue list whose task id is one of ``ids``."""
    found = []
    for raw in store.redis.lrange(queue, 0, -1):
        try:
            headers = json.loads(raw).get("headers") or {}
        except (ValueError, AttributeError):
            continue
        if headers.get("id") in ids:
            found.append(raw)
    return found


def take_from_queue(store: JobStore, queue: str, task_id: str | Collection[str]) -> bool:
    """Remove the message(s) of ``task_id`` (or of any of several task ids) from a Celery queue list;
    False if no worker-free copy was left."""
    ids = {task_id} if isinstance(task_id, str) else set(task_id)
    return sum(store.redis.lrem(queue, 1, raw) for raw in _messages(store, queue, ids)) > 0


def admitted_queues(store: JobStore, admission: Admission) -> list[str]:
    """The queues of admitted jobs: ``gpu.<id>`` of every GPU known to admission or holding a list now,
    and ``cpu``."""
    gpus = {gpu_queue(g) for g in admission.known_gpus()}
    gpus |= {str(k) for k in store.redis.scan_iter(match=GPU_QUEUE_PREFIX + "*", count=500, _type="list")}
    return [*sorted(gpus), CPU_QUEUE]


P = ParamSpec("P")
R = TypeVar("R")


def _serialised(method: Callable[Concatenate[Actions, P], R]) -> Callable[Concatenate[Actions, P], R]:
    """One action at a time (each reads, then queues or revokes): the sender's producer, held throughout."""

    @functools.wraps(method)
    def wrapper(self: Actions, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.sender.exclusive():
            return method(self, *args, **kwargs)

    return wrapper


class Actions:
    """The staff actions, on one job store, task sender and data root."""

    def __init__(self, store: JobStore, sender: TaskSender, scans: ScanStore, pipelines: Collection[str],
                 placement: Placement | None = None) -> None:
        self.store, self.sender, self.scans, self.pipelines = store, sender, scans, pipelines
        self.placement = placement  # jobs queued by an action are placed at submit where they can be
        self.admission = Admission(store.redis)

    def _job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job

    @_serialised
    def retry(self, job_id: str, who: str) -> Job:
        """Queue a failed job again (same id, same queue; its attempts go on counting)."""
        job = self._job(job_id)
        if job.state not in RETRYABLE:
            raise ActionRefused(f"job {job_id} is {job.state.value}; only a failed job can be retried")
        if job.raw_purged_at is not None:
            raise ActionRefused(f"the raw data of scan {job.scan_id} was deleted by retention on "
                                f"{_day(job.raw_purged_at)}: job {job_id} cannot be run again")
        self.store.update(job_id, error="", progress=0.0, stage="", warnings=[], report={}, lost_runs=0)
        self.store.clear_fields(job_id, "finished_at", "started_at")
        self.store.record_action(job_id, who, "retry", f"previous error: {job.error}" if job.error else "")
        with self._guard(job.scan_id):  # a purge of its scan sees it queued, or it the purge
            enqueue(self.store, self.sender, job, self.placement)
            if not self._fail_if_purged([job]):
                raise ActionRefused(f"the raw data of scan {job.scan_id} was deleted by retention: job {job_id} "
                                    "cannot be run again")
        log.info("job %s retried by %s", job_id, who)
        return self._job(job_id)

    @contextlib.contextmanager
    def _guard(self, scan_id: str) -> Iterator[None]:
        """The scan's guard against a purge (:func:`reconq.scheduler.retention.scan_guard`); a scan busy
        too long refuses the action, saying so."""
        try:
            with scan_guard(self.store.redis, scan_id):
                yield
        except ScanBusy as e:
            raise ActionRefused(str(e)) from e

    def _fail_if_purged(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose scan's raw data a purge deleted before they were made or queued (under the scan's
        guard, :func:`reconq.scheduler.retention.scan_guard`: retention marks the scan and reads its jobs, an
        action makes or queues the job and reads the scan, one at a time): each failed, saying so. Returns
        the others."""
        kept = []
        for job in jobs:
            try:
                record = self.scans.load(job.scan_id)
            except (ValueError, OSError):  # no record (a folder gone whole): the worker says so, failing it
                record = None
            if record is None or record.raw_purged_at is None:
                kept.append(job)
                continue
            when = _day(record.raw_purged_at)
            self.store.update(job.id, raw_purged_at=record.raw_purged_at)  # a retry of it is refused
            self.store.set_state(job.id, JobState.FAILED, error=f"the raw data of scan {job.scan_id} was deleted by "
                                 f"retention ({when}) as this job was made: it cannot run")
            log.warning("job %s failed: its scan %s was purged as the job was made", job.id, job.scan_id)
        return kept

    @_serialised
    def cancel(self, job_id: str, who: str) -> Job:
        """Cancel a queued, waiting or running job: mark it cancelled, take its message off whichever queue
        holds it (its own, a GPU's, the CPU's) and it out of the waiting set with its pending reservation;
        where none was found, revoke its task ids (a worker holds it)."""
        job = self._job(job_id)
        if job.state not in CANCELLABLE:
            raise ActionRefused(f"job {job_id} is {job.state.value}; only a queued, waiting or running "
                                "job can be cancelled")
        # cancelled first: from now on no worker starts it, and admission drops it wherever it sees it
        self.store.set_state(job_id, JobState.CANCELLED, stage="cancelled")
        ids = set(task_ids(job))
        taken = [q for q in dict.fromkeys([job.queue, *admitted_queues(self.store, self.admission)])
                 if take_from_queue(self.store, q, ids)]
        was_waiting, dropped = self.admission.forget(job_id)
        where = [f"queue {', '.join(taken)}"] if taken else []
        if was_waiting:
            where.append("the jobs waiting for GPU memory")
        if where:
            how = "taken off " + " and ".join(where)
        else:
            self.sender.revoke(sorted(ids))
            how = f"task revoked while {job.state.value}"
        if dropped:
            how += f"; GPU memory reserved for it on {', '.join(dropped)} freed"
        self.store.record_action(job_id, who, "cancel", how)
        log.info("job %s cancelled by %s (%s)", job_id, who, how)
        return self._job(job_id)

    @_serialised
    def set_priority(self, job_id: str, queue: Queue, who: str) -> Job:
        """Give a queued job another queue (``stat`` before ``routine`` before ``bulk``).

        A job still on its queue is moved to the new one; a job waiting for GPU memory is ordered again
        among the waiting jobs as one of the new queue. A job already admitted (sent to a GPU's queue, or
        to the CPU's) keeps its place, being about to run: only its queue is recorded, which counts if it
        is queued again. A job a worker holds, or that is running or finished, is refused."""
        job = self._job(job_id)
        if job.queue == queue.value:
            raise ActionRefused(f"job {job_id} is on queue {queue.value} already")
        if job.state not in REPRIORITISABLE:
            raise ActionRefused(f"job {job_id} is {job.state.value}; only a queued job can change priority")
        change = f"queue {job.queue} -> {queue.value}"
        if job.state is JobState.QUEUED and take_from_queue(self.store, job.queue, task_ids(job)):
            # still waiting since it was first queued: it keeps its age among the waiting jobs
            enqueue(self.store, self.sender, dataclasses.replace(job, queue=queue.value), self.placement,
                    since=job.queued_at)
            detail = change
        elif job.state is JobState.WAITING_INPUTS:  # its next look for the inputs is sent to the new queue
            self.store.update(job_id, queue=queue.value)
            detail = f"{change}; it waits for its inputs and looks for them next on the new queue"
        elif self._rescore(job, queue):
            self.store.update(job_id, queue=queue.value)
            detail = f"{change}; ordered again among the jobs waiting for GPU memory"
        elif where := self._admitted_to(job):
            self.store.update(job_id, queue=queue.value)
            detail = f"{change}; already admitted to {where}, it keeps its place (it is about to run)"
        else:
            raise ActionRefused(f"job {job_id} has just been taken by a worker; it is no longer queued")
        self.store.record_action(job_id, who, "priority", detail)
        log.info("job %s: %s by %s", job_id, detail, who)
        return self._job(job_id)

    def _rescore(self, job: Job, queue: Queue) -> bool:
        """Order a job waiting for GPU memory as one of ``queue``; False if it is not waiting. One MULTI:
        ``ZADD XX`` never puts back a job that a GPU took meanwhile."""
        score = waiting_score(queue.value, job.queued_at or job.created_at)
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.zscore(GPU_WAITING, job.id)
        pipe.zadd(GPU_WAITING, {job.id: score}, xx=True)
        before, _ = pipe.execute()
        return before is not None

    def _admitted_to(self, job: Job) -> str:
        """The queue (``gpu.<id>``, ``cpu``) holding the job's message, else the GPU holding memory reserved
        for it that no worker has started yet (its message on the way); else ''."""
        ids = set(task_ids(job))
        for q in admitted_queues(self.store, self.admission):
            if _messages(self.store, q, ids):
                return q
        for g in self.admission.known_gpus():
            if any(r.job_id == job.id and r.worker.endswith(PENDING_SUFFIX)
                   for r in self.admission.reservations(g)):
                return gpu_queue(g)
        return ""

    def retro_recon(self, scan_id: str, pipeline: str, params: dict[str, Any] | None, queue: Queue,
                    who: str) -> Job:
        """A new job ``<scan_id>-j<n>`` on a stored scan, with another pipeline or parameters."""
        return self.retro_recon_many([scan_id], pipeline, params, queue, who)[0]

    @_serialised
    def retro_recon_many(self, scan_ids: Sequence[str], pipeline: str, params: dict[str, Any] | None, queue: Queue,
                         who: str) -> list[Job]:
        """:meth:`retro_recon` of several scans as one batch: every scan is checked first (one refused,
        none queued), and the jobs are placed together, so the scheduler chooses among all of them."""
        if not scan_ids:
            raise InvalidAction("no scans named")
        if pipeline not in self.pipelines:
            raise InvalidAction(f"unknown pipeline {pipeline!r}; known pipelines: "
                                + ", ".join(sorted(self.pipelines)))
        records = []
        for scan_id in dict.fromkeys(scan_ids):
            try:
                record = self.scans.load(scan_id)
            except (ValueError, OSError) as e:
                raise ScanNotFound(f"no stored scan {scan_id!r}") from e
            if record.state is not ScanState.COMPLETE:
                raise ActionRefused(f"scan {scan_id} is {record.state.value}; only a complete scan can be "
                                    "reconstructed again")
            records.append(record)
        jobs, runnable = [], []
        for record in records:
            job = job_for_scan(record, self.store.next_job_id(record.scan_id), queue.value, pipeline, params)
            with self._guard(record.scan_id):  # a purge of the scan sees the job, or it the purge
                self.store.create(job)
                runnable += self._fail_if_purged([job])
            jobs.append(job)
        enqueue_many(self.store, self.sender, runnable, self.placement)
        for job in jobs:
            self.store.record_action(job.id, who, "retro-recon", f"pipeline {pipeline} on queue {queue.value}, "
                                                                 f"params {json.dumps(job.params, sort_keys=True)}")
            log.info("job %s: retro-recon of scan %s with %s by %s", job.id, job.scan_id, pipeline, who)
        return [self._job(job.id) for job in jobs]


def _day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))
