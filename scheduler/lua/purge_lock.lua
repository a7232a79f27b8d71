-- Keep or release the retention purge's lock, only while this holder has it (taken with SET NX PX).
-- KEYS[1] the lock                reconq:purgelock       (string: the holder's token)
-- ARGV[1] the holder's token, ARGV[2] milliseconds to keep it for (0: release it)
-- Returns 1 when done, 0 when the lock is not (or no longer) this holder's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
