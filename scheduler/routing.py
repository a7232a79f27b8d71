"""Queue names and routing: which queues a worker consumes, in which order, and a job's rank.

Priority queues, served in this order by every worker that consumes them:

1. ``gpu.<gpu_id>`` (GPU workers only): jobs already granted memory on that GPU;
2. ``stat``: a patient is waiting;
3. ``routine``: scans from the scanner;
4. ``bulk``: retro-recon and batch work.

A GPU worker takes a job from these in that order. Jobs waiting for GPU memory are kept in the same
order (rank of their queue, then the time they were queued), so a ``stat`` job overtakes waiting
``routine`` and ``bulk`` jobs. ``cpu`` holds jobs too large for every GPU; CPU workers consume it
first, and consume the priority queues too only where the machine has no GPU inventory (a laptop or
CI runs everything on the CPU).
"""

from __future__ import annotations

from reconq.core.constants import CPU_QUEUE, GPU_QUEUE_PREFIX, QUEUE_ORDER

#: Score gap between queue ranks in the waiting set (above any epoch time in seconds).
RANK_SPAN = 1e11


def gpu_queue(gpu_id: str) -> str:
    """The queue of jobs granted memory on ``gpu_id``."""
    return GPU_QUEUE_PREFIX + gpu_id


def queue_rank(queue: str) -> int:
    """0 for ``stat``, 1 for ``routine``, 2 for ``bulk``; an unknown queue ranks as ``routine``."""
    names = [q.value for q in QUEUE_ORDER]
    return names.index(queue) if queue in names else 1


def waiting_score(queue: str, queued_at: float) -> float:
    """Order of a job among jobs waiting for GPU memory: queue rank, then time queued."""
    return queue_rank(queue) * RANK_SPAN + queued_at


def gpu_worker_queues(gpu_id: str) -> list[str]:
    return [gpu_queue(gpu_id), *(q.value for q in QUEUE_ORDER)]


def cpu_worker_queues(machine_has_gpus: bool) -> list[str]:
    return [CPU_QUEUE] if machine_has_gpus else [CPU_QUEUE, *(q.value for q in QUEUE_ORDER)]
