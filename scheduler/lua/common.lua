-- Shared by admit.lua, fill.lua, submit.lua, reclaim.lua and forget.lua: this text is prepended to each
-- when it is loaded (Redis scripts cannot `require`). Each of those scripts takes these keys:
-- KEYS[1]      reconq:gpucap              hash: GPU -> bytes its reservations may share
-- KEYS[2]      reconq:gputotal            hash: GPU -> its memory in bytes
-- KEYS[3]      reconq:gpuseen             hash: GPU -> when a worker last reported it (epoch seconds)
-- KEYS[4]      reconq:waiting             sorted set: the waiting jobs, by queue rank then time queued
-- KEYS[5]      reconq:waitneed            hash: waiting job -> bytes it needs
-- KEYS[6]      reconq:waitsecs            hash: waiting job -> its expected run time in seconds
-- KEYS[3+4i]   reconq:resv:<GPU i>        hash: job -> bytes reserved (i = 1..G, the GPU list below)
-- KEYS[4+4i]   reconq:resvowner:<GPU i>   hash: job -> the worker holding the reservation
-- KEYS[5+4i]   reconq:resvend:<GPU i>     hash: job -> when the reservation is expected to end
-- KEYS[6+4i]   reconq:gpuworkers:<GPU i>  hash: worker -> its last heartbeat (the GPU's worker slots)
-- KEYS[6+4G+j] reconq:hb:<worker j>       a worker's heartbeat (j = 1..W, the worker list below)
-- and, after the script's own N arguments (its header lists them; it calls `bind(N)` before anything):
-- ARGV[N+1]        prefix of job records, reconq:job: (read only, for their state; see below)
-- ARGV[N+2]        suffix of the owner of a pending reservation (no worker started its job yet)
-- ARGV[N+3]        score gap between queue ranks in the waiting set
-- ARGV[N+4]        the states of a finished job, space-separated
-- ARGV[N+5]        G, the number of GPUs in the GPU list
-- ARGV[N+6..N+5+G] the GPU list: every GPU in reconq:gputotal or reconq:gpuseen, and the script's own
-- ARGV[N+6+G..]    the worker list: every worker registered on a listed GPU or named by a reservation
--                  there, and the script's own (W names)
--
-- The caller reads the GPU and worker lists just before the script runs. `bind` checks them against
-- Redis before the script writes anything: should a GPU or a worker have appeared in between, the
-- script returns the error STALE, having written nothing, and the caller reads the lists again.
--
-- Job records are the one family of keys not passed in KEYS: a script reads the state of the waiting
-- jobs it looks at (up to MAX_SCAN per pick, further down the waiting set as it drops finished ones)
-- and of the jobs holding pending reservations, which only the script knows as it goes. Passing them
-- would mean reading and sending the whole waiting set on every call, and retrying whenever a job is
-- queued meanwhile. The scripts only read these keys (HGET of the field `state`).

local CAP, TOTAL, SEEN, WAIT, NEED, SECS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local GPUS, GPU, HB = {}, {}, {}  -- the GPU list; GPU -> its keys; worker -> its heartbeat key
local JOB, PENDING, SPAN, FINISHED = '', '', 0, {}

local function is_pending(owner)
  return string.sub(owner, -#PENDING) == PENDING
end

-- the worker named by a reservation's owner
local function worker_of(owner)
  return is_pending(owner) and string.sub(owner, 1, -#PENDING - 1) or owner
end

-- an error reply naming a GPU or a worker that Redis knows and the lists lack (or `owner`, the worker
-- the script may make an owner, if they lack it), else nil
local function unlisted(owner)
  for _, hash in ipairs({TOTAL, SEEN}) do
    for _, g in ipairs(redis.call('HKEYS', hash)) do
      if not GPU[g] then return redis.error_reply('STALE gpu ' .. g) end
    end
  end
  local names = {owner}
  for _, g in ipairs(GPUS) do
    for _, w in ipairs(redis.call('HKEYS', GPU[g].workers)) do names[#names + 1] = w end
    for _, o in ipairs(redis.call('HVALS', GPU[g].owners)) do names[#names + 1] = worker_of(o) end
  end
  for _, w in ipairs(names) do
    if not HB[w] then return redis.error_reply('STALE worker ' .. w) end
  end
  return nil
end

-- Read the shared arguments, which follow the script's own `n`, and the keys of the listed GPUs and
-- workers; then nil if the lists are complete, else the error reply to return (see the header).
local function bind(n, owner)
  JOB, PENDING, SPAN = ARGV[n + 1], ARGV[n + 2], tonumber(ARGV[n + 3])
  for s in string.gmatch(ARGV[n + 4], '%S+') do FINISHED[s] = true end
  local ngpus = tonumber(ARGV[n + 5])
  for i = 1, ngpus do
    local g, k = ARGV[n + 5 + i], 2 + 4 * i
    GPUS[i] = g
    GPU[g] = {resv = KEYS[k + 1], owners = KEYS[k + 2], ends = KEYS[k + 3], workers = KEYS[k + 4]}
  end
  local first = n + 6 + ngpus  -- the first worker's argument
  for j = first, #ARGV do HB[ARGV[j]] = KEYS[7 + 4 * ngpus + j - first] end
  return unlisted(owner)
end

local function alive(worker)
  return redis.call('EXISTS', HB[worker]) == 1
end

local function finished(job)
  local st = redis.call('HGET', JOB .. job, 'state')
  return (not st) or FINISHED[st] == true
end

local function unreserve(g, job)
  redis.call('HDEL', GPU[g].resv, job)
  redis.call('HDEL', GPU[g].owners, job)
  redis.call('HDEL', GPU[g].ends, job)
end

-- drop reservations on g whose worker's heartbeat expired; return the bytes reserved, but `except`'s
local function reclaim_and_sum(g, except)
  local owners = redis.call('HGETALL', GPU[g].owners)
  for i = 1, #owners, 2 do
    local o = owners[i + 1]
    if not alive(worker_of(o)) or (is_pending(o) and finished(owners[i])) then
      unreserve(g, owners[i])
    end
  end
  local sum = 0
  local resv = redis.call('HGETALL', GPU[g].resv)
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
  redis.call('HSET', GPU[g].resv, job, need)
  redis.call('HSET', GPU[g].owners, job, owner)
  if secs > 0 then redis.call('HSET', GPU[g].ends, job, now + secs) end
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
  for _, w in ipairs(redis.call('HKEYS', GPU[g].workers)) do
    if alive(w) then n = n + 1 else redis.call('HDEL', GPU[g].workers, w) end
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
  local resv = redis.call('HGETALL', GPU[g].resv)
  for i = 1, #resv, 2 do
    local e = redis.call('HGET', GPU[g].ends, resv[i])
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
  if workers == 0 then slots = own and 1 or 0 else slots = workers - redis.call('HLEN', GPU[g].resv) end
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
