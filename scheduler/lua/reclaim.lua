-- Reclaim (Admission.reclaim): on every known GPU, drop the reservations whose worker's heartbeat
-- expired (and pending ones whose job is finished), and the registered workers that are dead. Keys and
-- the shared arguments as in common.lua (prepended); this script has no arguments of its own (N = 0).
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
-- ARGV[1]     prefix of job records, reconq:job:
-- ARGV[2]     suffix of a pending reservation's owner
-- ARGV[3]     score gap between queue ranks
-- ARGV[4]     the finished job states, space-separated
-- ARGV[5]     G, the number of GPUs listed
-- ARGV[6..5+G] the GPU list
-- ARGV[6+G..] the worker list
-- Returns the number of reservations dropped.
local stale = bind(0)
if stale then return stale end
local gpus = redis.call('HKEYS', TOTAL)
local n = 0
for _, g in ipairs(gpus) do
  local before = redis.call('HLEN', GPU[g].resv)
  reclaim_and_sum(g, '')
  live_workers(g)
  n = n + before - redis.call('HLEN', GPU[g].resv)
end
return n
