"""The whole stack on this machine as child processes: private Redis (if needed), gateway, API, workers.

Used by ``reconq up`` and ``reconq demo``. Children get the parent's settings through ``RECONQ_*``
variables, so every process runs with the same configuration. The stack owns its data root: it creates
(or records again) the root's id before it starts a child (:mod:`reconq.core.dataroot`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from reconq.core.dataroot import check_data_root
from reconq.core.redisconn import PrivateRedis, connect
from reconq.core.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """``RECONQ_*`` variables that rebuild ``settings`` in a child process.

    They hold the Redis URL with its password (the private Redis's, say): they go into children's
    environments only (readable by this user alone), never onto a command line or into a log."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[ENV_PREFIX + name.upper()] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment for a child process on ``settings``: the caller's own ``RECONQ_*``
    variables replaced by those that rebuild ``settings`` (:func:`settings_env`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(settings_env(settings))
    return env


#: The gateway's exit code when it refuses its data root: the stack then stops (see Stack.supervise)
REFUSED = 2
#: How long a restarted private Redis may take to load its AOF and answer
REDIS_RESTART_TIMEOUT_S = 60.0


@dataclass
class Restarts:
    """One child's restarts: back-off 1, 2, 4, ... up to 60 s while it keeps dying within a minute of its
    start; a child that ran longer than that starts again after 1 s."""

    total: int = 0
    quick: int = 0  # deaths in a row, each within STABLE_S of its start
    due: float | None = None  # monotonic time of the next start, while one is pending
    group: int | None = None  # the dead child's process group, while something in it got its SIGTERM
    drain_until: float = 0.0  # how long what is left in that group may take to stop (a worker hands back)

    STABLE_S = 60.0
    MAX_DELAY_S = 60.0

    def failed(self, ran_s: float) -> float:
        """Note a death after ``ran_s`` seconds of running; returns the delay before the next start."""
        self.quick = self.quick + 1 if ran_s < self.STABLE_S else 1
        return min(self.MAX_DELAY_S, 2.0 ** (self.quick - 1))


class Stack:
    """Starts and stops the services; :meth:`stop` is safe to call more than once."""

    def __init__(self, settings: Settings, workers: int = 1, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.workers = workers
        self.log_dir = log_dir
        self.redis: PrivateRedis | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.roles: dict[str, list[str]] = {}  # each child's command line arguments, to start it again
        self.started_at: dict[str, float] = {}  # monotonic
        self.env: dict[str, str] = {}
        self._logs: dict[str, IO[bytes]] = {}  # each child's log file (with log_dir)
        self._orphans: set[int] = set()  # process groups of dead children with something still stopping

    def start(self, timeout: float = 60.0) -> Settings:
        """Start everything and wait until the gateway and API answer; returns the effective settings."""
        if not self.settings.redis_url:
            self.redis = PrivateRedis(self.settings.data_dir, self.settings.redis_server_bin)
            # its URL carries its own password; no TLS on loopback
            self.settings = self.settings.model_copy(update={"redis_url": self.redis.start(),
                                                             "redis_password_file": None, "redis_ca_file": None})
            self.started_at["redis"] = time.monotonic()
        client = connect(self.settings)
        try:  # before any child: they then find the root's id recorded, whichever starts first
            check_data_root(self.settings, client, create=True, role="`reconq up`")
        finally:
            client.close()
        self.env = env = child_env(self.settings)
        self._spawn("gateway", ["gateway"], env)
        self._spawn("api", ["api"], env)
        for i in range(self.workers):
            self._spawn(f"worker{i}", ["worker"], env)
        self._wait_ready(timeout)
        return self.settings

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # stamped at every attempt: one that fails (no process slot) backs off like a child that died at once
        self.roles[name], self.started_at[name] = args, time.monotonic()
        old = self._logs.pop(name, None)
        if old is not None:  # the log of the child this one replaces
            old.close()
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs[name] = out
        cmd = [sys.executable, "-m", "reconq.cli", *args]
        # each in a process group of its own: a Ctrl-C reaches `up` alone, which stops them in order, and a
        # child that outlives its stop is killed with its own children (a worker's pool processes)
        self.procs[name] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT if out else None, start_new_session=True)
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def _wait_ready(self, timeout: float) -> None:
        s = self.settings
        deadline = time.monotonic() + timeout
        pending = {"gateway", "api"}
        while pending:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up"
                                       + (f"; see {self.log_dir / (name + '.log')}" if self.log_dir else ""))
            if "gateway" in pending and _port_open(s.mrd_host, s.mrd_port):
                pending.discard("gateway")
            scheme = "https" if s.tls_cert is not None else "http"
            if "api" in pending and _http_ok(f"{scheme}://{s.http_host}:{s.http_port}/api/health"):
                pending.discard("api")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(sorted(pending))} not ready after {timeout:g} s")
            time.sleep(0.1)

    def supervise(self, on_restart: Callable[[], None] | None = None, poll_s: float = 0.5) -> int:
        """Keep the stack up until Ctrl-C: a child that dies is started again after a back-off, each child on
        its own, so the gateway goes on taking scans while the API or a worker restarts (and the other way
        round); what a dead child leaves in its process group (a launcher's per-GPU workers) is stopped first
        (SIGTERM: running recons finish or are handed back; SIGKILL past the grace period and 40 s).
        A private Redis that dies is started again on its port and AOF, with the same back-off. A gateway
        that exits with code 2 refused its data root (not the recorded one): the stack stops and this returns
        2. Any other child is started again whatever its code: a worker that gave up waiting for Redis (code
        2 too) starts again once it is back. ``on_restart`` is called after each restart."""
        restarts: dict[str, Restarts] = {}
        while True:
            now = time.monotonic()
            if self._keep_redis(restarts.setdefault("redis", Restarts()), now):
                self._restarted(on_restart, "Redis")
            for name, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                state = restarts.setdefault(name, Restarts())
                if state.due is None:  # just found dead: what is left of its group (a launcher's workers) stops
                    state.group = proc.pid if _signal_group(proc.pid, signal.SIGTERM) else None
                    if state.group is not None:
                        self._orphans.add(state.group)
                    state.drain_until = now + self.settings.worker_stop_grace_s + 40.0
                    if name == "gateway" and code == REFUSED:
                        log.error("the gateway refused to run (exit code 2: its log says why); stopping the stack")
                        return REFUSED
                    delay = state.failed(now - self.started_at.get(name, now))
                    log.error("%s exited with code %d; starting it again in %.0f s (restart %d)", name, code, delay,
                              state.total + 1)
                    state.due = now + delay
                elif now >= state.due:
                    if state.group is not None and _group_alive(state.group):  # some of it still stopping
                        if now < state.drain_until:
                            continue  # its workers finish or hand back their jobs first
                        _signal_group(state.group, signal.SIGKILL)
                    self._orphans.discard(state.group or 0)
                    state.due = state.group = None
                    try:
                        self._spawn(name, self.roles[name], self.env)
                    except OSError as e:  # no process slot, a log file that cannot be opened: tried again
                        log.error("%s could not be started again: %s", name, e)
                        continue
                    state.total += 1
                    self._restarted(on_restart, name)
            time.sleep(poll_s)

    @staticmethod
    def _restarted(on_restart: Callable[[], None] | None, name: str) -> None:
        if on_restart is not None:
            try:
                on_restart()
            except OSError as e:  # a full disk, say: the stack goes on
                log.error("after restarting %s: %s", name, e)

    def _keep_redis(self, state: Restarts, now: float) -> bool:
        """Start the private Redis again (on its port, from its AOF) once its back-off is over, if it died;
        True when it did."""
        if self.redis is None or self.redis.proc is None or self.redis.proc.poll() is None:
            return False
        if state.due is None:
            delay = state.failed(now - self.started_at.get("redis", now))
            log.error("private Redis exited with code %s; starting it again on port %d in %.0f s",
                      self.redis.proc.returncode, self.redis.port, delay)
            state.due = now + delay
        elif now >= state.due:
            state.due = None
            self.started_at["redis"] = time.monotonic()  # every attempt: one that fails backs off too
            try:
                self.redis.start(timeout=REDIS_RESTART_TIMEOUT_S)  # a large AOF takes a while to load
            except (OSError, RuntimeError) as e:
                log.error("private Redis did not start again: %s", e)
                return False
            state.total += 1
            return True
        return False

    def pids(self) -> dict[str, int]:
        """The children's process ids, by name (``gateway``, ``api``, ``worker0``, ..., ``redis`` for a private
        Redis)."""
        pids = {name: proc.pid for name, proc in self.procs.items()}
        if self.redis is not None and self.redis.proc is not None:
            pids["redis"] = self.redis.proc.pid
        return pids

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every child (workers finish or hand back their job: they get the recons' grace period
        and the time to hand back, by default), kill what is left of their process groups, then stop Redis
        (whatever went wrong before: it is never left running on the data dir's AOF)."""
        if timeout is None:
            # a GPU launcher's own stop: its workers' grace + 15 s, then SIGQUIT + 10 s, then SIGKILL + 10 s
            timeout = self.settings.worker_stop_grace_s + 40.0
        try:
            running = [proc for proc in self.procs.values() if proc.poll() is None]
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in running:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in the kernel: Redis still stops
                        proc.wait(timeout=10)
            # a launcher's workers, a pool process, what a dead child left: none outlives `up`
            for group in [proc.pid for proc in running] + sorted(self._orphans):
                _signal_group(group, signal.SIGKILL)
            self._orphans.clear()
        finally:
            self.procs.clear()
            try:
                if self.redis is not None:
                    self.redis.stop()
            finally:
                self.redis = None
                for f in self._logs.values():
                    f.close()
                self._logs.clear()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a child's process group (each child leads one of its own); False when nothing is left in it
    (``sig`` 0: only look)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, exited and not yet reaped by whoever
    adopted them, do not count: a signal finds them all the same)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return _signal_group(pgid, 0)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        # our own API on its own address: its certificate may be self-signed or name another host
        context = ssl._create_unverified_context() if url.startswith("https:") else None
        with urllib.request.urlopen(url, timeout=0.5, context=context) as r:  # noqa: S310 - a URL we built
            return r.status == 200
    except OSError:
        return False


