-- Release a reservation (Admission.release): drop a job's reservation on one GPU, if `owner` holds it
-- (any owner's if `owner` is empty). Self-contained (common.lua is not prepended).
-- KEYS[1] reconq:resv:<GPU>       hash: job -> bytes reserved
-- KEYS[2] reconq:resvowner:<GPU>  hash: job -> the worker holding the reservation
-- KEYS[3] reconq:resvend:<GPU>    hash: job -> when the reservation is expected to end
-- ARGV[1] the job
-- ARGV[2] the worker that must hold the reservation, or '' for any
-- Returns 1 when dropped, 0 when another worker holds it.
local job, owner = ARGV[1], ARGV[2]
if owner ~= '' and redis.call('HGET', KEYS[2], job) ~= owner then return 0 end
redis.call('HDEL', KEYS[1], job)
redis.call('HDEL', KEYS[2], job)
redis.call('HDEL', KEYS[3], job)
return 1
