"""The MRD gateway: a TCP server with one thread per session and a bound on concurrent sessions.

It keeps serving while Redis is down: a scan is stored as ever, the scanner is told its job is queued
when the job queue is back, and the reconcile loop, which then tries every few seconds, queues it
when Redis answers again. The gateway also starts without Redis: what start-up needs of the disk alone
(scans a stopped gateway left ``receiving`` are marked incomplete) is done before it listens, the rest
by the same loop. Its counters are written by a thread of their own, so no session waits on Redis for
them.

Who may connect: the addresses and networks of ``mrd_allowed_clients`` (IPv4 and IPv6), else loopback
clients only; a gateway set to listen beyond loopback with no list refuses to start
(:func:`allowed_networks`). A connection from elsewhere is closed as it is accepted, before any
session state (no thread, no slot, no scan folder), logged by address and counted
(``connections_refused_total``). One client address holds at most ``mrd_max_sessions_per_client``
sessions at once, and every session must send its opening within ``mrd_opening_timeout_s``
(:class:`~reconq.gateway.stream.MessageStream`), so silent clients cannot hold every slot.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Collection
from typing import Any

import redis

from reconq.core.constants import GATEWAY_STATS
from reconq.core.dataroot import DataRootError, DataRootMismatch, DataRootUnchecked, check_data_root
from reconq.core.jobs import Job, JobStore
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings, SettingsError
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanStore
from reconq.gateway import protocol as p
from reconq.gateway.context import SessionContext
from reconq.gateway.session import Session
from reconq.gateway.stream import text
from reconq.scheduler.placement import Placement
from reconq.scheduler.retention import retention_on, run_purge
from reconq.scheduler.submit import (
    QUEUE_UNREACHABLE,
    announce_scan,
    enqueue,
    first_job_id,
    mark_interrupted,
    reconcile,
    submit_scan,
)

log = logging.getLogger(__name__)

#: Data-root checks in a row that must find another root before the gateway stops
ROOT_MISMATCHES_TO_STOP = 3

#: What says Redis (or the producer) cannot be reached just now, in a reconcile
_UNREACHABLE: tuple[type[BaseException], ...] = (*QUEUE_UNREACHABLE, DataRootUnchecked)

RECEIVE_BUFFER_BYTES = 1 << 20  # the kernel doubles it for its own bookkeeping
#: How often the reconcile loop tries while work waits for Redis (at most ``reconcile_interval_s``): a scan
#: stored during an outage is queued within this of Redis coming back.
CATCH_UP_INTERVAL_S = 2.0
#: How long the counter thread waits before it tries Redis again, keeping the counts meanwhile.
COUNTS_RETRY_S = 2.0
#: Refusals (gateway busy, too many sessions from one client) being answered at once; past it a refused
#: connection is closed without its ERR, so a flood of them costs no thread each.
REFUSERS = 16
#: The first periodic purge runs this long after start (at most ``purge_interval_s``), not one whole interval
#: later: a gateway restarted more often than the interval still purges.
PURGE_FIRST_S = 60.0
#: A refused address is logged at most once per this (with the count refused since), so a flood of
#: connections from outside the allow-list does not flood the log.
REFUSAL_LOG_S = 60.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def client_ip(host: str) -> IPAddress:
    """A peer's address as the allow-list compares it: an IPv6 scope dropped, an IPv4-mapped IPv6 address
    (``::ffff:10.0.0.5``, from a dual-stack socket) as the IPv4 address it is."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def listens_on_loopback_only(host: str) -> bool:
    """Whether ``host`` (an address or a name) is loopback only; ``""``, ``0.0.0.0`` and ``::`` are not."""
    try:
        return client_ip(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(client_ip(str(a)).is_loopback for a in addresses)


def allowed_networks(settings: Settings) -> tuple[IPNetwork, ...]:
    """The networks MRD clients may connect from: ``mrd_allowed_clients``, else loopback.

    Raises :class:`SettingsError` for an entry that is not an address or network, and when the gateway
    would listen beyond loopback with no list (anyone who reaches the port would be a scanner)."""
    networks: list[IPNetwork] = []
    for entry in settings.mrd_allowed_clients:
        try:
            net = ipaddress.ip_network(entry.strip().split("%", 1)[0], strict=False)
        except ValueError as e:
            raise SettingsError(f"RECONQ_MRD_ALLOWED_CLIENTS: {entry!r} is not an IP address or network "
                                f"(CIDR): {e}") from e
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
        if mapped is not None and net.prefixlen >= 96:  # ::ffff:a.b.c.d/n: peers are compared as IPv4
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
        networks.append(net)
    if networks:
        return tuple(networks)
    if not listens_on_loopback_only(settings.mrd_host):
        raise SettingsError(
            f"the MRD gateway is set to listen on {settings.mrd_host or '(all interfaces)'}, beyond loopback, "
            "but RECONQ_MRD_ALLOWED_CLIENTS is not set: anyone who reaches port "
            f"{settings.mrd_port} could send scans and retrieve patients' images. Set it to the scanners' "
            """addresses or networks (e.g. RECONQ_MRD_ALLOWED_CLIENTS='["10.1.2.0/24"]'), or listen on """
            "loopback only (RECONQ_MRD_HOST=127.0.0.1)")
    return LOOPBACK


def is_allowed(ip: IPAddress, networks: Collection[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


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
        self.allowed = allowed_networks(settings)  # before anything listens: SettingsError says why not
        self.limits = p.Limits(
            max_header_bytes=settings.max_header_bytes,
            max_text_bytes=settings.max_text_bytes,
            max_acquisition_bytes=settings.max_acquisition_bytes,
            max_image_bytes=settings.max_image_bytes,
        )
        self.context = SessionContext(settings, jobs, scans, self.limits, self.pipelines, self.submit, self.announce,
                                      self.redis_up)
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._per_client: dict[str, int] = {}  # sessions open per client address
        self._per_client_lock = threading.Lock()
        self._refusers = threading.BoundedSemaphore(REFUSERS)
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # address -> (last logged, refused since)
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Work that waits for Redis: set by a submit or a reconcile that found it unreachable (and at start
        # without it), cleared as a reconcile begins; while set the reconcile loop tries every few seconds.
        self._behind = threading.Event()
        self._outage_since: float | None = None  # when the reconcile loop first found Redis unreachable
        self._owed: set[str] = set()  # scans whose submit failed: their job may be queued with no message
        self._owed_lock = threading.Lock()
        self._counts: dict[str, int] = {}  # counter deltas not yet written to Redis
        self._counts_lock = threading.Lock()
        self._counts_due = threading.Event()
        self._counter_thread: threading.Thread | None = None
        #: why the gateway stopped by itself (its data dir turned out not to be the recorded data root)
        self.fatal: str | None = None
        self._root_mismatches = 0  # data-root checks in a row that found another root

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "gateway not started"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def redis_up(self) -> bool:
        """False from a failed submit or reconcile until a reconcile gets through: sessions then skip what
        is best effort (a job shown receiving, the run-time history), which would wait on Redis."""
        return not self._behind.is_set()

    def announce(self, record: ScanRecord) -> None:
        if not announce_scan(self.jobs, record, self.settings.queue):
            self._behind.set()

    def submit(self, record: ScanRecord, header: Any = None) -> Job:
        """Record and queue a complete scan's job; raises one of :data:`QUEUE_UNREACHABLE` when Redis cannot
        be reached, after noting the scan so the reconcile loop queues it (promptly) once Redis is back."""
        try:
            return submit_scan(self.jobs, self.sender, record, self.settings.queue, self.placement, header)
        except QUEUE_UNREACHABLE:
            self._owe(record.scan_id)
            raise

    def _owe(self, scan_id: str) -> None:
        """Note a scan whose job's submit failed (its job may be ``queued`` with no message): the reconcile
        loop sends it again, promptly, once Redis is back."""
        with self._owed_lock:
            self._owed.add(scan_id)
        self._behind.set()

    def bind(self) -> tuple[str, int]:
        """Reconcile disk with Redis, then open the listening socket.

        Scans a stopped gateway left ``receiving`` are marked incomplete first, from the disk alone, so
        that happens before any session even while Redis is down; the part that needs Redis (queueing
        complete scans without a job, failing cut-off scans' jobs) is left to the reconcile loop then."""
        mark_interrupted(self.scans)
        if not self.reconcile_once():
            log.warning("start-up: the job queue (Redis) is unreachable; serving anyway: scans are stored and "
                        "their jobs queued when it is back")
        host = self.settings.mrd_host
        listener = socket.create_server((host, self.settings.mrd_port), reuse_port=False, backlog=128,
                                        family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        # A bounded receive buffer (sessions inherit it): what the client has sent but the gateway not yet read
        # must still be written and fsynced after the client's CLOSE, so an autotuned buffer of tens of MB
        # would add tens of milliseconds to the ack. A few MB still cover 10 GbE at LAN round-trip times.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        listener.settimeout(0.5)
        self._listener = listener
        log.info("MRD gateway listening on %s:%d, data in %s; MRD clients allowed from %s", *self.address,
                 self.settings.data_dir, ", ".join(map(str, self.allowed)))
        return self.address

    def reconcile_once(self) -> bool:
        """Queue complete scans that have no queued job, fail cut-off scans' jobs, and send again the
        jobs whose submit failed after they were queued; False (and the loop told to try again soon) when
        Redis or the producer cannot be reached."""
        self._behind.clear()  # a submit that fails from here on sets it again, so none is missed
        try:
            self.jobs.redis.ping()  # fails before the producer is held: a session's ack may wait for it
            # the data root, each time: Redis may have come back without its data (the id is recorded again)
            # or be another Redis now; one whose id is not this data dir's stops the gateway
            check_data_root(self.settings, self.jobs.redis, create=True, role="gateway")
            self._root_mismatches = 0
            with self.sender.exclusive():
                requeued = reconcile(self.scans, self.jobs, self.sender, self.settings.queue, at_start=False,
                                     placement=self.placement, owed=self._owe)
                self._send_owed(requeued)
        except DataRootMismatch as e:
            # three rounds in a row, not one: a shared file system may say "no such file" for a moment
            self._root_mismatches += 1
            if self._root_mismatches < ROOT_MISMATCHES_TO_STOP:
                log.error("%s (%d of %d checks in a row before the gateway stops)", e, self._root_mismatches,
                          ROOT_MISMATCHES_TO_STOP)
                self._behind.set()  # look again soon
                return False
            log.critical("%s; the gateway stops", e)
            self.fatal = str(e)
            self._stopping.set()
            return False
        except _UNREACHABLE as e:
            self._behind.set()
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("the job queue (Redis) is unreachable (%s); trying again every %g s", e,
                            self._catch_up_s())
            return False
        if self._outage_since is not None:
            log.warning("the job queue (Redis) is reachable again after %.0f s", time.monotonic() - self._outage_since)
            self._outage_since = None
        if requeued:
            log.warning("%d complete scan(s) without a queued job were queued", len(requeued))
        return True

    def _send_owed(self, requeued: Collection[str]) -> None:
        """The scans whose submit failed: a job the reconcile did not just queue but that is ``queued``
        got its state before its message failed (Redis went away in between): it is sent again (a second
        delivery, should the first have got through after all, is dropped by the worker)."""
        with self._owed_lock:
            owed = sorted(self._owed)
        for scan_id in owed:
            job = self.jobs.get(first_job_id(scan_id))
            if job is not None and job.id not in requeued and job.state is JobState.QUEUED:
                enqueue(self.jobs, self.sender, job, self.placement)
                log.warning("job %s sent again: its message may have been lost to the Redis outage", job.id)
            with self._owed_lock:
                self._owed.discard(scan_id)

    def _catch_up_s(self) -> float:
        return min(self.settings.reconcile_interval_s, CATCH_UP_INTERVAL_S)

    def requeue_forever(self) -> None:
        """Every ``reconcile_interval_s``, queue complete scans that have no job (a Redis outage at the
        ack, or Redis restarted without its data), so none waits for the gateway's next start; while
        work waits for Redis (a submit failed, Redis was down at start), every few seconds until one
        reconcile gets through."""
        last = time.monotonic()
        while not self._stopping.wait(self._catch_up_s()):
            if not self._behind.is_set() and time.monotonic() - last < self.settings.reconcile_interval_s:
                continue
            last = time.monotonic()
            try:
                self.reconcile_once()
            except Exception:  # a scan folder being written, say: try at the next interval
                log.exception("periodic reconcile failed; trying again in %g s", self.settings.reconcile_interval_s)

    def purge_forever(self) -> None:
        """Every ``purge_interval_s`` (the first soon after start), apply the ``keep_*`` retention settings
        (:func:`reconq.scheduler.retention.run_purge`): one gateway at a time over a shared data root (a lock
        in Redis; a round another holds is skipped). A round that cannot run (Redis unreachable, the data root
        not the recorded one) or fails is logged and the next one tried: the gateway never stops for it."""
        interval = self.settings.purge_interval_s
        wait = min(interval, PURGE_FIRST_S)
        while not self._stopping.wait(wait):
            wait = interval
            if self.fatal:
                continue
            try:
                run_purge(self.settings, self.jobs.redis, dry_run=False)
            except (redis.RedisError, DataRootError) as e:
                log.warning("retention: purge skipped this round (%s); next in %g s", e, interval)
            except Exception:  # a file that cannot be read, say: the next round tries again
                log.exception("retention: purge failed; next in %g s", interval)

    def start(self) -> tuple[str, int]:
        address = self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="mrd-accept", daemon=True)
        self._thread.start()
        return address

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        threading.Thread(target=self.requeue_forever, name="mrd-reconcile", daemon=True).start()
        if retention_on(self.settings):
            threading.Thread(target=self.purge_forever, name="mrd-purge", daemon=True).start()
        self._counter_thread = threading.Thread(target=self.count_forever, name="mrd-counters", daemon=True)
        self._counter_thread.start()
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
            self._dispatch(sock, addr)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        if self._counter_thread is not None:  # it writes what is left, then ends
            self._counts_due.set()
            self._counter_thread.join(timeout=2 * self.settings.redis_timeout_s)

    def _dispatch(self, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        """A connection just accepted: turned away unless its address is allowed, refused (``ERR``) past the
        client's or the gateway's session limit, else served in a thread of its own."""
        peer = f"{addr[0]}:{addr[1]}"
        try:
            ip: IPAddress | None = client_ip(str(addr[0]))
        except ValueError:
            ip = None
        if ip is None or not is_allowed(ip, self.allowed):
            self._turn_away(sock, str(addr[0]))
            return
        sock.settimeout(self.settings.idle_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = str(ip)
        limit = self.settings.mrd_max_sessions_per_client
        if not self._claim(client):
            log.warning("refused %s: %d sessions from %s already open", peer, limit, client)
            self._count({"sessions_refused_client_limit_total": 1})
            self._refuse(sock, peer, f"too many sessions from {client}: {limit} already open "
                                     "(RECONQ_MRD_MAX_SESSIONS_PER_CLIENT); try again when one has ended")
            return
        if not self._slots.acquire(blocking=False):
            self._release(client)
            log.warning("refused %s: %d sessions already open", peer, self.settings.max_connections)
            self._count({"sessions_refused_busy_total": 1})
            self._refuse(sock, peer, f"gateway busy: {self.settings.max_connections} sessions already open; "
                                     "try again shortly")
            return
        threading.Thread(target=self._serve, args=(sock, peer, client), name=f"mrd-{peer}", daemon=True).start()

    def _turn_away(self, sock: socket.socket, address: str) -> None:
        """A client outside the allow-list: closed at once, in the accept thread (nothing is read, no thread
        or slot is taken, no scan begins), counted, and logged by address (at most every few seconds)."""
        self._count({"connections_refused_total": 1})
        with contextlib.suppress(OSError):
            sock.setblocking(False)  # a best-effort ERR that never waits
            sock.send(text("ERR", "this MRD gateway does not accept sessions from this address") + p.write_close())
        sock.close()
        now = time.monotonic()
        last, since = self._refusals_logged.get(address, (-REFUSAL_LOG_S, 0))
        if now - last < REFUSAL_LOG_S:
            self._refusals_logged[address] = (last, since + 1)
            return
        if len(self._refusals_logged) >= 4096:  # many addresses: forget them rather than grow
            self._refusals_logged.clear()
        self._refusals_logged[address] = (now, 0)
        log.warning("refused a connection from %s: not in RECONQ_MRD_ALLOWED_CLIENTS%s", address,
                    f" ({since} more refused since the last such line)" if since else "")

    def _claim(self, client: str) -> bool:
        with self._per_client_lock:
            held = self._per_client.get(client, 0)
            if held >= self.settings.mrd_max_sessions_per_client:
                return False
            self._per_client[client] = held + 1
            return True

    def _release(self, client: str) -> None:
        with self._per_client_lock:
            held = self._per_client.get(client, 0) - 1
            if held > 0:
                self._per_client[client] = held
            else:
                self._per_client.pop(client, None)

    def _refuse(self, sock: socket.socket, peer: str, message: str) -> None:
        """``ERR message`` and CLOSE in a thread of its own (at most :data:`REFUSERS` at once; past that the
        connection is closed without them)."""
        if not self._refusers.acquire(blocking=False):
            sock.close()
            return

        def answer() -> None:
            try:
                sock.sendall(text("ERR", message) + p.write_close())
            except OSError:
                pass
            finally:
                close_gracefully(sock)
                self._refusers.release()

        threading.Thread(target=answer, name=f"mrd-refused-{peer}", daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str, client: str) -> None:
        session = Session(self.context, sock, peer)
        self._count({"sessions_active": 1})
        try:
            session.run()
        finally:
            self._slots.release()
            self._release(client)
            close_gracefully(sock)
            self._count({"sessions_active": -1, "sessions_total": int(session.bytes_read > 0),
                         "bytes_received_total": session.bytes_read,
                         "sessions_failed_total": int(session.failed),
                         "retrieval_sessions_total": int(session.retrieval)})

    def _count(self, deltas: dict[str, int]) -> None:
        """Add to the gateway's counters (read by ``/metrics``): kept here and written to Redis by
        :meth:`count_forever`, so a session never waits on Redis for them nor fails by them."""
        with self._counts_lock:
            for name, delta in deltas.items():
                if delta:
                    self._counts[name] = self._counts.get(name, 0) + delta
        self._counts_due.set()

    def count_forever(self) -> None:
        """Write the counters to Redis as they change, all of one moment at once (``sessions_active`` and
        ``sessions_total`` agree); while Redis is down they are kept and added when it is back."""
        failing = False
        while True:
            self._counts_due.wait()
            self._counts_due.clear()
            with self._counts_lock:
                deltas, self._counts = self._counts, {}
            if deltas:
                try:
                    pipe = self.jobs.redis.pipeline(transaction=True)
                    for name, delta in deltas.items():
                        pipe.hincrby(GATEWAY_STATS, name, delta)
                    pipe.execute()
                    if failing:
                        log.info("gateway counters written again")
                    failing = False
                except redis.RedisError as e:
                    with self._counts_lock:  # kept, with what came meanwhile, for the next try
                        for name, delta in deltas.items():
                            self._counts[name] = self._counts.get(name, 0) + delta
                    if not failing:
                        log.warning("gateway counters not updated (%s); kept until Redis is back", e)
                    failing = True
                    if not self._stopping.wait(COUNTS_RETRY_S):
                        self._counts_due.set()
            if self._stopping.is_set():
                return


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
