-- Set fields of an existing job, its state only along an allowed transition, only by its current run.
-- KEYS[1] the job hash reconq:job:<id>
-- KEYS[2] the set of running jobs reconq:running (kept here, with every change of state)
-- ARGV[1] the new state, or '' when the state is not changed
-- ARGV[2] the states the job may be in for that change, space-separated (from reconq.core.states)
-- ARGV[3] the fence, or '' for any writer: 'N' is the writer of run N (its 'attempts' value): the job
--         must be running that run (a run handed back, cancelled or finished writes nothing more);
--         '=N' is a worker about to start run N+1 over a record it read with attempts N: of two
--         deliveries of one job, only the first starts it
-- ARGV[4] the job's id (the member of KEYS[2])
-- ARGV[5..] field, value, field, value, ...
-- Returns 1 when written; -1 when the job does not exist; 0 when its state may not change so (nothing
-- written), with the state it is in as the second value; -2 when the fence does not hold (nothing written).
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local current = redis.call('HGET', KEYS[1], 'state') or ''
local fence = ARGV[3]
if fence ~= '' then
  local attempts = redis.call('HGET', KEYS[1], 'attempts') or '0'
  if string.sub(fence, 1, 1) == '=' then
    if attempts ~= string.sub(fence, 2) then return {-2, current} end
  elseif attempts ~= fence or current ~= 'running' then
    return {-2, current}
  end
end
if ARGV[1] ~= '' and not string.find(' ' .. ARGV[2] .. ' ', ' ' .. current .. ' ', 1, true) then
  return {0, current}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[1] == 'running' then
  redis.call('SADD', KEYS[2], ARGV[4])
elseif ARGV[1] ~= '' then
  redis.call('SREM', KEYS[2], ARGV[4])
end
return {1, current}
