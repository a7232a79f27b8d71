-- Put a job in the waiting set (Admission.wait; after a GPU out-of-memory error, say). Self-contained
-- (common.lua is not prepended).
-- KEYS[1] reconq:waiting   sorted set: the waiting jobs, by queue rank then time queued
-- KEYS[2] reconq:waitneed  hash: waiting job -> bytes it needs
-- KEYS[3] reconq:waitsecs  hash: waiting job -> its expected run time in seconds
-- ARGV[1] the job
-- ARGV[2] bytes it needs
-- ARGV[3] its score in the waiting set
-- ARGV[4] its expected run time in seconds (0: unknown; a job that has one keeps it)
-- Returns 1.
local job, need, score, seconds = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('ZADD', KEYS[1], score, job)
redis.call('HSET', KEYS[2], job, need)
if seconds and tonumber(seconds) > 0 then redis.call('HSET', KEYS[3], job, seconds) end
return 1
