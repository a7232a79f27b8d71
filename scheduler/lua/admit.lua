-- Admit a job on a GPU (Admission.admit): reserve it there if it may start now, else put it in the
-- waiting set, and fill this GPU (and, when the job does not start here, every other GPU with live
-- workers) from the waiting set. Keys and the shared arguments as in common.lua (prepended).
-- KEYS[1]      reconq:gpucap
-- KEYS[2]      reconq:gputotal
-- KEYS[3]      reconq:gpuseen
-- KEYS[4]      reconq:waiting
-- KEYS[5]      reconq:waitneed
-- KEYS[6]      reconq:waitsecs
-- KEYS[3+4i]   reconq:resv:<GPU i>        (i = 1..G, the GPU list)
-- KEYS[4+4i]   reconq:resvowner:<GPU i>
-- KEYS[5+4i]   reconq:resvend:<GPU i>
-- KEYS[6+4i]   reconq:gpuworkers:<GPU i>
-- KEYS[6+4G+j] reconq:hb:<worker j>       (j = 1..W, the worker list)
-- ARGV[1]      now (epoch seconds)
-- ARGV[2]      backfill limit in seconds
-- ARGV[3]      GPU forget time in seconds
-- ARGV[4]      waiting jobs one pick looks at, at most
-- ARGV[5]      jobs one fill reserves, at most
-- ARGV[6]      the GPU
-- ARGV[7]      the job
-- ARGV[8]      bytes it needs
-- ARGV[9]      the worker asking (owner of its reservation)
-- ARGV[10]     its score in the waiting set
-- ARGV[11]     its expected run time in seconds (0: unknown)
-- ARGV[12]     prefix of job records, reconq:job:
-- ARGV[13]     suffix of a pending reservation's owner
-- ARGV[14]     score gap between queue ranks
-- ARGV[15]     the finished job states, space-separated
-- ARGV[16]     G, the number of GPUs listed
-- ARGV[17..16+G] the GPU list
-- ARGV[17+G..] the worker list
-- Returns {verdict, other, bytes, then job, GPU pairs of the other jobs reserved, to send to their GPUs'
-- queues}: see Verdict and Decision in admission.py.
local now, limit, forget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxscan, maxfill = tonumber(ARGV[4]), tonumber(ARGV[5])
local g, job, need, owner = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local score, seconds = tonumber(ARGV[10]), ARGV[11]
local stale = bind(11, owner)
if stale then return stale end
if redis.call('HEXISTS', GPU[g].resv, job) == 1 then  -- dispatched here, or redelivered here
  redis.call('HSET', GPU[g].owners, job, owner)
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
