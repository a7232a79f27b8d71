"""GPU scheduling benchmark: 200 jobs of 1-40 GB on 4 simulated GPUs (2 x 80 GB, 2 x 24 GB).

Every job goes through the real Redis queues to real worker processes (``reconq worker --gpus 0,1,2,3``
with ``RECONQ_WORKERS_PER_GPU`` from ``--per-gpu``: ``auto``, one count per GPU, or one for all) whose
recon is the ``sleep`` test pipeline: a timed sleep with a declared memory need,
which books that memory per GPU and counts an over-commit whenever a GPU's booked total passes its size.

Policies, side by side:
- ``reconq``: ReconQ's scheduler: placement at submit (the jobs queued at once go in as one batch, as a
  retro-recon of many scans does), reservations, the waiting set filled by memory x expected run time,
  holds with EASY backfilling. Each job's expected run time is its true one off by a random factor
  (log-normal, ``--estimate-error``, default sigma 0.25); ``--no-estimates`` gives none;
- ``round-robin``: job i goes to GPU i mod 4 at submit time, no memory check;
- ``most-free``: each job goes to the GPU with the most free memory at submit time (its size less the
  jobs sent to it that have not finished), no memory check.

Figures: over-commits (target 0); makespan against a lower bound (the largest of: memory x time over
all GPUs' memory; memory x time of jobs over 24 GB over the two 80 GB GPUs; total time over worker
slots; the latest arrival plus duration), target at most 1.15 x; queue wait of ``stat`` jobs (median,
p95). Most jobs are queued at once (routine and bulk); the stat jobs arrive one by one during the run.

    .venv/bin/python bench/schedule.py                  # about 4 minutes on 2 cores
    .venv/bin/python bench/schedule.py --per-gpu 8      # the same count on every GPU
    .venv/bin/python bench/schedule.py --policies reconq --seed 2 --no-estimates
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reconq.core.celeryapp import make_celery  # noqa: E402
from reconq.core.jobs import Job, JobStore  # noqa: E402
from reconq.core.redisconn import PrivateRedis  # noqa: E402
from reconq.core.sender import TaskSender  # noqa: E402
from reconq.core.settings import Settings, load_settings  # noqa: E402
from reconq.core.states import JobState  # noqa: E402
from reconq.core.storage import ScanStore  # noqa: E402
from reconq.recon.simulate import synthetic_scan, write_mrd  # noqa: E402
from reconq.scheduler.inventory import make_inventory  # noqa: E402
from reconq.scheduler.monitor import live_workers  # noqa: E402
from reconq.scheduler.placement import Placement  # noqa: E402
from reconq.scheduler.routing import gpu_queue  # noqa: E402
from reconq.scheduler.submit import enqueue_many  # noqa: E402
from reconq.stack import settings_env  # noqa: E402
from reconq.workers.launcher import per_gpu_counts  # noqa: E402
from reconq.workers.testpipelines import OVERCOMMITS, register_test_pipelines  # noqa: E402

GPUS_GB = [80.0, 80.0, 24.0, 24.0]
NODE = "bench"
SCAN = "bench-scan"


@dataclass
class Spec:
    id: str
    gb: float
    seconds: float
    queue: str
    arrival: float  # seconds after the start
    expected: float  # the run time the scheduler is told: `seconds` off by a random factor


def make_jobs(n: int, seed: int, scale: float, error: float = 0.25) -> list[Spec]:
    rng = random.Random(seed)
    noise = random.Random(seed + 1)  # the estimate errors, drawn apart so the jobs stay the same
    specs = []
    for i in range(n):
        u = rng.random()
        gb = rng.uniform(1, 8) if u < 0.55 else rng.uniform(8, 24) if u < 0.85 else rng.uniform(24, 40)
        seconds = scale * rng.uniform(0.5, 3.0) * (1 + gb / 40)
        queue = "stat" if i % 10 == 5 else ("routine" if rng.random() < 0.6 else "bulk")
        expected = seconds * noise.lognormvariate(0.0, error)
        specs.append(Spec(f"b{i:03d}", round(gb, 2), round(seconds, 3), queue, 0.0, round(expected, 3)))
    stat = [s for s in specs if s.queue == "stat"]
    horizon = 0.6 * lower_bound(specs, slots=1 << 30)
    for k, s in enumerate(stat):
        s.arrival = horizon * (k + 1) / (len(stat) + 1)
    return specs


def lower_bound(specs: list[Spec], slots: int) -> float:
    mem_time = sum(s.gb * s.seconds for s in specs)
    big = sum(s.gb * s.seconds for s in specs if s.gb > min(GPUS_GB))
    return max(mem_time / sum(GPUS_GB), big / sum(g for g in GPUS_GB if g > min(GPUS_GB)),
               sum(s.seconds for s in specs) / slots, max(s.arrival + s.seconds for s in specs))


def start_workers(settings: Settings, slots: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(settings_env(settings))  # RECONQ_WORKERS_PER_GPU: the processes per GPU
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "reconq.cli", "worker", "--gpus", "0,1,2,3"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    deadline = time.monotonic() + 300
    while len(live_workers(client)) < slots or log.read_bytes().count(b" ready.") < slots:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"workers did not start; see {log}")
        time.sleep(0.5)
    return proc


def run_policy(policy: str, specs: list[Spec], base: Settings, slots: int, workdir: Path,
               dump: Path | None = None, estimates: bool = True) -> dict[str, float]:
    settings = base.model_copy(update={"admission_control": policy == "reconq"})
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    client.flushdb()
    log = workdir / f"workers-{policy}.log"
    proc = start_workers(settings, slots, log)
    try:
        store, sender = JobStore(client), TaskSender(make_celery(settings))
        placement = Placement(settings, store, ScanStore(settings.data_dir), sender)
        gpu_ids = [f"{NODE}:sim{i}" for i in range(len(GPUS_GB))]
        assigned: dict[str, str] = {}

        def send_baseline(policy: str, s: Spec, job: Job, k: int) -> None:
            """Round-robin, or the GPU with the most memory free at submit; no memory check."""
            if policy == "round-robin":
                gpu = gpu_ids[k % len(gpu_ids)]
            else:
                free = {g: GPUS_GB[i] for i, g in enumerate(gpu_ids)}
                done = {j for j, st in zip(assigned, store.states(list(assigned)), strict=True)
                        if st in (JobState.DONE.value, JobState.FAILED.value)}
                for j, g in assigned.items():
                    if j not in done:
                        free[g] -= next(x.gb for x in specs if x.id == j)
                gpu = max(gpu_ids, key=lambda g: free[g])
            assigned[s.id] = gpu
            store.set_state(job.id, JobState.QUEUED, queue=job.queue)
            sender.send(job.id, gpu_queue(gpu), 0)

        t0 = time.time()
        by_arrival: dict[float, list[Spec]] = {}
        for s in sorted(specs, key=lambda s: s.arrival):
            by_arrival.setdefault(s.arrival, []).append(s)
        k = 0
        for arrival, batch in by_arrival.items():  # the jobs queued at once are submitted as one batch
            while time.time() - t0 < arrival:
                time.sleep(0.01)
            jobs = [Job(id=s.id, scan_id=SCAN, pipeline="sleep", queue=s.queue,
                        params={"memory_gb": s.gb, "seconds": s.seconds,
                                **({"expected_seconds": s.expected} if estimates else {})})
                    for s in batch]
            for job in jobs:
                store.create(job)
            if policy == "reconq":
                enqueue_many(store, sender, jobs, placement)
                continue
            for s, job in zip(batch, jobs, strict=True):
                k += 1
                send_baseline(policy, s, job, k)
        ids = [s.id for s in specs]
        while True:
            states = store.states(ids)
            if all(st in (JobState.DONE.value, JobState.FAILED.value) for st in states):
                break
            time.sleep(0.2)
        jobs = {j.id: j for j in store.get_many(ids)}
        if dump is not None:
            with open(dump, "a") as f:
                for sp in specs:
                    rec = jobs[sp.id]
                    f.write(json.dumps({"policy": policy, "id": sp.id, "gb": sp.gb, "seconds": sp.seconds,
                                        "queue": sp.queue, "gpu": rec.gpu, "queued": (rec.queued_at or 0) - t0,
                                        "started": (rec.started_at or 0) - t0,
                                        "finished": (rec.finished_at or 0) - t0}) + "\n")
        makespan = max(j.finished_at or 0.0 for j in jobs.values()) - t0
        waits = sorted((jobs[s.id].started_at or 0.0) - (jobs[s.id].queued_at or 0.0)
                       for s in specs if s.queue == "stat")
        return {"overcommits": float(sum(int(v) for v in client.hvals(OVERCOMMITS))),
                "failed": float(sum(j.state is JobState.FAILED for j in jobs.values())),
                "makespan": makespan,
                "stat_median": statistics.median(waits),
                "stat_p95": waits[min(len(waits) - 1, int(round(0.95 * (len(waits) - 1))))]}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0, help="seconds per duration unit (default 1)")
    ap.add_argument("--per-gpu", default="auto",
                    help="worker processes per GPU: auto (by memory; default), N for all, or N,N,N,N")
    ap.add_argument("--policies", default="reconq,round-robin,most-free")
    ap.add_argument("--estimate-error", type=float, default=0.25,
                    help="spread (log-normal sigma) of the run-time estimates the scheduler is given (default 0.25)")
    ap.add_argument("--no-estimates", action="store_true",
                    help="give the scheduler no run times (it then orders by memory alone, holds strictly)")
    ap.add_argument("--dump", type=Path, default=None, help="append each job's GPU and times here (JSON lines)")
    args = ap.parse_args()
    specs = make_jobs(args.jobs, args.seed, args.scale, args.estimate_error)
    register_test_pipelines(redis.Redis(), NODE)  # the submitter's memory model of `sleep` (never connects)
    probe = load_settings(simulated_gpus=GPUS_GB)
    counts = per_gpu_counts(probe, make_inventory(probe), list(range(len(GPUS_GB))), args.per_gpu)
    slots = sum(counts)
    bound = lower_bound(specs, slots)
    with tempfile.TemporaryDirectory(prefix="reconq-bench-") as tmp, PrivateRedis(Path(tmp)) as server:
        workdir = Path(tmp)
        data = workdir / "data"
        raw = ScanStore(data).raw_path(SCAN)
        raw.parent.mkdir(parents=True, exist_ok=True)
        write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), raw)
        base = load_settings(data_dir=data, redis_url=server.url, simulated_gpus=GPUS_GB, node_name=NODE,
                             enable_test_pipelines=True, heartbeat_interval_s=0.5, heartbeat_ttl_s=5.0,
                             dispatch_poll_s=0.1, backfill_limit_s=15 * args.scale,
                             workers_per_gpu=",".join(map(str, counts)))
        print(f"{len(specs)} jobs, {sum(s.gb for s in specs) / len(specs):.1f} GB and "
              f"{sum(s.seconds for s in specs) / len(specs):.2f} s on average "
              f"({sum(s.queue == 'stat' for s in specs)} stat, arriving during the run); GPUs "
              f"{'+'.join(f'{g:g}' for g in GPUS_GB)} GB (simulated), {'+'.join(map(str, counts))} workers "
              f"(--per-gpu {args.per_gpu}); "
              f"lower bound on the makespan {bound:.1f} s", flush=True)
        results = {}
        for policy in args.policies.split(","):
            t = time.monotonic()
            results[policy] = run_policy(policy, specs, base, slots, workdir, args.dump, not args.no_estimates)
            print(f"  {policy}: done in {time.monotonic() - t:.0f} s", flush=True)
    print(f"\n{'policy':12} {'over-commits':>12} {'failed':>6} {'makespan s':>10} {'x bound':>7} "
          f"{'stat wait median s':>18} {'p95 s':>7}")
    for policy, r in results.items():
        print(f"{policy:12} {r['overcommits']:12.0f} {r['failed']:6.0f} {r['makespan']:10.1f} "
              f"{r['makespan'] / bound:7.2f} {r['stat_median']:18.2f} {r['stat_p95']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
