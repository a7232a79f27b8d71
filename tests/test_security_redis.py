"""Redis is not trusted blindly (issue 16): credentials, TLS, ACL users per role, and what ReconQ makes on disk.

- The private Redis of ``reconq up``/``demo`` needs a password, made once and kept in the data dir (0600); its
  URL carries it to children in their environment only, and it is printed masked.
- ``rediss://`` is verified by redis-py and by Celery (kombu's default for ``rediss://`` verifies nothing):
  the built configuration, and a real TLS Redis that a client with the right CA reaches and one with another
  CA does not.
- compose.yaml's Redis (deploy/redis-entrypoint.sh): the default user off, a user per role with the rules it
  needs; a gateway, a worker and the API run a scan, a retrieval, staff actions and a sign-in through it.
- Result files are derived from ids, never read from Redis (also tests/test_api.py).
- Every file and folder the services make is their user's alone (0600/0700), the AOF included.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from conftest import ROOT, stop_process
from fastapi.testclient import TestClient

from reconq.api.auth import hash_password, hash_token
from reconq.core.celeryapp import make_celery
from reconq.core.dataroot import ROOT_FILE
from reconq.core.jobs import Job
from reconq.core.redisconn import (
    PrivateRedis,
    connect,
    free_port,
    redact,
    require_redis_url,
    with_redis_credentials,
)
from reconq.core.results import result_file
from reconq.core.settings import Settings, SettingsError, load_settings
from reconq.core.storage import ScanStore
from reconq.gateway import client
from reconq.recon.simulate import synthetic_scan
from reconq.stack import settings_env

ENTRYPOINT = ROOT / "deploy" / "redis-entrypoint.sh"
ROLES = ("gateway", "api", "worker")
TOKEN = "security-test-token-0123456789"
STAFF = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "a long and proper staff password"


def wait_until(condition, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def cmdlines() -> Iterator[bytes]:
    """The command line of every process this user can see."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield (entry / "cmdline").read_bytes()
            except OSError:
                continue


def private_modes(root: Path, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Files and folders under ``root`` (and ``root``) that group or others may use, as ``mode path``."""
    found = []
    for path in (root, *root.rglob("*")):
        mode = path.lstat().st_mode
        if mode & 0o077 and path.name not in allowed and not path.is_symlink():
            found.append(f"{oct(mode & 0o777)} {path.relative_to(root.parent)}")
    return found


# --- credentials: redaction, password files -----------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://worker:p%40ss@redis:6379/0", "redis://worker:***@redis:6379/0"),
    ("rediss://api:x@[::1]:6380/2", "rediss://api:***@[::1]:6380/2"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://gateway@redis:6379/0", "redis://gateway@redis:6379/0"),
    ("redis://h:6379/0?password=s3cret&db=1", "redis://h:6379/0?password=***&db=1"),
    ("redis://:s3cret@[::1:6379/0", "<a Redis URL that does not parse>"),
])
def test_redact_masks_the_password(url, shown):
    assert redact(url) == shown
    assert "s3cret" not in redact(url) and "p%40ss" not in redact(url)


def test_a_password_file_gives_the_users_password(tmp_path):
    secret = tmp_path / "redis_worker_password"
    secret.write_text("p@ss/word:1\n")  # a Docker secret, newline and all; quoted into the URL
    settings = load_settings(redis_url="redis://worker@redis:6379/0", redis_password_file=secret)
    url = require_redis_url(settings)
    assert url == "redis://worker:p%40ss%2Fword%3A1@redis:6379/0"
    kwargs = connect(settings).connection_pool.connection_kwargs
    assert kwargs["username"] == "worker" and kwargs["password"] == "p@ss/word:1"
    folded = with_redis_credentials(settings)  # as `reconq` does at start: one URL for every client
    assert folded.redis_url == url and folded.redis_password_file is None
    assert redact(folded.redis_url) == "redis://worker:***@redis:6379/0"
    for text in ("", "two words"):
        secret.write_text(text)
        with pytest.raises(SettingsError, match="empty or holds white space"):
            require_redis_url(settings)
    with pytest.raises(SettingsError, match="cannot be read"):
        require_redis_url(settings.model_copy(update={"redis_password_file": tmp_path / "missing"}))
    with pytest.raises(SettingsError, match="one way only"):
        require_redis_url(settings.model_copy(update={"redis_url": "redis://worker:other@redis:6379/0"}))


def test_the_private_redis_needs_its_password_kept_0600_and_reused(tmp_path):
    """Nobody reaches the private Redis without the password; the password is in a 0600 file of the data
    dir, never on a command line, and a restart takes it again (the AOF's clients keep working)."""
    old = os.umask(0o022)  # whatever the caller's umask: the server's files are private
    try:
        server = PrivateRedis(tmp_path / "data")
        url = server.start()
        try:
            password = server.password_file.read_text().strip()
            assert len(password) == 64 and url == f"redis://:{password}@127.0.0.1:{server.port}/0"
            assert server.password_file.stat().st_mode & 0o777 == 0o600
            assert server.dir.stat().st_mode & 0o777 == 0o700
            assert not any(password.encode() in line for line in cmdlines())  # not in ps
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=server.port, socket_connect_timeout=2).ping()
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=server.port, password="guess", socket_connect_timeout=2).ping()
            ok = redis.Redis.from_url(url)
            ok.set("kept", "1")
            ok.close()
        finally:
            server.stop()
        again = PrivateRedis(tmp_path / "data", port=server.port)
        assert again.start() == url  # the same password: old clients, the same AOF
        try:
            assert redis.Redis.from_url(url).get("kept") == b"1"
            aof = list((again.dir / "appendonlydir").iterdir())
            assert aof, "no AOF written"
        finally:
            again.stop()
        assert private_modes(server.dir) == []  # the AOF, its folder, the log, the password file
    finally:
        os.umask(old)


