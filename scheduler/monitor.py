"""What the GPUs are doing: their state, the jobs running and reserved on each, the jobs that wait.

Read from the workers' heartbeats and the reservations in Redis; ``reconq gpus`` prints it as a table
and ``GET /api/gpus`` returns it.
"""

from __future__ import annotations

import json
import time

import redis
from pydantic import BaseModel

from reconq.core.constants import (
    CPU_QUEUE,
    GPU_SEEN,
    GPU_STATE,
    JOB_KEY,
    QUEUE_ORDER,
    WORKER_HEARTBEAT,
    WORKERS_INDEX,
)
from reconq.scheduler.admission import PENDING_SUFFIX, Admission
from reconq.scheduler.estimate import GB
from reconq.scheduler.routing import gpu_queue


class ReservationOut(BaseModel):
    job_id: str
    bytes: int
    worker: str
    started: bool  # False: reserved for a job sent to the GPU's queue, not started yet


class WorkerOut(BaseModel):
    name: str
    host: str
    pid: int
    gpu_id: str  # "" for a CPU worker
    job_id: str  # "" when idle
    job_since: float | None
    seen: float
    queues: list[str]


class GpuOut(BaseModel):
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
    workers: list[WorkerOut]
    reservations: list[ReservationOut]


class WaitingJobOut(BaseModel):
    job_id: str
    queue: str
    need_bytes: int
    stage: str


class ClusterOut(BaseModel):
    at: float
    gpus: list[GpuOut]
    cpu_workers: list[WorkerOut]
    waiting: list[WaitingJobOut]
    queues: dict[str, int]  # stat, routine, bulk, cpu: messages not yet taken by a worker


def live_workers(client: redis.Redis) -> list[WorkerOut]:
    """Workers whose heartbeat has not expired (expired ones are dropped from the index)."""
    names = sorted(client.smembers(WORKERS_INDEX))
    raw = client.mget([WORKER_HEARTBEAT + n for n in names]) if names else []
    out = []
    for name, value in zip(names, raw, strict=True):
        if value is None:
            client.srem(WORKERS_INDEX, name)
            continue
        hb = json.loads(value)
        out.append(WorkerOut(name=name, host=hb["host"], pid=int(hb["pid"]), gpu_id=hb["gpu_id"] or "",
                             job_id=hb["job"] or "", job_since=hb["job_since"] or None, seen=hb["seen"],
                             queues=list(hb["queues"])))
    return out


def cluster_status(client: redis.Redis, forget_s: float = 600.0) -> ClusterOut:
    """The current picture; GPUs unseen for ``forget_s`` are left out."""
    admission = Admission(client)
    admission.reclaim()
    now = time.time()
    workers = live_workers(client)
    states = client.hgetall(GPU_STATE)
    seen = {g: float(t) for g, t in client.hgetall(GPU_SEEN).items()}
    gpus = []
    for gpu_id, raw in sorted(states.items()):
        if now - seen.get(gpu_id, 0.0) > forget_s:
            continue
        st = json.loads(raw)
        mine = [w for w in workers if w.gpu_id == gpu_id]
        resv = [ReservationOut(job_id=r.job_id, bytes=r.bytes, worker=r.worker.removesuffix(PENDING_SUFFIX),
                               started=not r.worker.endswith(PENDING_SUFFIX))
                for r in admission.reservations(gpu_id)]
        gpus.append(GpuOut(id=gpu_id, name=st["name"], host=st["host"], index=st["index"], simulated=st["simulated"],
                           total_bytes=st["total_bytes"], used_bytes=st["used_bytes"], free_bytes=st["free_bytes"],
                           reserved_bytes=sum(r.bytes for r in resv), utilization_pct=st["utilization_pct"],
                           temperature_c=st["temperature_c"], seen=seen.get(gpu_id, 0.0), alive=bool(mine),
                           queued=int(client.llen(gpu_queue(gpu_id))), workers=mine, reservations=resv))
    waiting = []
    for job_id, need, _ in admission.waiting():
        queue, stage = client.hmget(JOB_KEY + job_id, ["queue", "stage"])
        waiting.append(WaitingJobOut(job_id=job_id, queue=queue or "", need_bytes=need, stage=stage or ""))
    queues = {q: int(client.llen(q)) for q in [*(q.value for q in QUEUE_ORDER), CPU_QUEUE]}
    return ClusterOut(at=now, gpus=gpus, cpu_workers=[w for w in workers if not w.gpu_id], waiting=waiting,
                      queues=queues)


def _gb(n: int) -> str:
    return f"{n / GB:.1f}"


def format_table(status: ClusterOut) -> str:
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

