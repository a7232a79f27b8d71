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

Keys are in :mod:`reconq.core.constants` (and :data:`GPU_WORKERS` here); the job states the scripts read are
:class:`JobState` values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import redis

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

_COMMON = """
local RESV, OWNERS, CAP, TOTAL, SEEN, HB, WAIT, NEED, JOB, WORKERS, SECS, ENDS = ARGV[1], ARGV[2], ARGV[3],
  ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local SPAN = %(span)r
local PENDING = '%(pending)s'

local function finished(job)
  local st = redis.call('HGET', JOB .. job, 'state')
  return (not st) or st == '%(done)s' or st == '%(failed)s' or st == '%(cancelled)s'
end

local function unreserve(g, job)
  redis.call('HDEL', RESV .. g, job)
  redis.call('HDEL', OWNERS .. g, job)
  redis.call('HDEL', ENDS .. g, job)
end

-- drop reservations on g whose worker's heartbeat expired; return the bytes reserved, but `except`'s
local function reclaim_and_sum(g, except)
  local owners = redis.call('HGETALL', OWNERS .. g)
  for i = 1, #owners, 2 do
    local o = owners[i + 1]
    local pending = string.sub(o, -#PENDING) == PENDING
    local name = pending and string.sub(o, 1, -#PENDING - 1) or o
    if redis.call('EXISTS', HB .. name) == 0 or (pending and finished(owners[i])) then
      unreserve(g, owners[i])
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
  redis.call('HDEL', SECS, job)
end

-- `seconds`: the expected run time (0 or nil: unknown; a job sent back to wait keeps the one it had)
local function wait(job, need, score, seconds)
  redis.call('ZADD', WAIT, score, job)
  redis.call('HSET', NEED, job, need)
  if seconds and tonumber(seconds) > 0 then redis.call('HSET', SECS, job, seconds) end
end

-- reserve on g for a job (waiting or not); its expected end (now + its expected run time) is kept when
-- known, for the backfill of `pick`
local function reserve(g, job, need, owner, now)
  local secs = tonumber(redis.call('HGET', SECS, job) or '0')
  redis.call('HSET', RESV .. g, job, need)
  redis.call('HSET', OWNERS .. g, job, owner)
  if secs > 0 then redis.call('HSET', ENDS .. g, job, now + secs) end
  unwait(job)
end

-- 2 for a stat job, 1 for another job waiting longer than `limit` seconds, else 0
local function urgency(score, now, limit)
  local rank = math.floor(score / SPAN)
  if rank == 0 then return 2 end
  if (now - (score - rank * SPAN)) > limit then return 1 end
  return 0
end

local function number(key, field)
  return tonumber(redis.call('HGET', key, field) or '0')
end

-- live workers of g (dead ones are dropped)
local function live_workers(g)
  local n = 0
  for _, w in ipairs(redis.call('HKEYS', WORKERS .. g)) do
    if redis.call('EXISTS', HB .. w) == 1 then n = n + 1 else redis.call('HDEL', WORKERS .. g, w) end
  end
  return n
end

-- GPUs seen in the last `forget` seconds
local function fresh_gpus(now, forget)
  local out = {}
  local seen = redis.call('HGETALL', SEEN)
  for i = 1, #seen, 2 do
    if now - tonumber(seen[i + 1]) <= forget then out[#out + 1] = seen[i] end
  end
  table.sort(out)
  return out
end

-- the size of the smallest GPU seen
local SMALLEST = nil
local function smallest_gpu(now, forget)
  if SMALLEST == nil then
    SMALLEST = math.huge
    for _, h in ipairs(fresh_gpus(now, forget)) do
      local t = number(TOTAL, h)
      if t < SMALLEST then SMALLEST = t end
    end
  end
  return SMALLEST
end

-- memory available on h now
local function available(h)
  return number(CAP, h) - reclaim_and_sum(h, '')
end

-- The shadow of a job of `need` bytes held on g (EASY backfilling): the time it fits g if no other job
-- starts there and the jobs there end when expected, and the memory left over then. A reservation whose
-- run time is not known ends at an unknown time (math.huge: then only the memory left over counts); one
-- past its expected end, now. The reservation that lets it fit frees a worker slot too, so no slot is
-- kept for it.
local function shadow(g, avail, need, now)
  local ends = {}
  local resv = redis.call('HGETALL', RESV .. g)
  for i = 1, #resv, 2 do
    local e = redis.call('HGET', ENDS .. g, resv[i])
    ends[#ends + 1] = {e and math.max(tonumber(e), now) or math.huge, tonumber(resv[i + 1])}
  end
  table.sort(ends, function(a, b) return a[1] < b[1] end)
  local free, at = avail, now
  for _, e in ipairs(ends) do
    if free >= need then break end
    free, at = free + e[2], e[1]
  end
  if free < need then return math.huge, 0 end
  return at, free - need
end

-- the GPU a holding job of `need` bytes waits for: of those large enough and not `claimed` by a holding
-- job before it, the one with the most memory available now (it fits there soonest)
local function target(need, now, forget, claimed, avails)
  local best, most = nil, -1
  for _, h in ipairs(fresh_gpus(now, forget)) do
    if not claimed[h] and number(TOTAL, h) >= need then
      if avails[h] == nil then avails[h] = available(h) end
      if avails[h] > most then best, most = h, avails[h] end
    end
  end
  return best
end

-- The waiting job to start on g now, with its need; or nil and the holding job g is kept for (or nil).
-- Holding jobs, of those that fit g: every stat job, the first job in waiting order that has waited past
-- the limit, and every job too large for the smallest GPU (a large job). A stat job that fits now starts
-- first, in waiting order; then the largest large job that fits now (large jobs run long, and only the
-- large GPUs take them). A holding job that fits nowhere now claims its target GPU, so two holding jobs
-- wait for two GPUs (stat and long-waiting jobs in waiting order, then large jobs, the smallest first).
-- On its target, other jobs are backfilled (EASY backfilling): a job may start only if it leaves the
-- holding job its memory at the shadow time (see `shadow`), or, unless the holding job is a stat job, if
-- it is expected to end by then. Among those, the largest share of g's memory x expected run time.
local function pick(g, avail, total, now, limit, forget, maxscan)
  local list = redis.call('ZRANGE', WAIT, 0, maxscan - 1, 'WITHSCORES')
  local best, bestneed = nil, -1
  local aged = false
  local smallest = smallest_gpu(now, forget)
  local claimed, avails, fits = {}, {}, {}
  local held = nil
  local until_, extra, strict = math.huge, avail, false  -- the hold's shadow time and memory left then
  local bigs = {}
  local large, largeneed = nil, -1  -- the largest large job that fits now
  local known, nknown = 0, 0  -- expected run times of the fitting jobs that have one
  local function secs_of(w) return tonumber(redis.call('HGET', SECS, w) or '0') end
  -- whether a job of `wneed` bytes expected to run `secs` (0: not known) may start without delaying `held`
  local function allowed(wneed, secs)
    if wneed > avail then return false end
    if held == nil or wneed <= extra then return true end
    return (not strict) and secs > 0 and until_ < math.huge and now + secs <= until_
  end
  local function claim(w, wneed, u)
    local t = target(wneed, now, forget, claimed, avails)
    if t ~= nil then
      claimed[t] = true
      if t == g and held == nil then
        held, strict = w, u == 2
        until_, extra = shadow(g, avail, wneed, now)
      end
    end
  end
  for i = 1, #list, 2 do
    local w = list[i]
    if finished(w) then
      unwait(w)
    else
      local wneed = number(NEED, w)
      local score = tonumber(list[i + 1])
      local u = wneed <= total and urgency(score, now, limit) or 0
      local first = u == 2 or (wneed <= total and wneed > smallest)  -- goes first where it fits
      local holder = first or (u == 1 and not aged)
      if u == 1 then aged = true end
      if u == 2 and allowed(wneed, secs_of(w)) then return w, wneed, held end
      if first and u ~= 2 and wneed <= avail then
        if wneed > largeneed and allowed(wneed, secs_of(w)) then large, largeneed = w, wneed end
      elseif holder and wneed > avail and u == 0 then
        bigs[#bigs + 1] = {w, wneed}
      elseif holder and wneed > avail then
        claim(w, wneed, u)
      elseif wneed <= avail then
        local rank = math.floor(score / SPAN)
        local secs = secs_of(w)
        if secs > 0 then known, nknown = known + secs, nknown + 1 end
        fits[#fits + 1] = {w, wneed, math.max(0, now - (score - rank * SPAN)) / limit, secs}
      end
    end
  end
  if large ~= nil then return large, largeneed, held end
  -- large jobs claim GPUs after stat and long-waiting jobs, the smallest first (it fits soonest)
  table.sort(bigs, function(a, b) return a[2] < b[2] end)
  for _, c in ipairs(bigs) do claim(c[1], c[2], 0) end
  -- the best fit allowed: the largest share of g's memory x time (the share of g, times the expected run
  -- time over the longest of the fitting jobs; a job without an estimate counts the mean of those with
  -- one), plus one for every `limit` seconds waited (jobs queued together keep this order, which starts
  -- long, large jobs first and leaves short, small ones to fill the end; a job older by `limit` beats any
  -- younger one)
  local mean = nknown > 0 and known / nknown or 1
  local longest = 0
  for _, c in ipairs(fits) do
    if (c[4] > 0 and c[4] or mean) > longest then longest = c[4] > 0 and c[4] or mean end
  end
  local bestkey = -1
  for _, c in ipairs(fits) do
    local key = (c[2] / total) * ((c[4] > 0 and c[4] or mean) / longest) + c[3]
    if key > bestkey and allowed(c[2], c[4]) then best, bestneed, bestkey = c[1], c[2], key end
  end
  return best, bestneed, held
end

-- reserve waiting jobs on g while memory and idle worker slots last (at most `maxjobs`); `mine` (the
-- caller's own job, if any) is reserved for `owner`, the others as pending. A GPU without registered
-- workers has one slot if `own` (the caller works on it), else none.
local function fill(g, owner, maxjobs, own, mine, now, limit, forget, maxscan)
  local workers = live_workers(g)
  local total = number(TOTAL, g)
  local avail = number(CAP, g) - reclaim_and_sum(g, '')
  local slots
  if workers == 0 then slots = own and 1 or 0 else slots = workers - redis.call('HLEN', RESV .. g) end
  slots = math.min(slots, maxjobs)
  local got, held = {}, nil
  while slots > 0 do
    local w, wneed, h = pick(g, avail, total, now, limit, forget, maxscan)
    if not w then
      held = h
      break
    end
    if h and h ~= w then held = h end
    reserve(g, w, wneed, (w == mine) and owner or (owner .. PENDING), now)
    got[#got + 1] = w
    avail = avail - wneed
    slots = slots - 1
  end
  if slots <= 0 and not held and mine ~= '' then
    local _, _, h = pick(g, avail, total, now, limit, forget, maxscan)
    held = h
  end
  return got, held, avail
end
"""
_COMMON %= {  # noqa: UP031 - Lua's braces rule out str.format
    "span": RANK_SPAN, "done": JobState.DONE.value, "failed": JobState.FAILED.value,
    "cancelled": JobState.CANCELLED.value, "pending": PENDING_SUFFIX,
}

