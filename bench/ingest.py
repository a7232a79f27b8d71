"""Benchmark: the MRD gateway at wire speed, against a socket-to-file copy on the same machine.

Streams ``--gb`` GB of 32-channel, 512-sample readouts (pre-serialized ACQUISITION messages, so the
sender is not the bottleneck) over loopback:

- into a minimal reader that copies the socket to a file and fsyncs it, and does nothing else: the
  limit of this machine (its own process); and, for reference, into the same reader with the
  gateway's write-behind (:class:`reconq.gateway.rawfile.WriteBehind`), the best a plain copy does here;
- into the gateway (``python -m reconq.cli gateway`` in its own process, on a private Redis, its job
  queue consumed by nobody), timed until its CLOSE, i.e. to a complete, fsynced MRD file with the job
  recorded and queued.

Each is run ``--rounds`` times, alternately, after one unmeasured 10 MB session each; the median and
the best rounds are compared. It then prints the ack latency (the client's CLOSE sent to the gateway's
CLOSE received), median and p99 over ``--sessions`` sessions of ``--small-mb`` MB and for the large
sessions; the gateway's peak resident memory (``VmHWM``, reset before each measured session) for the
large session and for one an eighth of its size; and ``--concurrent`` simultaneous sessions of
``--concurrent-mb`` MB each, checked complete, bit-identical (every readout's header and samples, read
back with h5py) and queued once. The gateway's log (kept with ``--keep``) splits each ack into the
file's fsync, ``scan.json`` and queueing the job.

``--only load`` runs the load test alone: ``--load`` sessions of ``--load-mb`` MB each that connect,
stream and send their CLOSE at the same moment (a barrier), ``--load-rounds`` times; it prints the ack
latency (median, p99, max over every session of every round), the gateway's peak resident memory
(``VmHWM``, reset before each round) and its resident memory after the round, and checks every scan
complete, bit-identical and queued once. ``--only throughput`` runs the large-session rounds alone.

    python bench/ingest.py                # 2 GB, 20 x 10 MB, 8 x 250 MB, 50 x 1 MB at once
    python bench/ingest.py --gb 0.2 --concurrent-mb 25 --sessions 20
    python bench/ingest.py --only load --load 50 --load-mb 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.hdf5
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tools import machine  # noqa: E402
from reconq.core.jobs import JobStore  # noqa: E402
from reconq.core.redisconn import PrivateRedis, free_port  # noqa: E402
from reconq.core.settings import ENV_PREFIX, Settings, load_settings  # noqa: E402
from reconq.core.storage import ScanState, ScanStore  # noqa: E402
from reconq.gateway import client  # noqa: E402
from reconq.gateway import protocol as p  # noqa: E402
from reconq.gateway.rawfile import WriteBehind  # noqa: E402
from reconq.stack import settings_env  # noqa: E402

NCHA, NCOL = 32, 512
BLOCK_READOUTS = 256  # one pre-serialized block: 256 readouts, about 34 MB
_SCAN_COUNTER = struct.Struct("<I")
_SCAN_COUNTER_AT = 2 + ismrmrd.hdf5.acquisition_header_dtype.fields["scan_counter"][1]
_MB = 1e6


class Block:
    """``BLOCK_READOUTS`` ACQUISITION messages in one buffer; ``number(first)`` renumbers their scan counters."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        acq = ismrmrd.Acquisition.from_array(np.zeros((NCHA, NCOL), np.complex64))
        acq.available_channels = NCHA
        one = p.write_acquisition(acq)
        self.message_size = len(one)
        self.buf = bytearray(one * BLOCK_READOUTS)
        data = rng.standard_normal((BLOCK_READOUTS, NCHA * NCOL * 2), dtype=np.float32)
        view = np.frombuffer(self.buf, np.uint8).reshape(BLOCK_READOUTS, self.message_size)
        view[:, 2 + p.ACQ_HEADER_SIZE:] = data.view(np.uint8)
        self.samples = data  # what every stored readout must hold, by position in the block

    def number(self, first: int) -> memoryview:
        for i in range(BLOCK_READOUTS):
            _SCAN_COUNTER.pack_into(self.buf, i * self.message_size + _SCAN_COUNTER_AT, first + i)
        return memoryview(self.buf)

    def readouts_for(self, nbytes: float) -> int:
        return max(1, int(nbytes // self.message_size))

    def stream(self, sock: socket.socket, readouts: int) -> None:
        """Send ``readouts`` messages (whole blocks, then part of one)."""
        sent = 0
        while sent < readouts:
            n = min(BLOCK_READOUTS, readouts - sent)
            sock.sendall(self.number(sent)[: n * self.message_size])
            sent += n


def header_xml() -> str:
    """A header that declares what the bench sends (the gateway caps a scan at what its header declares):
    ``NCHA`` channels of ``NCOL`` samples, ``BLOCK_READOUTS`` lines, up to 4096 repetitions (137 GB)."""
    hdr = ismrmrd.xsd.CreateFromDocument(client.retrieval_header("BENCH01", "1.2.826.0.1.3680043.2.1125.1",
                                                                 "ingest_bench"))
    hdr.acquisitionSystemInformation = ismrmrd.xsd.acquisitionSystemInformationType(receiverChannels=NCHA)
    enc = hdr.encoding[0]
    enc.encodedSpace.matrixSize = ismrmrd.xsd.matrixSizeType(x=NCOL, y=BLOCK_READOUTS, z=1)
    enc.encodingLimits.repetition = ismrmrd.xsd.limitType(minimum=0, maximum=4095, center=0)
    return client.header_xml(hdr)


# -- the limit: socket to file, fsync, nothing else ---------------------------------------------------------

def _sink(listener: socket.socket, folder: str, write_behind: bool) -> None:
    """Accept connections; copy each to a file (with the gateway's write-behind, or none), fsync, answer."""
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    n_conn = 0
    while True:
        conn, _ = listener.accept()
        n_conn += 1
        path = os.path.join(folder, f"sink-{'wb' if write_behind else 'plain'}-{n_conn}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        behind, written, pending = WriteBehind(fd if write_behind else None), 0, 0
        while n := conn.recv_into(buf):
            os.write(fd, view[:n])
            written, pending = written + n, pending + n
            if pending >= 8 << 20:
                behind.wrote_up_to(written)
                pending = 0
        os.fsync(fd)
        os.close(fd)
        conn.sendall(b"k")
        conn.close()
        os.unlink(path)


def run_limit(address: tuple[str, int], block: Block, readouts: int) -> float:
    """Seconds to copy ``readouts`` messages to a file and fsync it."""
    t0 = time.perf_counter()
    with socket.create_connection(address, timeout=600) as sock:
        block.stream(sock, readouts)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b"k"
    return time.perf_counter() - t0


# -- the gateway ---------------------------------------------------------------------------------------------

@dataclass
class Session:
    seconds: float
    ack_s: float
    job_id: str | None
    texts: list[str]


def run_gateway_session(address: tuple[str, int], block: Block, readouts: int) -> Session:
    t0 = time.perf_counter()
    with socket.create_connection(address, timeout=600) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(client.opening("cartesian", header_xml()))
        block.stream(sock, readouts)
        return close_and_ack(sock, t0)


def run_at_once(one: Callable[[int], None], n: int) -> float:
    """``one(0)`` ... ``one(n - 1)``, each in a thread of its own, all started together; the wall time."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def close_and_ack(sock: socket.socket, t0: float) -> Session:
    """Send the client's CLOSE, read the gateway's answer: the session, timed from ``t0`` and from the CLOSE."""
    t_close = time.perf_counter()
    sock.sendall(p.write_close())
    reply = client.read_reply(sock)
    t_ack = time.perf_counter()
    if not reply.closed or reply.job_id() is None:
        raise RuntimeError(f"gateway session failed: {reply.texts}")
    return Session(t_ack - t0, t_ack - t_close, reply.job_id(), reply.texts)


class GatewayProcess:
    def __init__(self, settings: Settings, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(settings_env(settings))
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "reconq.cli", "gateway"], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.address = (settings.mrd_host, settings.mrd_port)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(self.address, timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start; see {log_path}") from None
                time.sleep(0.1)

    def status(self, field: str) -> int:
        """A ``/proc/<pid>/status`` memory figure, in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def check_stored(scans: ScanStore, jobs: JobStore, block: Block, job_id: str, readouts: int) -> None:
    """The scan behind ``job_id`` is complete, holds every readout bit-identical, and has one job."""
    scan_id = job_id.rsplit("-j", 1)[0]
    record = scans.load(scan_id)
    assert record.state is ScanState.COMPLETE and record.acquisitions == readouts, record
    assert jobs.jobs_for_scan(scan_id) == [job_id], jobs.jobs_for_scan(scan_id)
    with h5py.File(scans.raw_path(scan_id), "r") as f:
        dset = f["dataset/data"]
        assert dset.shape == (readouts,)
        for start in range(0, readouts, BLOCK_READOUTS):
            rows = dset[start:start + BLOCK_READOUTS]
            counters = rows["head"]["scan_counter"]
            assert np.array_equal(counters, np.arange(start, start + len(rows))), "readout order or headers differ"
            for i, row in enumerate(rows):
                assert row["data"].tobytes() == block.samples[i].tobytes(), f"readout {start + i} differs"


# -- many sessions at the same moment ---------------------------------------------------------------------------

def run_load(gw: GatewayProcess, scans: ScanStore, jobs: JobStore, block: Block, sessions: int, mb: float,
             rounds: int, gap_s: float) -> bool:
    """``sessions`` sessions of ``mb`` MB at once, ``rounds`` times: ack p50/p99, peak RSS; True if all stored.

    Every session connects, then all stream at once; ``gap_s`` > 0: they wait that long after their data
    (a scan lasts longer than its bytes take on loopback) and send their CLOSE together (a second barrier),
    so the ack measures what follows a CLOSE; 0: each sends its CLOSE right after its data, and the ack
    includes the gateway reading and writing the data still in the socket's buffers."""
    readouts = block.readouts_for(mb * 1e6)
    size_mb = readouts * block.message_size / _MB
    data = bytes(block.number(0)[: readouts * block.message_size])  # every session sends the same readouts
    opening = client.opening("cartesian", header_xml())
    when = f"CLOSE together {gap_s:g} s after the data" if gap_s > 0 else "CLOSE right after the data"
    print(f"== load: {sessions} sessions of {size_mb:.2f} MB ({readouts} readouts) at once, {when}, {rounds} round(s)")
    acks: list[float] = []
    peaks, afters, ok = [], [], True
    for r in range(rounds):
        barrier, closing = threading.Barrier(sessions), threading.Barrier(sessions)
        results: list[Session | BaseException] = [RuntimeError("not run")] * sessions

        def one(i: int, barrier: threading.Barrier = barrier, closing: threading.Barrier = closing,
                results: list = results) -> None:
            try:
                with socket.create_connection(gw.address, timeout=600) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    barrier.wait(60)
                    t0 = time.perf_counter()
                    sock.sendall(opening)
                    sock.sendall(data)
                    if gap_s > 0:
                        time.sleep(gap_s)
                        closing.wait(60)
                    results[i] = close_and_ack(sock, t0)
            except BaseException as e:  # noqa: BLE001 - reported below
                results[i] = e

        gw.reset_peak()
        wall = run_at_once(one, sessions)
        done = [x for x in results if isinstance(x, Session)]
        failed = [x for x in results if isinstance(x, BaseException)]
        ok = ok and not failed
        round_acks = [x.ack_s for x in done]
        acks += round_acks
        peaks.append(gw.status("VmHWM"))
        time.sleep(0.5)  # the sessions' threads end after their CLOSE
        afters.append(gw.status("VmRSS"))
        for x in done:
            check_stored(scans, jobs, block, x.job_id or "", readouts)
        print(f"round {r + 1}: {len(done)} acked in {wall:.2f} s, {len(failed)} failed {failed[:1]}; ack median "
              f"{1e3 * statistics.median(round_acks or [0]):.0f} ms, max {1e3 * max(round_acks or [0]):.0f} ms; "
              f"peak RSS {peaks[-1] / 2**20:.0f} MiB, after {afters[-1] / 2**20:.0f} MiB", flush=True)
    if acks:
        print(f"load: {len(acks)} sessions: ack median {1e3 * statistics.median(acks):.0f} ms, "
              f"p99 {1e3 * percentile(acks, 99):.0f} ms, max {1e3 * max(acks):.0f} ms (target p99 <= 200 ms); "
              f"gateway peak RSS {max(peaks) / 2**20:.0f} MiB (target <= 600 MB), "
              f"{max(afters) / 2**20:.0f} MiB after; every scan complete, bit-identical, one job\n")
    return ok


# -- the run -------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the large session in GB (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of limit vs gateway (default 3)")
    ap.add_argument("--sessions", type=int, default=20, help="small sessions for ack latency (default 20)")
    ap.add_argument("--small-mb", type=float, default=10.0, help="size of each small session (default 10 MB)")
    ap.add_argument("--concurrent", type=int, default=8, help="simultaneous sessions (default 8)")
    ap.add_argument("--concurrent-mb", type=float, default=250.0, help="size of each (default 250 MB)")
    ap.add_argument("--load", type=int, default=50, help="sessions at the same moment in the load test (default 50)")
    ap.add_argument("--load-mb", type=float, default=1.0, help="size of each (default 1 MB)")
    ap.add_argument("--load-rounds", type=int, default=3, help="rounds of the load test (default 3)")
    ap.add_argument("--load-gap", type=float, default=0.0,
                    help="seconds between a load session's data and its CLOSE, sent by all together (default 0: "
                         "CLOSE right after the data)")
    ap.add_argument("--only", choices=("throughput", "load"), default=None,
                    help="run only the large-session rounds, or only the load test")
    ap.add_argument("--dir", default=None, help="where to put the data (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the data folder")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="reconq-ingest-", dir=args.dir))
    block = Block()
    big = block.readouts_for(args.gb * 1e9)
    big_mb = big * block.message_size / _MB
    print(f"machine: {machine()}")
    print(f"readout: {NCHA} channels x {NCOL} samples, {block.message_size} bytes per message; "
          f"large session {big} readouts, {big_mb:.0f} MB; data in {root}", flush=True)

    server = PrivateRedis(root)
    sinks = {}
    for write_behind in (False, True):
        listener = socket.create_server(("127.0.0.1", 0))
        proc = mp.get_context("fork").Process(target=_sink, args=(listener, str(root), write_behind), daemon=True)
        proc.start()
        sinks[write_behind] = (listener, proc)
    plain, behind = (sinks[w][0].getsockname()[:2] for w in (False, True))
    gw = None
    try:
        url = server.start()
        # every session comes from this one client: the per-client bound must let the load test's all in
        settings = load_settings(data_dir=root / "data", redis_url=url, mrd_port=free_port(), min_free_bytes=0,
                                 mrd_max_sessions_per_client=max(args.load, args.concurrent) + 1)
        gw = GatewayProcess(settings, root / "gateway.log")
        scans, jobs = ScanStore(settings.data_dir), JobStore(redis.Redis.from_url(url, decode_responses=True))
        print(f"gateway pid {gw.proc.pid}: resident {gw.status('VmRSS') / 2**20:.0f} MiB after start-up\n")
        if args.only == "load":
            run_gateway_session(gw.address, block, block.readouts_for(10e6))  # warm
            loaded = run_load(gw, scans, jobs, block, args.load, args.load_mb, args.load_rounds, args.load_gap)
            return 0 if loaded else 1

        print(f"== throughput: {big_mb:.0f} MB. limit: socket -> file, fsync; limit+wb: the same with the "
              "gateway's write-behind; gateway: -> fsynced MRD file, job queued")
        warm = block.readouts_for(10e6)  # one unmeasured session each first: connections made, code paths warm
        for address in (plain, behind):
            run_limit(address, block, warm)
        run_gateway_session(gw.address, block, warm)
        limit_s, behind_s, gw_runs, peaks = [], [], [], []
        for r in range(args.rounds):
            limit_s.append(run_limit(plain, block, big))
            behind_s.append(run_limit(behind, block, big))
            os.sync()  # the limits' files are on disk before the gateway's run starts
            gw.reset_peak()
            s = run_gateway_session(gw.address, block, big)
            gw_runs.append(s)
            peaks.append(gw.status("VmHWM"))
            print(f"round {r + 1}: limit {big_mb / limit_s[-1]:5.0f} MB/s   "
                  f"limit+wb {big_mb / behind_s[-1]:5.0f} MB/s   gateway {big_mb / s.seconds:5.0f} MB/s   "
                  f"ack {1e3 * s.ack_s:6.1f} ms   gateway peak RSS {peaks[-1] / 2**20:.0f} MiB", flush=True)
            shutil.rmtree(settings.data_dir / "scans", ignore_errors=True)
            (settings.data_dir / "scans").mkdir()
        for name, pick in (("median", statistics.median), ("best", min)):
            lim, wb = big_mb / pick(limit_s), big_mb / pick(behind_s)
            gwy = big_mb / pick([s.seconds for s in gw_runs])
            print(f"{name}: limit {lim:.0f} MB/s, limit+wb {wb:.0f} MB/s, gateway {gwy:.0f} MB/s; "
                  f"gateway/limit {gwy / lim:.2f} (target >= 0.8), gateway/limit+wb {gwy / wb:.2f}")

        if args.only == "throughput":
            return 0

        eighth = max(1, big // 8)
        gw.reset_peak()
        run_gateway_session(gw.address, block, eighth)
        small_peak = gw.status("VmHWM")
        print(f"peak RSS: {max(peaks) / 2**20:.0f} MiB for {big_mb:.0f} MB, {small_peak / 2**20:.0f} MiB for "
              f"{eighth * block.message_size / _MB:.0f} MB (target <= 300 MiB, flat in size)\n")

        small = block.readouts_for(args.small_mb * 1e6)
        acks = [run_gateway_session(gw.address, block, small).ack_s for _ in range(args.sessions)]
        big_acks = [s.ack_s for s in gw_runs]
        print("== ack latency (client CLOSE -> gateway CLOSE), target <= 100 ms")
        print(f"{args.sessions} x {small * block.message_size / _MB:.0f} MB: "
              f"median {1e3 * statistics.median(acks):.1f} ms, p99 {1e3 * percentile(acks, 99):.1f} ms, "
              f"max {1e3 * max(acks):.1f} ms")
        print(f"{len(big_acks)} x {big_mb:.0f} MB: median {1e3 * statistics.median(big_acks):.1f} ms, "
              f"max {1e3 * max(big_acks):.1f} ms\n")

        n_each = block.readouts_for(args.concurrent_mb * 1e6)
        blocks = [Block(seed=0) for _ in range(args.concurrent)]  # each sender numbers its own buffer
        results: list[Session | BaseException] = [RuntimeError("not run")] * args.concurrent

        def one(i: int) -> None:
            try:
                results[i] = run_gateway_session(gw.address, blocks[i], n_each)
            except BaseException as e:  # noqa: BLE001 - reported below
                results[i] = e

        print(f"== {args.concurrent} simultaneous sessions of {n_each * block.message_size / _MB:.0f} MB")
        gw.reset_peak()
        wall = run_at_once(one, args.concurrent)
        failed = [r for r in results if isinstance(r, BaseException)]
        total_mb = args.concurrent * n_each * block.message_size / _MB
        print(f"{total_mb:.0f} MB in {wall:.1f} s: {total_mb / wall:.0f} MB/s in all; gateway peak RSS "
              f"{gw.status('VmHWM') / 2**20:.0f} MiB; {len(failed)} failed {failed[:1]}")
        ok = [done for done in results if isinstance(done, Session)]
        print(f"ack latency: median {1e3 * statistics.median(done.ack_s for done in ok):.1f} ms, "
              f"max {1e3 * max(done.ack_s for done in ok):.1f} ms")
        t0 = time.perf_counter()
        for done in ok:
            check_stored(scans, jobs, block, done.job_id or "", n_each)
        print(f"checked: {len(ok)} scans complete, every readout bit-identical, one job each "
              f"({time.perf_counter() - t0:.1f} s to read back)\n")
        loaded = run_load(gw, scans, jobs, block, args.load, args.load_mb, args.load_rounds, args.load_gap)
        return 1 if failed or not loaded else 0
    finally:
        if gw is not None:
            gw.stop()
        for listener, proc in sinks.values():
            proc.terminate()
            listener.close()
        server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
