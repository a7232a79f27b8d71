-- Create a job record and its indexes at once, unless the job exists already.
-- KEYS[1] the job hash            reconq:job:<id>
-- KEYS[2] the index of all jobs   reconq:jobs            (sorted set, scored by creation time)
-- KEYS[3] the retrieval match     reconq:match:<digest>  (sorted set, scored by creation time)
-- KEYS[4] the scan's jobs         reconq:scanjobs:<scan> (set)
-- ARGV[1] created_at (epoch seconds), ARGV[2] the job id, ARGV[3..] field, value, field, value, ...
-- Returns 1 when created, 0 when the id existed (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
return 1
