"""What the GPUs are doing: their state, the jobs running and reserved on each, the jobs that wait.

Read from the workers' heartbeats and the reservations in Redis, and only read: nothing here writes.
Entries that have gone stale are skipped, not deleted: a worker whose heartbeat key expired, a
reservation whose worker's heartbeat expired or that was made for a job that has finished meanwhile
(admission reclaims those, see :mod:`reconq.scheduler.admission`; the workers' heartbeats prune the
worker index, see :mod:`reconq.workers.heartbeat`). ``reconq gpus`` prints the picture as a table and
``GET /api/gpus`` returns it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from reconq.core.constants import (
    CPU_QUEUE,
    GPU_SEEN,
    GPU_STATE,
    JOB_KEY,
    QUEUE_ORDER,
    WORKER_HEARTBEAT,
    WORKERS_INDEX,
)
from reconq.core.states import FINISHED
from reconq.scheduler.admission import PENDING_SUFFIX, Admission, Reservation
from reconq.scheduler.estimate import GB
from reconq.scheduler.routing import gpu_queue


@dataclass(frozen=True)
class ReservationStatus:
    job_id: str
    bytes: int
    worker: str
    started: bool  # False: reserved for a job sent to the GPU's queue, not started yet


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    host: str
    pid: int
    gpu_id: str  # "" for a CPU worker
    job_id: str  # "" when idle
    job_since: float | None
    seen: float
    queues: tuple[str, ...]


@dataclass(frozen=True)
class GpuStatus:
    id: str
    name: str
    host: str
    index: int
    simulated: bool
    total_bytes: int
    used_bytes: int
    free_bytes: int
    reserved_bytes: int
    utilization_pct: float | None
    temperature_c: float | None
    seen: float
    alive: bool  # a worker of this GPU sent a heartbeat within its TTL
    queued: int  # jobs in the GPU's own queue, memory reserved, not started
    workers: tuple[WorkerStatus, ...]
    reservations: tuple[ReservationStatus, ...]


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    queue: str
    need_bytes: int
    stage: str


@dataclass(frozen=True)
class ClusterStatus:
    at: float
    gpus: tuple[GpuStatus, ...]
    cpu_workers: tuple[WorkerStatus, ...]
    waiting: tuple[WaitingJob, ...]
    queues: dict[str, int]  # stat, routine, bulk, cpu: messages not yet taken by a worker


def live_workers(client: redis.Redis) -> list[WorkerStatus]:
    """Workers whose heartbeat has not expired (names left in the index by dead workers are skipped)."""
    names = sorted(client.smembers(WORKERS_INDEX))
    raw = client.mget([WORKER_HEARTBEAT + n for n in names]) if names else []
    out = []
    for name, value in zip(names, raw, strict=True):
        if value is None:
            continue
        hb = json.loads(value)
        out.append(WorkerStatus(name=name, host=hb["host"], pid=int(hb["pid"]), gpu_id=hb["gpu_id"] or "",
                                job_id=hb["job"] or "", job_since=hb["job_since"] or None, seen=hb["seen"],
                                queues=tuple(hb["queues"])))
    return out


def current_reservations(client: redis.Redis, admission: Admission, gpu_id: str) -> list[ReservationStatus]:
    """The reservations on ``gpu_id`` that still hold: those admission would reclaim (their worker's
    heartbeat expired, or made for a job no worker started that has finished since) are left out."""
    reservations = admission.reservations(gpu_id)
    if not reservations:
        return []
    pipe = client.pipeline(transaction=False)
    for r in reservations:
        pipe.exists(WORKER_HEARTBEAT + r.worker.removesuffix(PENDING_SUFFIX))
        pipe.hget(JOB_KEY + r.job_id, "state")
    replies = pipe.execute()
    return [_status(r) for r, alive, state in zip(reservations, replies[::2], replies[1::2], strict=True)
            if alive and not (r.worker.endswith(PENDING_SUFFIX) and (state is None or state in FINISHED))]


def _status(r: Reservation) -> ReservationStatus:
    return ReservationStatus(job_id=r.job_id, bytes=r.bytes, worker=r.worker.removesuffix(PENDING_SUFFIX),
                             started=not r.worker.endswith(PENDING_SUFFIX))


def _gpu(client: redis.Redis, admission: Admission, gpu_id: str, state: dict[str, Any], seen: float,
         workers: list[WorkerStatus]) -> GpuStatus:
    mine = tuple(w for w in workers if w.gpu_id == gpu_id)
    resv = tuple(current_reservations(client, admission, gpu_id))
    return GpuStatus(id=gpu_id, name=state["name"], host=state["host"], index=state["index"],
                     simulated=state["simulated"], total_bytes=state["total_bytes"], used_bytes=state["used_bytes"],
                     free_bytes=state["free_bytes"], reserved_bytes=sum(r.bytes for r in resv),
                     utilization_pct=state["utilization_pct"], temperature_c=state["temperature_c"], seen=seen,
                     alive=bool(mine), queued=int(client.llen(gpu_queue(gpu_id))), workers=mine, reservations=resv)


def cluster_status(client: redis.Redis, forget_s: float = 600.0) -> ClusterStatus:
    """The current picture; GPUs unseen for ``forget_s`` are left out."""
    admission = Admission(client)
    now = time.time()
    workers = live_workers(client)
    seen = {g: float(t) for g, t in client.hgetall(GPU_SEEN).items()}
    gpus = tuple(_gpu(client, admission, gpu_id, json.loads(raw), seen.get(gpu_id, 0.0), workers)
                 for gpu_id, raw in sorted(client.hgetall(GPU_STATE).items())
                 if now - seen.get(gpu_id, 0.0) <= forget_s)
    waiting = []
    for job_id, need, _ in admission.waiting():
        queue, stage = client.hmget(JOB_KEY + job_id, ["queue", "stage"])
        waiting.append(WaitingJob(job_id=job_id, queue=queue or "", need_bytes=need, stage=stage or ""))
    queues = {q: int(client.llen(q)) for q in [*(q.value for q in QUEUE_ORDER), CPU_QUEUE]}
    return ClusterStatus(at=now, gpus=gpus, cpu_workers=tuple(w for w in workers if not w.gpu_id),
                         waiting=tuple(waiting), queues=queues)


def _gb(n: int) -> str:
    return f"{n / GB:.1f}"


def format_table(status: ClusterStatus) -> str:
    """The picture as text: one line per GPU, then its jobs; CPU workers; the waiting jobs; queues."""
    lines = [f"{'GPU':22} {'name':28} {'total':>6} {'used':>6} {'rsvd':>6} {'util':>5} {'temp':>5}  workers  jobs"]
    for g in status.gpus:
        util = "-" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%"
        temp = "-" if g.temperature_c is None else f"{g.temperature_c:.0f}C"
        busy = sum(1 for w in g.workers if w.job_id)
        lines.append(f"{g.id:22} {g.name[:28]:28} {_gb(g.total_bytes):>6} {_gb(g.used_bytes):>6} "
                     f"{_gb(g.reserved_bytes):>6} {util:>5} {temp:>5}  {busy}/{len(g.workers)}"
                     f"{'' if g.alive else ' (no live worker)':8}  {len(g.reservations)}")
        for r in g.reservations:
            lines.append(f"    {r.job_id:34} {_gb(r.bytes):>6} GB  "
                         + (f"running on {r.worker}" if r.started else "reserved, in the GPU's queue"))
    if not status.gpus:
        lines.append("(no GPU has reported: start GPU workers with `reconq worker --gpus ...`)")
    lines.append(f"CPU workers: {len(status.cpu_workers)} "
                 f"({sum(1 for w in status.cpu_workers if w.job_id)} busy)")
    for w in status.cpu_workers:
        if w.job_id:
            lines.append(f"    {w.job_id:34} running on {w.name}")
    lines.append(f"waiting for GPU memory: {len(status.waiting)}")
    for j in status.waiting:
        lines.append(f"    {j.job_id:34} {j.queue:8} {_gb(j.need_bytes):>6} GB  {j.stage}")
    lines.append("queued: " + ", ".join(f"{q} {n}" for q, n in status.queues.items()))
    return "\n".join(lines)
