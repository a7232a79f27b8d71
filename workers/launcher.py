"""``reconq worker``: Celery worker processes, each bound to one GPU or to the CPU.

``reconq worker --gpus 0,1 --per-gpu 2 --cpu 1`` starts five processes: two bound to GPU 0, two to
GPU 1 (``CUDA_VISIBLE_DEVICES=<i>``, ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so CUDA's device 0 is NVML's GPU
``i``) and one CPU worker (``CUDA_VISIBLE_DEVICES`` empty). The count per GPU may also differ
(``12,12,4,4``: one count per GPU named) or follow each GPU's memory (``auto``: one process per
``slot_gb`` GB, at least 1, at most ``max_workers_per_gpu``), so that a large GPU runs out of memory
before it runs out of worker processes; the setting ``workers_per_gpu`` (``RECONQ_WORKERS_PER_GPU``),
when set, takes the place of ``--per-gpu``. With a simulated inventory, ``--gpus`` names simulated GPUs,
and their processes see no real GPU either. Each process is a Celery worker with one pool process,
``acks_late``, ``reject_on_worker_lost`` and prefetch 1 (see :mod:`reconq.core.celeryapp`). The launcher restarts
a process that dies, and on SIGTERM or Ctrl-C stops them all: a warm shutdown (running jobs finish) for
``stop_timeout`` seconds, then a cold one, then SIGKILL. Every worker process (and the launcher) first
checks that its data dir is the recorded data root (:mod:`reconq.core.dataroot`), and refuses to start
otherwise, saying why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from reconq.core.celeryapp import make_celery
from reconq.core.dataroot import FIRST_START_WAIT_S, check_data_root
from reconq.core.redisconn import connect
from reconq.core.settings import Settings
from reconq.scheduler.inventory import GB, Inventory, InventoryError, make_inventory
from reconq.workers.slot import cpu_slot, gpu_slot
from reconq.workers.tasks import register_tasks

log = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0


class LaunchError(ValueError):
    """The requested workers cannot be started (no such GPU, nothing to start)."""


def worker_argv(concurrency: int, loglevel: str, name: str, queues: tuple[str, ...]) -> list[str]:
    return [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--queues=" + ",".join(queues),
        "--hostname=" + name,
        "--without-gossip",
        "--without-mingle",
        "--prefetch-multiplier=1",
    ]


def check_worker_root(settings: Settings) -> str:
    """Refuse (:class:`~reconq.core.dataroot.DataRootError`) to run a worker on a data dir that is not the
    recorded data root: on a node without the shared storage every job would fail at once on its raw file.
    Waits for a gateway to record the root's id, and for Redis, up to ``FIRST_START_WAIT_S``."""
    client = connect(settings)
    try:
        return check_data_root(settings, client, create=False, role="worker", wait_s=FIRST_START_WAIT_S,
                               redis_wait_s=FIRST_START_WAIT_S)
    finally:
        client.close()


def run_worker(settings: Settings, concurrency: int = 1, loglevel: str = "INFO", name: str | None = None,
               gpu_index: int | None = None) -> None:
    """Run one Celery worker in this process, bound to GPU ``gpu_index`` (None: the CPU), until stopped.
    Checks the data root first, before the pool forks or a task is taken."""
    check_worker_root(settings)
    inventory = make_inventory(settings)
    slot = cpu_slot(inventory) if gpu_index is None else gpu_slot(settings, inventory, gpu_index)
    app = make_celery(settings, queues=slot.queues)
    register_tasks(app, settings, gpu_index)
    name = name or f"{'gpu' if slot.is_gpu else 'cpu'}{'' if gpu_index is None else gpu_index}-{os.getpid()}@%h"
    log.info("worker %s on %s: %d process(es), queues %s", name, slot.label, concurrency, ",".join(slot.queues))
    app.worker_main(worker_argv(concurrency, loglevel, name, slot.queues))


@dataclass
class Child:
    label: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    died_at: float = field(default=0.0)


PerGpu = int | str | Sequence[int]


