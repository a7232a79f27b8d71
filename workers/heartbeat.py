"""Worker heartbeats, and the idle worker's look for waiting jobs that now fit its GPU.

Every ``heartbeat_interval_s`` a worker writes ``reconq:hb:<worker>`` (JSON: its GPU, running job;
expires after ``heartbeat_ttl_s``) and, on a GPU, the GPU's state and capacity. A worker whose key has
expired is dead: its reservations are reclaimed (see :mod:`reconq.scheduler.admission`), and each live
worker's periodic heartbeat prunes what dead ones left: their names in the worker index and their
reservations (readers such as :mod:`reconq.scheduler.monitor` only skip them). A GPU worker also
registers itself as one of its GPU's worker slots. Jobs are dispatched to a GPU when one ends or is
admitted there; as a safety net, every ``dispatch_poll_s`` an idle GPU worker fills its GPU with waiting
jobs that fit now (:meth:`Admission.fill`) and sends them to the GPU's queue, which it consumes first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from reconq.core.constants import GPU_RESERVATION_OWNERS, WORKER_DRAINING, WORKER_HEARTBEAT, WORKERS_INDEX
from reconq.core.jobs import Job, JobStore
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.scheduler.admission import PENDING_SUFFIX, Admission
from reconq.scheduler.inventory import Inventory, InventoryError
from reconq.scheduler.routing import gpu_queue
from reconq.workers.slot import Slot, node_name

log = logging.getLogger(__name__)


class Heartbeat:
    """Heartbeats and idle dispatch in a daemon thread of one worker process."""

    def __init__(self, settings: Settings, client: redis.Redis, admission: Admission, slot: Slot,
                 inventory: Inventory, name: str, send: Callable[[str, str], None]) -> None:
        self.settings, self.redis, self.admission = settings, client, admission
        self.slot, self.inventory, self.name, self.send = slot, inventory, name, send
        self.job_id, self.job_since = "", 0.0
        self._pending_until = 0.0
        self._lost = False  # a beat failed since the last one that worked
        self._back_since: float | None = None  # monotonic time of the first beat after one failed
        self._orphans: dict[tuple[str, int], float] = {}  # (job, run) -> when first seen run by no live worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconq-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()  # before any admission: reservations of a worker with no heartbeat are reclaimed
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.redis.delete(WORKER_HEARTBEAT + self.name)
            self.redis.srem(WORKERS_INDEX, self.name)
            if self.slot.is_gpu:
                self.admission.unregister_worker(self.slot.gpu_id, self.name)
        except redis.RedisError:
            pass

    def job_started(self, job_id: str) -> None:
        self.job_id, self.job_since = job_id, time.time()
        self._safe_beat()

    def job_ended(self) -> None:
        self.job_id, self.job_since = "", 0.0
        self._safe_beat()

    def expect_job(self) -> None:
        """A job was just dispatched to this GPU's queue: wait a while before dispatching another."""
        self._pending_until = time.monotonic() + 5 * self.settings.dispatch_poll_s

    def beat(self) -> None:
        now = time.time()
        record = {"worker": self.name, "host": node_name(self.settings), "pid": os.getpid(),
                  "gpu_id": self.slot.gpu_id, "gpu_index": self.slot.gpu_index, "simulated": self.slot.simulated,
                  "ppid": os.getppid(), "queues": list(self.slot.queues), "job": self.job_id,
                  "job_since": self.job_since, "seen": now}
        pipe = self.redis.pipeline()
        pipe.set(WORKER_HEARTBEAT + self.name, json.dumps(record), px=int(self.settings.heartbeat_ttl_s * 1000))
        pipe.sadd(WORKERS_INDEX, self.name)
        try:
            pipe.execute()
        except redis.RedisError:
            self._lost, self._back_since = True, None
            raise
        if self._lost:
            self._lost, self._back_since = False, time.monotonic()
        if self.slot.is_gpu:
            self.admission.register_worker(self.slot.gpu_id, self.name)
            self._report_gpu()

    def prune(self) -> None:
        """Remove what dead workers left behind: their names in the worker index (their heartbeat key
        expired), their GPU memory reservations and pending reservations of jobs that finished before a worker
        started them (:meth:`Admission.reclaim`). A worker late enough for its
        key to expire just as it beats again is back in the index at its next beat.

        Nothing is judged within a heartbeat's lifetime and a beat of a Redis outage (:meth:`settled`).
        """
        if not self.settled():
            return
        names = sorted(self.redis.smembers(WORKERS_INDEX))
        beats = self.redis.mget([WORKER_HEARTBEAT + n for n in names]) if names else []
        dead = [n for n, beat in zip(names, beats, strict=True) if beat is None]
        if dead:
            self.redis.srem(WORKERS_INDEX, *dead)
            log.info("worker %s: dropped expired workers from the index: %s", self.name, ", ".join(dead))
        self.hand_back(set(dead))
        if reclaimed := self.admission.reclaim():
            log.info("worker %s: reclaimed %d GPU memory reservations (worker gone or job finished)", self.name,
                     reclaimed)

    def settled(self) -> bool:
        """Whether heartbeats can be trusted to tell live workers from dead ones: not within a heartbeat's
        lifetime and a beat of Redis's start (a restart loses the keys whose time ran out meanwhile), nor of
        this worker getting Redis back after losing it (the others were cut off too, most likely, and their
        keys expired). The live workers need a beat to say so again; judging at once would hand back, and
        so run twice, the jobs they are running."""
        settle = self.settings.heartbeat_ttl_s + self.settings.heartbeat_interval_s
        if self._lost or (self._back_since is not None and time.monotonic() - self._back_since < settle):
            return False
        try:
            uptime = float(self.redis.info("server").get("uptime_in_seconds", settle))
        except redis.ResponseError:  # INFO not allowed to this client: judge by this worker's own view
            return True
        return uptime >= settle

    def hand_back(self, dead: set[str]) -> None:
        """Send the jobs ``running`` on workers that are gone back to their queues at once (not at the
        broker's visibility timeout), each lost run counted: at ``RECONQ_MAX_ATTEMPTS`` the job fails instead.

        Gone: named in ``dead`` (just dropped from the index), or with no heartbeat at all (its name lost
        with Redis's data, say). Also handed back: a job ``running`` on a live worker whose heartbeats since
        the run began name another job or none (the run's message was lost, say in a Redis restart, so no
        worker will ever finish it). The change is fenced by the run's number, so a worker that comes back
        cannot record an outcome over the newer run."""
        store = JobStore(self.redis)
        running = [j for j in store.get_many(store.running_ids()) if j.state is JobState.RUNNING]
        if not running:
            self._orphans.clear()
            return
        names = sorted({job.worker for job in running if job.worker})
        beats = dict(zip(names, self.redis.mget([WORKER_HEARTBEAT + n for n in names]), strict=True)) if names else {}
        now, ttl = time.time(), self.settings.heartbeat_ttl_s
        for job in running:
            beat = json.loads(beats[job.worker]) if beats.get(job.worker) else None
            if job.worker in dead or (beat is None and (job.started_at or 0.0) < now - ttl):
                why, lost = f"worker {job.worker or '(none)'} stopped (no heartbeat for {ttl:g} s)", True
            elif beat is not None and beat.get("job") != job.id and float(beat.get("seen", 0)) > \
                    (job.started_at or now) + 2 * self.settings.heartbeat_interval_s + 1.0:
                # seen so twice, a few beats apart: not a run between its end and its outcome's write
                first = self._orphans.setdefault((job.id, job.attempts), time.monotonic())
                if time.monotonic() - first < 2 * self.settings.heartbeat_interval_s:
                    continue
                # not the job's doing: not counted against RECONQ_MAX_ATTEMPTS
                why, lost = f"worker {job.worker} is alive but no longer runs it (its run was lost)", False
            else:
                continue
            hand_back_job(store, job, why, self.send, self.settings.max_attempts, lost=lost)
        current = {(job.id, job.attempts) for job in running}
        self._orphans = {k: v for k, v in self._orphans.items() if k in current}

    def _report_gpu(self) -> None:
        assert self.slot.gpu_index is not None
        try:
            info = self.inventory.gpu(self.slot.gpu_index)
        except InventoryError as e:
            log.warning("worker %s: cannot read %s: %s", self.name, self.slot.gpu_id, e)
            return
        owners = self.redis.hvals(GPU_RESERVATION_OWNERS + self.slot.gpu_id)
        our_pids = {int(o.removesuffix(PENDING_SUFFIX).rsplit(":", 1)[1]) for o in owners
                    if o.removesuffix(PENDING_SUFFIX).rsplit(":", 1)[-1].isdigit()}
        state = {**info.to_json(), "gpu_id": self.slot.gpu_id, "host": node_name(self.settings), "seen": time.time()}
        self.admission.register_gpu(self.slot.gpu_id, info.total_bytes, info.capacity_bytes(our_pids),
                                    json.dumps(state))

    def _safe_beat(self) -> None:
        try:
            self.beat()
        except redis.RedisError as e:
            log.warning("worker %s: heartbeat failed: %s", self.name, e)

    def draining(self) -> bool:
        """Whether this worker is stopping (SIGTERM to its main process, :mod:`reconq.workers.shutdown`): it
        then dispatches no more jobs to its GPU's queue, which no one would consume once it is gone."""
        try:
            return bool(self.redis.exists(WORKER_DRAINING + self.name))
        except redis.RedisError:
            return False

    def _idle_dispatch(self) -> None:
        if not self.slot.is_gpu or self.job_id or time.monotonic() < self._pending_until or self.draining():
            return
        jobs = self.admission.fill(self.slot.gpu_id, self.name)
        if jobs:
            self.expect_job()
        for job in jobs:
            log.info("job %s: memory reserved on %s (idle worker %s); sent to its queue", job, self.slot.gpu_id,
                     self.name)
            self.send(job, gpu_queue(self.slot.gpu_id))

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.settings.heartbeat_interval_s
        while not self._stop.wait(self.settings.dispatch_poll_s):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.settings.heartbeat_interval_s
                    self.beat()
                    self.prune()
                if self.settings.admission_control:
                    self._idle_dispatch()
            except redis.RedisError as e:
                log.warning("worker %s: heartbeat/dispatch failed: %s", self.name, e)
            except Exception:  # the thread must live as long as the worker
                log.exception("worker %s: heartbeat/dispatch error", self.name)


