"""GPU inventory: each GPU's memory, utilisation, temperature and processes.

Three kinds, chosen from the settings by :func:`make_inventory`:

- :class:`NvmlInventory` reads the driver through NVML (``nvidia-ml-py``, imported as ``pynvml`` when
  the inventory is first read, never at import time). NVML numbers GPUs in PCI bus order, which is why
  workers set ``CUDA_DEVICE_ORDER=PCI_BUS_ID``: CUDA's device 0 of ``CUDA_VISIBLE_DEVICES=<i>`` is then
  NVML's GPU ``i``.
- :class:`SimulatedInventory` stands in where there is no GPU (tests, benchmarks, laptops): GPUs of the
  sizes given in ``RECONQ_SIMULATED_GPUS``, named ``SIMULATED GPU <i> (<n> GB)`` wherever they show.
- :class:`NoGpuInventory`: neither; it says why.

Recon code never uses this module: only the scheduler and the workers do.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from reconq.core.settings import Settings

log = logging.getLogger(__name__)

GB = 10**9


class InventoryError(RuntimeError):
    """The GPU inventory cannot be read (no NVML, no driver, no such GPU)."""


@dataclass(frozen=True)
class GpuProcess:
    """A process using a GPU, as NVML reports it."""

    pid: int
    used_bytes: int


@dataclass(frozen=True)
class GpuInfo:
    """One GPU at one moment. ``index`` is the PCI-bus-order index (``CUDA_VISIBLE_DEVICES`` value)."""

    index: int
    name: str
    uuid: str
    simulated: bool
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_pct: float | None = None
    temperature_c: float | None = None
    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)

    def capacity_bytes(self, our_pids: set[int]) -> int:
        """Memory that ReconQ's reservations may share: free memory plus what our own jobs already use.

        Reservations count our jobs in full, so their current use is added back; what other programs
        use stays subtracted.
        """
        ours = sum(p.used_bytes for p in self.processes if p.pid in our_pids)
        return max(0, min(self.total_bytes, self.free_bytes + ours))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Inventory(Protocol):
    """What workers and ``reconq gpus`` ask of an inventory."""

    kind: str  # "nvml", "simulated" or "none"

    def gpus(self) -> list[GpuInfo]: ...

    def gpu(self, index: int) -> GpuInfo: ...


class SimulatedInventory:
    """GPUs that exist only in the settings. Nothing is allocated, so all memory always reads free."""

    kind = "simulated"

    def __init__(self, sizes_gb: list[float]) -> None:
        if not sizes_gb:
            raise InventoryError("a simulated inventory needs at least one GPU size")
        self.sizes = [int(round(gb * GB)) for gb in sizes_gb]

    def gpus(self) -> list[GpuInfo]:
        return [self.gpu(i) for i in range(len(self.sizes))]

    def gpu(self, index: int) -> GpuInfo:
        if not 0 <= index < len(self.sizes):
            raise InventoryError(f"no simulated GPU {index}: the simulated inventory has GPUs "
                                 f"0..{len(self.sizes) - 1}")
        total = self.sizes[index]
        return GpuInfo(index=index, name=f"SIMULATED GPU {index} ({total / GB:g} GB)",
                       uuid=f"SIMULATED-{index}", simulated=True, total_bytes=total, used_bytes=0,
                       free_bytes=total)


class NvmlInventory:
    """Real GPUs through NVML. The first read loads ``pynvml`` and initialises NVML (once per process)."""

    kind = "nvml"
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._nvml: Any = None

    def _lib(self) -> Any:
        with self._lock:
            if self._nvml is None:
                try:
                    import pynvml
                except ImportError as e:
                    raise InventoryError("nvidia-ml-py is not installed (pip install 'reconq[gpu]')") from e
                try:
                    pynvml.nvmlInit()
                except pynvml.NVMLError as e:
                    raise InventoryError(f"NVML is not available (no NVIDIA driver?): {e}") from e
                self._nvml = pynvml
            return self._nvml

    def gpus(self) -> list[GpuInfo]:
        nvml = self._lib()
        return [self.gpu(i) for i in range(nvml.nvmlDeviceGetCount())]

    def gpu(self, index: int) -> GpuInfo:
        nvml = self._lib()
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
        except nvml.NVMLError as e:
            raise InventoryError(f"GPU {index}: {e}") from e
        return GpuInfo(
            index=index, name=name.decode() if isinstance(name, bytes) else str(name),
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid), simulated=False,
            total_bytes=int(mem.total), used_bytes=int(mem.used), free_bytes=int(mem.free),
            utilization_pct=_optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu), nvml),
            temperature_c=_optional(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                                    nvml),
            processes=_processes(nvml, handle),
        )


def _optional(read: Any, nvml: Any) -> float | None:
    """A reading some GPUs do not support (utilisation on MIG slices, temperature on some boards)."""
    try:
        return read()  # type: ignore[no-any-return]
    except nvml.NVMLError:
        return None


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return ()
    return tuple(GpuProcess(pid=int(p.pid), used_bytes=int(p.usedGpuMemory or 0)) for p in procs)


class NoGpuInventory:
    """No GPUs here; ``reason`` says why (shown by ``reconq gpus`` and the launcher)."""

    kind = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def gpus(self) -> list[GpuInfo]:
        return []

    def gpu(self, index: int) -> GpuInfo:
        raise InventoryError(f"no GPU {index}: {self.reason}")


def make_inventory(settings: Settings) -> Inventory:
    """The simulated inventory if the settings declare one, else NVML, else none (with the reason)."""
    if settings.simulated_gpus:
        return SimulatedInventory(settings.simulated_gpus)
    nvml = NvmlInventory()
    try:
        nvml.gpus()
    except InventoryError as e:
        return NoGpuInventory(str(e))
    return nvml
