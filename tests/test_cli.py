"""The README's promise: `reconq demo` runs the whole flow; `reconq send`/`retrieve`/`jobs` against `up`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import h5py
import ismrmrd
import pytest

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
    helped = reconq("--help", env=clean_env())
    assert helped.returncode == 0 and "`reconq settings` lists every one" in helped.stdout.replace("\n", " ")
    for command in ("simulate", "purge", "settings", "up", "send", "retrieve"):
        assert command in helped.stdout
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


def readme_block(heading: str, index: int = 0) -> list[str]:
    """The command lines of the ``index``-th ```sh block under README's ``heading``, comments removed."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n")[index + 1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def as_run(line: str) -> list[str]:
    """A README command line as this test runs it: ``.venv/bin/reconq`` is this interpreter's reconq."""
    words = line.split()
    assert words[0] == ".venv/bin/reconq", line
    return [sys.executable, "-m", "reconq.cli", *words[1:]]


def test_the_readme_running_it_block_as_written_and_up_restarts_a_dead_child(tmp_path):
    """README "Running it": `up` in one shell, the client commands in another, in the same folder, nothing
    set in the second. Then `up` as a supervisor: the API killed, scans still taken, the API back."""
    first, *client_lines = readme_block("## Running it")
    assert first == ".venv/bin/reconq up" and len(client_lines) == 4, client_lines
    mrd_port, http_port = free_port(), free_port()  # shell 1 only: not the default ports on a shared machine
    shell1 = clean_env(RECONQ_MRD_PORT=str(mrd_port), RECONQ_HTTP_PORT=str(http_port), RECONQ_MIN_FREE_BYTES="0")
    shell2 = clean_env(TQDM_DISABLE="1")
    up = subprocess.Popen(as_run(first), env=shell1, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("ReconQ up" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        out = {}
        for line in client_lines:
            run = subprocess.run(as_run(line), env=shell2, cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert run.returncode == 0 and "Traceback" not in run.stderr, (line, run.stdout, run.stderr)
            out[line.split()[1]] = run.stdout
        assert "raw.h5: axial Cartesian, 1 slice(s), 128x128, 8 coils" in out["simulate"]
        assert out["send"].startswith("INF job ") and " queued" in out["send"], out["send"]
        job_id = out["send"].split()[2]
        assert "1 images written to images.h5" in out["retrieve"], out["retrieve"]
        with ismrmrd.Dataset(str(tmp_path / "images.h5"), "dataset", create_if_needed=False, mode="r") as dset:
            assert dset.number_of_images("image_1") == 1
        listed = next(row for row in out["jobs"].splitlines() if row.startswith(job_id))
        assert listed.split()[1] == "done" and "reconq_sim" in listed, out["jobs"]

        # --json, as the API's staff JSON; a job id given to retro is answered with its scan id
        jobs = json.loads(subprocess.run(as_run(".venv/bin/reconq jobs --json"), env=shell2, cwd=tmp_path,
                                         capture_output=True, text=True, timeout=60).stdout)
        (mine,) = [j for j in jobs["jobs"] if j["id"] == job_id]
        assert mine["state"] == "done" and mine["patient"] == "PAT001" and jobs["total"] >= 1
        retro = subprocess.run(as_run(f".venv/bin/reconq retro {job_id} --pipeline cartesian"), env=shell2,
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
        scan_id = mine["scan_id"]
        _one_line_error(retro, 1, f"{job_id} is a job on scan {scan_id}", f"reconq retro {scan_id} --pipeline")

        # the supervisor: kill -9 the API; the gateway takes a scan meanwhile; the API comes back
        connection = json.loads((tmp_path / "reconq-data" / "reconq-up.json").read_text())
        api_pid = connection["children"]["api"]
        os.kill(api_pid, 9)
        deadline = time.monotonic() + 10
        while not any("api exited with code -9; starting it again" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        scan = synthetic_scan(matrix=(16, 16), ncoil=2, protocol="while_api_down")
        reply = mrd.send_scan("127.0.0.1", mrd_port, scan.header, scan.acquisitions, config="cartesian")
        assert reply.job_id() is not None and not reply.errors(), reply.texts
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and up.poll() is None, "".join(lines)
            time.sleep(0.3)
        restarted = json.loads((tmp_path / "reconq-data" / "reconq-up.json").read_text())["children"]
        assert restarted["api"] != api_pid and restarted["gateway"] == connection["children"]["gateway"]

        # the private Redis killed: started again on its port and AOF, the jobs still there
        os.kill(connection["children"]["redis"], 9)
        deadline = time.monotonic() + 60
        while True:
            again = subprocess.run(as_run(".venv/bin/reconq jobs"), env=shell2, cwd=tmp_path, capture_output=True,
                                   text=True, timeout=60)
            if again.returncode == 0 and job_id in again.stdout:
                break
            assert time.monotonic() < deadline and up.poll() is None, "".join(lines) + again.stderr
            time.sleep(0.5)
        assert any("private Redis exited with code -9; starting it again" in line for line in lines)
        deadline = time.monotonic() + 10
        while (redis_pid := json.loads((tmp_path / "reconq-data" / "reconq-up.json").read_text())["children"][
                "redis"]) == connection["children"]["redis"]:  # the new one's pid, recorded after its restart
            assert time.monotonic() < deadline, "the restarted Redis's pid was not recorded"
            time.sleep(0.1)
        os.kill(redis_pid, 0)  # alive now
    finally:
        up.send_signal(2)  # Ctrl-C, and again at once: the stop is not cut short
        time.sleep(0.3)
        with contextlib.suppress(ProcessLookupError):
            up.send_signal(2)
        code = up.wait(timeout=90)
        reader.join(5)
    assert code == 0, "".join(lines)
    log = "".join(lines)
    assert "stopping" in log and " ERROR " not in log.split("stopping", 1)[1], log  # Ctrl-C is not an error
    assert not (tmp_path / "reconq-data" / "reconq-up.json").exists()
    with pytest.raises(ProcessLookupError):  # no Redis left running on the data dir's AOF
        os.kill(redis_pid, 0)


def test_simulate_writes_scans_with_an_identity(tmp_path):
    run = reconq("simulate", str(tmp_path / "s.h5"), "--acceleration", "2", "--slices", "2", "--coils", "4",
                 "--matrix", "32", "--patient-id", "PX1", "--patient-name", "Müller^Anna", "--protocol", "t1_sim",
                 env=clean_env())
    assert run.returncode == 0 and "send it: reconq send" in run.stdout and "--config sense" in run.stdout, run.stderr
    with ismrmrd.Dataset(str(tmp_path / "s.h5"), "dataset", create_if_needed=False, mode="r") as dset:
        header = ismrmrd.xsd.CreateFromDocument(dset.read_xml_header())
        n = dset.number_of_acquisitions()
        acqs = [dset.read_acquisition(i) for i in range(n)]
    assert header.subjectInformation.patientID == "PX1" and header.subjectInformation.patientName == "Müller^Anna"
    assert header.measurementInformation.protocolName == "t1_sim" and header.studyInformation.studyDate
    assert header.studyInformation.studyInstanceUID and header.measurementInformation.frameOfReferenceUID
    assert header.encoding[0].parallelImaging.accelerationFactor.kspace_encoding_step_1 == 2
    assert acqs[0].active_channels == 4 and {a.idx.slice for a in acqs} == {0, 1}
    assert any(a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) or
               a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for a in acqs)
    radial = reconq("simulate", str(tmp_path / "r.h5"), "--radial", "--spokes", "30", "--matrix", "32",
                    "--coils", "2", env=clean_env())
    assert radial.returncode == 0 and "2D radial, 30 spokes" in radial.stdout, radial.stderr
    with ismrmrd.Dataset(str(tmp_path / "r.h5"), "dataset", create_if_needed=False, mode="r") as dset:
        assert dset.number_of_acquisitions() == 30 and dset.read_acquisition(0).traj.shape[1] == 2
    second = reconq("simulate", str(tmp_path / "s.h5"), env=clean_env())
    _one_line_error(second, 2, "exists", "--force")
    _one_line_error(reconq("simulate", str(tmp_path / "x.h5"), "--radial", "--slices", "3", env=clean_env()), 2,
                    "--radial makes one 2D slice")


def test_send_shows_a_progress_bar_on_a_terminal_only(tmp_path, settings, start_gateway):
    gateway = start_gateway()
    _, port = gateway.address
    raw = write_mrd(synthetic_scan(matrix=(32, 32), ncoil=2, protocol="cli_bar"), tmp_path / "raw.h5")
    env = clean_env(RECONQ_MRD_PORT=str(port), RECONQ_DATA_DIR=str(tmp_path / "client"))
    master, slave = os.openpty()  # stderr a terminal, as in a shell: 24 x 100 characters
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        run = subprocess.run([sys.executable, "-m", "reconq.cli", "send", str(raw), "--config", "cartesian"],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120)
        os.close(slave)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the child's end is closed and read to its end
            while chunk := os.read(master, 65536):
                shown += chunk
    finally:
        os.close(master)
    assert run.returncode == 0 and run.stdout.startswith("INF job "), run.stdout
    assert b"send raw.h5" in shown and b"32/32" in shown and b"readouts" in shown, shown
    piped = reconq("send", str(raw), "--config", "cartesian", env=env)  # stderr a pipe: no bar
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


def test_sequences_json(tmp_path):
    run = reconq("sequences", "--json", env=clean_env(RECONQ_SEQUENCE_DIR=str(tmp_path / "seq")))
    assert run.returncode == 0, run.stderr
    listed = json.loads(run.stdout)
    assert listed["sequences"] == [] and listed["folder"] == str(tmp_path / "seq")


def _children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def test_up_lets_a_dead_launchers_gpu_workers_stop_before_it_starts_another(tmp_path):
    """On a GPU machine `up`'s worker child is a launcher with a Celery worker per GPU (here a **simulated**
    GPU). The launcher killed: its workers, left in its process group, get SIGTERM and stop before another
    launcher starts, so a GPU never has two sets of workers."""
    env = clean_env(RECONQ_DATA_DIR=str(tmp_path / "data"), RECONQ_MRD_PORT=str(free_port()),
                    RECONQ_HTTP_PORT=str(free_port()), RECONQ_MIN_FREE_BYTES="0", RECONQ_SIMULATED_GPUS="[8]",
                    RECONQ_WORKER_STOP_GRACE_S="2")
    up = subprocess.Popen([sys.executable, "-m", "reconq.cli", "up"], env=env, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True).start()
    connection = tmp_path / "data" / "reconq-up.json"
    try:
        deadline = time.monotonic() + 90
        while not any("ReconQ up" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        launcher = json.loads(connection.read_text())["children"]["worker0"]
        while not (workers := _children_of(launcher)):  # its per-GPU Celery worker
            assert time.monotonic() < deadline, "the launcher started no worker"
            time.sleep(0.2)
        os.kill(launcher, 9)
        deadline = time.monotonic() + 60
        while (now := json.loads(connection.read_text())["children"]["worker0"]) == launcher:
            assert time.monotonic() < deadline and up.poll() is None, "".join(lines)
            time.sleep(0.1)
        for pid in workers:  # gone (or a zombie not reaped yet) before the new launcher was started
            with contextlib.suppress(FileNotFoundError):
                assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
        assert now != launcher and any("worker0 exited with code -9; starting it again" in line for line in lines)
    finally:
        up.send_signal(2)
        code = up.wait(timeout=90)
    assert code == 0, "".join(lines)
