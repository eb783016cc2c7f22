-- Say "alive" under our name, only while the name is ours (its key is absent or holds our
-- token). Returns {-1, holder} when another process holds the name; {1, 0} when the pending
-- list could not be read; else {1, 1, entry ids still pending for us...} (idle time reset).
local hb_key = KEYS[1]
local jobs_stream = KEYS[2]
local group = ARGV[1]
local consumer = ARGV[2]
local lease_ms = ARGV[3]
local token = ARGV[4]

local holder = redis.call('GET', hb_key)
if holder and holder ~= token then return {-1, holder} end
redis.call('SET', hb_key, token, 'PX', lease_ms)
local ok, pending = pcall(redis.call, 'XPENDING', jobs_stream, group, '-', '+', 10000, consumer)
if not ok then return {1, 0} end
local out = {1, 1}
for _, p in ipairs(pending) do
  redis.call('XCLAIM', jobs_stream, group, consumer, 0, p[1], 'JUSTID')
  table.insert(out, p[1])
end
return out
