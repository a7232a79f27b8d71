"""Connections to Redis, and the private ``redis-server`` that ``reconq up``/``demo`` start.

The private server keeps its data (AOF on) under ``<data_dir>/redis`` and listens on loopback only.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reconq.core.settings import Settings, SettingsError

log = logging.getLogger(__name__)


def require_redis_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise SettingsError("RECONQ_REDIS_URL is not set (only `reconq up` and `reconq demo` start a private Redis)")
    return settings.redis_url


def connect(settings: Settings) -> redis.Redis:
    """A client with ``decode_responses=True`` on the configured Redis.

    Connecting and each reply are bounded by ``redis_timeout_s``: a Redis host that is gone (no reset
    comes back) or a server that hangs is an error after that, not a wait of minutes (the kernel's
    connect timeout) or forever (a reply that never comes), so a caller such as an MRD session can
    go on without it."""
    return redis.Redis.from_url(require_redis_url(settings), decode_responses=True, health_check_interval=30,
                                socket_timeout=settings.redis_timeout_s,
                                socket_connect_timeout=settings.redis_timeout_s)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` child process with AOF persistence in ``<data_dir>/redis``."""

    def __init__(self, data_dir: Path, binary: str = "redis-server", port: int | None = None) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        exe = shutil.which(self.binary)
        if exe is None:
            raise RuntimeError(
                f"{self.binary} not found: install Redis (Debian: apt-get install redis-server) "
                "or set RECONQ_REDIS_URL to a running one"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"private redis-server did not start; see {self.dir / 'redis.log'}") from None
                time.sleep(0.05)
        log.info("private Redis on %s (data in %s)", self.url, self.dir)
        return self.url

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # no retries: the server closing the connection is SHUTDOWN's success, which redis-py would
        # otherwise retry for seconds (its default backoff) before it says so
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0)).shutdown(nosave=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
