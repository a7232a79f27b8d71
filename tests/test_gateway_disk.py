"""The gateway's disk: a disk that fills up mid-scan, a gateway killed mid-scan, a start on a nearly full disk.

Real parts: ``reconq gateway`` as its own process on loopback, a real redis-server, real HDF5 files.
The full disk is a real one: a small tmpfs that the test mounts in a mount namespace of its own (``unshare
-m``), in which the gateway runs; the test sees that file system through ``/proc/<gateway pid>/root``.
These tests need root (or whatever else lets ``unshare -m`` mount a tmpfs) and are skipped, saying why,
where that is not allowed.

What must hold:

- the disk never fills up under HDF5: a scan is stopped before a write would leave less than
  ``disk_floor_bytes`` free; the scanner gets an ``ERR`` that says the disk is nearly full; the gateway
  lives on; the raw file keeps what was written, opens with h5py and ismrmrd, and holds exactly the
  readouts ``scan.json`` claims; the scan is ``incomplete``; the next scan is refused while space is
  short and accepted once there is space again;
- a gateway killed at any point of a scan (just after the header, after a few readouts, mid-stream)
  leaves a raw file that opens, and once started again, ``scan.json`` claims exactly the readouts that
  can be read, each bit-identical to what the scanner sent;
- a gateway starts on a nearly full disk, marks the scans it finds cut off, and refuses new scans with
  the free-space message.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from reconq.core.jobs import JobStore
from reconq.core.redisconn import free_port
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.gateway import client
from reconq.gateway import protocol as p
from reconq.gateway.rawfile import RawFileWriter
from reconq.recon.simulate import synthetic_scan
from reconq.stack import settings_env

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
NCHA, NCOL = 32, 512  # 131 kB readouts
PATTERNS = 16  # readout i holds samples PATTERNS[i % 16]


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(matrix=(32, 32), ncoil=4, protocol="disk", patient_id="DISK01")


@pytest.fixture(scope="module")
def patterns() -> np.ndarray:
    rng = np.random.default_rng(15)
    return rng.standard_normal((PATTERNS, NCHA, 2 * NCOL), dtype=np.float32).view(np.complex64)


def readout(patterns: np.ndarray, i: int) -> bytes:
    acq = ismrmrd.Acquisition.from_array(patterns[i % PATTERNS])
    acq.scan_counter = i
    acq.available_channels = NCHA
    return p.write_acquisition(acq)


def readouts(patterns: np.ndarray, start: int, stop: int) -> bytes:
    return b"".join(readout(patterns, i) for i in range(start, stop))


@pytest.fixture(scope="module")
def mount_namespaces(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip, saying why, unless this process may mount a tmpfs in a mount namespace of its own."""
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` command: the disk tests need a tmpfs in a mount namespace")
    where = tmp_path_factory.mktemp("probe")
    try:
        mount = f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(where))}"
        done = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"`unshare -m` could not run ({e}): the disk tests need a tmpfs in a mount namespace")
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()
        pytest.skip(f"cannot mount a tmpfs in a mount namespace (not root?): {why}")


class GatewayProcess:
    """``reconq gateway`` in its own process; with ``tmpfs_mb``, in a mount namespace whose data dir is a
    tmpfs of that size, which starts as a copy of the data dir as it is here (the data root's id file that
    the fixtures recorded, and any scans put there); ``prepare``: shell commands run there after the copy,
    before the gateway."""

    def __init__(self, settings: Settings, log_path: Path, tmpfs_mb: int | None = None, prepare: str = "") -> None:
        self.settings = settings
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
        env.update(settings_env(settings))
        gateway = f"exec {shlex.quote(sys.executable)} -m reconq.cli gateway"
        if tmpfs_mb is None:
            cmd = ["sh", "-c", gateway]
        else:
            seed = log_path.with_name(f"{log_path.stem}-seed")
            shutil.rmtree(seed, ignore_errors=True)
            shutil.copytree(settings.data_dir, seed)
            data, seed_dir = shlex.quote(str(settings.data_dir)), shlex.quote(str(seed))
            cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={tmpfs_mb}m tmpfs {data} && "
                   f"cp -a {seed_dir}/. {data}/ && {prepare or 'true'} && {gateway}"]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.address = (settings.mrd_host, settings.mrd_port)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(self.address, timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("gateway did not start:\n" + self.log()) from None
                time.sleep(0.1)

    @property
    def data_dir(self) -> Path:
        """The data dir as the gateway sees it (its mount namespace's file system), while it runs."""
        return Path(f"/proc/{self.proc.pid}/root") / self.settings.data_dir.relative_to("/")

    def scans(self) -> ScanStore:
        return ScanStore(self.data_dir)

    def free_bytes(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.stop()


def exchange(address: tuple[str, int], data: bytes | Iterable[bytes], timeout: float = 60.0) -> client.Reply:
    """Send ``data`` (or its pieces) while reading the gateway's reply (it may stop reading after an ERR), up
    to its CLOSE."""
    replies: list[client.Reply] = []
    with socket.create_connection(address, timeout=timeout) as sock:
        reader = threading.Thread(target=lambda: replies.append(client.read_reply(sock)), daemon=True)
        reader.start()
        with contextlib.suppress(OSError):  # the gateway closes once it has said why
            for piece in [data] if isinstance(data, bytes) else data:
                sock.sendall(piece)
        reader.join(timeout)
    assert replies, "no reply from the gateway"
    return replies[0]


def errors(reply: client.Reply) -> list[str]:
    assert reply.closed, f"no CLOSE after {reply.texts}"
    return [t for t in reply.texts if t.startswith("ERR ")]


def assert_served(address: tuple[str, int], store: JobStore, scan) -> str:
    reply = client.send_scan(*address, scan.header, scan.acquisitions, config="cartesian")
    assert reply.closed and not reply.errors(), reply.texts
    job = store.get(reply.job_id() or "")
    assert job is not None and job.state is JobState.QUEUED, job
    return job.scan_id


def row_ok(dset: h5py.Dataset, i: int) -> bool:
    """Row ``i`` reads, with as many samples and trajectory points as its header says."""
    try:
        row = dset[i]
    except Exception:  # noqa: BLE001 - a row cut off fails in many ways
        return False
    head = row["head"]
    return (len(row["data"]) == 2 * int(head["number_of_samples"]) * int(head["active_channels"])
            and len(row["traj"]) == int(head["number_of_samples"]) * int(head["trajectory_dimensions"]))


def assert_holds_exactly(path: Path, claimed: int, patterns: np.ndarray) -> None:
    """The raw file opens with h5py and ismrmrd; its first ``claimed`` readouts read, each bit-identical to
    what was sent; the next one, if the file names one, cannot be read."""
    with h5py.File(path, "r") as f:
        group = f["dataset"]
        if claimed:
            assert "xml" in group  # written (and synced) before any readout
        if claimed == 0 and "data" not in group:
            return
        dset = group["data"]
        assert dset.shape[0] >= claimed
        if dset.shape[0] > claimed:
            assert not row_ok(dset, claimed), f"row {claimed} reads: scan.json claims too few"
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False, mode="r") as ds:
        for i in range(claimed):
            acq = ds.read_acquisition(i)
            assert acq.scan_counter == i
            assert acq.data.tobytes() == patterns[i % PATTERNS].tobytes(), f"readout {i} differs"


# -- a disk that fills up mid-scan -----------------------------------------------------------------------------

def test_disk_full_mid_scan_stops_the_scan_before_the_disk_fills(mount_namespaces, settings, store, scan,
                                                                  patterns, tmp_path, gateways):
    floor, min_free, size_mb = 256 * MiB, 272 * MiB, 320
    settings = settings.model_copy(update={"mrd_port": free_port(), "min_free_bytes": min_free,
                                           "disk_floor_bytes": floor, "write_batch_bytes": MiB,
                                           "write_sync_bytes": 4 * MiB})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    gw = GatewayProcess(settings, tmp_path / "gateway.log", tmpfs_mb=size_mb)
    gateways.append(gw)
    assert gw.free_bytes() > min_free

    sent = 2600  # 342 MB: more than the whole tmpfs, so without the floor the disk would fill

    def stream() -> Iterator[bytes]:
        yield client.opening("cartesian", scan.header)
        for start in range(0, sent, 50):
            yield readouts(patterns, start, min(sent, start + 50))
        yield p.write_close()

    reply = exchange(gw.address, stream())
    err = errors(reply)
    assert err and "disk nearly full" in err[-1] and "MiB free" in err[-1], reply.texts
    assert gw.alive(), gw.log()
    assert gw.free_bytes() >= floor, "the disk filled up below the floor"

    deadline = time.monotonic() + 10
    while (records := list(gw.scans().scans())) and records[0].state is ScanState.RECEIVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [record] = records
    assert record.state is ScanState.INCOMPLETE and "disk nearly full" in (record.error or ""), record
    assert 0 < record.acquisitions < sent, record
    raw = gw.scans().raw_path(record.scan_id)
    assert_holds_exactly(raw, record.acquisitions, patterns)
    with h5py.File(raw, "r") as f:
        assert f["dataset/data"].shape == (record.acquisitions,)  # closed cleanly: the shape says it too
    jobs = [store.get(j) for j in store.jobs_for_scan(record.scan_id)]
    assert [j.state for j in jobs if j] == [JobState.FAILED]

    # space is short now: the next scan is refused before any data, with the free-space message
    refused = exchange(gw.address, client.opening("cartesian", scan.header) + readouts(patterns, 0, 4)
                       + p.write_close())
    err = errors(refused)
    assert err and "not enough free disk space" in err[-1] and "scan refused" in err[-1], refused.texts
    assert gw.alive()
    # with space freed, the gateway serves again
    raw.unlink()
    assert gw.free_bytes() > min_free
    assert_served(gw.address, store, scan)
    assert gw.alive()


# -- a gateway killed mid-scan ---------------------------------------------------------------------------------

def rows_in_file(path: Path) -> int:
    """The readable rows of a raw file the gateway is writing (read without HDF5's file lock; 0 while it
    cannot be read)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            dset = f["dataset/data"]
            return next((i for i in range(dset.shape[0]) if not row_ok(dset, i)), dset.shape[0])
    except Exception:  # noqa: BLE001 - the file changes under the reader
        return 0


def wait_for(condition, timeout: float = 30.0) -> None:  # noqa: ANN001 - a callable returning a truth value
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("when", ["scan_folder", "raw_file", "header", "few_readouts", "mid_stream"])
def test_killed_at_any_point_of_a_scan_leaves_a_file_that_holds_what_scan_json_claims(
        settings, store, scan, patterns, tmp_path, when):
    settings = settings.model_copy(update={"mrd_port": free_port(), "write_batch_bytes": 1 << 18,
                                           "write_sync_bytes": 1 << 20})
    scans = ScanStore(settings.data_dir)
    gw = GatewayProcess(settings, tmp_path / "gateway.log")
    stream_error: list[BaseException] = []
    try:
        sock = socket.create_connection(gw.address, timeout=30)
        sock.sendall(client.opening("cartesian", scan.header))
        wait_for(lambda: scans.root.is_dir() and any((f / "scan.json").exists() for f in scans.root.iterdir()))
        [folder] = list(scans.root.iterdir())
        if when != "scan_folder":
            wait_for(lambda: (folder / "raw.h5").exists())
        if when == "header":
            time.sleep(0.1)  # the writer thread writes and syncs the header
        elif when == "few_readouts":
            sock.sendall(readouts(patterns, 0, 5))
            wait_for(lambda: rows_in_file(folder / "raw.h5") >= 5)  # taken by the idle writer, in the file
        elif when == "mid_stream":
            sent = [0]

            def stream() -> None:
                try:
                    for start in range(0, 100_000, 16):
                        sock.sendall(chunk := readouts(patterns, start, start + 16))
                        sent[0] += len(chunk)
                except OSError as e:  # the gateway was killed
                    stream_error.append(e)

            threading.Thread(target=stream, daemon=True).start()
            wait_for(lambda: sent[0] > 16_000_000)  # past the socket buffers: megabytes written and synced
        gw.kill()
        sock.close()
    finally:
        gw.stop()
    assert not [r for r in scans.scans() if r.state is not ScanState.RECEIVING]

    gw = GatewayProcess(settings, tmp_path / "gateway.log")  # marks the scan cut off, then serves
    try:
        [record] = list(scans.scans())
        assert record.state is ScanState.INCOMPLETE and "the gateway stopped mid-scan" in (record.error or "")
        raw = scans.raw_path(record.scan_id)
        if when == "scan_folder" and not raw.exists():
            assert record.acquisitions == 0
        else:
            assert_holds_exactly(raw, record.acquisitions, patterns)
        if when == "few_readouts":
            assert record.acquisitions == 5
        if when == "mid_stream":
            assert record.acquisitions > 0, gw.log()
        assert [j.state for j in (store.get(x) for x in store.jobs_for_scan(record.scan_id)) if j] in \
            ([], [JobState.FAILED])
        assert_served(gw.address, store, scan)
    finally:
        gw.stop()


def write_raw(path: Path, header_xml: str, patterns: np.ndarray, n: int) -> None:
    """A raw file of ``n`` readouts, written and closed by the gateway's writer."""
    writer = RawFileWriter(path, 1 << 18, 1 << 20, disk_floor_bytes=0)
    writer.write_header(header_xml)
    for i in range(n):
        msg = readout(patterns, i)
        head, body = msg[2:2 + p.ACQ_HEADER_SIZE], msg[2 + p.ACQ_HEADER_SIZE:]
        writer.add_acquisition_into(head, len(body), lambda view, body=body: view.__setitem__(slice(None), body))
    writer.abort()
    assert writer.written_acquisitions == n


def destroy_samples(path: Path, rows: range) -> None:
    """Overwrite the heap collections that hold these rows' samples, as a file cut off before HDF5 wrote them:
    the dataset's shape still counts the rows."""
    with h5py.File(path, "r") as f:
        dset = f["dataset/data"]
        ftype = dset.id.get_type()
        row_size, at = ftype.get_size(), ftype.get_member_offset(ftype.get_member_index(b"data"))
        chunk = dset.id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        stored = raw.read(chunk.size)
        for i in rows:
            _length, collection, _index = struct.unpack_from("<IQI", stored, i * row_size + at)
            raw.seek(collection)
            assert raw.read(4) == b"GCOL"
            raw.seek(collection)
            raw.write(b"\0\0\0\0")


def test_a_cut_off_file_whose_shape_claims_more_rows_is_counted_by_the_rows_that_read(settings, store, scan,
                                                                                       patterns, tmp_path):
    scans = ScanStore(settings.data_dir)
    record = ScanRecord(scan_id="20260101T000000-cafe0002", client="cut", config="cartesian", pipeline="cartesian")
    scans.create(record)  # receiving: a gateway stopped while it streamed in
    raw = scans.raw_path(record.scan_id)
    write_raw(raw, scan.header.toXML(), patterns, 20)
    destroy_samples(raw, range(17, 20))
    with h5py.File(raw, "r") as f:
        assert f["dataset/data"].shape == (20,)  # what the shape claims

    gw = GatewayProcess(settings.model_copy(update={"mrd_port": free_port()}), tmp_path / "gateway.log")
    try:
        marked = scans.load(record.scan_id)
        assert marked.state is ScanState.INCOMPLETE and marked.acquisitions == 17, marked
        assert "17 readouts readable" in (marked.error or "")
        assert_holds_exactly(raw, 17, patterns)
    finally:
        gw.stop()


# -- a start on a nearly full disk -----------------------------------------------------------------------------

FILL = """
import os, sys
path, leave = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    while True:
        st = os.statvfs(os.path.dirname(path))
        free = st.f_bavail * st.f_frsize
        if free <= leave:
            break
        f.write(b"\\0" * min(1 << 20, free - leave))
        f.flush()
"""


def test_the_gateway_starts_on_a_nearly_full_disk_and_refuses_new_scans(mount_namespaces, settings, store, scan,
                                                                        patterns, tmp_path, gateways):
    # a scan that a stopped gateway left receiving, to be marked at start-up on the full disk
    seed_scans = ScanStore(settings.data_dir)
    record = ScanRecord(scan_id="20260101T000000-cafe0001", client="seed", config="cartesian", pipeline="cartesian")
    seed_scans.create(record)
    write_raw(seed_scans.raw_path(record.scan_id), scan.header.toXML(), patterns, 12)

    (tmp_path / "fill.py").write_text(FILL)
    settings = settings.model_copy(update={"mrd_port": free_port(), "min_free_bytes": 16 * MiB,
                                           "disk_floor_bytes": 8 * MiB})
    data = shlex.quote(str(settings.data_dir))
    prepare = f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'fill.py'))} {data}/filler {2 * MiB}"
    gw = GatewayProcess(settings, tmp_path / "gateway.log", tmpfs_mb=48, prepare=prepare)
    gateways.append(gw)
    assert gw.free_bytes() < 3 * MiB, gw.free_bytes()

    marked = gw.scans().load(record.scan_id)
    assert marked.state is ScanState.INCOMPLETE and "the gateway stopped mid-scan" in (marked.error or "")
    assert marked.acquisitions == 12
    assert_holds_exactly(gw.scans().raw_path(record.scan_id), 12, patterns)

    for _ in range(2):  # refused, and the gateway goes on refusing
        reply = exchange(gw.address, client.opening("cartesian", scan.header) + readouts(patterns, 0, 3)
                         + p.write_close())
        err = errors(reply)
        assert err and "not enough free disk space" in err[-1] and "MiB free" in err[-1], reply.texts
        assert gw.alive(), gw.log()
    assert [r.scan_id for r in gw.scans().scans()] == [record.scan_id]  # nothing stored for the refused ones
