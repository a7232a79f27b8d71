"""Benchmark: a simulated clinical day through the real stack, with faults, and what the retrievals got.

Starts a private Redis, the gateway, the API and two worker processes (``reconq.stack.Stack``), then
plays a day: ``--patients`` exams, each with a few scans over a few protocols (some repeated, as after
the patient moved), some retro-recons of a stored scan with another pipeline, some exams with no
patient ID or study UID, some patients with non-ASCII names, one recon that fails. Each exam's protocols
are retrieved at a random delay after their last scan (often before the recon has finished). Faults
are injected for real while the day runs: one worker process group is SIGKILLed mid-job, and Redis is
restarted once (a clean ``SHUTDOWN`` and a new start on the same port and AOF).

Each retrieval is judged against the bench's own record of what it sent: the right answer is the newest
scan of that exam and protocol (its newest job per pipeline). It prints:

- retrievals attempted; delivered with the right images; of those, delivered after waiting for the recon;
- refused with a reason, by reason (the first words of the last TEXT);
- wrong images delivered (another exam's, or an older scan's): must be 0;
- silent endings (no CLOSE, or no TEXT): must be 0;
- of the retrievals whose recon had finished when they began, the share that got images;
- time from the scan's CLOSE to its images being retrievable (job ``finished_at`` less its record's
  creation at the scan's start, and less the scan's streaming), median and p95.

    python bench/clinical_day.py --patients 30 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: the repository, not bench/

import redis  # noqa: E402

from reconq.core.jobs import JobStore  # noqa: E402
from reconq.core.redisconn import free_port  # noqa: E402
from reconq.core.settings import load_settings  # noqa: E402
from reconq.core.storage import ScanStore  # noqa: E402
from reconq.gateway import client  # noqa: E402
from reconq.recon.simulate import synthetic_scan  # noqa: E402
from reconq.services import build_services  # noqa: E402
from reconq.stack import Stack  # noqa: E402

PROTOCOLS = ("t1_se", "t2_tse", "flair")
NAMES = ("Müller^Jørgen", "Øster^Åsa", "Nuñez^José", "Smith^Anne", "Doe^John", "Lefèvre^Chloé")


@dataclass
class Exam:
    n: int
    patient: str
    study: str
    name: str
    #: protocol -> job ids of its scans' first jobs, in the order sent (the last is the newest scan)
    scans: dict[str, list[str]] = field(default_factory=dict)
    #: first job id -> the retro-recon jobs made on that scan
    retros: dict[str, list[str]] = field(default_factory=dict)

    @property
    def identified(self) -> bool:
        return bool(self.patient and self.study)


@dataclass
class Outcome:
    exam: Exam
    protocol: str
    expected: set[str]
    finished_before: bool
    reply: client.Reply | None
    error: str = ""


def scan_of(exam: Exam, protocol: str, rng: random.Random):
    matrix = rng.choice([(64, 64), (96, 96), (128, 128)])
    return synthetic_scan(matrix=matrix, ncoil=rng.choice([4, 8]), nslices=rng.choice([1, 2, 3]), protocol=protocol,
                          patient_id=exam.patient, patient_name=exam.name, study_uid=exam.study)


def sent_jobs(reply: client.Reply) -> set[str]:
    """The jobs whose images a retrieval says it sent (``INF N images of job(s) A, B sent``)."""
    for t in reply.texts:
        if t.startswith("INF ") and " images of job" in t and t.endswith(" sent"):
            listed = t.split(" images of job", 1)[1].removeprefix("s").removesuffix(" sent")
            return {j.strip() for j in listed.split(",") if j.strip()}
    return set()


def reason_of(last: str) -> str:
    """A refusal's kind: its TEXT with job ids and numbers taken out, up to the first colon or semicolon."""
    words = ["<job>" if "-j" in w and w[:8].isdigit() else w for w in last.split()]
    return " ".join(words).split(":")[0].split(";")[0].split(" (")[0][:90]


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker and its pool children (the whole worker, as a host losing power would)."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proc.pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--retrieve-wait", type=float, default=120.0, help="RECONQ_RETRIEVE_WAIT_S")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp) / "data", mrd_port=free_port(), http_port=free_port(),
                                 min_free_bytes=0, retrieve_wait_s=args.retrieve_wait, retrieve_poll_s=1.0,
                                 heartbeat_ttl_s=10.0)
        stack = Stack(settings, workers=2, log_dir=Path(tmp) / "logs")
        t0 = time.monotonic()
        settings = stack.start()
        print(f"stack up in {time.monotonic() - t0:.1f} s: private Redis, gateway, API, 2 workers")
        try:
            run_day(stack, settings, rng, args.patients)
        finally:
            stack.stop()


