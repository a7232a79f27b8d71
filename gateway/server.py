"""The MRD gateway: a TCP server with one thread per session and a bound on concurrent sessions."""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import threading
import time
from collections.abc import Collection
from typing import Any

import redis

from reconq.core.constants import GATEWAY_STATS
from reconq.core.jobs import Job, JobStore
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings
from reconq.core.storage import ScanRecord, ScanStore
from reconq.gateway import protocol as p
from reconq.gateway.context import SessionContext
from reconq.gateway.session import Session
from reconq.gateway.stream import text
from reconq.scheduler.placement import Placement
from reconq.scheduler.submit import announce_scan, reconcile, submit_scan

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 1 << 20  # the kernel doubles it for its own bookkeeping


class Gateway:
    """Listens for MRD sessions; :meth:`start` serves in a background thread, :meth:`serve_forever` here.

    Built by :func:`reconq.services.make_gateway`; ``pipelines`` is the allow-list of config names."""

    def __init__(self, settings: Settings, jobs: JobStore, scans: ScanStore, sender: TaskSender,
                 placement: Placement, pipelines: Collection[str]) -> None:
        self.settings = settings
        self.jobs = jobs
        self.scans = scans
        self.sender = sender
        self.placement = placement
        self.pipelines = frozenset(pipelines)
        self.limits = p.Limits(
            max_header_bytes=settings.max_header_bytes,
            max_text_bytes=settings.max_text_bytes,
            max_acquisition_bytes=settings.max_acquisition_bytes,
            max_image_bytes=settings.max_image_bytes,
        )
        self.context = SessionContext(settings, jobs, scans, self.limits, self.pipelines, self.submit, self.announce)
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "gateway not started"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def announce(self, record: ScanRecord) -> None:
        announce_scan(self.jobs, record, self.settings.queue)

    def submit(self, record: ScanRecord, header: Any = None) -> Job:
        return submit_scan(self.jobs, self.sender, record, self.settings.queue, self.placement, header)

    def bind(self) -> tuple[str, int]:
        """Reconcile disk with Redis, then open the listening socket."""
        with self.sender.exclusive():
            requeued = reconcile(self.scans, self.jobs, self.sender, self.settings.queue, placement=self.placement)
        if requeued:
            log.warning("start-up: %d complete scan(s) without a job were queued again", len(requeued))
        listener = socket.create_server((self.settings.mrd_host, self.settings.mrd_port), reuse_port=False,
                                        backlog=128)
        # A bounded receive buffer (sessions inherit it): what the client has sent but the gateway not yet read
        # must still be written and fsynced after the client's CLOSE, so an autotuned buffer of tens of MB
        # would add tens of milliseconds to the ack. A few MB still cover 10 GbE at LAN round-trip times.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        listener.settimeout(0.5)
        self._listener = listener
        log.info("MRD gateway listening on %s:%d, data in %s", *self.address, self.settings.data_dir)
        return self.address

    def requeue_forever(self) -> None:
        """Every ``reconcile_interval_s``, queue complete scans that have no job (a Redis outage at the
        ack, or Redis restarted without its data), so none waits for the gateway's next start."""
        while not self._stopping.wait(self.settings.reconcile_interval_s):
            try:
                with self.sender.exclusive():
                    requeued = reconcile(self.scans, self.jobs, self.sender, self.settings.queue, at_start=False,
                                         placement=self.placement)
            except Exception:  # Redis down again, a scan folder being written: try at the next interval
                log.exception("periodic reconcile failed; trying again in %g s", self.settings.reconcile_interval_s)
                continue
            if requeued:
                log.warning("%d complete scan(s) without a job were queued", len(requeued))

    def start(self) -> tuple[str, int]:
        address = self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="mrd-accept", daemon=True)
        self._thread.start()
        return address

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        threading.Thread(target=self.requeue_forever, name="mrd-reconcile", daemon=True).start()
        assert self._listener is not None
        if threading.current_thread() is threading.main_thread():  # the gateway's own process
            # Start-up objects (Celery, h5py, numpy, ...) are never garbage: without this a full collection walks
            # them all, some 40 ms that could fall between a client's CLOSE and the gateway's.
            gc.collect()
            gc.freeze()
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            self._dispatch(sock, f"{addr[0]}:{addr[1]}")

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def _dispatch(self, sock: socket.socket, peer: str) -> None:
        sock.settimeout(self.settings.idle_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._slots.acquire(blocking=False):
            log.warning("refused %s: %d sessions already open", peer, self.settings.max_connections)
            threading.Thread(target=self._refuse, args=(sock,), name=f"mrd-busy-{peer}", daemon=True).start()
            return
        threading.Thread(target=self._serve, args=(sock, peer), name=f"mrd-{peer}", daemon=True).start()

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.sendall(text("ERR", f"gateway busy: {self.settings.max_connections} sessions already open; "
                                     "try again shortly") + p.write_close())
        except OSError:
            pass
        finally:
            close_gracefully(sock)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        session = Session(self.context, sock, peer)
        self._count({"sessions_active": 1})
        try:
            session.run()
        finally:
            self._slots.release()
            close_gracefully(sock)
            self._count({"sessions_active": -1, "sessions_total": int(session.bytes_read > 0),
                         "bytes_received_total": session.bytes_read,
                         "sessions_failed_total": int(session.failed),
                         "retrieval_sessions_total": int(session.retrieval)})

    def _count(self, deltas: dict[str, int]) -> None:
        """Add to the gateway's counters in Redis (read by ``/metrics``); never fails a session."""
        try:
            pipe = self.jobs.redis.pipeline(transaction=False)
            for name, delta in deltas.items():
                if delta:
                    pipe.hincrby(GATEWAY_STATS, name, delta)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("gateway counters not updated: %s", e)


def close_gracefully(sock: socket.socket, linger_s: float = 2.0, max_bytes: int = 64 << 20) -> None:
    """Close after our last message: shut our side, then read (and drop) what the client still sends.

    Closing a socket with unread data makes the kernel send a reset, and a client that gets the reset
    before it read our ``ERR`` TEXT and CLOSE never sees them. So the gateway waits, a bounded time,
    for the client to close its side (which it does on reading our CLOSE).
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger_s
        drained = 0
        while drained < max_bytes and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            drained += len(chunk)
    sock.close()
