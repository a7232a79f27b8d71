"""A worker's graceful stop: SIGTERM lets a running recon finish for a grace period, then hands it back.

Celery's warm shutdown (SIGTERM) stops taking jobs and waits for the running ones, for as long as they
take. A recon of an hour would hold a stopping worker (and ``docker stop``, and a node's drain) that
long, or be killed at the container's stop timeout and wait for the broker's visibility timeout. So the
Celery main process of a ReconQ worker, on a warm shutdown, watches its pool processes' heartbeats:

- a recon that ends within ``RECONQ_WORKER_STOP_GRACE_S`` ends as usual and the worker exits;
- one still running then is handed back to its queue at once (fenced by its run's number, not counted
  against ``RECONQ_MAX_ATTEMPTS``: the job did nothing wrong), so another worker starts it again now. The
  old run sees the hand-back at its next progress write and stops; a pool process that has not stopped
  a few seconds later is killed, and its GPU reservation released here rather than at heartbeat expiry.

The launcher (``reconq worker``) and ``compose.yaml``'s ``stop_grace_period`` allow for the grace period
plus that margin before they kill the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import redis

from reconq.core.constants import WORKER_DRAINING, WORKER_HEARTBEAT, WORKERS_INDEX
from reconq.core.jobs import JobStore
from reconq.core.redisconn import connect
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.scheduler.admission import Admission
from reconq.workers.heartbeat import hand_back_job, live_beats
from reconq.workers.slot import node_name

log = logging.getLogger(__name__)

#: How long a pool process whose run was handed back may take to notice before it is killed.
STOP_AFTER_HAND_BACK_S = 5.0


class GracefulStop:
    """The Celery main process's side of a warm shutdown (see the module docstring). ``send(job_id, queue)``
    sends a job's current attempt to a queue."""

    def __init__(self, settings: Settings, send: Callable[[str, str], None], poll_s: float = 0.2,
                 client: redis.Redis | None = None) -> None:
        self.settings, self.send, self.poll_s = settings, send, poll_s
        self._client = client
        self._thread: threading.Thread | None = None

    def begin(self, **_: object) -> None:
        """Start watching (once); called from Celery's ``worker_shutting_down`` signal, in the main process."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reconq-graceful-stop", daemon=True)
            self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def redis(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.settings)
        return self._client

    def beats(self) -> list[dict]:
        """The heartbeats of this process's pool processes."""
        me, node = os.getpid(), node_name(self.settings)
        return [beat for beat in live_beats(self.redis).values() if beat.get("host") == node and beat.get("ppid") == me]

    def running(self) -> list[tuple[int, dict]]:
        """(pid, heartbeat) of this process's pool processes that run a job now."""
        return [(int(beat["pid"]), beat) for beat in self.beats() if beat.get("job")]

    def _run(self) -> None:
        grace = self.settings.worker_stop_grace_s
        deadline = time.monotonic() + grace
        try:
            self._drain()
            if self.running():
                log.warning("stopping: running recons may end within %g s (RECONQ_WORKER_STOP_GRACE_S), then "
                            "they are handed back to their queues", grace)
        except redis.RedisError as e:
            log.warning("stopping: Redis unavailable (%s); trying again until the grace period ends", e)
        # until the deadline, not until nothing runs: a task still before its recon (inputs, admission) when
        # the signal came starts one later, and Celery's warm shutdown would wait for it however long it takes
        while time.monotonic() < deadline:
            time.sleep(self.poll_s)
        for _ in range(3):
            try:
                self._hand_back(grace)
                return
            except redis.RedisError as e:  # the runs stay; others hand them back once this worker's beats end
                log.error("stopping: could not hand the running recons back (Redis unavailable: %s)", e)
                time.sleep(1.0)

    def _drain(self) -> None:
        """Tell this process's pool processes to dispatch no more jobs to their GPU's queue, which no one
        will consume once this worker is gone (:meth:`reconq.workers.heartbeat.Heartbeat.draining`)."""
        ttl_ms = int((self.settings.worker_stop_grace_s + 120) * 1000)
        names = [beat["worker"] for beat in self.beats()]
        for name in names:
            self.redis.set(WORKER_DRAINING + name, "1", px=ttl_ms)

    def _hand_back(self, grace: float) -> None:
        store = JobStore(self.redis)
        handed: dict[int, tuple[str, dict]] = {}
        for pid, beat in self.running():
            job = store.get(beat["job"])
            if job is None or job.state is not JobState.RUNNING or job.worker != beat["worker"]:
                continue
            why = f"worker {job.worker} stopping, the recon did not end within {grace:g} s " \
                  "(RECONQ_WORKER_STOP_GRACE_S)"
            if hand_back_job(store, job, why, self.send, self.settings.max_attempts, lost=False):
                handed[pid] = (job.id, beat)
        deadline = time.monotonic() + STOP_AFTER_HAND_BACK_S
        while handed and time.monotonic() < deadline:
            still = {pid for pid, beat in self.running() if beat["job"] == handed.get(pid, ("",))[0]}
            for pid in [p for p in handed if p not in still]:
                del handed[pid]
            time.sleep(self.poll_s)
        for pid, (job_id, beat) in handed.items():
            log.warning("job %s: its old run (pid %d) did not stop; killed", job_id, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._forget(beat, job_id)

    def _forget(self, beat: dict, job_id: str) -> None:
        """What a killed pool process leaves: its heartbeat and its GPU reservation for ``job_id``."""
        name = beat["worker"]
        self.redis.delete(WORKER_HEARTBEAT + name)
        self.redis.srem(WORKERS_INDEX, name)
        if beat.get("gpu_id"):
            admission = Admission(self.redis, self.settings.backfill_limit_s, self.settings.gpu_forget_s)
            admission.release(beat["gpu_id"], job_id, name)
            admission.unregister_worker(beat["gpu_id"], name)
