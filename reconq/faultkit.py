"""Faults injected for real, for the fault tests and ``bench/faults.py``: worker processes killed or stopped
mid-job, Redis killed, stopped or cut off by a paused proxy, while ``sleep`` jobs run.

Each scenario starts real ``reconq worker`` processes (each in a process group of its own, so one can be
killed whole), queues ``sleep`` test-pipeline jobs (``RECONQ_ENABLE_TEST_PIPELINES``), injects its fault,
waits for every job to end and returns a :class:`FaultRun`: the jobs' end states, how many runs of each
reached their end (:data:`reconq.workers.testpipelines.COMPLETED`: a job run to the end twice shows), GPU
reservations left behind, and how long each recovery took. The tests assert on it; the bench prints it.
Nothing here is a stand-in: the processes, Redis and sockets are the real ones.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis

from reconq.core.celeryapp import make_celery
from reconq.core.constants import GPU_RESERVATIONS
from reconq.core.dataroot import check_data_root
from reconq.core.jobs import Job, JobStore
from reconq.core.redisconn import PrivateRedis
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings, load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.scheduler.submit import enqueue
from reconq.stack import child_env
from reconq.workers.testpipelines import COMPLETED

#: Heartbeats fast enough that a dead worker is noticed within seconds.
FAST_BEATS: dict[str, Any] = {"heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 2.0, "dispatch_poll_s": 0.2}


def fault_settings(folder: Path, url: str, **overrides: Any) -> Settings:
    """Settings of a fault scenario: its data dir in ``folder``, Redis at ``url``, the test pipelines."""
    return load_settings(data_dir=folder / "data", redis_url=url, enable_test_pipelines=True, mrd_port=0,
                         min_free_bytes=0, **{**FAST_BEATS, **overrides})


def wait_until(what: Callable[[], Any], timeout: float, poll: float = 0.1) -> Any:
    """``what()``'s first true value, polled; AssertionError past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := what()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(poll)
    return value


def spawn_worker(settings: Settings, log_path: Path, *args: str, ready: int = 1, new_session: bool = False,
                 prefix: tuple[str, ...] | list[str] = ()) -> subprocess.Popen[bytes]:
    """A real ``reconq worker ARGS`` process (default ``--concurrency 1``) on ``settings``, its output in
    ``log_path``; waits until ``ready`` Celery workers report ready (RuntimeError with the log if not).
    ``new_session``: in a process group of its own (which a test may kill whole); ``prefix``: a command to
    run it under (``unshare ...``, say)."""
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "reconq.cli", "worker",
                                 *(args or ("--concurrency", "1"))], env=child_env(settings), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=new_session)
    deadline = time.monotonic() + 90
    while log_path.read_bytes().count(b"ready.") < ready:
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL) if new_session else proc.kill()
            proc.wait()
            raise RuntimeError("worker did not start:\n" + log_path.read_text(errors="replace"))
        time.sleep(0.1)
    return proc


class Workers:
    """Real ``reconq worker`` processes on ``settings``, each in a process group of its own."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings, self.folder = settings, folder
        self.procs: list[subprocess.Popen[bytes]] = []
        self._started = 0
        # what the gateway does at its first start: the data root's id, which workers check theirs against
        client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
        check_data_root(settings, client, create=True, role="fault scenario")
        client.close()

    def start(self, *args: str, ready: int = 1) -> subprocess.Popen[bytes]:
        """``reconq worker ARGS`` (default ``--concurrency 1``); waits until ``ready`` Celery workers are."""
        log_path = self.folder / f"worker-{self._started}.log"
        self._started += 1
        proc = spawn_worker(self.settings, log_path, *args, ready=ready, new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL to the worker's whole process group: its main process and its pool processes."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.procs.remove(proc)  # killed as asked: not a worker that died

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def sleep_jobs(settings: Settings, store: JobStore, n: int, seconds: float, prefix: str = "f") -> list[str]:
    """``n`` queued ``sleep`` jobs of ``seconds`` each (1 GB declared), one small scan each."""
    scans = ScanStore(settings.data_dir)
    sender = TaskSender(make_celery(settings))
    ids = []
    for i in range(n):
        scan_id = f"{prefix}{i:02d}"
        raw = scans.raw_path(scan_id)
        raw.parent.mkdir(parents=True)
        write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), raw)
        job = Job(id=f"{scan_id}-j1", scan_id=scan_id, pipeline="sleep", params={"seconds": seconds, "memory_gb": 1})
        store.create(job)
        enqueue(store, sender, job)
        ids.append(job.id)
    return ids


def completions(client: redis.Redis, settings: Settings, job_ids: list[str]) -> dict[str, int]:
    """How many runs of each job's recon reached their end."""
    scans = ScanStore(settings.data_dir)
    counts = client.hgetall(COMPLETED)
    return {j: int(counts.get(str(scans.raw_path(j.rsplit("-", 1)[0])), 0)) for j in job_ids}


def all_finished(store: JobStore, ids: list[str]) -> bool:
    return all(JobState(s).finished for s in store.states(ids) if s)


