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

local status = redis.call('HGET', job, 'status')
if (not status) or is_final(status) then ack(jobs_stream, group, entry); return 0 end
if redis.call('EXISTS', cancel_flag) == 1 then
  finish(job, stats, 'cancelled', '', '', now, ttl, {job, cancel_flag, done, progress})
  ack(jobs_stream, group, entry)
  return 0
end
local start_id = token .. ' ' .. entry
if status == 'running' and redis.call('HGET', job, 'start_id') == start_id then
  return {1, unpack(redis.call('HKEYS', done))}
end
if status ~= 'running' then set_status(job, stats, status, 'running') end
redis.call('HSET', job, 'started_at', now, 'replica', consumer, 'start_id', start_id)
redis.call('HINCRBY', job, 'deliveries', 1)
return {1, unpack(redis.call('HKEYS', done))}
