"""Benchmark: how long each ReconQ process takes to import what it runs, in fresh interpreters.

A gateway restarted while a scanner waits, or a CLI command, should not pay for the recon's numerical
stack (sigpy, numba, scipy.signal), which only workers need. Times ``python -c "import MODULE"`` over
``--repeat`` fresh processes each (bytecode cached by a first run), median and max:

- ``reconq.gateway.server`` (the MRD gateway), ``reconq.api.app`` (the HTTP API), ``reconq.services``
  (the composition root), ``reconq.workers.tasks`` (a worker, which loads the stack before its pool
  forks), ``reconq.recon.runs`` (the built-in reconstructions themselves), and ``reconq.cli``.

    python bench/startup.py --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

MODULES = ("reconq.cli", "reconq.gateway.server", "reconq.api.app", "reconq.services", "reconq.workers.tasks",
           "reconq.recon.runs")


def import_seconds(module: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    base = [import_seconds("sys") for _ in range(args.repeat)]
    print(f"bare interpreter: median {statistics.median(base):.2f} s")
    for module in MODULES:
        import_seconds(module)  # compile and cache bytecode first
        runs = [import_seconds(module) for _ in range(args.repeat)]
        print(f"  import {module:24} median {statistics.median(runs):5.2f} s   max {max(runs):5.2f} s")


if __name__ == "__main__":
    main()