def reservations_left(client: redis.Redis) -> dict[str, dict[str, str]]:
    """Every GPU memory reservation still recorded, by key."""
    return {k: v for k in client.scan_iter(GPU_RESERVATIONS + "*") if (v := client.hgetall(k))}


def pool_parent(worker: str) -> int:
    """The pid of the Celery main process whose pool process is ``worker`` (``<node>:<pid>``)."""
    stat = Path(f"/proc/{worker.rsplit(':', 1)[1]}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def get(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    assert job is not None, f"no job {job_id}"
    return job


def handed_back(store: JobStore, run: Job) -> bool:
    """Whether the run read in ``run`` has ended (the job is no longer running on that worker)."""
    job = get(store, run.id)
    return job.state is not JobState.RUNNING or job.worker != run.worker


def running(store: JobStore, ids: list[str], min_progress: float = 0.1) -> list[Job]:
    return [j for j in store.get_many(ids) if j.state is JobState.RUNNING and j.progress > min_progress]


@dataclass
class FaultRun:
    """What one scenario did and how the system came through it."""

    fault: str
    jobs: list[Job]
    runs: dict[str, int]  # job id -> runs that reached their end
    reservations_left: dict[str, dict[str, str]]
    recover_s: list[float] = field(default_factory=list)  # per fault: until the affected jobs went on
    workers_alive: bool = True
    acks: list[str] = field(default_factory=list)  # TEXTs a scanner got for a scan sent during the fault

    @property
    def done_once(self) -> bool:
        """Every job done; every ``sleep`` job's recon run to its end once (other pipelines are not counted)."""
        sleeps = [j.id for j in self.jobs if j.pipeline == "sleep"]
        return all(j.state is JobState.DONE for j in self.jobs) and all(self.runs[j] == 1 for j in sleeps)

    def row(self) -> str:
        recover = ", ".join(f"{s:.1f}" for s in self.recover_s) or "-"
        return (f"| {self.fault} | {len(self.jobs)} | {sum(j.state is JobState.DONE for j in self.jobs)} | "
                f"{'yes' if self.done_once else 'NO'} | {recover} | {len(self.reservations_left)} |")


def _finish(fault: str, store: JobStore, client: redis.Redis, settings: Settings, ids: list[str],
            workers: Workers, recover: list[float], timeout: float = 180) -> FaultRun:
    wait_until(lambda: all_finished(store, ids), timeout, poll=0.2)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not reservations_left(client), 10, poll=0.2)  # released as each job ends
    alive = all(w.poll() is None for w in workers.procs)
    return FaultRun(fault, store.get_many(ids), completions(client, settings, ids), reservations_left(client),
                    recover, alive)


def worker_kills(server: PrivateRedis, folder: Path, jobs: int = 10, kills: int = 3, seconds: float = 5.0) -> FaultRun:
    """2 workers; ``kills`` times, SIGKILL to the whole process group of a worker running a job, a new worker
    started in its place once the job is handed back. Recovery: kill to the job handed back by a live worker."""
    settings = fault_settings(folder, server.url)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    store, workers = JobStore(client), Workers(settings, folder)
    recover: list[float] = []
    killed: set[str] = set()
    try:
        by_pid = {p.pid: p for p in (workers.start(), workers.start())}
        ids = sleep_jobs(settings, store, jobs, seconds)
        while len(killed) < kills:
            victim: Job = wait_until(lambda: next((j for j in running(store, ids, 0.05) if j.id not in killed), None),
                                     60, poll=0.05)
            workers.kill(by_pid.pop(pool_parent(victim.worker)))
            t0 = time.monotonic()
            wait_until(partial(handed_back, store, victim), 30, poll=0.05)
            recover.append(time.monotonic() - t0)
            killed.add(victim.id)
            new = workers.start()
            by_pid[new.pid] = new
        return _finish(f"worker SIGKILL (process group) x{kills}, 2 workers", store, client, settings, ids, workers,
                       recover)
    finally:
        workers.stop_all()