def test_the_children_get_the_url_in_their_environment_only(tmp_path):
    server = PrivateRedis(tmp_path / "data")
    settings = load_settings(data_dir=tmp_path / "data", redis_url=server.url)
    env = settings_env(settings)
    assert env["RECONQ_REDIS_URL"] == server.url  # the password travels in the environment (this user's only)
    assert server.password not in redact(env["RECONQ_REDIS_URL"])


# --- TLS: what redis-py and Celery are told -----------------------------------------------------------------


def test_rediss_needs_a_ca_and_verifies_with_it(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    plain = load_settings(redis_url="rediss://worker:pw@redis.example:6380/0")
    for build in (connect, make_celery):
        with pytest.raises(SettingsError, match="RECONQ_REDIS_CA_FILE"):
            build(plain)
    with pytest.raises(SettingsError, match="not a readable file"):
        connect(plain.model_copy(update={"redis_ca_file": tmp_path / "none.pem"}))
    with pytest.raises(SettingsError, match="not rediss://"):  # a CA with a plain URL: TLS would be off
        connect(load_settings(redis_url="redis://redis:6379/0", redis_ca_file=ca))
    with pytest.raises(SettingsError, match="TLS options in the URL"):  # ?ssl_cert_reqs=none would win
        connect(plain.model_copy(update={"redis_url": "rediss://redis.example:6380/0?ssl_cert_reqs=none",
                                         "redis_ca_file": ca}))

    settings = plain.model_copy(update={"redis_ca_file": ca})
    pool = connect(settings).connection_pool
    assert pool.connection_class is redis.SSLConnection
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_ca_certs"] == str(ca)
    assert kwargs["ssl_check_hostname"] is True

    app = make_celery(settings)
    use_ssl = app.conf.broker_use_ssl
    assert use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED and use_ssl["ssl_ca_certs"] == str(ca)
    assert use_ssl["ssl_check_hostname"] is True
    assert not app.conf.result_backend  # no result backend: nothing else connects to Redis
    with app.connection_for_write() as conn:  # what kombu will connect with (nothing is connected yet)
        assert conn.transport_cls == "rediss" and conn.ssl == use_ssl
    assert not make_celery(load_settings(redis_url="redis://redis:6379/0")).conf.broker_use_ssl


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (EC P-256): its certificate and key."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=ReconQ test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=folder)
    return cert, key


def make_server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A server certificate for the name localhost (not for 127.0.0.1), signed by ``ca``."""
    cert, key, csr, ext = (folder / n for n in ("server.crt", "server.key", "server.csr", "server.ext"))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
             "-out", csr, "-subj", "/CN=localhost", cwd=folder)
    ext.write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                   "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext, cwd=folder)
    return cert, key


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """A real redis-server on TLS only (loopback): its port, the CA that signed it, and another CA."""
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("openssl") is None:
        pytest.skip("TLS test needs redis-server and the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder, "ca")
    other, _ = make_ca(folder, "other-ca")
    cert, key = make_server_cert(folder, ca)
    port = free_port()
    log = folder / "redis.log"
    proc = subprocess.Popen([exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                             str(ca[0]), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
                             "--dir", str(folder), "--logfile", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    probe = ssl.create_default_context(cafile=str(ca[0]))
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
            text = err + (log.read_text(errors="replace") if log.exists() else "")
            if "tls" in text.lower():
                pytest.skip(f"this redis-server has no TLS: {text.strip()[-200:]}")
            raise RuntimeError(f"TLS redis-server did not start: {text}")
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                    probe.wrap_socket(raw, server_hostname="localhost"):
                break
        except OSError:
            assert time.monotonic() < deadline, "TLS redis-server not reachable"
            time.sleep(0.1)
    yield port, ca[0], other
    proc.terminate()
    proc.wait(10)


def test_tls_redis_is_reached_with_its_ca_and_refused_with_another(tls_redis):
    port, ca, other = tls_redis
    good = load_settings(redis_url=f"rediss://localhost:{port}/0", redis_ca_file=ca, redis_timeout_s=5)
    wrong = good.model_copy(update={"redis_ca_file": other})

    assert connect(good).ping()
    with pytest.raises(redis.ConnectionError, match="(?i)certificate verify failed"):
        connect(wrong).ping()
    # the right CA but a name the certificate does not hold (it is for localhost, not 127.0.0.1): refused
    with pytest.raises(redis.ConnectionError, match="(?i)mismatch|match"):
        connect(good.model_copy(update={"redis_url": f"rediss://127.0.0.1:{port}/0"})).ping()

    app = make_celery(good)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        with conn.Producer() as producer:
            producer.publish({"probe": 1}, routing_key="tls-probe", declare=[], retry=False)
    assert connect(good).llen("tls-probe") == 1  # the message went over the verified connection
    with make_celery(wrong).connection_for_write() as conn, \
            pytest.raises(Exception, match="(?i)certificate verify failed"):
        conn.ensure_connection(max_retries=0)


def test_kombus_own_default_would_not_have_verified(tls_redis, caplog):
    """The finding: a Celery app on ``rediss://`` without ``broker_use_ssl`` accepts any certificate (here one
    of a CA the client does not know, for another name), which :func:`make_celery` no longer leaves so."""
    from celery import Celery

    port, _, _ = tls_redis
    with Celery("plain", broker=f"rediss://127.0.0.1:{port}/0", set_as_current=False).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)  # connected, verifying nothing
        assert conn.default_channel.client.ping()
    assert "defaulting to insecure SSL behaviour" in caplog.text


# --- compose's Redis: ACL users per role --------------------------------------------------------------------


def test_compose_gives_each_service_its_own_redis_user_and_secret():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    redis_service = services["redis"]
    assert "redis-entrypoint.sh" in " ".join(redis_service["entrypoint"])
    assert sorted(redis_service["secrets"]) == sorted(f"redis_{r}_password" for r in ROLES)
    assert {f"redis_{r}_password" for r in ROLES} <= set(compose["secrets"])  # (and the proxy's TLS files)
    assert "--user worker" in " ".join(redis_service["healthcheck"]["test"])
    for name, service in services.items():
        if name in ("redis", "proxy"):  # the TLS proxy talks to the API only, never to Redis
            assert name == "redis" or "RECONQ_REDIS_URL" not in service.get("environment", {})
            continue
        role = "worker" if name.startswith("worker") else name
        env = service["environment"]
        assert env["RECONQ_REDIS_URL"] == f"redis://{role}@redis:6379/0", name
        assert env["RECONQ_REDIS_PASSWORD_FILE"] == f"/run/secrets/redis_{role}_password", name
        assert service["secrets"] == [f"redis_{role}_password"], name
    assert "RECONQ_REDIS_URL" not in compose["x-reconq"]["environment"]  # no service falls back to no user


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, Path]]]:
    """redis-server started by compose's entrypoint script (deploy/redis-entrypoint.sh) on loopback, with a
    random secret per role; yields its port and the secret files."""
    if shutil.which("redis-server") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs redis-server and sha256sum")
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    files = {}
    for role in ROLES:
        files[role] = folder / f"redis_{role}_password"
        files[role].write_text(secrets.token_hex(32) + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(REDIS_SECRETS_DIR=str(folder), REDIS_ACL_FILE=str(tmp_path / "acl" / "users.acl"))
    (tmp_path / "redis").mkdir()
    proc = subprocess.Popen(["/bin/sh", str(ENTRYPOINT), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(tmp_path / "redis"), "--appendonly", "yes", "--save", "",
                             "--logfile", str(tmp_path / "redis" / "redis.log")],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    probe = redis.Redis(port=port, username="worker", password=files["worker"].read_text().strip(),
                        socket_connect_timeout=0.5)

    def up() -> bool:
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            assert proc.poll() is None, "redis-server (compose's entrypoint) exited"
            return False

    wait_until(up, 10, "redis-server with the ACL file")
    acl_text = (tmp_path / "acl" / "users.acl").read_text()
    assert not any(f.read_text().strip() in acl_text for f in files.values())  # hashes only
    assert (tmp_path / "acl" / "users.acl").stat().st_mode & 0o077 == 0
    yield port, files
    proc.terminate()
    proc.wait(10)


def role_client(port: int, files: dict[str, Path], role: str) -> redis.Redis:
    return redis.Redis(port=port, username=role, password=files[role].read_text().strip(), decode_responses=True,
                       socket_connect_timeout=2)


def test_compose_redis_refuses_strangers_and_keeps_each_role_to_its_rules(acl_redis):
    port, files = acl_redis
    with pytest.raises(redis.AuthenticationError):  # the default user is off
        redis.Redis(port=port, socket_connect_timeout=2).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, username="default", password="", socket_connect_timeout=2).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, username="gateway", password=files["worker"].read_text().strip()).ping()
    gateway, worker, api = (role_client(port, files, r) for r in ("gateway", "worker", "api"))
    for who in (gateway, worker):  # a stolen gateway or worker password mints no staff session
        with pytest.raises(redis.exceptions.NoPermissionError):
            who.set("reconq:session:" + "0" * 64, '{"name": "mallory"}')
        with pytest.raises(redis.exceptions.NoPermissionError):
            who.get("reconq:signin_fail:alice")
        assert who.set("reconq:job:probe", "1") and who.get("reconq:scanjobs:probe") is None
        assert who.lpush("routine", "m") and who.smembers("_kombu.binding.routine") == set()
    for who in (gateway, worker, api):
        for dangerous in (lambda c: c.flushall(), lambda c: c.flushdb(), lambda c: c.keys("*"),
                          lambda c: c.config_get("requirepass"), lambda c: c.execute_command("LASTSAVE"),
                          lambda c: c.execute_command("ACL", "LIST"), lambda c: c.set("elsewhere", "1")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                dangerous(who)
    assert api.set("reconq:session:" + "1" * 64, "x") and api.get("reconq:signin_fail:alice") is None
    assert worker.info("server")["redis_version"]  # its heartbeat reads the server's uptime
    assert worker.brpop(["routine"], timeout=0.01) == ("routine", "m")
    for producer in (gateway, api):  # they only produce: no blocking reads, no INFO
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.brpop(["routine"], timeout=0.01)
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.info()


def test_a_scan_retrieval_staff_actions_and_sign_in_run_under_the_role_users(acl_redis, tmp_path, caplog):
    """The gateway, a worker process and the API each on its own ACL user (URL with the user, password from
    its secret file): a scan is reconstructed, retrieved and downloaded, a retro-recon runs, a queued job is
    cancelled (a revoke on Celery's pidbox), staff sign in. No role hits a rule it lacks (NOPERM)."""
    from reconq.services import make_api, make_gateway

    port, files = acl_redis

    def role(name: str, **extra: object) -> Settings:
        return load_settings(data_dir=tmp_path / "data", redis_url=f"redis://{name}@127.0.0.1:{port}/0",
                             redis_password_file=files[name], mrd_port=0, min_free_bytes=0, retrieve_wait_s=90.0,
                             retrieve_poll_s=0.2, **extra)

    gw = make_gateway(role("gateway"))  # records the data root's id (the worker and API wait for it)
    host, mrd_port = gw.start()
    log_path = tmp_path / "worker.log"
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    worker_env.update(settings_env(role("worker")))
    assert worker_env["RECONQ_REDIS_URL"] == f"redis://worker@127.0.0.1:{port}/0"  # its password: from the file
    assert worker_env["RECONQ_REDIS_PASSWORD_FILE"] == str(files["worker"])
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "reconq.cli", "worker", "--concurrency", "1"],
                                  env=worker_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: b"ready." in log_path.read_bytes() or worker.poll() is not None, 90, "the worker")
        assert worker.poll() is None, log_path.read_text(errors="replace")
        api_settings = with_redis_credentials(role("api", staff_tokens={"robot": hash_token(TOKEN)},
                                                   staff_passwords={"alice": hash_password(PASSWORD)}))
        api = TestClient(make_api(api_settings))

        scan = synthetic_scan(matrix=(32, 32), ncoil=2, protocol="acl_t1", patient_id="ACL0001")
        reply = client.send_scan(host, mrd_port, scan.header, scan.acquisitions, config="cartesian")
        job_id = reply.job_id()
        assert reply.closed and job_id is not None and not reply.errors(), reply.texts

        def state(jid: str) -> str:
            page = api.get("/api/jobs", params={"limit": 50}, headers=STAFF).json()["jobs"]
            return next((j["state"] for j in page if j["id"] == jid), "")

        wait_until(lambda: state(job_id) in ("done", "failed"), 120, "the job", poll=0.3)
        assert state(job_id) == "done", api.get(f"/api/jobs/{job_id}", headers=STAFF).json()
        assert api.get(f"/api/jobs/{job_id}", headers=STAFF).json()["image_count"] > 0
        assert api.get(f"/api/jobs/{job_id}/images", headers=STAFF).status_code == 200
        back = client.retrieve(host, mrd_port, scan.header)
        assert back.closed and back.images and not back.errors(), back.texts

        scan_id = job_id.removesuffix("-j1")
        retro = api.post(f"/api/scans/{scan_id}/jobs", json={"pipeline": "cartesian"}, headers=STAFF)
        assert retro.status_code in (200, 201), retro.text
        retro_id = retro.json()["id"]
        wait_until(lambda: state(retro_id) in ("done", "failed"), 120, "the retro-recon", poll=0.3)
        assert state(retro_id) == "done"
        for path in ("/api/jobs", "/api/exams", "/api/queues", "/api/gpus", "/api/retrievals", "/metrics"):
            assert api.get(path, headers=STAFF).status_code == 200, path

        stop_process(worker)  # no worker: the next job stays queued, and is cancelled (revoked)
        queued = api.post(f"/api/scans/{scan_id}/jobs", json={"pipeline": "cartesian"}, headers=STAFF).json()["id"]
        cancel = api.post(f"/api/jobs/{queued}/cancel", headers=STAFF)
        assert cancel.status_code == 200 and state(queued) == "cancelled", cancel.text

        signed = TestClient(make_api(api_settings))
        assert signed.post("/api/auth/signin", json={"name": "alice", "password": PASSWORD}).status_code == 200
        assert signed.get("/api/jobs").status_code == 200  # the session, in Redis, read back
        events = role_client(port, files, "api").pubsub()
        events.subscribe("reconq:events")  # the dashboard's live view
        assert events.get_message(timeout=2)["type"] == "subscribe"
        events.close()
    finally:
        if worker.poll() is None:
            stop_process(worker)
        gw.stop()
    for who, text in (("worker", log_path.read_text(errors="replace")), ("gateway and API", caplog.text)):
        assert "NOPERM" not in text and "no permissions" not in text.lower(), (who, text[-3000:])
        assert not any(f.read_text().strip() in text for f in files.values()), f"a password in the {who} log"


