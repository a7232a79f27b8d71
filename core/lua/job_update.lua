-- Set fields of an existing job, its state only along an allowed transition, only by its current run.
-- KEYS[1] the job hash reconq:job:<id>
-- ARGV[1] the new state, or '' when the state is not changed
-- ARGV[2] the states the job may be in for that change, space-separated (from reconq.core.states)
-- ARGV[3] the fence: the run (its 'attempts' value) the writer is, or '' for any writer
-- ARGV[4..] field, value, field, value, ...
-- Returns 1 when written; -1 when the job does not exist; 0 when its state may not change so (nothing
-- written), with the state it is in as the second value; -2 when a newer run holds the job (a fenced
-- writer of an older run: nothing written).
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local current = redis.call('HGET', KEYS[1], 'state') or ''
if ARGV[3] ~= '' and (redis.call('HGET', KEYS[1], 'attempts') or '0') ~= ARGV[3] then
  return {-2, current}
end
if ARGV[1] ~= '' and not string.find(' ' .. ARGV[2] .. ' ', ' ' .. current .. ' ', 1, true) then
  return {0, current}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
return {1, current}
