-- Create a job record and its indexes at once, unless the job exists already; number it.
-- KEYS[1] the job hash            reconq:job:<id>
-- KEYS[2] the index of all jobs   reconq:jobs            (sorted set, scored by creation time)
-- KEYS[3] the exam's jobs         reconq:exam:<digest>   (sorted set, scored by the job's number)
-- KEYS[4] the scan's jobs         reconq:scanjobs:<scan> (set)
-- KEYS[5] the job counter         reconq:jobseq
-- ARGV[1] created_at (epoch seconds), ARGV[2] the job id, ARGV[3..] field, value, field, value, ...
-- The job's number (field seq) comes from the counter: it orders the jobs of an exam by when they were
-- recorded, whatever the wall clock says. Returns the number, or 0 when the id existed (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], seq, ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
return seq
