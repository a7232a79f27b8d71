"""The README's promise: `reconq demo` runs the whole flow; `reconq send`/`retrieve`/`jobs` against `up`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
        sent = reconq("send", str(raw), "--config", "cartesian", env=client_env)
        assert sent.returncode == 0 and sent.stdout.startswith("INF job "), sent.stdout + sent.stderr
        got = reconq("retrieve", "--from-file", str(raw), "--out", str(tmp_path / "img.h5"), env=client_env)
        assert got.returncode == 0, got.stdout + got.stderr
        assert "1 images written" in got.stdout
        jobs = reconq("jobs", env=client_env)
        assert jobs.returncode == 0 and " done " in jobs.stdout and "cli_t1" in jobs.stdout
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
