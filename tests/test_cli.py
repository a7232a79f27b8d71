"""The README's promise: `reconq demo` runs the whole flow; `reconq send`/`retrieve`/`jobs` against `up`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import ismrmrd

from reconq.core.redisconn import free_port
from reconq.gateway import client as mrd
from reconq.gateway import protocol as p
from reconq.recon.simulate import synthetic_scan, write_mrd

ROOT = Path(__file__).resolve().parents[1]


def reconq(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconq.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(extra)
    return env


def test_demo_runs_the_whole_flow(tmp_path):
    run = reconq("demo", "--out", str(tmp_path / "demo"), env=clean_env())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "demo OK" in run.stdout
    images = tmp_path / "demo" / "images.h5"
    with ismrmrd.Dataset(str(images), "dataset", create_if_needed=False, mode="r") as dset:
        assert dset.number_of_images("image_1") == 3
    assert len(list((tmp_path / "demo" / "png").glob("*.png"))) == 3


def test_up_send_retrieve_jobs(tmp_path):
    mrd_port, http = free_port(), free_port()
    env = clean_env(RECONQ_DATA_DIR=str(tmp_path / "data"), RECONQ_MRD_PORT=str(mrd_port),
                    RECONQ_HTTP_PORT=str(http), RECONQ_MIN_FREE_BYTES="0")
    up = subprocess.Popen([sys.executable, "-m", "reconq.cli", "up"], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "ReconQ up" not in line and time.monotonic() < deadline:
            line = up.stdout.readline()
        assert "ReconQ up" in line, line
        shown = line.split("Redis ")[1].split(",")[0]  # the private Redis, its password masked
        assert shown.startswith("redis://:***@127.0.0.1:"), line
        password_file = tmp_path / "data" / "redis" / "password"  # clients take its password from the file
        assert password_file.read_text().strip() not in line
        redis_url = shown.replace(":***@", "")
        # a scan streams into the first stack while a second `up` and a second `gateway` are refused
        streaming = synthetic_scan(matrix=(32, 32), ncoil=2, protocol="cli_streaming")
        halfway, refusals_done = threading.Event(), threading.Event()

        def acquisitions() -> Iterator[bytes]:
            for i, acq in enumerate(streaming.acquisitions):
                if i == len(streaming.acquisitions) // 2:
                    halfway.set()
                    refusals_done.wait(120)
                yield p.write_acquisition(acq)

        replies: list[mrd.Reply] = []
        sender = threading.Thread(target=lambda: replies.append(mrd.stream_session(
            "127.0.0.1", mrd_port, mrd.opening("cartesian", streaming.header), acquisitions())))
        sender.start()
        assert halfway.wait(60)
        try:
            for second in ("up", "gateway"):  # one stack per data dir: refused at once, the first one untouched
                refused = reconq(second, env=env)
                assert refused.returncode == 2, refused.stdout + refused.stderr
                assert "is in use by `reconq up`" in refused.stderr and f"pid {up.pid}" in refused.stderr
        finally:
            refusals_done.set()
            sender.join(60)
        (streamed,) = replies
        assert streamed.job_id() is not None, streamed.texts  # stored complete and queued by the first stack
        raw = write_mrd(synthetic_scan(matrix=(32, 32), ncoil=2, protocol="cli_t1"), tmp_path / "raw.h5")
        client_env = clean_env(RECONQ_MRD_PORT=str(mrd_port), RECONQ_REDIS_URL=redis_url,
                               RECONQ_REDIS_PASSWORD_FILE=str(password_file))
        # the README's "Running it" in a second shell: nothing set but the same data dir; `up`'s connection
        # file (0600, its Redis URL with the password) gives the Redis and the MRD port
        connection = tmp_path / "data" / "reconq-up.json"
        assert connection.stat().st_mode & 0o777 == 0o600
        second_shell = clean_env(RECONQ_DATA_DIR=str(tmp_path / "data"))
        sent = reconq("send", str(raw), "--config", "cartesian", env=second_shell)
        assert sent.returncode == 0 and sent.stdout.startswith("INF job "), sent.stdout + sent.stderr
        got = reconq("retrieve", "--from-file", str(raw), "--out", str(tmp_path / "img.h5"), env=second_shell)
        assert got.returncode == 0, got.stdout + got.stderr
        assert "1 images written" in got.stdout
        jobs = reconq("jobs", env=second_shell)
        assert jobs.returncode == 0 and " done " in jobs.stdout and "cli_t1" in jobs.stdout, jobs.stderr
        jobs = reconq("jobs", env=client_env)  # an explicit RECONQ_REDIS_URL still works
        assert jobs.returncode == 0 and "cli_t1" in jobs.stdout, jobs.stderr
        scan_id = sent.stdout.split()[2].removesuffix("-j1")
        admin_env = dict(client_env, RECONQ_DATA_DIR=str(tmp_path / "data"))
        retro = reconq("retro", scan_id, "--pipeline", "cartesian", "--params", '{"series_index": 2}',
                       env=admin_env)
        assert retro.returncode == 0 and retro.stdout.startswith(f"job {scan_id}-j2 queued on bulk"), retro.stderr
        refused = reconq("retro", scan_id, "--pipeline", "nope", env=admin_env)
        assert refused.returncode == 1 and "unknown pipeline 'nope'" in refused.stderr
        deadline = time.monotonic() + 60
        while " done " not in (listing := reconq("jobs", "--state", "done", env=client_env).stdout) \
                or f"{scan_id}-j2" not in listing or streamed.job_id() not in listing:
            assert time.monotonic() < deadline, listing
            time.sleep(0.5)
    finally:
        up.terminate()
        assert up.wait(timeout=30) == 0  # Ctrl-C/SIGTERM stops everything cleanly
    assert not (tmp_path / "data" / "reconq-up.json").exists()  # removed when `up` stops cleanly
    gone = reconq("jobs", env=clean_env(RECONQ_DATA_DIR=str(tmp_path / "data")))
    assert gone.returncode == 1 and "no running `reconq up` was found in" in gone.stderr, gone.stderr
    assert "Traceback" not in gone.stderr and len(gone.stderr.strip().splitlines()) == 1


def _one_line_error(run: subprocess.CompletedProcess, code: int, *words: str) -> None:
    err = run.stderr.strip()
    assert run.returncode == code, (run.returncode, run.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("reconq: "), err
    for word in words:
        assert word in err, err


def test_no_up_running_and_a_stale_connection_file(tmp_path):
    env = clean_env(RECONQ_DATA_DIR=str(tmp_path / "data"))
    for command in ("jobs", "gpus", "exams"):
        _one_line_error(reconq(command, env=env), 1, "RECONQ_REDIS_URL is not set and no running `reconq up` "
                        f"was found in {tmp_path / 'data'}; start `reconq up` or set RECONQ_REDIS_URL")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reconq-up.json").write_text(json.dumps({"pid": dead.pid, "redis_url": "redis://x:1/0"}))
    _one_line_error(reconq("jobs", env=env), 1, "no running `reconq up` was found", "(a stale ",
                    "left by a stopped reconq up)")


def test_cli_mistakes_are_one_line(tmp_path):
    env = clean_env(RECONQ_DATA_DIR=str(tmp_path / "data"), RECONQ_MRD_PORT=str(free_port()))
    raw = write_mrd(synthetic_scan(matrix=(16, 16), ncoil=1, protocol="cli_err"), tmp_path / "raw.h5")
    not_mrd = tmp_path / "plain.h5"
    with h5py.File(not_mrd, "w") as f:
        f["x"] = 1
    _one_line_error(reconq("send", str(ROOT / "README.md"), env=env), 1, "is not an HDF5 file")
    _one_line_error(reconq("send", str(tmp_path / "missing.h5"), env=env), 1, "no such file")
    _one_line_error(reconq("send", str(not_mrd), env=env), 1, "not an MRD file")
    _one_line_error(reconq("send", str(raw), env=env), 1, "no MRD gateway listening on", "connection refused")
    images = tmp_path / "images.h5"
    with h5py.File(images, "w") as f:  # an MRD image file: a header, images, no readouts
        f["dataset/xml"] = "<ismrmrdHeader/>"
        f["dataset/image_1/header"] = [1]
    _one_line_error(reconq("send", str(images), env=env), 1, "is an MRD image file")
    _one_line_error(reconq("retrieve", "--from-file", str(raw), "--out", str(tmp_path / "i.h5"), env=env), 1,
                    "no MRD gateway listening on")
    _one_line_error(reconq("send", str(raw), "--params", "{maps: walsh}", env=env), 2, "--params",
                    "is not JSON", "at character 2")
    _one_line_error(reconq("jobs", "--state", "runing", env=env), 2, "did you mean running")
    _one_line_error(reconq("nosuch", env=env), 2, "invalid choice")
    _one_line_error(reconq("retrieve", "--out", "x.h5", env=env), 2, "give --from-file")
    _one_line_error(reconq("jobs", env=dict(env, RECONQ_MRD_PORTT="1")), 2, "did you mean RECONQ_MRD_PORT")
    _one_line_error(reconq("jobs", env=dict(env, RECONQ_MRD_PORT="abc")), 2, "RECONQ_MRD_PORT", "integer")
    _one_line_error(reconq("jobs", env=dict(env, RECONQ_SIMULATED_GPUS="x")), 2, "RECONQ_SIMULATED_GPUS", "JSON")
    debug = reconq("--debug", "send", str(tmp_path / "missing.h5"), env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_version_and_settings():
    version = reconq("--version", env=clean_env())
    assert version.returncode == 0 and version.stdout.startswith("reconq ") and version.stdout.split()[1][0].isdigit()
    env = clean_env(RECONQ_REDIS_URL="redis://:s3cret@127.0.0.1:6390/0", RECONQ_STAFF_TOKENS='{"ann": "sha256$ab"}')
    listed = reconq("settings", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "s3cret" not in listed.stdout and "sha256$ab" not in listed.stdout
    assert "RECONQ_REDIS_URL = redis://:***@127.0.0.1:6390/0 (set)" in listed.stdout
    rows = json.loads(reconq("settings", "--json", env=env).stdout)
    by_variable = {r["variable"]: r for r in rows}
    assert by_variable["RECONQ_MRD_PORT"]["default"] == 9002 and by_variable["RECONQ_MRD_PORT"]["description"]
    assert by_variable["RECONQ_STAFF_TOKENS"]["value"] == {"ann": "***"}
    assert all(r["description"] for r in rows)
