-- Graceful stop: drop our heartbeat (if it is still ours) and, with nothing pending, our
-- name in the group.
local hb_key = KEYS[1]
local jobs_stream = KEYS[2]
local group = ARGV[1]
local consumer = ARGV[2]
local token = ARGV[3]

if redis.call('GET', hb_key) == token then redis.call('DEL', hb_key) end
local ok, pending = pcall(redis.call, 'XPENDING', jobs_stream, group, '-', '+', 1, consumer)
if ok and #pending == 0 then
  pcall(redis.call, 'XGROUP', 'DELCONSUMER', jobs_stream, group, consumer)
end
return 1
