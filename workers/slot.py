"""What one worker process is bound to: one GPU (real or simulated) or the CPU, and its queues."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from reconq.core.settings import Settings
from reconq.scheduler.inventory import Inventory, InventoryError
from reconq.scheduler.routing import cpu_worker_queues, gpu_worker_queues


@dataclass(frozen=True)
class Slot:
    """A worker's binding. ``gpu_index`` is the PCI-bus-order index (or the simulated GPU's index)."""

    gpu_index: int | None
    gpu_id: str  # "<node>:gpu<i>" or "<node>:sim<i>"; "" on the CPU
    simulated: bool
    queues: tuple[str, ...]

    @property
    def is_gpu(self) -> bool:
        return self.gpu_index is not None

    @property
    def label(self) -> str:
        return self.gpu_id or "cpu"


def node_name(settings: Settings) -> str:
    return settings.node_name or socket.gethostname()


def worker_name(settings: Settings) -> str:
    """This process's name in heartbeats and reservations: ``<node>:<pid>``."""
    return f"{node_name(settings)}:{os.getpid()}"


def gpu_slot(settings: Settings, inventory: Inventory, index: int) -> Slot:
    """A slot on GPU ``index`` of ``inventory``; raises InventoryError if there is no such GPU."""
    info = inventory.gpu(index)
    gpu_id = f"{node_name(settings)}:{'sim' if info.simulated else 'gpu'}{index}"
    return Slot(index, gpu_id, info.simulated, tuple(gpu_worker_queues(gpu_id)))


def cpu_slot(inventory: Inventory) -> Slot:
    try:
        has_gpus = bool(inventory.gpus())
    except InventoryError:
        has_gpus = False
    return Slot(None, "", False, tuple(cpu_worker_queues(has_gpus)))


def parse_bind(text: str) -> int | None:
    """``gpu:<i>`` -> i, ``cpu`` -> None (the hidden ``reconq worker --bind`` option of launched slots)."""
    if text == "cpu":
        return None
    kind, _, index = text.partition(":")
    if kind != "gpu" or not index.isdigit():
        raise ValueError(f"--bind {text!r}: expected gpu:<index> or cpu")
    return int(index)
