-- Mark a job running on this consumer. Returns {1, done item indices...} when started (so the
-- worker learns what an earlier delivery stored without another round trip), 0 when not
-- (final or cancelled: acked).
-- Starting the same delivery twice in one process (a retried call whose reply was lost, a
-- re-read pending entry) counts it once.
local job = KEYS[1]
local stats = KEYS[2]
local jobs_stream = KEYS[3]
local cancel_flag = KEYS[4]
local done = KEYS[5]
local progress = KEYS[6]
local group = ARGV[1]
local entry = ARGV[2]
local consumer = ARGV[3]
local now = ARGV[4]
local ttl = ARGV[5]
local token = ARGV[6]

return start_delivery(job, stats, jobs_stream, cancel_flag, done, progress, group, entry,
  consumer, now, ttl, token)
