-- Record a job's progress (hash fields and one event); 0 for an unknown job.
local job = KEYS[1]
local progress = KEYS[2]
local step = ARGV[1]
local total = ARGV[2]
local maxlen = ARGV[3]
local ttl = ARGV[4]

if redis.call('EXISTS', job) == 0 then return 0 end
redis.call('HSET', job, 'progress_step', step, 'progress_total', total)
redis.call('XADD', progress, 'MAXLEN', '~', maxlen, '*', 'step', step, 'total', total)
redis.call('EXPIRE', progress, ttl)
return 1