_ADMIT = _COMMON + """
local g, job, need, owner = ARGV[13], ARGV[14], tonumber(ARGV[15]), ARGV[16]
local score, now, limit, forget = tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19]), tonumber(ARGV[20])
local maxscan, maxfill, seconds = tonumber(ARGV[21]), tonumber(ARGV[22]), ARGV[23]
if redis.call('HEXISTS', RESV .. g, job) == 1 then  -- dispatched here, or redelivered here
  redis.call('HSET', OWNERS .. g, job, owner)
  unwait(job)
  return {'run', '', '0'}
end
local total = number(TOTAL, g)
local biggest = total
local gpus = fresh_gpus(now, forget)
for _, h in ipairs(gpus) do
  local t = number(TOTAL, h)
  if t > biggest then biggest = t end
end
if need > biggest then
  unwait(job)
  return {'never', '', tostring(biggest)}
end
wait(job, need, score, seconds)
local out = {}
local got, held, avail = fill(g, owner, maxfill, true, job, now, limit, forget, maxscan)
local ran, first = false, ''
for _, w in ipairs(got) do
  if w == job then ran = true else
    if first == '' then first = w end
    out[#out + 1] = w
    out[#out + 1] = g
  end
end
local moved = ''
if not ran then  -- other GPUs with idle workers may take it, or other waiting jobs, now
  for _, h in ipairs(gpus) do
    if h ~= g and live_workers(h) > 0 then
      local got2 = fill(h, owner, maxfill, false, '', now, limit, forget, maxscan)
      for _, w in ipairs(got2) do
        if w == job then moved = h end
        out[#out + 1] = w
        out[#out + 1] = h
      end
    end
  end
end
local res
if ran then res = {'run', '', tostring(avail)}
elseif moved ~= '' then res = {'moved', moved, tostring(avail)}
elseif first ~= '' then res = {'swap', first, tostring(avail)}
elseif held and held ~= job then res = {'held', held, tostring(avail)}
elseif need <= total then res = {'wait', '', tostring(avail)}
else res = {'bigger', '', tostring(biggest)} end
for _, x in ipairs(out) do res[#res + 1] = x end
return res
"""

