-- Delete an ended job's record and its entries in every index at once, if it is still ended (and ended
-- before a given time) when the script runs: a staff retry that queued it again meanwhile keeps it.
-- KEYS[1] the job hash            reconq:job:<id>
-- KEYS[2] the index of all jobs   reconq:jobs            (sorted set)
-- KEYS[3] the exam's jobs         reconq:exam:<digest>   (sorted set)
-- KEYS[4] the scan's jobs         reconq:scanjobs:<scan> (set)
-- KEYS[5] the job's log           reconq:log:<id>
-- KEYS[6] the job's stages        reconq:stages:<id>
-- KEYS[7] the job's actions       reconq:actions:<id>
-- KEYS[8] the scan's job counter  reconq:jobseq:<scan>   (deleted with the scan's last job)
-- ARGV[1] the job id, ARGV[2] the ended states (space-separated), ARGV[3] the latest end allowed (epoch
-- seconds; '' for any). A job without finished_at is aged by its created_at.
-- Returns 1 when deleted, 0 when kept (not ended, or ended later), -1 when there is no such job.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
local ended = false
for s in string.gmatch(ARGV[2], '%S+') do
  if s == state then ended = true end
end
if not ended then return 0 end
if ARGV[3] ~= '' then
  local at = tonumber(redis.call('HGET', KEYS[1], 'finished_at') or redis.call('HGET', KEYS[1], 'created_at') or '')
  if at == nil or at > tonumber(ARGV[3]) then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[5], KEYS[6], KEYS[7])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
if redis.call('SCARD', KEYS[4]) == 0 then redis.call('DEL', KEYS[8]) end
return 1
