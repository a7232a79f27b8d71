"""What the benchmarks share: the machine the figures belong to, and BART's files and command.

Benchmarks run as scripts (``python bench/NAME.py``) with the repository first on ``sys.path``, so they
import this as ``bench.tools``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    """CPU model, threads, memory and load: the machine the figures belong to."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")) / 2**20
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except (OSError, StopIteration):
        mem, load = float("nan"), "unknown"
    return (f"{model}, {len(os.sched_getaffinity(0))} CPU threads, {mem:.0f} GiB RAM, load average {load}; "
            f"Python {platform.python_version()}, numpy {np.__version__}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def write_cfl(path: Path, array: np.ndarray) -> None:
    """BART's .cfl/.hdr: dims in Fortran order, i.e. our C-order shape reversed."""
    path.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(n) for n in array.shape[::-1]) + "\n")
    np.ascontiguousarray(array, dtype=np.complex64).tofile(path.with_suffix(".cfl"))


def read_cfl(path: Path) -> np.ndarray:
    dims = [int(n) for n in path.with_suffix(".hdr").read_text().splitlines()[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return np.fromfile(path.with_suffix(".cfl"), dtype=np.complex64).reshape(dims[::-1])


def bart(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["bart", *args], check=True, capture_output=True)
    return time.perf_counter() - t0