def redis_outage(server: PrivateRedis, folder: Path, how: str, down_s: float = 4.0, jobs: int = 7,
                 seconds: float = 4.0) -> FaultRun:
    """2 simulated GPUs with a worker each, ``jobs`` jobs (2 run, the rest wait), and the MRD gateway; Redis
    stopped (``how``: ``kill`` = SIGKILL, ``stop`` = a clean SHUTDOWN) while 2 run, started again after
    ``down_s`` with its AOF. Meanwhile a scanner sends a scan (``cartesian``), which the gateway stores and
    acknowledges with an ``INF`` (:attr:`FaultRun.acks`); it is queued and reconstructed once Redis is back
    (its job is the last of :attr:`FaultRun.jobs`). Recovery: Redis back to the first job state written."""
    from reconq.gateway import client as mrd
    from reconq.services import make_gateway

    settings = fault_settings(folder, server.url, simulated_gpus=[8, 8], redis_retry_s=60.0)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    store, workers = JobStore(client), Workers(settings, folder)
    again = PrivateRedis(server.dir.parent, port=server.port)
    gateway = make_gateway(settings)
    try:
        host, port = gateway.start()
        workers.start("--gpus", "0,1", "--per-gpu", "1", ready=2)
        ids = sleep_jobs(settings, store, jobs, seconds)
        wait_until(lambda: len(running(store, ids)) == 2, 60, poll=0.05)
        if how == "kill":
            assert server.proc is not None
            server.proc.kill()  # no shutdown save: the AOF holds every write Redis answered
            server.proc.wait()
        else:
            server.stop()
        t_down = time.monotonic()
        scan = synthetic_scan(matrix=(32, 32), ncoil=2, nslices=1, protocol="fault_scan", patient_id="FAULT01")
        reply = mrd.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
        time.sleep(max(0.0, down_s - (time.monotonic() - t_down)))
        again.start()
        t0 = time.monotonic()
        before = {j.id: (j.state, j.progress) for j in store.get_many(ids)}
        wait_until(lambda: any((j.state, j.progress) != before[j.id] for j in store.get_many(ids)), 60, poll=0.05)
        recover = [time.monotonic() - t0]
        scan_ids = [r.scan_id for r in ScanStore(settings.data_dir).scans() if r.protocol == "fault_scan"]
        ids += [f"{scan_id}-j1" for scan_id in scan_ids]
        wait_until(lambda: all(store.get(j) is not None for j in ids), 30, poll=0.2)  # queued by the reconciler
        what = "SIGKILL" if how == "kill" else "clean SHUTDOWN"
        run = _finish(f"Redis {what}, down {down_s:g} s, 2 running + {jobs - 2} waiting + 1 sent meanwhile", store,
                      client, settings, ids, workers, recover)
        run.acks = reply.texts
        return run
    finally:
        gateway.stop()
        workers.stop_all()
        again.stop()


class PausableProxy:
    """A TCP proxy on loopback in front of a port; :meth:`pause` stops it forwarding (connections stay
    open, bytes wait), as a network that drops everything for a while looks to both ends."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.forwarding = threading.Event()
        self.forwarding.set()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def pause(self) -> None:
        self.forwarding.clear()

    def resume(self) -> None:
        self.forwarding.set()

    def close(self) -> None:
        self._closed = True
        self.forwarding.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                if self._closed:
                    return
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 16):
                self.forwarding.wait()
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


def network_outage(server: PrivateRedis, folder: Path, pause_s: float = 20.0, seconds: float = 6.0) -> FaultRun:
    """One simulated-GPU worker reaching Redis through a :class:`PausableProxy`, paused ``pause_s`` during a
    recon; then a second job, which must run on the same GPU. Recovery: proxy resumed to the job going on."""
    proxy = PausableProxy(server.port)
    beats = {"heartbeat_interval_s": 1.0, "heartbeat_ttl_s": 30.0, "redis_retry_s": 60.0, "simulated_gpus": [8]}
    direct = fault_settings(folder, server.url, **beats)
    behind = fault_settings(folder, server.url_on(proxy.port), **beats)  # with the server's password
    client = redis.Redis.from_url(server.url, decode_responses=True)
    store, workers = JobStore(client), Workers(behind, folder)
    try:
        workers.start("--gpus", "0", "--per-gpu", "1")
        ids = sleep_jobs(direct, store, 1, seconds, prefix="a")
        wait_until(lambda: running(store, ids), 60, poll=0.05)
        proxy.pause()
        time.sleep(pause_s)
        before = get(store, ids[0])
        proxy.resume()
        t0 = time.monotonic()
        wait_until(lambda: (j := get(store, ids[0])).state.finished or j.progress != before.progress, 60, poll=0.05)
        recover = [time.monotonic() - t0]
        wait_until(lambda: all_finished(store, ids), 120, poll=0.2)
        ids += sleep_jobs(direct, store, 1, 1.0, prefix="b")
        return _finish(f"worker-Redis network paused {pause_s:g} s mid-recon", store, client, direct, ids, workers,
                       recover)
    finally:
        workers.stop_all()
        proxy.close()


def graceful_stop(server: PrivateRedis, folder: Path, grace_s: float = 2.0, seconds: float = 8.0) -> FaultRun:
    """SIGTERM to the worker running a job longer than the grace period, a second worker idle. Recovery:
    SIGTERM to the job handed back (the grace period included)."""
    settings = fault_settings(folder, server.url, worker_stop_grace_s=grace_s)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    store, workers = JobStore(client), Workers(settings, folder)
    try:
        by_pid = {p.pid: p for p in (workers.start(), workers.start())}
        ids = sleep_jobs(settings, store, 1, seconds)
        first = wait_until(lambda: next(iter(running(store, ids, 0.0)), None), 30, poll=0.05)
        stopping = by_pid[pool_parent(first.worker)]
        stopping.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        wait_until(lambda: get(store, ids[0]).worker != first.worker, 30, poll=0.05)
        recover = [time.monotonic() - t0]
        stopping.wait(timeout=30)
        workers.procs.remove(stopping)  # stopped as asked: not a worker that died
        return _finish(f"worker SIGTERM mid-job, grace {grace_s:g} s", store, client, settings, ids, workers, recover)
    finally:
        workers.stop_all()