def hand_back_job(store: JobStore, job: Job, why: str, send: Callable[[str, str], None], max_attempts: int,
                  lost: bool = True) -> bool:
    """Send a ``running`` job back to its queue, saying ``why`` in its log; fenced by the run's number, so
    only the run read in ``job`` is ended. ``lost``: the run counts against ``max_attempts`` (a worker that
    died under it; a graceful stop does not count), and at the limit the job fails instead. Returns
    whether this call changed the job."""
    count = job.lost_runs + 1 if lost else job.lost_runs
    if lost and count >= max_attempts:
        return store.set_state(job.id, JobState.FAILED, fence=job.attempts, lost_runs=count, stage="failed",
                               error=f"the recon ended its worker {count} times (last: {why}; "
                                     f"RECONQ_MAX_ATTEMPTS={max_attempts}): not run again")
    if not store.set_state(job.id, JobState.QUEUED, fence=job.attempts, lost_runs=count, progress=0.0,
                           stage=f"handed back: {why}"):
        return False
    store.log(job.id, f"handed back to queue {job.queue}: {why}" + (f" ({count} of {max_attempts})" if lost else ""))
    log.warning("job %s: %s; handed back to %s", job.id, why, job.queue)
    send(job.id, job.queue)
    return True


def live_beats(client: redis.Redis) -> dict[str, dict]:
    """The heartbeat records of the workers in the worker index whose heartbeat has not expired, by name."""
    names = sorted(client.smembers(WORKERS_INDEX))
    raws = client.mget([WORKER_HEARTBEAT + n for n in names]) if names else []
    return {n: json.loads(raw) for n, raw in zip(names, raws, strict=True) if raw is not None}