# --- files on disk: 0600 / 0700 -----------------------------------------------------------------------------


def test_up_keeps_every_file_private_and_prints_no_password(tmp_path):
    """``reconq up`` (umask 077 from its start, inherited by every child and by the private Redis): after a
    scan is stored, reconstructed and retrieved, nothing under the data dir is readable by group or others,
    the AOF included; the banner shows the URL masked; no process has the password on its command line."""
    mrd_port, http = free_port(), free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(RECONQ_DATA_DIR=str(data), RECONQ_MRD_PORT=str(mrd_port), RECONQ_HTTP_PORT=str(http),
               RECONQ_MIN_FREE_BYTES="0")
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        up = subprocess.Popen([sys.executable, "-m", "reconq.cli", "up"], env=env, cwd=ROOT, stdout=sink,
                              stderr=subprocess.STDOUT, umask=0o022)  # as a shell would start it
    try:
        banner = wait_until(lambda: next((line for line in out.read_text(errors="replace").splitlines()
                                          if "ReconQ up" in line), None) or (up.poll() is not None and "exited"),
                            90, "reconq up")
        assert banner != "exited", out.read_text(errors="replace")
        password = (data / "redis" / "password").read_text().strip()
        assert "Redis redis://:***@127.0.0.1:" in banner
        assert not any(password.encode() in line for line in cmdlines())

        scan = synthetic_scan(matrix=(32, 32), ncoil=2, protocol="modes_t1", patient_id="MODES01")
        reply = client.send_scan("127.0.0.1", mrd_port, scan.header, scan.acquisitions, config="cartesian")
        job_id = reply.job_id()
        assert job_id is not None, reply.texts
        back = client.retrieve("127.0.0.1", mrd_port, scan.header)  # waits for the job
        assert back.closed and back.images, back.texts
        redis_port = int(re.search(r"redis://:\*\*\*@127\.0\.0\.1:(\d+)/", banner).group(1))
        store = redis.Redis(port=redis_port, password=password, decode_responses=True)
        job = Job.from_redis(store.hgetall("reconq:job:" + job_id))
        assert job.state.value == "done" and result_file(ScanStore(data), job).is_file()  # where it was derived
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, out.read_text(errors="replace")
    assert password not in out.read_text(errors="replace")  # nor in any log line
    aof = list((data / "redis" / "appendonlydir").iterdir())
    assert aof and all(f.stat().st_mode & 0o077 == 0 for f in aof)
    assert any(p.name == "raw.h5" for p in data.rglob("*")) and any(p.suffix == ".h5" and "results" in p.parts
                                                                     for p in data.rglob("*"))
    # the data root's id file is 0644 by design (core/dataroot.py: an id, no patient data), in a 0700 folder
    assert private_modes(data, allowed=frozenset({ROOT_FILE})) == []
    assert data.stat().st_mode & 0o777 == 0o700
