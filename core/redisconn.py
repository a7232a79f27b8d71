"""Connections to Redis, and the private ``redis-server`` that ``reconq up``/``demo`` start.

The private server keeps its data (AOF on) under ``<data_dir>/redis`` (a folder of mode 0700, every file in
it 0600), listens on loopback only and requires a password: a random one made once and kept in
``<data_dir>/redis/password`` (mode 0600), so a restarted server takes the clients of the last one.

Credentials are never printed: banners and logs show :func:`redact` of a URL. A ``rediss://`` URL is
verified (the server's certificate against ``RECONQ_REDIS_CA_FILE``, and its host name) by every client:
redis-py here, Celery's broker connection in :mod:`reconq.core.celeryapp`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reconq.core.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: URL query arguments that would weaken or replace the TLS verification these settings give.
_TLS_QUERY_ARGS = frozenset({"ssl_cert_reqs", "ssl_check_hostname", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data",
                             "ssl", "ssl_include_verify_flags", "ssl_exclude_verify_flags"})
#: Query arguments that carry a credential (redis-py passes unknown ones on as connection arguments).
_SECRET_QUERY_ARGS = frozenset({"password"})
_PRIVATE_PASSWORD = re.compile(r"[0-9a-f]{64}")


def redact(url: str | None) -> str:
    """``url`` as it may be printed or logged: its password (in the user part or a ``password=`` query
    argument) shown as ``***`` (``redis://:***@127.0.0.1:6379/0``); a URL without one as it is."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:  # an unparseable port, say: show nothing of what may be a credential
        return "<a Redis URL that does not parse>"
    netloc = parts.netloc
    if has_password:
        user = netloc.rpartition("@")[0].partition(":")[0]
        netloc = f"{user}:***@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k in _SECRET_QUERY_ARGS for k, _ in pairs):
            query = urlencode([(k, "***" if k in _SECRET_QUERY_ARGS else v) for k, v in pairs], safe="*/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in its user part (quoted), its user name (an ACL user) kept."""
    parts = urlsplit(url)
    user_host = parts.netloc.rpartition("@")
    user = user_host[0].partition(":")[0] if user_host[1] else ""
    return urlunsplit((parts.scheme, f"{user}:{quote(password, safe='')}@{user_host[2]}", parts.path, parts.query,
                       parts.fragment))


def read_password_file(path: Path) -> str:
    """The password in ``path`` (a Docker secret, say), its trailing newlines dropped; SettingsError for a
    file that cannot be read, is empty or holds white space."""
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"RECONQ_REDIS_PASSWORD_FILE {path}: cannot be read: {e}") from e
    if not password or any(c.isspace() for c in password):
        raise SettingsError(f"RECONQ_REDIS_PASSWORD_FILE {path}: the password is empty or holds white space")
    return password


def require_redis_url(settings: Settings) -> str:
    """The URL to connect to, with the password of ``redis_password_file`` in it when that is set.

    Raises :class:`SettingsError` when no URL is set, when a password is given both in the URL and as a
    file, or when the TLS settings do not fit the URL (:func:`tls_options`)."""
    url = settings.redis_url
    if not url:
        raise SettingsError("RECONQ_REDIS_URL is not set (only `reconq up` and `reconq demo` start a private Redis)")
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError as e:
        raise SettingsError(f"RECONQ_REDIS_URL {redact(url)} does not parse: {e}") from e
    if settings.redis_password_file is not None:
        if has_password:
            raise SettingsError("RECONQ_REDIS_URL holds a password and RECONQ_REDIS_PASSWORD_FILE is set: "
                                "give the password one way only")
        url = with_password(url, read_password_file(settings.redis_password_file))
    tls_options(settings, url)  # refuses a rediss:// URL without a CA, or a CA for a plain connection
    return url


def with_redis_credentials(settings: Settings) -> Settings:
    """``settings`` with the password file's password in ``redis_url`` (read once, at start), so that
    whatever takes the URL from the settings connects as the configured user."""
    if settings.redis_password_file is None or not settings.redis_url:
        return settings
    return settings.model_copy(update={"redis_url": require_redis_url(settings), "redis_password_file": None})


def tls_options(settings: Settings, url: str | None = None) -> dict[str, Any]:
    """redis-py connection arguments for ``url`` (default: the settings'): for ``rediss://``, the server's
    certificate verified against ``redis_ca_file`` and its host name checked; ``{}`` for a plain URL.

    Raises :class:`SettingsError` for ``rediss://`` without a readable CA file, for a CA file given with a
    URL that is not ``rediss://`` (TLS would silently be off), and for TLS arguments in the URL's query."""
    url = url if url is not None else settings.redis_url or ""
    parts = urlsplit(url)
    weakening = sorted({k for k, _ in parse_qsl(parts.query, keep_blank_values=True)} & _TLS_QUERY_ARGS)
    if weakening:
        raise SettingsError(f"RECONQ_REDIS_URL {redact(url)}: TLS options in the URL ({', '.join(weakening)}) are "
                            "not taken; TLS is rediss:// with RECONQ_REDIS_CA_FILE")
    ca = settings.redis_ca_file
    if parts.scheme != "rediss":
        if ca is not None:
            raise SettingsError(f"RECONQ_REDIS_CA_FILE is set but RECONQ_REDIS_URL ({redact(url)}) is not rediss://: "
                                "the connection would not use TLS")
        return {}
    if ca is None:
        raise SettingsError(f"RECONQ_REDIS_URL {redact(url)} uses TLS (rediss://): set RECONQ_REDIS_CA_FILE to the "
                            "CA certificate(s) (PEM) that signed the Redis server's certificate")
    if not Path(ca).is_file() or not os.access(ca, os.R_OK):
        raise SettingsError(f"RECONQ_REDIS_CA_FILE {ca}: not a readable file")
    return {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca), "ssl_check_hostname": True}


