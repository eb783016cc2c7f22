-- Cancel: a queued job at once, a running one by flag. Returns the status after the call
-- (false for an unknown job).
local job = KEYS[1]
local stats = KEYS[2]
local cancel_flag = KEYS[3]
local done = KEYS[4]
local progress = KEYS[5]
local now = ARGV[1]
local ttl = ARGV[2]

local status = redis.call('HGET', job, 'status')
if not status then return false end
if status == 'queued' then
  finish(job, stats, 'cancelled', '', '', now, ttl, {job, done, progress})
  return 'cancelled'
end
if status == 'running' then
  redis.call('SET', cancel_flag, '1', 'EX', ttl)
end
return status