_FILL = _COMMON + """
local g, owner, now, limit, maxscan = ARGV[13], ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local maxjobs, forget = tonumber(ARGV[18]), tonumber(ARGV[19])
if redis.call('ZCARD', WAIT) == 0 then return {} end
local got = fill(g, owner, maxjobs, true, '', now, limit, forget, maxscan)
return got
"""

_RELEASE = _COMMON + """
local g, job, owner = ARGV[13], ARGV[14], ARGV[15]
if owner ~= '' and redis.call('HGET', OWNERS .. g, job) ~= owner then return 0 end
unreserve(g, job)
return 1
"""

_RECLAIM = _COMMON + """
local gpus = redis.call('HKEYS', TOTAL)
local n = 0
for _, g in ipairs(gpus) do
  local before = redis.call('HLEN', RESV .. g)
  reclaim_and_sum(g, '')
  live_workers(g)
  n = n + before - redis.call('HLEN', RESV .. g)
end
return n
"""

# jobs placed at submit: into the waiting set, then every GPU with live workers is filled, once for them
# all (a batch is placed as a whole: best fit among all its jobs, not in the order they are listed).
# ARGV: count, then job, need, seconds, score per job. Returns {count not placed, those jobs..., then
# job, GPU pairs reserved by the fills (these jobs or others) to send to their GPUs' queues}. A job is not
# placed when no GPU with live workers was seen, or it is larger than every GPU that has them: it goes to
# its priority queue and the first worker that takes it decides (a CPU worker may take it, say).
_SUBMIT = _COMMON + """
local now, limit, forget = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local maxscan, maxfill, count = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18])
local live, biggest = {}, 0
for _, h in ipairs(fresh_gpus(now, forget)) do
  local worker = nil
  for _, w in ipairs(redis.call('HKEYS', WORKERS .. h)) do
    if redis.call('EXISTS', HB .. w) == 1 then worker = w break end
  end
  if worker then
    live[#live + 1] = {h, worker}
    if number(TOTAL, h) > biggest then biggest = number(TOTAL, h) end
  end
end
local unplaced = {}
for i = 0, count - 1 do
  local job, need, seconds, score = ARGV[19 + 4 * i], tonumber(ARGV[20 + 4 * i]), ARGV[21 + 4 * i],
    tonumber(ARGV[22 + 4 * i])
  if need > biggest then unplaced[#unplaced + 1] = job else wait(job, need, score, seconds) end
end
local out = {#unplaced}
for _, job in ipairs(unplaced) do out[#out + 1] = job end
for _, hw in ipairs(live) do
  -- pending reservations are owned by a live worker of the GPU: reclaimed if that worker dies
  for _, w in ipairs(fill(hw[1], hw[2], maxfill, false, '', now, limit, forget, maxscan)) do
    out[#out + 1] = w
    out[#out + 1] = hw[1]
  end
end
return out
"""

