"""Fixtures on real parts: a real redis-server, the gateway on loopback, real Celery worker processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from reconq.core.constants import DATA_ROOT_KEY, SCAN_INDEX, SCANS_INDEXED
from reconq.core.dataroot import check_data_root
from reconq.core.jobs import JobStore
from reconq.core.redisconn import PrivateRedis
from reconq.core.settings import Settings, load_settings
from reconq.core.storage import ScanStore
from reconq.faultkit import spawn_worker
from reconq.gateway.server import Gateway
from reconq.scheduler.scanindex import rebuild

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_caller_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees the settings it gives, never the ``RECONQ_*`` variables of whoever runs the suite."""
    for name in [n for n in os.environ if n.startswith("RECONQ_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def cuda() -> int:
    """For tests marked ``gpu``: skip, with the reason shown, unless cupy and a CUDA device are there."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed: GPU test not run")
    try:
        devices = int(cupy.cuda.runtime.getDeviceCount())
    except cupy.cuda.runtime.CUDARuntimeError:
        devices = 0
    if devices == 0:
        pytest.skip("no CUDA device: GPU test not run")
    return devices


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """One real redis-server for the test session (AOF on, as in production)."""
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server: PrivateRedis) -> Iterator[str]:
    """A Redis URL on a database flushed before the test (db 1; workers of e2e tests use db 0)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.close()


def claim_data_root(settings: Settings) -> str:
    """Make ``settings``' data dir the data root of record on its Redis db, as a gateway's start does.

    Test modules share Redis dbs, each module with a data dir of its own: the root id another module left
    would make this one's processes refuse to start (:mod:`reconq.core.dataroot`), and its scans in the scan
    index would look like scans this node cannot see. So the id is recorded anew and the index rebuilt from
    this data dir (its scans only). Returns the root's id."""
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    try:
        client.delete(DATA_ROOT_KEY)
        ident = check_data_root(settings, client, create=True, role="test")
        if (Path(settings.data_dir) / "scans").is_dir():
            rebuild(client, ScanStore(settings.data_dir))
        else:  # no scans here: every entry is another data dir's
            client.delete(SCANS_INDEXED, *client.scan_iter(SCAN_INDEX + "*"))
        return ident
    finally:
        client.close()


@pytest.fixture
def settings(tmp_path: Path, redis_db: str) -> Settings:
    settings = load_settings(data_dir=tmp_path / "data", redis_url=redis_db, mrd_port=0, min_free_bytes=0,
                             retrieve_wait_s=10.0, retrieve_poll_s=0.2, idle_timeout_s=10.0)
    claim_data_root(settings)  # as the gateway's first start: an API or worker alone finds the root recorded
    return settings


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore(redis.Redis.from_url(settings.redis_url or "", decode_responses=True))


def start_worker(settings: Settings, log_path: Path, concurrency: int = 1,
                 new_session: bool = False) -> subprocess.Popen[bytes]:
    """A real ``reconq worker`` process on ``settings``; waits until Celery reports it ready.
    ``new_session``: in a process group of its own (which a test may SIGKILL whole). The settings' data dir
    is made the root of record first (:func:`claim_data_root`): some tests start a worker before, or
    without, a gateway."""
    claim_data_root(settings)
    return spawn_worker(settings, log_path, "--concurrency", str(concurrency), new_session=new_session)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def e2e_settings(redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings shared by a module's gateway and its worker process (Redis db 0, one data folder, the root of
    record there: see :func:`claim_data_root`)."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("e2e") / "data", redis_url=redis_server.url,
                             mrd_port=0, min_free_bytes=0, retrieve_wait_s=60.0, retrieve_poll_s=0.2)
    claim_data_root(settings)
    return settings


@pytest.fixture(scope="module")
def worker(e2e_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(e2e_settings, tmp_path_factory.mktemp("worker") / "worker.log")
    yield proc
    stop_process(proc)


@pytest.fixture(scope="module")
def gateway(e2e_settings: Settings) -> Iterator[tuple[str, int]]:
    """The MRD gateway serving on loopback in this process (real TCP); yields (host, port)."""
    from reconq.services import make_gateway

    claim_data_root(e2e_settings)  # modules that override e2e_settings share db 0 with other data dirs
    gw = make_gateway(e2e_settings)
    address = gw.start()
    yield address
    gw.stop()


@pytest.fixture
def start_gateway(settings: Settings) -> Iterator[Callable[..., Gateway]]:
    """Start an in-process gateway on ``settings`` with some changed; stopped after the test."""
    from reconq.services import make_gateway

    started: list[Gateway] = []

    def start(**changes: object) -> Gateway:
        gateway = make_gateway(settings.model_copy(update=changes))
        gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
