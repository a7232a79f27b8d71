-- Place jobs at submit (Admission.submit): into the waiting set, then every GPU with live workers is
-- filled, once for them all (a batch is placed as a whole: best fit among all its jobs, not in the order
-- they are listed). A job is not placed when no GPU with live workers was seen, or it is larger than
-- every GPU that has them: it goes to its priority queue and the first worker that takes it decides (a
-- CPU worker may take it, say). Keys and the shared arguments as in common.lua (prepended).
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
-- ARGV[6]      C, the number of jobs
-- ARGV[3+4c]   job c (c = 1..C)
-- ARGV[4+4c]   bytes job c needs
-- ARGV[5+4c]   its score in the waiting set
-- ARGV[6+4c]   its expected run time in seconds (0: unknown)
-- ARGV[7+4C]     prefix of job records, reconq:job:
-- ARGV[8+4C]     suffix of a pending reservation's owner
-- ARGV[9+4C]     score gap between queue ranks
-- ARGV[10+4C]    the finished job states, space-separated
-- ARGV[11+4C]    G, the number of GPUs listed
-- ARGV[12+4C..11+4C+G] the GPU list
-- ARGV[12+4C+G..] the worker list
-- Returns {the number of jobs not placed, those jobs..., then job, GPU pairs reserved by the fills (these
-- jobs or others) to send to their GPUs' queues}.
local now, limit, forget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxscan, maxfill = tonumber(ARGV[4]), tonumber(ARGV[5])
local count = tonumber(ARGV[6])
local stale = bind(6 + 4 * count)
if stale then return stale end
local live, biggest = {}, 0
for _, h in ipairs(fresh_gpus(now, forget)) do
  local worker = nil
  for _, w in ipairs(redis.call('HKEYS', GPU[h].workers)) do
    if alive(w) then worker = w break end
  end
  if worker then
    live[#live + 1] = {h, worker}
    if number(TOTAL, h) > biggest then biggest = number(TOTAL, h) end
  end
end
local unplaced = {}
for c = 1, count do
  local job, need, score, seconds = ARGV[3 + 4 * c], tonumber(ARGV[4 + 4 * c]), tonumber(ARGV[5 + 4 * c]),
    ARGV[6 + 4 * c]
  if need > biggest then unplaced[#unplaced + 1] = job else wait(job, need, score, seconds) end
end
local out = {#unplaced}
for _, job in ipairs(unplaced) do out[#out + 1] = job end
for _, hw in ipairs(live) do
  -- pending reservations are owned by a live worker of the GPU: reclaimed if that worker dies
  for _, w in ipairs(fill(hw[1], hw[2], maxfill, false, '', now, limit, forget, maxscan)) do
    out[#out + 1] = w
    out[#out + 1] = hw[1]
  end
end
return out
