"""Admission: atomic GPU memory reservations in Redis, and the jobs that wait for memory.

A worker bound to GPU ``g`` starts a job only after :meth:`Admission.admit` has reserved the job's
estimate on ``g``: the estimate must fit ``g``'s capacity (its memory less what other programs use)
minus what jobs already admitted there have reserved. Each step is one Lua script, so two workers can
never both take the last gigabytes.

- A reservation is released when the job ends, however it ends (the worker's ``finally``), and
  reclaimed by the next script that looks at the GPU once the worker holding it stops sending
  heartbeats (its ``reconq:hb:<worker>`` key expired).
- A job that does not fit now goes to the waiting set ``reconq:waiting``, ordered by queue rank
  (``stat``, ``routine``, ``bulk``) and then by the time it was queued. When memory frees up on a GPU,
  a worker of that GPU reserves the first waiting job that fits (:meth:`Admission.dispatch`) and sends
  it to the GPU's own queue ``gpu.<id>``, which its workers consume first.
- Smaller jobs may overtake a waiting job that does not fit yet (backfilling), except a ``stat`` job,
  or one that has waited longer than ``backfill_limit_s``: for that one the GPU is held until it fits.
- A job larger than every GPU seen in the last ``gpu_forget_s`` is reported as fitting nowhere.

Keys are in :mod:`reconq.constants`; the job states the scripts read are :class:`JobState` values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum

import redis

from reconq.constants import (
    GPU_CAPACITY,
    GPU_RESERVATION_OWNERS,
    GPU_RESERVATIONS,
    GPU_SEEN,
    GPU_STATE,
    GPU_TOTAL,
    GPU_WAITING,
    GPU_WAITING_NEED,
    JOB_KEY,
    WORKER_HEARTBEAT,
    JobState,
)
from scheduler.routing import RANK_SPAN

log = logging.getLogger(__name__)

#: Waiting jobs one script looks at, at most.
MAX_SCAN = 256
#: Suffix of the owner of a reservation made for a job that no worker has started yet (dispatched to a
#: GPU's queue); such a reservation is also dropped once the job is finished (cancelled meanwhile).
PENDING_SUFFIX = ">pending"

_COMMON = """
local RESV, OWNERS, CAP, TOTAL, SEEN, HB, WAIT, NEED, JOB = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local SPAN = %(span)r
local PENDING = '%(pending)s'

local function finished(job)
  local st = redis.call('HGET', JOB .. job, 'state')
  return (not st) or st == '%(done)s' or st == '%(failed)s' or st == '%(cancelled)s'
end

