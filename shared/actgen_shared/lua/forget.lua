-- Forget a consumer that is gone: no heartbeat and nothing pending (unique replica ids would
-- otherwise pile up in the group). Returns 1 when it was removed.
local hb_key = KEYS[1]
local jobs_stream = KEYS[2]
local group = ARGV[1]
local consumer = ARGV[2]

if redis.call('EXISTS', hb_key) == 1 then return 0 end
local pending = redis.call('XPENDING', jobs_stream, group, '-', '+', 1, consumer)
if #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', jobs_stream, group, consumer)
return 1