_WAIT = _COMMON + """
wait(ARGV[13], ARGV[14], ARGV[15], ARGV[16])
return 1
"""

# a cancelled job: out of the waiting set, and its pending reservations (no worker started it) dropped; a
# reservation a worker holds is the worker's to release. Returns {1 if it was waiting else 0, GPUs...}
_FORGET = _COMMON + """
local job = ARGV[13]
local out = {redis.call('ZREM', WAIT, job)}
redis.call('HDEL', NEED, job)
redis.call('HDEL', SECS, job)
for _, g in ipairs(redis.call('HKEYS', TOTAL)) do
  local o = redis.call('HGET', OWNERS .. g, job)
  if o and string.sub(o, -#PENDING) == PENDING then
    unreserve(g, job)
    out[#out + 1] = g
  end
end
return out
"""


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
        self._admit = client.register_script(_ADMIT)
        self._fill = client.register_script(_FILL)
        self._release = client.register_script(_RELEASE)
        self._reclaim = client.register_script(_RECLAIM)
        self._wait = client.register_script(_WAIT)
        self._submit = client.register_script(_SUBMIT)
        self._forget = client.register_script(_FORGET)

    @staticmethod
    def _keys() -> list[str]:
        return [GPU_RESERVATIONS, GPU_RESERVATION_OWNERS, GPU_CAPACITY, GPU_TOTAL, GPU_SEEN, WORKER_HEARTBEAT,
                GPU_WAITING, GPU_WAITING_NEED, JOB_KEY, GPU_WORKERS, GPU_WAITING_SECONDS,
                GPU_RESERVATION_ENDS]

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
        verdict, other, amount, *rest = self._admit(args=[
            *self._keys(), gpu_id, job_id, need, owner, repr(score), repr(time.time()),
            self.backfill_limit_s, self.gpu_forget_s, MAX_SCAN, MAX_FILL, repr(float(seconds))])
        pairs = tuple((str(rest[i]), str(rest[i + 1])) for i in range(0, len(rest), 2))
        return Decision(Verdict(verdict), other, int(float(amount)), pairs)

    def fill(self, gpu_id: str, owner: str, max_jobs: int = MAX_FILL) -> list[str]:
        """Reserve waiting jobs on ``gpu_id`` while its memory and idle worker slots last (at most
        ``max_jobs``), in the order of the module doc; their ids, to send to the GPU's queue."""
        jobs = self._fill(args=[*self._keys(), gpu_id, owner, repr(time.time()), self.backfill_limit_s, MAX_SCAN,
                                max_jobs, self.gpu_forget_s])
        return [str(j) for j in jobs or []]

    def dispatch(self, gpu_id: str, owner: str) -> str | None:
        """Reserve one waiting job on ``gpu_id`` (see :meth:`fill`); its id, or None."""
        jobs = self.fill(gpu_id, owner, 1)
        return jobs[0] if jobs else None

    def release(self, gpu_id: str, job_id: str, owner: str = "") -> bool:
        """Drop ``owner``'s reservation of ``job_id`` on ``gpu_id`` (any owner's if ``owner`` is empty);
        False if there was none."""
        return bool(self._release(args=[*self._keys(), gpu_id, job_id, owner]))

    def wait(self, job_id: str, need: int, score: float, seconds: float = 0.0) -> None:
        """Put a job in the waiting set (after a GPU out-of-memory error, for one)."""
        self._wait(args=[*self._keys(), job_id, need, repr(score), repr(float(seconds))])

    def submit(self, jobs: Sequence[tuple[str, int, float, float]]) -> tuple[list[str], list[tuple[str, str]]]:
        """Place jobs at submit, ``(job id, bytes needed, score, expected seconds)`` each: put them in the
        waiting set and fill every GPU that has live workers, in one step (a batch is placed as a whole).
        Returns the jobs not placed (no GPU has live workers, or the job is larger than every GPU that
        has), which go to their priority queues (see :mod:`reconq.scheduler.placement`), and the (job id, GPU id)
        reserved by the fills (these jobs or others) to send to their GPUs' queues."""
        flat = [str(x) for job_id, need, score, seconds in jobs for x in (job_id, need, repr(float(seconds)),
                                                                          repr(score))]
        count, *rest = self._submit(args=[*self._keys(), repr(time.time()), self.backfill_limit_s,
                                          self.gpu_forget_s, MAX_SCAN, MAX_FILL, len(jobs), *flat])
        unplaced = [str(j) for j in rest[:int(count)]]
        pairs = rest[int(count):]
        return unplaced, [(str(pairs[i]), str(pairs[i + 1])) for i in range(0, len(pairs), 2)]

    def forget(self, job_id: str) -> tuple[bool, list[str]]:
        """Take a job (cancelled, say) out of the waiting set and drop its pending reservations, those made
        for it while no worker has started it, in one step; a reservation a worker holds is left to that
        worker. Returns whether it was waiting, and the GPUs whose pending reservation was dropped."""
        was_waiting, *dropped = self._forget(args=[*self._keys(), job_id])
        return bool(int(was_waiting)), [str(g) for g in dropped]

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
