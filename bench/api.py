"""How fast the API answers with 10 000 jobs in Redis: a page of the jobs table, filtered pages, one job,
the queues and /metrics, over HTTP (uvicorn on loopback, a private redis-server).

    .venv/bin/python -m bench.api [--jobs 10000] [--repeat 50]

Prints median and 95th percentile per request; the target for a page is under 200 ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
import uvicorn

from reconq.api.auth import hash_token
from reconq.core.jobs import Job, JobStore
from reconq.core.redisconn import PrivateRedis, free_port
from reconq.core.settings import load_settings
from reconq.core.states import JobState
from reconq.services import make_api

TOKEN = "bench-token-not-a-secret-0123456789"
PAGE_TARGET_MS = 200.0
STATES = [JobState.DONE] * 8 + [JobState.FAILED, JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED]
PROTOCOLS = ["t1_mprage", "t2_flair", "dwi_b1000", "swi", "t1_vibe_dixon", "cine_sax"]


def fill(store: JobStore, n: int) -> None:
    """``n`` jobs over the last 30 days, in batches (one pipeline per 1000)."""
    now = time.time()
    for start in range(0, n, 1000):
        pipe = store.redis.pipeline()
        for i in range(start, min(n, start + 1000)):
            created = now - (n - i) * 30 * 86400 / n
            job = Job(id=f"bench{i:06d}-j1", scan_id=f"bench{i:06d}", pipeline="cartesian",
                      params={"combine": "sos"}, state=STATES[i % len(STATES)], protocol=PROTOCOLS[i % len(PROTOCOLS)],
                      patient_id=f"P{i % 997:05d}", created_at=created, queued_at=created + 1,
                      started_at=created + 5, finished_at=created + 65, progress=1.0, stage="done", attempts=1,
                      gpu="n1:0", worker="n1:1234")
            pipe.hset("reconq:job:" + job.id, mapping=job.to_redis())
            pipe.zadd("reconq:jobs", {job.id: created})
            pipe.rpush("reconq:log:" + job.id, "2026-01-01T00:00:00 stage reading", "2026-01-01T00:01:00 state done")
        pipe.execute()


def timed(client: httpx.Client, path: str, repeat: int) -> tuple[float, float, int]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        reply = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        reply.raise_for_status()
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], len(reply.content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = PrivateRedis(Path(tmp))
        server.start()
        try:
            settings = load_settings(data_dir=Path(tmp) / "data", redis_url=server.url,
                                     staff_tokens={"bench": hash_token(TOKEN)})
            client = redis.Redis.from_url(server.url, decode_responses=True)
            t0 = time.perf_counter()
            fill(JobStore(client), args.jobs)
            print(f"{args.jobs} jobs written to Redis in {time.perf_counter() - t0:.1f} s")
            port = free_port()
            uv = uvicorn.Server(uvicorn.Config(make_api(settings, client), host="127.0.0.1", port=port,
                                               log_level="warning"))
            threading.Thread(target=uv.run, daemon=True).start()
            while not uv.started:
                time.sleep(0.05)
            ok = True
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=30) as http:
                day = time.strftime("%Y-%m-%d", time.localtime(time.time() - 10 * 86400))
                cases = [
                    ("page 1 (50 jobs)", "/api/jobs?limit=50", True),
                    ("page 100 (offset 4950)", "/api/jobs?limit=50&offset=4950", True),
                    ("filter state=failed", "/api/jobs?limit=50&state=failed", True),
                    ("filter protocol=flair", "/api/jobs?limit=50&protocol=flair", True),
                    ("filter state+protocol+since", f"/api/jobs?limit=50&state=done&protocol=t1&since={day}", True),
                    ("one job", f"/api/jobs/bench{args.jobs // 2:06d}-j1", False),
                    ("queues", "/api/queues", False),
                    ("metrics (all jobs scanned)", "/metrics", False),
                ]
                print(f"{'request':32} {'median ms':>10} {'p95 ms':>8} {'bytes':>8}")
                for name, path, is_page in cases:
                    timed(http, path, 3)  # warm up
                    med, p95, size = timed(http, path, args.repeat)
                    flag = ""
                    if is_page and p95 >= PAGE_TARGET_MS:
                        flag, ok = "  OVER TARGET", False
                    print(f"{name:32} {med:10.1f} {p95:8.1f} {size:8d}{flag}")
            uv.should_exit = True
            print(f"target: a page in under {PAGE_TARGET_MS:.0f} ms: {'met' if ok else 'NOT met'}")
            return 0 if ok else 1
        finally:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
