"""The one place job ids are sent to Celery queues.

A message carries the job id only, never patient data (Celery's monitoring tools show task arguments);
its task id is the job id and attempt, so one attempt is never queued twice under two ids. A process
shares one :class:`TaskSender` between its threads: kombu's producer is not meant to be used by two
threads at once, so sends are serialised here rather than by a lock in every caller.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from celery import Celery

from reconq.core.constants import JOB_KEY, RUN_JOB_TASK


def task_id(job_id: str, attempt: int | str) -> str:
    """The Celery task id of one attempt of a job (a job sent again after a failure gets a new one)."""
    return f"{job_id}.{attempt}"


class TaskSender:
    """Sends job ids to queues on one Celery app, one send at a time per process."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        self._lock = threading.RLock()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the producer for several steps (a reconcile, a staff action) that send and revoke."""
        with self._lock:
            yield

    def send(self, job_id: str, queue: str, attempt: int | str, countdown: float = 0.0) -> None:
        """Send one attempt of a job to ``queue`` (after ``countdown`` seconds)."""
        with self._lock:
            self.celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, task_id=task_id(job_id, attempt),
                                  countdown=countdown or None)

    def send_current(self, client: redis.Redis, job_id: str, queue: str, countdown: float = 0.0) -> None:
        """Send a job's current attempt (read from its record) to ``queue``."""
        self.send(job_id, queue, client.hget(JOB_KEY + job_id, "attempts") or "0", countdown)

    def revoke(self, task_ids: list[str]) -> None:
        """Tell every worker not to start these tasks (a broadcast; a task already running goes on)."""
        with self._lock:
            self.celery.control.revoke(task_ids)