def run_day(stack: Stack, settings, rng: random.Random, patients: int) -> None:  # noqa: ANN001
    host, port = settings.mrd_host, settings.mrd_port
    exams = []
    for n in range(patients):
        blank = rng.random() < 0.1
        exams.append(Exam(n, "" if blank else f"CD{n:03d}", "" if blank else f"1.2.826.0.1.3680043.2.1125.{900 + n}",
                          rng.choice(NAMES) if rng.random() < 0.3 else f"Patient^{n:03d}"))
    pool = ThreadPoolExecutor(max_workers=8)
    outcomes: list = []
    lock = threading.Lock()
    failing_sent = False
    scans_sent = 0
    fault_at = {"kill": max(3, patients // 3), "redis": max(6, 2 * patients // 3)}
    store = JobStore(redis.Redis.from_url(settings.redis_url, decode_responses=True))

    def retrieve_later(exam: Exam, protocol: str, delay: float) -> None:
        time.sleep(delay)
        newest = exam.scans[protocol][-1]
        expected = {newest, *exam.retros.get(newest, [])}
        try:
            states = [store.get(j) for j in expected]
            finished = all(s is not None and s.state.finished for s in states)
        except redis.RedisError:
            finished = False
        header = scan_of(exam, protocol, random.Random(0)).header
        try:
            reply = client.retrieve(host, port, header, timeout=settings.retrieve_wait_s + 60)
            out = Outcome(exam, protocol, expected, finished, reply)
        except OSError as e:
            out = Outcome(exam, protocol, expected, finished, None, str(e))
        with lock:
            outcomes.append(out)

    futures = []
    for exam in exams:
        for protocol in rng.sample(PROTOCOLS, rng.choice([1, 2, 3])):
            for _ in range(2 if rng.random() < 0.2 else 1):  # a repeated series
                scan = scan_of(exam, protocol, rng)
                params = None
                if not failing_sent and exam.n == patients // 2:
                    params, failing_sent = {"device": "no-such-device"}, True  # the one recon that fails
                try:
                    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian",
                                             params=params)
                except OSError as e:
                    print(f"  send failed: {e}")
                    continue
                job_id = reply.job_id()
                if job_id is None:
                    print(f"  scan refused: {reply.texts}")
                    continue
                exam.scans.setdefault(protocol, []).append(job_id)
                scans_sent += 1
                if scans_sent == fault_at["kill"]:
                    time.sleep(0.3)
                    kill_group(stack.procs["worker0"])
                    print(f"  fault: worker0 SIGKILLed (process group) after scan {scans_sent}")
                if scans_sent == fault_at["redis"] and stack.redis is not None:
                    stack.redis.stop()
                    stack.redis.start()
                    print(f"  fault: Redis restarted after scan {scans_sent}")
            if rng.random() < 0.15 and exam.scans.get(protocol):
                first = exam.scans[protocol][-1]
                scan_id = first.removesuffix("-j1")
                try:
                    retro = build_services(settings).actions.retro_recon(scan_id, "sense", {"maps": "walsh"},
                                                                         _bulk(), who="bench")
                    exam.retros.setdefault(first, []).append(retro.id)
                except Exception as e:  # noqa: BLE001 - reported, the day goes on
                    print(f"  retro-recon of {scan_id} refused: {e}")
            if exam.scans.get(protocol):
                futures.append(pool.submit(retrieve_later, exam, protocol, rng.uniform(0.0, 4.0)))
    for f in futures:
        f.result()
    pool.shutdown()
    report(outcomes, store, settings)


def _bulk():  # noqa: ANN202
    from reconq.core.constants import Queue

    return Queue.BULK


def report(outcomes: list[Outcome], store: JobStore, settings) -> None:  # noqa: ANN001
    right = waited = wrong = silent = 0
    refused: Counter[str] = Counter()
    finished_total = finished_got = 0
    for o in outcomes:
        reply = o.reply
        if reply is None or not reply.closed or not reply.texts:
            silent += 1
            continue
        got = sent_jobs(reply) if reply.images else set()
        if reply.images and not got <= o.expected:
            wrong += 1
            print(f"  WRONG: exam {o.exam.n} {o.protocol}: got {sorted(got)}, expected {sorted(o.expected)}")
        elif reply.images:
            right += 1
            waited += any("waiting" in t for t in reply.texts)
        else:
            refused[reason_of(reply.texts[-1])] += 1
        if o.finished_before and o.exam.identified:
            finished_total += 1
            finished_got += bool(reply.images)
    print(f"retrievals attempted: {len(outcomes)}")
    print(f"  delivered with the right images: {right} (after waiting for the recon: {waited})")
    print(f"  refused with a reason: {sum(refused.values())}")
    for reason, count in refused.most_common():
        print(f"    {count:3d}  {reason}")
    print(f"  wrong images delivered: {wrong} (must be 0)")
    print(f"  silent endings: {silent} (must be 0)")
    if finished_total:
        print(f"  recon finished before the retrieval began: {finished_got} of {finished_total} got images "
              f"({100 * finished_got / finished_total:.1f} %)")
    scans = ScanStore(settings.data_dir)
    latencies = []
    for record in scans.scans():
        job = store.get(f"{record.scan_id}-j1")
        if job is not None and job.finished_at and record.completed_at and job.state.value == "done":
            latencies.append(job.finished_at - record.completed_at)
    if latencies:
        q = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]
        print(f"  CLOSE to images retrievable: median {statistics.median(latencies):.1f} s, p95 {q:.1f} s "
              f"({len(latencies)} scans done)")
    states = Counter(j.state.value for j in store.query(limit=10_000)[0])
    print(f"  jobs by state at the end: {dict(states)}")


if __name__ == "__main__":
    main()
