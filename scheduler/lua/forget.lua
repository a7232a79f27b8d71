-- Forget a job (Admission.forget; a cancelled job, say): out of the waiting set, and its pending
-- reservations (no worker started it) dropped; a reservation a worker holds is the worker's to release.
-- Keys and the shared arguments as in common.lua (prepended).
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
-- ARGV[1]      the job
-- ARGV[2]     prefix of job records, reconq:job:
-- ARGV[3]     suffix of a pending reservation's owner
-- ARGV[4]     score gap between queue ranks
-- ARGV[5]     the finished job states, space-separated
-- ARGV[6]     G, the number of GPUs listed
-- ARGV[7..6+G] the GPU list
-- ARGV[7+G..] the worker list
-- Returns {1 if it was waiting else 0, then the GPUs whose pending reservation of it was dropped}.
local job = ARGV[1]
local stale = bind(1)
if stale then return stale end
local out = {redis.call('ZREM', WAIT, job)}
redis.call('HDEL', NEED, job)
redis.call('HDEL', SECS, job)
for _, g in ipairs(redis.call('HKEYS', TOTAL)) do
  local o = redis.call('HGET', GPU[g].owners, job)
  if o and is_pending(o) then
    unreserve(g, job)
    out[#out + 1] = g
  end
end
return out
