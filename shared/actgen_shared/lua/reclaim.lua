-- Take the entries of one consumer, only if its heartbeat has expired.
-- Returns flat {entry_id, job_id, ...} (job_id '' for an entry without one).
local jobs_stream = KEYS[1]
local dead_hb_key = KEYS[2]
local group = ARGV[1]
local dead_consumer = ARGV[2]
local claimer = ARGV[3]
local min_idle_ms = tonumber(ARGV[4])
local count = tonumber(ARGV[5])

if redis.call('EXISTS', dead_hb_key) == 1 then return {} end
local pending = redis.call('XPENDING', jobs_stream, group, '-', '+', count, dead_consumer)
local out = {}
for _, p in ipairs(pending) do
  local claimed = redis.call('XCLAIM', jobs_stream, group, claimer, min_idle_ms, p[1])
  for _, e in ipairs(claimed) do
    if e and e[2] then
      local job_id = ''
      for i = 1, #e[2], 2 do if e[2][i] == 'job_id' then job_id = e[2][i + 1] end end
      table.insert(out, e[1])
      table.insert(out, job_id)
    elseif e then
      table.insert(out, e[1])
      table.insert(out, '')
    end
  end
end
return out