def per_gpu_counts(settings: Settings, inventory: Inventory, gpus: list[int], per_gpu: PerGpu) -> list[int]:
    """Worker processes for each GPU of ``gpus``: ``per_gpu`` is a count for all, one count per GPU (a
    sequence, or text such as ``"12,12,4,4"``), or ``"auto"`` (one per ``slot_gb`` of the GPU's memory,
    at least 1, at most ``max_workers_per_gpu``). Raises LaunchError for anything else."""
    text = per_gpu.strip().lower() if isinstance(per_gpu, str) else None
    if text == "auto":
        counts = []
        for index in gpus:
            try:
                total_gb = inventory.gpu(index).total_bytes / GB
            except InventoryError as e:
                raise LaunchError(str(e)) from e
            counts.append(max(1, min(settings.max_workers_per_gpu, int(total_gb // settings.slot_gb))))
        return counts
    if isinstance(per_gpu, int):
        counts = [per_gpu] * len(gpus)
    else:
        try:
            counts = [int(x) for x in (text.split(",") if text is not None else per_gpu)]
        except ValueError as e:
            raise LaunchError(f"--per-gpu {per_gpu!r}: expected N, N,N,... (one per GPU) or auto") from e
        if len(counts) == 1:
            counts *= len(gpus)
    if len(counts) != len(gpus):
        raise LaunchError(f"--per-gpu {per_gpu!r}: {len(counts)} counts for {len(gpus)} GPUs")
    if any(c < 0 for c in counts):
        raise LaunchError(f"--per-gpu {per_gpu!r}: a count is negative")
    return counts


def plan(settings: Settings, inventory: Inventory, gpus: list[int], per_gpu: PerGpu, cpu: int) -> list[Child]:
    """The processes to start; raises LaunchError naming a GPU the inventory does not have, or for a
    ``per_gpu`` that :func:`per_gpu_counts` refuses."""
    base = [sys.executable, "-m", "reconq.cli", "worker"]
    env = dict(os.environ)
    children = []
    counts = per_gpu_counts(settings, inventory, gpus, per_gpu)
    for index, count in zip(gpus, counts, strict=True):
        try:
            slot = gpu_slot(settings, inventory, index)
        except InventoryError as e:
            raise LaunchError(str(e)) from e
        visible = "" if slot.simulated else str(index)  # a simulated GPU's process sees no real one
        gpu_env = {**env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": visible}
        for k in range(count):
            children.append(Child(f"{slot.gpu_id}#{k}", [*base, "--bind", f"gpu:{index}", "--name",
                                                         f"gpu{index}-{k}@%h"], gpu_env))
    for k in range(cpu):
        children.append(Child(f"cpu#{k}", [*base, "--bind", "cpu", "--name", f"cpu-{k}@%h"],
                              {**env, "CUDA_VISIBLE_DEVICES": ""}))
    if not children:
        raise LaunchError("nothing to start: give --gpus and/or --cpu")
    return children


class Launcher:
    """Starts the planned worker processes, restarts those that die, stops them all on request."""

    def __init__(self, children: list[Child], stop_timeout: float = 30.0) -> None:
        self.children = children
        self.stop_timeout = stop_timeout
        self._stopping = False

    def _start(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, env=child.env, stdin=subprocess.DEVNULL)
        log.info("worker %s started (pid %d)", child.label, child.proc.pid)

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        for child in self.children:
            self._start(child)
        try:
            while not self._stopping:
                self._watch()
                time.sleep(0.2)
        finally:
            self.stop()
        return 0

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            if not child.died_at:
                child.died_at = now
                log.error("worker %s (pid %d) exited with code %s; restarting it", child.label, child.proc.pid,
                          child.proc.returncode)
            elif now - child.died_at >= RESTART_DELAY_S:
                child.restarts += 1
                child.died_at = 0.0
                self._start(child)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then cold (SIGQUIT), then SIGKILL for what is still running."""
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for sig, wait_s in ((signal.SIGTERM, self.stop_timeout), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            for proc in running:
                if proc.poll() is None:
                    proc.send_signal(sig)
            deadline = time.monotonic() + wait_s
            for proc in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            running = [p for p in running if p.poll() is None]
            if not running:
                break
            log.warning("%d worker(s) still running after %s; sending %s", len(running), sig.name,
                        "SIGQUIT" if sig is signal.SIGTERM else "SIGKILL")
        log.info("all workers stopped")


def launch(settings: Settings, gpus: list[int] | None, per_gpu: PerGpu, cpu: int,
           stop_timeout: float | None = None) -> int:
    """Start ``per_gpu`` processes for each GPU of ``gpus`` (None: every GPU; see :func:`per_gpu_counts`;
    the setting ``workers_per_gpu`` instead when set) and ``cpu`` CPU workers. On a stop the processes get
    ``stop_timeout`` seconds (default: the recons' grace period ``worker_stop_grace_s`` plus 15 s to hand
    back what is still running) before a cold shutdown."""
    if stop_timeout is None:
        stop_timeout = settings.worker_stop_grace_s + 15.0
    check_worker_root(settings)  # here too: a node without the shared storage refuses once, no restart loop
    inventory = make_inventory(settings)
    if gpus is None:
        gpus = [g.index for g in inventory.gpus()]
    children = plan(settings, inventory, gpus, settings.workers_per_gpu or per_gpu, cpu)
    log.info("starting %d worker process(es) on %s inventory: %s", len(children), inventory.kind,
             ", ".join(c.label for c in children))
    return Launcher(children, stop_timeout).run()