#: The file ``reconq up`` writes in its data dir (mode 0600) so that client commands in another shell find
#: its Redis (the URL with its password) and its ports without any variable set.
CONNECTION_FILE = "reconq-up.json"


def connection_path(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / CONNECTION_FILE


def write_connection(settings: Settings, pid: int | None = None, children: dict[str, int] | None = None) -> Path:
    """Write the running stack's connection details (atomically, mode 0600), with its children's process ids
    by name; returns the file's path."""
    path = connection_path(settings.data_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {"pid": pid or os.getpid(), "redis_url": settings.redis_url, "redis_ca_file":
           str(settings.redis_ca_file) if settings.redis_ca_file else None, "mrd_host": settings.mrd_host,
           "mrd_port": settings.mrd_port, "http_host": settings.http_host, "http_port": settings.http_port,
           "children": children or {}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(doc, indent=2).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def remove_connection(data_dir: Path, pid: int | None = None) -> None:
    """Remove the connection file if it is this process's (``pid``'s) own."""
    path = connection_path(data_dir)
    doc = _read_json(path)
    if doc is not None and doc.get("pid") == (pid or os.getpid()):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_connection(data_dir: Path) -> tuple[dict[str, object] | None, bool]:
    """``(details, stale)``: the details of a running ``reconq up`` on ``data_dir``, or ``(None, True)`` when
    its file is left by an ``up`` no longer running, or ``(None, False)`` when there is none."""
    doc = _read_json(connection_path(data_dir))
    if doc is None:
        return None, False
    pid = doc.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None, True
    return doc, False


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