def celery_tls_options(settings: Settings, url: str) -> dict[str, Any] | None:
    """``broker_use_ssl`` for Celery (kombu) on ``url``: certificate required and checked against the CA,
    host name checked; None for a plain URL."""
    options = tls_options(settings, url)
    if not options:
        return None
    return {**options, "ssl_cert_reqs": ssl.CERT_REQUIRED}


def client_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The URL and the arguments every client of the configured Redis is made with (a sync or an asyncio
    ``from_url``): credentials from the settings, replies and connects bounded by ``redis_timeout_s``, TLS
    verified."""
    url = require_redis_url(settings)
    return url, {"decode_responses": True, "health_check_interval": 30, "socket_timeout": settings.redis_timeout_s,
                 "socket_connect_timeout": settings.redis_timeout_s, **tls_options(settings, url)}


def connect(settings: Settings) -> redis.Redis:
    """A client with ``decode_responses=True`` on the configured Redis.

    Connecting and each reply are bounded by ``redis_timeout_s``: a Redis host that is gone (no reset
    comes back) or a server that hangs is an error after that, not a wait of minutes (the kernel's
    connect timeout) or forever (a reply that never comes), so a caller such as an MRD session can
    go on without it. ``rediss://``: the server's certificate is verified (:func:`tls_options`)."""
    url, options = client_options(settings)
    return redis.Redis.from_url(url, **options)


def connect_async(settings: Settings, **overrides: Any) -> aioredis.Redis:
    """An asyncio client on the configured Redis, made as :func:`connect`'s (``overrides`` replace options:
    ``socket_timeout=None`` for a pub/sub reader that waits)."""
    url, options = client_options(settings)
    return aioredis.Redis.from_url(url, **{**options, **overrides})


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def private_password(path: Path) -> str:
    """The private Redis's password kept in ``path``; made (random, 256 bits) and written with mode 0600
    the first time. A file another process wrote meanwhile wins, so both use one password."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        kept = path.read_text(encoding="ascii", errors="replace").strip()
        if _PRIVATE_PASSWORD.fullmatch(kept):
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return kept
        log.warning("%s does not hold a password made by ReconQ; a new one is made", path)
        path.unlink()
    password = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (password + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never over a password another start wrote a moment ago
    except FileExistsError:
        return private_password(path)
    finally:
        tmp.unlink()
    return password


class PrivateRedis:
    """A ``redis-server`` child process with AOF persistence in ``<data_dir>/redis`` and a password.

    :attr:`url` carries the password (``redis://:PASSWORD@127.0.0.1:PORT/0``): hand it to children in their
    environment, never on a command line, and print it only through :func:`redact`. The server gets the
    password on its standard input (never in its arguments, which ``ps`` shows) and makes its files with
    umask 077."""

    def __init__(self, data_dir: Path, binary: str = "redis-server", port: int | None = None) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.password_file = self.dir / "password"
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._password: str | None = None

    @property
    def password(self) -> str:
        if self._password is None:
            self._password = private_password(self.password_file)
        return self._password

    @property
    def url(self) -> str:
        return self.url_on(self.port)

    def url_on(self, port: int, host: str = "127.0.0.1") -> str:
        """The URL of this server, with its password, as reached at ``host:port`` (a proxy in front of it)."""
        return f"redis://:{self.password}@{host}:{port}/0"

    def _client(self, **options: Any) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, **options)

    def start(self, timeout: float = 10.0) -> str:
        exe = shutil.which(self.binary)
        if exe is None:
            raise RuntimeError(
                f"{self.binary} not found: install Redis (Debian: apt-get install redis-server) "
                "or set RECONQ_REDIS_URL to a running one"
            )
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private_modes(self.dir)  # a folder an older version made 0755, say
        password = self.password
        args = [exe, "-", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.dir / "redis.log")]
        # the config read from stdin ("-") holds the password; its files (AOF, log) are made 0600/0700; its
        # stdout only says that it reads stdin (then it logs to its file), its stderr is a fatal error's
        # a session of its own: a Ctrl-C at the terminal reaches `reconq up` alone, which stops Redis last,
        # after the workers have finished or handed back their jobs
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, umask=0o077,
                                     start_new_session=True)
        assert self.proc.stdin is not None
        with self.proc.stdin:
            self.proc.stdin.write(f"requirepass {password}\n".encode("ascii"))
        client = self._client(socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"private redis-server did not start; see {self.dir / 'redis.log'}") from None
                time.sleep(0.05)
        client.close()
        log.info("private Redis on %s (data in %s)", redact(self.url), self.dir)
        return self.url

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # no retries: the server closing the connection is SHUTDOWN's success, which redis-py would
        # otherwise retry for seconds (its default backoff) before it says so
        with contextlib.suppress(redis.ConnectionError):
            self._client(retry=Retry(NoBackoff(), 0)).shutdown(nosave=False)
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


def _private_modes(folder: Path) -> None:
    """``folder`` and what is in it no longer readable by group or others (files this user owns)."""
    for path in (folder, *folder.rglob("*")):
        with contextlib.suppress(OSError):
            st = path.lstat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077 and not path.is_symlink():
                os.chmod(path, st.st_mode & 0o700)
