"""The HTTP API's defences (issue 16), each finding reproduced and now refused, on a real Redis and, where the
transport matters (streamed bodies, TLS, the browser's CSP), a real uvicorn on loopback:

- sign-in limits taken before the password check (parallel guesses), per address for tokens, a stranger
  unable to lock a user out from elsewhere, a dummy check for unknown names;
- sessions bound to their credential: forged, copied, removed-staff and changed-password sessions refused;
  the idle timeout and the absolute lifetime;
- body-size limits (413 before the body is read, memory flat), security headers, ``no-store``, trusted
  hosts, ``/docs`` off in production, TLS (HSTS, ``Secure`` cookies), roles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ismrmrd
import numpy as np
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from reconq.api import auth as staff_auth
from reconq.api.app import uvicorn_options
from reconq.api.auth import ACTION_HEADER, SECRET_FILE, SESSION_COOKIE, hash_password, hash_token, session_key
from reconq.core.jobs import Job, JobStore
from reconq.core.redisconn import free_port
from reconq.core.results import result_file, write_images
from reconq.core.settings import Settings, SettingsError
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.simulate import synthetic_scan
from reconq.services import make_api

PASSWORD = "correct horse battery staple"
#: Test hashes at scrypt N=2^14 (fast; old hashes keep verifying: the parameters are in the hash string) ...
ALICE = hash_password(PASSWORD, n=2**14)
BOB = hash_password("bob's own long password", n=2**14)
BOB_NEW = hash_password("bob's new long password", n=2**14)
VIEWER_TOKEN, TECH_TOKEN, ADMIN_TOKEN = "viewer-token-0123456789", "tech-token-0123456789", "admin-token-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def staff_settings(settings: Settings, **changes: object) -> Settings:
    """alice (old form: admin) and bob (a technologist) by password; three tokens, one per role."""
    return settings.model_copy(update={
        "staff_passwords": {"alice": ALICE, "bob": {"hash": BOB, "role": "technologist"}},
        "staff_tokens": {"vera": {"hash": hash_token(VIEWER_TOKEN), "role": "viewer"},
                         "tom": {"hash": hash_token(TECH_TOKEN), "role": "technologist"},
                         "ada": hash_token(ADMIN_TOKEN)},
        **changes})


def app_of(settings: Settings):
    return make_api(settings, redis.Redis.from_url(settings.redis_url or "", decode_responses=True))


def client_of(settings: Settings, address: str = "10.0.0.1") -> TestClient:
    return TestClient(app_of(settings), client=(address, 50000))


def sign_in(client: TestClient, name: str = "alice", password: str = PASSWORD) -> httpx.Response:
    return client.post("/api/auth/signin", json={"name": name, "password": password})


# --- sign-in limits ------------------------------------------------------------------------------------------


def test_parallel_wrong_passwords_are_refused_before_the_check_past_the_limit(settings):
    """40 wrong guesses at once: at most the limit of them get their password checked (401); the others are
    refused before (429), and the count is taken before, not after, the slow check."""
    limit = 5
    app = app_of(staff_settings(settings, signin_max_per_name=limit, signin_max_per_address=1000))
    clients = [TestClient(app, client=("10.0.0.9", 40000 + i)) for i in range(40)]
    barrier = threading.Barrier(len(clients))
    answers: list[tuple[int, float]] = []

    def guess(client: TestClient, i: int) -> None:
        barrier.wait()
        t0 = time.monotonic()
        r = client.post("/api/auth/signin", json={"name": "alice", "password": f"guess {i}"})
        answers.append((r.status_code, time.monotonic() - t0))

    threads = [threading.Thread(target=guess, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(code for code, _ in answers)
    assert codes == [401] * limit + [429] * (40 - limit), codes
    # the right password from that address waits for the window too; from another address it signs in
    assert sign_in(clients[0]).status_code == 429
    other = TestClient(app, client=("10.0.0.10", 50000))
    assert sign_in(other).status_code == 200


def test_the_refusal_says_when_to_try_again(settings):
    client = client_of(staff_settings(settings, signin_max_per_name=2, signin_window_s=30))
    for _ in range(2):
        assert sign_in(client, password="wrong").status_code == 401
    r = sign_in(client)
    assert r.status_code == 429 and "too many failed sign-ins as this name from this address" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 30


def test_token_guesses_cannot_escape_the_limit_by_changing_the_name(settings):
    """Before: a token guess counted under whatever name came with it. Now tokens count per address."""
    client = client_of(staff_settings(settings, signin_max_per_address=5, signin_max_per_name=100))
    codes = [client.post("/api/auth/signin", json={"name": f"n{i}", "password": "x", "token": f"guess-{i}"}
                         ).status_code for i in range(8)]
    assert codes == [401] * 5 + [429] * 3
    assert client.post("/api/auth/signin", json={"token": "another-guess"}).status_code == 429
    # bearer tokens count against the same address
    assert client.get("/api/jobs", headers=bearer("guess")).status_code == 429
    assert client_of(staff_settings(settings), "10.0.0.2").get("/api/jobs", headers=bearer(ADMIN_TOKEN)
                                                                ).status_code == 200


def test_wrong_bearer_tokens_are_limited_per_address(settings):
    client = client_of(staff_settings(settings, signin_max_per_address=3))
    assert [client.get("/api/jobs", headers=bearer(f"guess-{i}")).status_code for i in range(5)] == \
        [401, 401, 401, 429, 429]


def test_a_stranger_cannot_lock_a_user_out_from_elsewhere(settings):
    """The per-name limit counts per (name, address); the global per-name limit, once reached by guesses from
    many addresses, still lets the name sign in from an address it signed in from before."""
    s = staff_settings(settings, signin_max_per_name=2, signin_max_per_name_global=4, signin_max_per_address=100)
    app = app_of(s)
    home = TestClient(app, client=("10.1.0.1", 50000))
    assert sign_in(home).status_code == 200  # alice's workstation: a known address from now on
    for i in range(2):  # strangers: two addresses, two guesses each
        stranger = TestClient(app, client=(f"10.9.0.{i}", 50000))
        assert [sign_in(stranger, password="guess").status_code for _ in range(3)] == [401, 401, 429]
    new_place = TestClient(app, client=("10.9.1.1", 50000))
    r = sign_in(new_place)
    assert r.status_code == 429 and r.json()["detail"].startswith("too many failed sign-ins as this name;")
    assert sign_in(home).status_code == 200  # the user is not locked out


def test_a_successful_sign_in_gives_back_its_attempt(settings):
    client = client_of(staff_settings(settings, signin_max_per_name=3))
    for _ in range(10):  # signing in again and again never reaches the limit
        assert sign_in(client).status_code == 200
    assert sign_in(client, password="typo").status_code == 401
    assert sign_in(client).status_code == 200


def test_unknown_names_take_as_long_as_known_ones(settings):
    """A dummy scrypt check at today's parameters for a name that is not configured: the time of a refusal
    does not tell which names exist."""
    strong = settings.model_copy(update={"staff_passwords": {"carol": hash_password(PASSWORD)},
                                         "signin_max_per_name": 100, "signin_max_per_address": 100})
    client = client_of(strong)

    def took(name: str) -> float:
        t0 = time.perf_counter()
        assert sign_in(client, name, "not the password").status_code == 401
        return time.perf_counter() - t0

    known = statistics.median(took("carol") for _ in range(3))
    unknown = statistics.median(took(f"nobody{i}") for i in range(3))
    assert unknown > 0.4 * known and known > 0.4 * unknown, (known, unknown)  # before: unknown names took ~1 %


def test_password_hashes_use_owasp_parameters_and_old_ones_still_verify(settings):
    stored = hash_password(PASSWORD)
    assert stored.startswith(f"scrypt${2**17}$8$1$")
    assert staff_auth.verify_secret(PASSWORD, stored) and not staff_auth.verify_secret("other", stored)
    assert staff_auth.verify_secret(PASSWORD, ALICE)  # N=2^14, as hashes were made before
    assert sign_in(client_of(staff_settings(settings))).status_code == 200
    # a hash naming an absurd cost is refused, not computed
    assert not staff_auth.verify_secret(PASSWORD, f"scrypt${2**30}${ALICE.split('$', 2)[2]}")


def test_the_hash_tool_refuses_short_passwords(monkeypatch, capsys):
    answers = iter(["short pw", "short pw"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert staff_auth.main([]) == 1
    out = capsys.readouterr().out
    assert "at least 12 characters" in out and "too short" in out
    answers = iter([PASSWORD, PASSWORD])
    assert staff_auth.main([]) == 0
    assert "scrypt$131072$8$1$" in capsys.readouterr().out


# --- sessions ------------------------------------------------------------------------------------------------


def test_a_session_written_into_redis_is_refused(settings):
    """Whoever can write Redis could mint a staff session (``reconq:session:<sha256>`` = name). Now a session
    needs a fingerprint made with a secret Redis does not hold."""
    client = client_of(staff_settings(settings))
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    for forged in ("alice", json.dumps({"name": "alice", "kind": "password", "fp": "0" * 64, "started": time.time()})):
        token = f"forged-{hashlib.sha1(forged.encode()).hexdigest()}"
        r.set(session_key(token), forged, ex=3600)
        client.cookies.set(SESSION_COOKIE, token)
        assert client.get("/api/jobs").status_code == 401
        assert client.get("/api/jobs", headers=bearer(token)).status_code == 401
        assert client.get("/api/auth/me").json()["staff"] is False
        assert not r.exists(session_key(token))  # deleted at first sight
        client.cookies.clear()


def test_a_session_copied_to_another_key_is_refused(settings):
    client = client_of(staff_settings(settings))
    assert sign_in(client).status_code == 200
    real = client.cookies[SESSION_COOKIE]
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    r.set(session_key("attacker-chosen"), r.get(session_key(real)), ex=3600)
    thief = client_of(staff_settings(settings), "10.6.6.6")
    thief.cookies.set(SESSION_COOKIE, "attacker-chosen")
    assert thief.get("/api/jobs").status_code == 401
    assert client.get("/api/jobs").status_code == 200  # the real one still works


def test_removed_staff_and_changed_passwords_are_signed_out_at_their_next_request(settings):
    before = staff_settings(settings)
    client = client_of(before)
    assert sign_in(client, "bob", "bob's own long password").status_code == 200
    cookie = client.cookies[SESSION_COOKIE]
    assert client.get("/api/jobs").status_code == 200

    restarted = client_of(before)  # the same configuration, restarted: the session goes on
    restarted.cookies.set(SESSION_COOKIE, cookie)
    assert restarted.get("/api/auth/me").json()["name"] == "bob"

    changed = client_of(before.model_copy(update={"staff_passwords": {"alice": ALICE, "bob": BOB_NEW}}))
    changed.cookies.set(SESSION_COOKIE, cookie)
    assert changed.get("/api/jobs").status_code == 401  # password changed: signed out

    assert sign_in(client, "bob", "bob's own long password").status_code == 200
    cookie = client.cookies[SESSION_COOKIE]
    removed = client_of(before.model_copy(update={"staff_passwords": {"alice": ALICE}}))
    removed.cookies.set(SESSION_COOKIE, cookie)
    assert removed.get("/api/jobs").status_code == 401
    assert removed.get("/api/auth/me").json() == {"name": "", "staff": False, "role": None, "public_read": False}
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    assert not r.exists(session_key(cookie))


def test_an_idle_session_ends_and_each_request_refreshes_it(settings):
    client = client_of(staff_settings(settings, session_idle_s=3))  # model_copy: below the setting's minimum
    assert sign_in(client).status_code == 200
    for _ in range(4):  # used every second for 4 s: still signed in
        time.sleep(1.0)
        assert client.get("/api/jobs").status_code == 200
    time.sleep(4.0)
    assert client.get("/api/jobs").status_code == 401


def test_no_session_outlives_its_lifetime(settings):
    client = client_of(staff_settings(settings, session_ttl_s=4, session_idle_s=60))
    t0 = time.monotonic()
    assert sign_in(client).status_code == 200
    while time.monotonic() < t0 + 2.0:  # in use all along
        assert client.get("/api/jobs").status_code == 200
        time.sleep(0.3)
    time.sleep(max(0.0, t0 + 4.5 - time.monotonic()))
    assert client.get("/api/jobs").status_code == 401


def test_the_server_secret_is_a_private_file_kept_across_restarts(settings):
    client_of(staff_settings(settings))
    path = Path(settings.data_dir) / SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    secret = path.read_bytes()
    client_of(staff_settings(settings))
    assert path.read_bytes() == secret and len(bytes.fromhex(secret.decode().strip())) == 32
    r = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    assert not any(secret.decode().strip() in (r.get(k) or "") for k in r.scan_iter(type="string"))


# --- roles ---------------------------------------------------------------------------------------------------


def failed_job(store: JobStore, job_id: str) -> None:
    store.create(Job(id=job_id, scan_id="s", pipeline="cartesian", state=JobState.FAILED, error="boom",
                     patient_id="PAT777"))


def test_a_viewer_reads_but_does_not_act(settings, store):
    client = client_of(staff_settings(settings))
    failed_job(store, "rv1")
    assert client.get("/api/jobs", headers=bearer(VIEWER_TOKEN)).json()["jobs"][0]["patient"] == "PAT777"
    assert client.get("/api/jobs/rv1/images", headers=bearer(VIEWER_TOKEN)).status_code == 409  # allowed; none yet
    for path, body in [("/api/jobs/rv1/retry", None), ("/api/jobs/rv1/cancel", None),
                       ("/api/jobs/rv1/priority", {"queue": "stat"}), ("/api/scans/s/jobs", {"pipeline": "cartesian"}),
                       ("/api/retro", {"scan_ids": ["s"], "pipeline": "cartesian"})]:
        r = client.post(path, json=body, headers=bearer(VIEWER_TOKEN))
        assert r.status_code == 403 and "vera has the role viewer; this needs the role technologist" in \
            r.json()["detail"], path
    assert store.get("rv1").state is JobState.FAILED and store.actions("rv1") == []


def test_a_technologist_and_an_admin_act(settings, store):
    client = client_of(staff_settings(settings))
    for token, job_id, who in ((TECH_TOKEN, "rt1", "tom"), (ADMIN_TOKEN, "ra1", "ada")):
        failed_job(store, job_id)
        r = client.post(f"/api/jobs/{job_id}/retry", headers=bearer(token))
        assert r.status_code == 200 and r.json()["state"] == "queued"
        assert client.post(f"/api/jobs/{job_id}/cancel", headers=bearer(token)).json()["state"] == "cancelled"
        assert [a["who"] for a in store.actions(job_id)] == [who, who]


def test_roles_come_with_password_sessions_too(settings, store):
    """bob is a technologist (the long form); alice is in the old form: full rights, as before."""
    failed_job(store, "rp1")
    bob = client_of(staff_settings(settings))
    assert sign_in(bob, "bob", "bob's own long password").status_code == 200
    assert bob.post("/api/jobs/rp1/retry", headers={ACTION_HEADER: "1"}).status_code == 200
    viewer = client_of(staff_settings(settings, staff_passwords={"alice": {"hash": ALICE, "role": "viewer"}}))
    assert sign_in(viewer).status_code == 200
    failed_job(store, "rp2")
    r = viewer.post("/api/jobs/rp2/retry", headers={ACTION_HEADER: "1"})
    assert r.status_code == 403 and "alice has the role viewer" in r.json()["detail"]


def test_role_order_and_refused_entries(settings):
    admin = staff_auth.Principal("a", staff=True, via="bearer", role="admin")
    viewer = staff_auth.Principal("v", staff=True, via="bearer", role="viewer")
    assert admin.may("viewer") and admin.may("technologist") and admin.may("admin")
    assert viewer.may("viewer") and not viewer.may("technologist")
    assert not staff_auth.ANONYMOUS.may("viewer")
    with pytest.raises(SettingsError, match="the role of 'x' is 'root'"):
        app_of(settings.model_copy(update={"staff_tokens": {"x": {"hash": hash_token(ADMIN_TOKEN), "role": "root"}}}))
    with pytest.raises(SettingsError, match="must be a hash or"):
        app_of(settings.model_copy(update={"staff_tokens": {"x": {"role": "admin"}}}))


# --- body sizes ----------------------------------------------------------------------------------------------


def test_a_large_sign_in_body_gets_413(settings):
    client = client_of(staff_settings(settings))
    big = json.dumps({"name": "alice", "password": "x" * (100 << 10)})
    r = client.post("/api/auth/signin", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than the 65536 bytes" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"name": "alice", "password": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    r = client.post("/api/auth/signin", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    r = client.post("/api/retro", content=b"[" + b"1," * (600 << 10) + b"1]", headers={
        **bearer(ADMIN_TOKEN), "Content-Type": "application/json"})
    assert r.status_code == 413 and "1048576 bytes" in r.json()["detail"]


class LiveApi:
    """The API on uvicorn in a thread on a free loopback port, with the options ``reconq api`` uses."""

    def __init__(self, settings: Settings) -> None:
        app = app_of(settings)
        self.port = free_port()
        self.tls = settings.tls_cert is not None
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1, **uvicorn_options(settings)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveApi:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def read_http_reply(sock: socket.socket) -> bytes:
    """One HTTP reply: its head, then as many body bytes as its Content-Length says (or to EOF)."""
    reply = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
        reply = head + b"\r\n\r\n" + body
    return reply


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_streamed_200_mib_sign_in_is_stopped_at_the_limit_and_memory_stays_flat(settings):
    """Before: a 200 MiB POST to the public sign-in route cost 520 MiB. Now a chunked body is refused (413)
    once it passes 64 KiB, while the client is still sending, and the server's memory does not grow."""
    with LiveApi(staff_settings(settings)) as api, \
            socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        rss0 = rss_bytes()
        sock.sendall(b"POST /api/auth/signin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"x" * (64 << 10))
        sent, answered = 0, False
        while sent < 200 << 20:
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection after answering
                answered = True
                break
            sent += 64 << 10
        reply = read_http_reply(sock)  # its head and body may come in separate segments
        grew = rss_bytes() - rss0
    assert answered and reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 32 << 20, f"the client could send {sent >> 20} MiB before the answer"
    assert grew < 48 << 20, f"the server grew by {grew >> 20} MiB"
    assert b"larger than the 65536 bytes allowed here" in reply


def test_a_declared_200_mib_body_is_refused_before_it_is_sent(settings):
    with LiveApi(staff_settings(settings)) as api, socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(b"POST /api/auth/signin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (200 << 20))
        assert s.recv(65536).startswith(b"HTTP/1.1 413")


# --- headers, hosts, docs ------------------------------------------------------------------------------------


def done_job_with_images(settings: Settings, store: JobStore, job_id: str = "h1") -> None:
    scans = ScanStore(settings.data_dir)
    path = result_file(scans, Job(id=job_id, scan_id="hs", pipeline="cartesian", attempts=1))  # where workers write
    scan = synthetic_scan(matrix=(16, 16), ncoil=2, nslices=1, protocol="t1", patient_id="PAT12345")
    image = ismrmrd.Image.from_array(np.arange(256, dtype=np.uint16).reshape(16, 16))
    image.image_index, image.image_series_index, image.slice = 1, 1, 0
    image.field_of_view = (220.0, 220.0, 5.0)
    image.read_dir, image.phase_dir, image.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    write_images(path, [image], ismrmrd.xsd.ToXML(scan.header))
    store.create(Job(id=job_id, scan_id="hs", pipeline="cartesian", protocol="t1"))
    store.set_state(job_id, JobState.RUNNING, attempts=1)
    store.set_state(job_id, JobState.DONE, result_path=scans.stored(path))


def test_security_headers_and_no_store_on_every_answer_with_patient_data(settings, store):
    client = client_of(staff_settings(settings))
    done_job_with_images(settings, store)
    for path in ("/", "/jobs/h1", "/api/jobs", "/api/jobs/h1", "/api/jobs/h1/previews/0.png", "/api/jobs/h1/images",
                 "/api/jobs/h1/dicom", "/api/exams", "/api/health", "/api/jobs/nope", "/metrics"):
        r = client.get(path, headers=bearer(ADMIN_TOKEN))
        assert r.status_code in (200, 404), (path, r.status_code)
        h = r.headers
        assert h["content-security-policy"].startswith("default-src 'self'"), path
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer", path
        assert h["cache-control"] == "no-store", (path, h.get("cache-control"))  # previews too
        assert "strict-transport-security" not in h  # plain HTTP: no HSTS
    css = client.get("/static/app.css")
    assert css.headers["x-content-type-options"] == "nosniff" and "no-store" not in css.headers.get("cache-control", "")
    refused = client.post("/api/auth/signin", json={"name": "x", "password": "y"})
    assert refused.status_code == 401 and refused.headers["cache-control"] == "no-store"


def test_behind_a_tls_proxy_hsts_and_secure_cookies(settings):
    client = client_of(staff_settings(settings, behind_tls_proxy=True))
    r = sign_in(client)
    assert r.headers["strict-transport-security"].startswith("max-age=")
    assert "Secure" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    plain = sign_in(client_of(staff_settings(settings)))
    assert "Secure" not in plain.headers["set-cookie"]


def test_an_untrusted_host_is_refused(settings):
    client = client_of(staff_settings(settings, allowed_hosts=["reconq.hospital.example", "*.radiology.example"]))
    for host in ("evil.example", "reconq.hospital.example.evil.example", "radiology.example"):
        r = client.get("/api/health", headers={"Host": host})
        assert r.status_code == 400 and "is not one this server answers to" in r.json()["detail"], host
        assert r.headers["x-content-type-options"] == "nosniff"
    for host in ("reconq.hospital.example", "RECONQ.hospital.example:9443", "mri.radiology.example", "localhost:9080",
                 "127.0.0.1", "[::1]:9080"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    default = client_of(staff_settings(settings))  # only http_host and the loopback names
    assert default.get("/api/health", headers={"Host": "reconq.hospital.example"}).status_code == 400


def test_docs_are_off_in_production_and_the_schema_needs_sign_in(settings):
    client = client_of(staff_settings(settings))
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 401
    assert "/api/jobs" in client.get("/openapi.json", headers=bearer(VIEWER_TOKEN)).json()["paths"]
    dev = client_of(staff_settings(settings, environment="development"))
    page = dev.get("/docs")
    csp = page.headers["content-security-policy"]
    assert page.status_code == 200 and "'sha256-" in csp and "unsafe-inline" not in csp


# --- TLS -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_settings_that_cannot_work_are_refused(settings, cert_pair, tmp_path):
    cert, key = cert_pair
    with pytest.raises(SettingsError, match="RECONQ_TLS_CERT is set but RECONQ_TLS_KEY is not"):
        app_of(staff_settings(settings, tls_cert=cert))
    with pytest.raises(SettingsError, match="RECONQ_TLS_KEY is set but RECONQ_TLS_CERT is not"):
        uvicorn_options(staff_settings(settings, tls_key=key))
    with pytest.raises(SettingsError, match="cannot be read"):
        app_of(staff_settings(settings, tls_cert=cert, tls_key=tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="are not a PEM certificate and its"):
        app_of(staff_settings(settings, tls_cert=cert, tls_key=cert))
    options = uvicorn_options(staff_settings(settings, tls_cert=cert, tls_key=key))
    assert options["ssl_certfile"] == str(cert) and options["ssl_keyfile"] == str(key)


def test_the_api_serves_https_with_hsts_and_secure_cookies(settings, cert_pair):
    cert, key = cert_pair
    context = ssl.create_default_context(cafile=str(cert))
    with LiveApi(staff_settings(settings, tls_cert=cert, tls_key=key)) as api, \
            httpx.Client(base_url=api.url, verify=context) as client:
        r = client.post("/api/auth/signin", json={"name": "alice", "password": PASSWORD})
        assert r.status_code == 200
        assert r.headers["strict-transport-security"] == "max-age=31536000"
        assert "Secure" in r.headers["set-cookie"]
        assert client.get("/api/jobs").status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{api.port}/api/health", timeout=5)


# --- the dashboard under its Content-Security-Policy ---------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def test_the_dashboard_pages_break_no_rule_of_the_csp(settings, store):
    """The pages load scripts and styles from /static only; no inline style or script is refused."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    done_job_with_images(settings, store, "csp1")
    profile = tempfile.mkdtemp(prefix="reconq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        with LiveApi(staff_settings(settings, dashboard_public_read=True)) as api:
            for page, ready in (("/#jobs", "document.querySelectorAll('.fill[data-pct]').length > 0"),
                                ("/jobs/csp1", "document.getElementById('state').textContent.trim() !== ''")):
                driver.get(api.url + page)
                deadline = time.monotonic() + 20
                while not driver.execute_script(f"return {ready}"):
                    assert time.monotonic() < deadline, f"{page} did not render"
                    time.sleep(0.1)
                widths = driver.execute_script(
                    "return [...document.querySelectorAll('.fill[data-pct]')].map((f) => f.style.width)")
                assert all(w.endswith("%") for w in widths), widths
                refused = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
                assert refused == [], refused
            driver.get("about:blank")  # the event stream closed before the server stops
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
