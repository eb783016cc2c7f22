-- Decide what to do with a fetched entry, and (given a consumer token) start it there at once,
-- as start.lua would, saving the worker a round trip.
-- Deliveries that ended in a lost device count apart (device_losses, bounded by max_device_losses):
-- a flapping GPU does not use up a healthy job's max_deliveries.
-- Returns {'gone'} | {'final'} | {'dead', reason} | {'ok', delivery number, request} and, when
-- started, the indices of the items an earlier delivery stored after the request. Started
-- twice (this call retried after its reply was lost), a delivery counts once.
local job = KEYS[1]
local stats = KEYS[2]
local jobs_stream = KEYS[3]
local dead_stream = KEYS[4]
local done = KEYS[5]
local progress = KEYS[6]
local cancel_flag = KEYS[7]
local group = ARGV[1]
local entry = ARGV[2]
local job_id = ARGV[3]
local max_deliveries = tonumber(ARGV[4])
local reclaim_note = ARGV[5]
local now = ARGV[6]
local ttl = ARGV[7]
local dead_maxlen = ARGV[8]
local consumer = ARGV[9]
local token = ARGV[10]
local max_device_losses = tonumber(ARGV[11])

local status = redis.call('HGET', job, 'status')
if not status then ack(jobs_stream, group, entry); return {'gone'} end
if is_final(status) then ack(jobs_stream, group, entry); return {'final'} end
local started_here = token ~= '' and status == 'running'
  and redis.call('HGET', job, 'start_id') == token .. ' ' .. entry
if not started_here then
  if reclaim_note ~= '' then redis.call('HSET', job, 'last_error', reclaim_note) end
  local d = tonumber(redis.call('HGET', job, 'deliveries') or '0')
  local lost = tonumber(redis.call('HGET', job, 'device_losses') or '0')
  if d >= max_deliveries or lost >= max_device_losses then
    local reason = 'started ' .. d .. ' times without finishing (max_deliveries ' .. max_deliveries .. ')'
    if d < max_deliveries then
      reason = 'its replica lost its device ' .. lost .. ' times (max_device_losses ' .. max_device_losses .. ')'
    end
    local last = redis.call('HGET', job, 'last_error')
    if last then reason = reason .. '; last error: ' .. last end
    redis.call('XADD', dead_stream, 'MAXLEN', '~', dead_maxlen, '*', 'job_id', job_id,
      'reason', reason, 'deliveries', d, 'replica', redis.call('HGET', job, 'replica') or '',
      'at', now)
    finish(job, stats, 'failed', 'error', reason, now, ttl, {job, done, progress, cancel_flag})
    ack(jobs_stream, group, entry)
    return {'dead', reason}
  end
  if token == '' then return {'ok', tostring(d + 1), redis.call('HGET', job, 'request')} end
end
local started = start_delivery(job, stats, jobs_stream, cancel_flag, done, progress, group, entry,
  consumer, now, ttl, token)
if started == 0 then return {'final'} end
return {'ok', redis.call('HGET', job, 'deliveries'), redis.call('HGET', job, 'request'),
  unpack(started, 2)}
