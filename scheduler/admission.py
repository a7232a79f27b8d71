"""Admission: atomic GPU memory reservations in Redis, and the jobs that wait for memory.

A worker bound to GPU ``g`` starts a job only after :meth:`Admission.admit` has reserved the job's
estimate on ``g``: the estimate must fit ``g``'s capacity (its memory less what other programs use)
minus what jobs already admitted there have reserved. Each step is one Lua script, so two workers can
never both take the last gigabytes.

- A reservation is released when the job ends, however it ends (the worker's ``finally``), and
  reclaimed by the next script that looks at the GPU once the worker holding it stops sending
  heartbeats (its ``reconq:hb:<worker>`` key expired).
- Jobs wait in the waiting set ``reconq:waiting``, ordered by queue rank (``stat``, ``routine``,
  ``bulk``) and then by the time they were queued, with their memory need and expected run time. A job
  gets there at submit (:meth:`Admission.submit`, see :mod:`reconq.scheduler.placement`: a batch goes in as a
  whole), or when it does not fit the GPU of the worker that took it from its priority queue. Jobs leave
  it by *filling* a GPU (:meth:`Admission.fill`): while the GPU has free memory and idle worker slots
  (its live workers, registered by their heartbeats in ``reconq:gpuworkers:<gpu>``, less the jobs
  reserved there), reserve a waiting job and send it to the GPU's own queue ``gpu.<id>``, which its
  workers consume first. A GPU is filled at submit, when a job ends on it, when a job is admitted on
  it, by its idle workers every ``dispatch_poll_s``, and, when a job fits neither the GPU that took it
  from its queue nor waits for it, any other GPU with idle workers is filled at once (the job is
  *moved* there).
- Which waiting job fills a GPU: first a ``stat`` job that fits now, in waiting order; then the largest
  *large* job (too large for the smallest GPU: it can run on few GPUs, and runs long) that fits now;
  else the best fit: the job with the largest share of the GPU's memory x time (its share of the
  memory times its expected run time over the longest among the fitting jobs), plus one for every
  ``backfill_limit_s`` seconds it has waited. Jobs queued together thus start long, large jobs first and
  leave short, small ones to fill the end; a job older by ``backfill_limit_s`` beats any younger one.
- Holding, with EASY backfilling: a ``stat`` job, the first job that has waited longer than
  ``backfill_limit_s``, and large jobs (the smallest first), when they fit no GPU now, each claim one
  GPU, their *target*: of the GPUs large enough and not claimed before, the one with the most memory
  available (it fits there soonest). On its target, the holding job's *shadow time* is when it would
  fit if nothing else started there and the jobs running there ended when expected (reservations keep
  their expected end in ``reconq:resvend:<gpu>``; one without a run time ends never). Another job starts
  there only if it leaves the holding job its memory at the shadow time, or, when the holding job is
  not a ``stat`` job, if it is expected to end by then (a shadow time that depends on a job of unknown
  run time allows only the first). So a hold costs memory only for jobs that would delay it. The other
  GPUs go on packing.
- A job larger than every GPU seen in the last ``gpu_forget_s`` is reported as fitting nowhere.

The scripts are the ``.lua`` files in ``lua/`` (those that pick jobs share ``lua/common.lua``, prepended when
they are loaded); each file's header lists its keys and arguments in order, and the dataclasses below build
the arguments by name in that order. Every key a script touches is passed to it, but job records, whose
state it reads (``lua/common.lua`` says why). The caller reads the GPUs and workers in Redis first and
passes their keys; a script that finds one more returns :data:`STALE` before it writes anything, and is
run again. Keys are in :mod:`reconq.core.constants` (and :data:`GPU_WORKERS` here); the job states the
scripts read are :class:`JobState` values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

import redis
from redis.commands.core import Script

from reconq.core.constants import (
    GPU_CAPACITY,
    GPU_RESERVATION_ENDS,
    GPU_RESERVATION_OWNERS,
    GPU_RESERVATIONS,
    GPU_SEEN,
    GPU_STATE,
    GPU_TOTAL,
    GPU_WAITING,
    GPU_WAITING_NEED,
    GPU_WAITING_SECONDS,
    JOB_KEY,
    KEY_PREFIX,
    WORKER_HEARTBEAT,
)
from reconq.core.scripts import load_joined, load_script
from reconq.core.states import JobState
from reconq.scheduler.routing import RANK_SPAN

log = logging.getLogger(__name__)

#: Hash per GPU: live worker name -> time of its last heartbeat (workers whose heartbeat key expired are
#: dropped by the scripts); the GPU's worker slots.
GPU_WORKERS = KEY_PREFIX + "gpuworkers:"
#: Waiting jobs one script looks at, at most.
MAX_SCAN = 256
#: Jobs one fill reserves at most (a GPU has no more worker slots than this).
MAX_FILL = 64
#: Suffix of the owner of a reservation made for a job that no worker has started yet (dispatched to a
#: GPU's queue); such a reservation is also dropped once the job is finished (cancelled meanwhile).
PENDING_SUFFIX = ">pending"

#: Error a script returns, having written nothing, when Redis names a GPU or a worker that appeared after
#: its caller read the lists of them (see ``lua/common.lua``); the caller reads them again.
STALE = "STALE"
#: Attempts at a script whose lists went stale each time before :class:`StaleLists` is raised.
ATTEMPTS = 8

_PACKAGE = "reconq.scheduler"
#: The first keys of every script that includes ``lua/common.lua``, in order: KEYS[1..6].
_SHARED_KEYS = (GPU_CAPACITY, GPU_TOTAL, GPU_SEEN, GPU_WAITING, GPU_WAITING_NEED, GPU_WAITING_SECONDS)
#: A GPU's reservation hashes (key prefixes; the GPU id follows), in order: KEYS[1..3] of ``lua/release.lua``.
_RESERVATION_KEYS = (GPU_RESERVATIONS, GPU_RESERVATION_OWNERS, GPU_RESERVATION_ENDS)
#: The keys of each listed GPU, in order: KEYS[3+4i..6+4i] of a script that includes ``lua/common.lua``.
_GPU_KEYS = (*_RESERVATION_KEYS, GPU_WORKERS)
#: The keys of ``lua/wait.lua``, in order.
_WAIT_KEYS = (GPU_WAITING, GPU_WAITING_NEED, GPU_WAITING_SECONDS)
#: The states of a finished job: its waiting entry and its pending reservations are dropped.
_FINISHED = " ".join(s.value for s in (JobState.DONE, JobState.FAILED, JobState.CANCELLED))


class StaleLists(RuntimeError):
    """GPUs or workers kept appearing between reading their lists and running a script."""


@dataclass(frozen=True)
class _Args:
    """A script's own arguments: ARGV[1..n], in the order of the fields (see the script's header)."""

    def argv(self) -> list[str | int | float]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class _Policy(_Args):
    """ARGV[1..5] of the scripts that pick waiting jobs (admit, fill, submit)."""

    now: float
    backfill_limit_s: float
    gpu_forget_s: float
    max_scan: int
    max_fill: int


@dataclass(frozen=True)
class _AdmitArgs(_Policy):
    """ARGV[1..11] of ``lua/admit.lua``."""

    gpu: str
    job: str
    need: int
    owner: str
    score: float
    seconds: float


@dataclass(frozen=True)
class _FillArgs(_Policy):
    """ARGV[1..7] of ``lua/fill.lua`` (``max_fill``: the jobs this fill reserves at most)."""

    gpu: str
    owner: str


@dataclass(frozen=True)
class _SubmitArgs(_Policy):
    """ARGV[1..6+4C] of ``lua/submit.lua``: the policy, the number of jobs C, then job, bytes needed, score
    and expected seconds of each."""

    jobs: tuple[tuple[str, int, float, float], ...]

    def argv(self) -> list[str | int | float]:
        policy = [getattr(self, f.name) for f in fields(_Policy)]
        return [*policy, len(self.jobs), *(x for job in self.jobs for x in job)]


@dataclass(frozen=True)
class _ForgetArgs(_Args):
    """ARGV[1] of ``lua/forget.lua``."""

    job: str


@dataclass(frozen=True)
class _ReleaseArgs(_Args):
    """ARGV[1..2] of ``lua/release.lua``."""

    job: str
    owner: str


@dataclass(frozen=True)
class _WaitArgs(_Args):
    """ARGV[1..4] of ``lua/wait.lua``."""

    job: str
    need: int
    score: float
    seconds: float


@dataclass(frozen=True)
class _Lists:
    """The GPUs and workers a script that includes ``lua/common.lua`` may touch, read just before it runs:
    its keys, and the shared arguments that follow its own."""

    gpus: tuple[str, ...]
    workers: tuple[str, ...]

    def keys(self) -> list[str]:
        """KEYS: the shared keys, four per GPU, then one heartbeat per worker."""
        per_gpu = [prefix + gpu for gpu in self.gpus for prefix in _GPU_KEYS]
        return [*_SHARED_KEYS, *per_gpu, *(WORKER_HEARTBEAT + w for w in self.workers)]

    def argv(self) -> list[str | int | float]:
        """ARGV[N+1..]: the job record prefix, the constants, then the GPU list and the worker list."""
        return [JOB_KEY, PENDING_SUFFIX, RANK_SPAN, _FINISHED, len(self.gpus), *self.gpus, *self.workers]


class Verdict(StrEnum):
    """What :meth:`Admission.admit` decided for a job on a GPU."""

    RUN = "run"  # reserved on this GPU: start it
    MOVED = "moved"  # reserved on another GPU (``other_job`` names it), sent to its queue
    SWAP = "swap"  # a waiting job fits here better or has waited longer: reserved instead; this one waits
    HELD = "held"  # this GPU is held for a waiting job that does not fit yet; this one waits
    WAIT = "wait"  # fits this GPU once memory frees up; waits
    BIGGER = "bigger"  # too big for this GPU, fits a bigger one; waits
    NEVER = "never"  # too big for every GPU


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    other_job: str  # the waiting job reserved instead (SWAP), holding the GPU (HELD); the GPU (MOVED)
    bytes: int  # memory available on this GPU, or the largest GPU's memory (BIGGER, NEVER)
    #: (job id, GPU id) of the other jobs reserved by this admission, to send to their GPUs' queues
    dispatched: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Reservation:
    job_id: str
    bytes: int
    worker: str


class Admission:
    """Reservations and the waiting set on one Redis connection (``decode_responses=True``)."""

    def __init__(self, client: redis.Redis, backfill_limit_s: float = 300.0, gpu_forget_s: float = 600.0) -> None:
        self.redis = client
        self.backfill_limit_s = backfill_limit_s
        self.gpu_forget_s = gpu_forget_s
        self._admit = load_joined(client, _PACKAGE, ("common", "admit"))
        self._fill = load_joined(client, _PACKAGE, ("common", "fill"))
        self._submit = load_joined(client, _PACKAGE, ("common", "submit"))
        self._reclaim = load_joined(client, _PACKAGE, ("common", "reclaim"))
        self._forget = load_joined(client, _PACKAGE, ("common", "forget"))
        self._release = load_script(client, _PACKAGE, "release")
        self._wait = load_script(client, _PACKAGE, "wait")

    def register_gpu(self, gpu_id: str, total: int, capacity: int, state_json: str) -> None:
        """Record a GPU's size, the memory reservations may share, and its state (heartbeats do this)."""
        pipe = self.redis.pipeline()
        pipe.hset(GPU_TOTAL, gpu_id, total)
        pipe.hset(GPU_CAPACITY, gpu_id, capacity)
        pipe.hset(GPU_SEEN, gpu_id, f"{time.time():.3f}")
        pipe.hset(GPU_STATE, gpu_id, state_json)
        pipe.execute()

    def register_worker(self, gpu_id: str, worker: str) -> None:
        """Count ``worker`` (whose heartbeat key must exist) as one of ``gpu_id``'s worker slots."""
        self.redis.hset(GPU_WORKERS + gpu_id, worker, f"{time.time():.3f}")

    def unregister_worker(self, gpu_id: str, worker: str) -> None:
        self.redis.hdel(GPU_WORKERS + gpu_id, worker)

    def admit(self, gpu_id: str, job_id: str, need: int, owner: str, score: float, seconds: float = 0.0) -> Decision:
        """Reserve ``need`` bytes for ``job_id`` on ``gpu_id`` if it may start there now (see module doc);
        ``seconds`` is its expected run time (0: unknown), which orders it among waiting jobs."""
        args = _AdmitArgs(**self._policy(MAX_FILL), gpu=gpu_id, job=job_id, need=need, owner=owner, score=score,
                          seconds=float(seconds))
        verdict, other, amount, *rest = self._run(self._admit, args, gpu_id, owner)
        return Decision(Verdict(verdict), other, int(float(amount)), _pairs(rest))

    def fill(self, gpu_id: str, owner: str, max_jobs: int = MAX_FILL) -> list[str]:
        """Reserve waiting jobs on ``gpu_id`` while its memory and idle worker slots last (at most
        ``max_jobs``), in the order of the module doc; their ids, to send to the GPU's queue."""
        jobs = self._run(self._fill, _FillArgs(**self._policy(max_jobs), gpu=gpu_id, owner=owner), gpu_id, owner)
        return [str(j) for j in jobs or []]

    def dispatch(self, gpu_id: str, owner: str) -> str | None:
        """Reserve one waiting job on ``gpu_id`` (see :meth:`fill`); its id, or None."""
        jobs = self.fill(gpu_id, owner, 1)
        return jobs[0] if jobs else None

    def release(self, gpu_id: str, job_id: str, owner: str = "") -> bool:
        """Drop ``owner``'s reservation of ``job_id`` on ``gpu_id`` (any owner's if ``owner`` is empty);
        False if there was none."""
        keys = [prefix + gpu_id for prefix in _RESERVATION_KEYS]
        return bool(self._release(keys=keys, args=_ReleaseArgs(job=job_id, owner=owner).argv()))

    def wait(self, job_id: str, need: int, score: float, seconds: float = 0.0) -> None:
        """Put a job in the waiting set (after a GPU out-of-memory error, for one)."""
        args = _WaitArgs(job=job_id, need=need, score=score, seconds=float(seconds))
        self._wait(keys=list(_WAIT_KEYS), args=args.argv())

    def submit(self, jobs: Sequence[tuple[str, int, float, float]]) -> tuple[list[str], list[tuple[str, str]]]:
        """Place jobs at submit, ``(job id, bytes needed, score, expected seconds)`` each: put them in the
        waiting set and fill every GPU that has live workers, in one step (a batch is placed as a whole).
        Returns the jobs not placed (no GPU has live workers, or the job is larger than every GPU that
        has), which go to their priority queues (see :mod:`reconq.scheduler.placement`), and the (job id, GPU id)
        reserved by the fills (these jobs or others) to send to their GPUs' queues."""
        entries = tuple((job_id, need, score, float(seconds)) for job_id, need, score, seconds in jobs)
        count, *rest = self._run(self._submit, _SubmitArgs(**self._policy(MAX_FILL), jobs=entries))
        return [str(j) for j in rest[:int(count)]], list(_pairs(rest[int(count):]))

    def forget(self, job_id: str) -> tuple[bool, list[str]]:
        """Take a job (cancelled, say) out of the waiting set and drop its pending reservations, those made
        for it while no worker has started it, in one step; a reservation a worker holds is left to that
        worker. Returns whether it was waiting, and the GPUs whose pending reservation was dropped."""
        was_waiting, *dropped = self._run(self._forget, _ForgetArgs(job=job_id))
        return bool(int(was_waiting)), [str(g) for g in dropped]

    def reclaim(self) -> int:
        """Drop every reservation whose worker's heartbeat expired; returns how many."""
        return int(self._run(self._reclaim, _Args()))

    def reservations(self, gpu_id: str) -> list[Reservation]:
        pipe = self.redis.pipeline()
        pipe.hgetall(GPU_RESERVATIONS + gpu_id)
        pipe.hgetall(GPU_RESERVATION_OWNERS + gpu_id)
        amounts, owners = pipe.execute()
        return [Reservation(job, int(b), owners.get(job, "")) for job, b in sorted(amounts.items())]

    def reserved_bytes(self, gpu_id: str) -> int:
        return sum(r.bytes for r in self.reservations(gpu_id))

    def known_gpus(self) -> list[str]:
        return sorted(self.redis.hkeys(GPU_TOTAL))

    def waiting(self) -> list[tuple[str, int, float]]:
        """(job id, bytes needed, score) of the jobs waiting for GPU memory, first first."""
        pipe = self.redis.pipeline()
        pipe.zrange(GPU_WAITING, 0, -1, withscores=True)
        pipe.hgetall(GPU_WAITING_NEED)
        entries, needs = pipe.execute()
        return [(job, int(needs.get(job, 0)), score) for job, score in entries]

    def _policy(self, max_fill: int) -> dict[str, Any]:
        """The :class:`_Policy` fields of a script call made now."""
        return {"now": time.time(), "backfill_limit_s": self.backfill_limit_s, "gpu_forget_s": self.gpu_forget_s,
                "max_scan": MAX_SCAN, "max_fill": max_fill}

    def _lists(self, gpu: str | None, owner: str | None) -> _Lists:
        """Every GPU Redis knows (and ``gpu``), and every worker registered on one of them or named by a
        reservation there (and ``owner``)."""
        pipe = self.redis.pipeline()
        pipe.hkeys(GPU_TOTAL)
        pipe.hkeys(GPU_SEEN)
        total, seen = pipe.execute()
        gpus = sorted({*total, *seen, *([gpu] if gpu is not None else [])})
        for g in gpus:
            pipe.hkeys(GPU_WORKERS + g)
            pipe.hvals(GPU_RESERVATION_OWNERS + g)
        names = {name.removesuffix(PENDING_SUFFIX) for group in pipe.execute() for name in group}
        if owner is not None:
            names.add(owner)
        return _Lists(tuple(gpus), tuple(sorted(names)))

    def _run(self, script: Script, args: _Args, gpu: str | None = None, owner: str | None = None) -> Any:
        """Run a script that includes ``lua/common.lua`` with ``args`` and the keys of every GPU and worker
        it may touch (and ``gpu``, ``owner``, its own); read them again if one appeared in between."""
        for attempt in range(1, ATTEMPTS + 1):
            lists = self._lists(gpu, owner)
            try:
                return script(keys=lists.keys(), args=[*args.argv(), *lists.argv()])
            except redis.ResponseError as exc:
                if not str(exc).startswith(STALE):
                    raise
                log.debug("attempt %d: %s appeared meanwhile; reading the lists again", attempt,
                          str(exc).removeprefix(STALE).strip())
        raise StaleLists(f"GPUs or workers kept appearing over {ATTEMPTS} attempts")


def _pairs(flat: Sequence[object]) -> tuple[tuple[str, str], ...]:
    """``[a, b, c, d, ...]`` as ``((a, b), (c, d), ...)``, as strings."""
    return tuple((str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2))