-- drop reservations on g whose worker's heartbeat expired; return the bytes reserved, but `except`'s
local function reclaim_and_sum(g, except)
  local owners = redis.call('HGETALL', OWNERS .. g)
  for i = 1, #owners, 2 do
    local o = owners[i + 1]
    local pending = string.sub(o, -#PENDING) == PENDING
    local name = pending and string.sub(o, 1, -#PENDING - 1) or o
    if redis.call('EXISTS', HB .. name) == 0 or (pending and finished(owners[i])) then
      redis.call('HDEL', RESV .. g, owners[i])
      redis.call('HDEL', OWNERS .. g, owners[i])
    end
  end
  local sum = 0
  local resv = redis.call('HGETALL', RESV .. g)
  for i = 1, #resv, 2 do
    if resv[i] ~= except then sum = sum + tonumber(resv[i + 1]) end
  end
  return sum
end


local function unwait(job)
  redis.call('ZREM', WAIT, job)
  redis.call('HDEL', NEED, job)
end

local function wait(job, need, score)
  redis.call('ZADD', WAIT, score, job)
  redis.call('HSET', NEED, job, need)
end

local function reserve(g, job, need, owner)
  redis.call('HSET', RESV .. g, job, need)
  redis.call('HSET', OWNERS .. g, job, owner)
  unwait(job)
end

-- a stat job, or one waiting longer than `limit` seconds, holds a GPU it fits until it fits now
local function holds(score, now, limit)
  local rank = math.floor(score / SPAN)
  return rank == 0 or (now - (score - rank * SPAN)) > limit
end

local function number(key, field)
  return tonumber(redis.call('HGET', key, field) or '0')
end
"""
_COMMON %= {  # noqa: UP031 - Lua's braces rule out str.format
    "span": RANK_SPAN, "done": JobState.DONE.value, "failed": JobState.FAILED.value,
    "cancelled": JobState.CANCELLED.value, "pending": PENDING_SUFFIX,
}

_ADMIT = _COMMON + """
local g, job, need, owner = ARGV[10], ARGV[11], tonumber(ARGV[12]), ARGV[13]
local score, now, limit, forget = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local maxscan = tonumber(ARGV[18])
if redis.call('HEXISTS', RESV .. g, job) == 1 then  -- dispatched here, or redelivered here
  redis.call('HSET', OWNERS .. g, job, owner)
  unwait(job)
  return {'run', '', '0'}
end
local cap, total = number(CAP, g), number(TOTAL, g)
local avail = cap - reclaim_and_sum(g, job)
local ahead = redis.call('ZRANGEBYSCORE', WAIT, '-inf', '(' .. ARGV[14], 'WITHSCORES', 'LIMIT', 0, maxscan)
for i = 1, #ahead, 2 do
  local w = ahead[i]
  if w ~= job then
    if finished(w) then
      unwait(w)
    else
      local wneed = number(NEED, w)
      if wneed <= avail then
        reserve(g, w, wneed, owner .. PENDING)
        wait(job, need, score)
        return {'swap', w, tostring(avail)}
      end
      if wneed <= total and holds(tonumber(ahead[i + 1]), now, limit) then
        wait(job, need, score)
        return {'held', w, tostring(avail)}
      end
    end
  end
end
if need <= avail then
  reserve(g, job, need, owner)
  return {'run', '', tostring(avail)}
end
if need <= total then
  wait(job, need, score)
  return {'wait', '', tostring(avail)}
end
local biggest = 0
local seen = redis.call('HGETALL', SEEN)
for i = 1, #seen, 2 do
  if now - tonumber(seen[i + 1]) <= forget then
    local t = number(TOTAL, seen[i])
    if t > biggest then biggest = t end
  end
end
if need <= biggest then
  wait(job, need, score)
  return {'bigger', '', tostring(biggest)}
end
unwait(job)
return {'never', '', tostring(biggest)}
"""

_DISPATCH = _COMMON + """
local g, owner, now, limit, maxscan = ARGV[10], ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local cap, total = number(CAP, g), number(TOTAL, g)
local avail = cap - reclaim_and_sum(g, '')
local list = redis.call('ZRANGE', WAIT, 0, maxscan - 1, 'WITHSCORES')
for i = 1, #list, 2 do
  local w = list[i]
  if finished(w) then
    unwait(w)
  else
    local wneed = number(NEED, w)
    if wneed <= avail then
      reserve(g, w, wneed, owner .. PENDING)
      return w
    end
    if wneed <= total and holds(tonumber(list[i + 1]), now, limit) then return false end
  end
end
return false
"""

_RELEASE = _COMMON + """
local g, job, owner = ARGV[10], ARGV[11], ARGV[12]
if owner ~= '' and redis.call('HGET', OWNERS .. g, job) ~= owner then return 0 end
redis.call('HDEL', RESV .. g, job)
redis.call('HDEL', OWNERS .. g, job)
return 1
"""

_RECLAIM = _COMMON + """
local gpus = redis.call('HKEYS', TOTAL)
local n = 0
for _, g in ipairs(gpus) do
  local before = redis.call('HLEN', RESV .. g)
  reclaim_and_sum(g, '')
  n = n + before - redis.call('HLEN', RESV .. g)
end
return n
"""

_WAIT = _COMMON + """
wait(ARGV[10], ARGV[11], ARGV[12])
return 1
"""


class Verdict(StrEnum):
    """What :meth:`Admission.admit` decided for a job on a GPU."""

    RUN = "run"  # reserved on this GPU: start it
    SWAP = "swap"  # an older waiting job fits here now: it was reserved instead; this one waits
    HELD = "held"  # this GPU is held for an older job that does not fit yet; this one waits
    WAIT = "wait"  # fits this GPU once memory frees up; waits
    BIGGER = "bigger"  # too big for this GPU, fits a bigger one; waits
    NEVER = "never"  # too big for every GPU


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    other_job: str  # the waiting job reserved instead (SWAP) or holding the GPU (HELD)
    bytes: int  # memory available on this GPU, or the largest GPU's memory (BIGGER, NEVER)


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
        self._admit = client.register_script(_ADMIT)
        self._dispatch = client.register_script(_DISPATCH)
        self._release = client.register_script(_RELEASE)
        self._reclaim = client.register_script(_RECLAIM)
        self._wait = client.register_script(_WAIT)

    @staticmethod
    def _keys() -> list[str]:
        return [GPU_RESERVATIONS, GPU_RESERVATION_OWNERS, GPU_CAPACITY, GPU_TOTAL, GPU_SEEN, WORKER_HEARTBEAT,
                GPU_WAITING, GPU_WAITING_NEED, JOB_KEY]

    def register_gpu(self, gpu_id: str, total: int, capacity: int, state_json: str) -> None:
        """Record a GPU's size, the memory reservations may share, and its state (heartbeats do this)."""
        pipe = self.redis.pipeline()
        pipe.hset(GPU_TOTAL, gpu_id, total)
        pipe.hset(GPU_CAPACITY, gpu_id, capacity)
        pipe.hset(GPU_SEEN, gpu_id, f"{time.time():.3f}")
        pipe.hset(GPU_STATE, gpu_id, state_json)
        pipe.execute()

    def admit(self, gpu_id: str, job_id: str, need: int, owner: str, score: float) -> Decision:
        """Reserve ``need`` bytes for ``job_id`` on ``gpu_id`` if it may start there now (see module doc)."""
        verdict, other, amount = self._admit(args=[
            *self._keys(), gpu_id, job_id, need, owner, repr(score), repr(time.time()),
            self.backfill_limit_s, self.gpu_forget_s, MAX_SCAN])
        return Decision(Verdict(verdict), other, int(float(amount)))

    def dispatch(self, gpu_id: str, owner: str) -> str | None:
        """Reserve the first waiting job that fits ``gpu_id`` now; its id, or None."""
        job = self._dispatch(args=[*self._keys(), gpu_id, owner, repr(time.time()), self.backfill_limit_s,
                                   MAX_SCAN])
        return str(job) if job else None

    def release(self, gpu_id: str, job_id: str, owner: str = "") -> bool:
        """Drop ``owner``'s reservation of ``job_id`` on ``gpu_id`` (any owner's if ``owner`` is empty);
        False if there was none."""
        return bool(self._release(args=[*self._keys(), gpu_id, job_id, owner]))

    def wait(self, job_id: str, need: int, score: float) -> None:
        """Put a job in the waiting set (after a GPU out-of-memory error, for one)."""
        self._wait(args=[*self._keys(), job_id, need, repr(score)])

    def reclaim(self) -> int:
        """Drop every reservation whose worker's heartbeat expired; returns how many."""
        return int(self._reclaim(args=self._keys()))

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
