-- Fill a GPU (Admission.fill): reserve waiting jobs on it while its memory and idle worker slots last,
-- as pending reservations of the worker asking. Keys and the shared arguments as in common.lua
-- (prepended).
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
-- ARGV[7]      the worker asking
-- ARGV[8]     prefix of job records, reconq:job:
-- ARGV[9]     suffix of a pending reservation's owner
-- ARGV[10]     score gap between queue ranks
-- ARGV[11]     the finished job states, space-separated
-- ARGV[12]     G, the number of GPUs listed
-- ARGV[13..12+G] the GPU list
-- ARGV[13+G..] the worker list
-- Returns the jobs reserved, to send to the GPU's queue.
local now, limit, forget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxscan, maxjobs = tonumber(ARGV[4]), tonumber(ARGV[5])
local g, owner = ARGV[6], ARGV[7]
local stale = bind(7, owner)
if stale then return stale end
if redis.call('ZCARD', WAIT) == 0 then return {} end
local got = fill(g, owner, maxjobs, true, '', now, limit, forget, maxscan)
return got
