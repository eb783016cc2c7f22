-- Put a job back at once, only if its entry is still ours (else another consumer owns it
-- now). mode: '1' the delivery counts (a transient error), '0' it does not (a graceful
-- hand-back), 'device' it does not but counts as a device loss. Returns 1 when it was put back.
local job = KEYS[1]
local stats = KEYS[2]
local jobs_stream = KEYS[3]
local group = ARGV[1]
local entry = ARGV[2]
local consumer = ARGV[3]
local job_id = ARGV[4]
local mode = ARGV[5]
local note = ARGV[6]

local mine = redis.call('XPENDING', jobs_stream, group, entry, entry, 1, consumer)
if #mine == 0 then return 0 end
ack(jobs_stream, group, entry)
local status = redis.call('HGET', job, 'status')
if (not status) or is_final(status) then return 0 end
local started_here = status == 'running' and redis.call('HGET', job, 'replica') == consumer
if status ~= 'queued' then set_status(job, stats, status, 'queued') end
if mode ~= '1' and started_here then  -- a graceful hand-back does not use up a delivery
  redis.call('HINCRBY', job, 'deliveries', -1)
end
if mode == 'device' then redis.call('HINCRBY', job, 'device_losses', 1) end
if note ~= '' then redis.call('HSET', job, 'last_error', note) end
redis.call('XADD', jobs_stream, '*', 'job_id', job_id)
return 1
