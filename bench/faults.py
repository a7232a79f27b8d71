"""Faults injected for real while jobs run, and how the system comes through: the fault table of
``bench/RESULTS.md``.

    python bench/faults.py [--repeat N] [--only NAME ...]

Each scenario of :mod:`reconq.faultkit` runs on a redis-server of its own and real worker processes:

- ``kills``: SIGKILL to a worker's whole process group mid-job, 3 times over 10 jobs on 2 workers;
- ``sigterm``: SIGTERM to a worker mid-job, grace period 2 s, another worker idle;
- ``redis-kill`` / ``redis-stop``: Redis SIGKILLed / shut down cleanly while 2 jobs run on 2 simulated
  GPUs and 5 wait, back 4 s later (AOF);
- ``network``: the worker's connection to Redis paused 20 s mid-recon (a proxy).

It prints one row per run: jobs, how many ended ``done``, whether each was done exactly once (one run
reached its end), the recovery time(s) (see each scenario for what it measures), and the GPU reservations
left behind.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tools import machine  # noqa: E402
from reconq import faultkit  # noqa: E402
from reconq.core.redisconn import PrivateRedis  # noqa: E402

SCENARIOS: dict[str, tuple[str, Callable[[PrivateRedis, Path], faultkit.FaultRun]]] = {
    "kills": ("kill to hand-back by a live worker", lambda r, d: faultkit.worker_kills(r, d, jobs=10, kills=3)),
    "sigterm": ("SIGTERM to hand-back (2 s grace included)", lambda r, d: faultkit.graceful_stop(r, d, grace_s=2.0)),
    "redis-kill": ("Redis back to the first job write", lambda r, d: faultkit.redis_outage(r, d, "kill")),
    "redis-stop": ("Redis back to the first job write", lambda r, d: faultkit.redis_outage(r, d, "stop")),
    "network": ("network back to the recon going on", lambda r, d: faultkit.network_outage(r, d, pause_s=20.0)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="these scenarios only")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print("| fault | jobs | done | done exactly once | recovery (s) | reservations left | recovery measures |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = 0
    for name in args.only or list(SCENARIOS):
        what, scenario = SCENARIOS[name]
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix=f"reconq-fault-{name}-") as tmp:
                server = PrivateRedis(Path(tmp) / "redis")
                server.start()
                t0 = time.monotonic()
                try:
                    run = scenario(server, Path(tmp))
                finally:
                    server.stop()
                print(f"{run.row()} {what}; scenario {time.monotonic() - t0:.0f} s |", flush=True)
                failed += not run.done_once or bool(run.reservations_left)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
