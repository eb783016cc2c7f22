-- Shared by every script (prepended when loaded): job status steps that keep the counters.
local function is_final(s) return s == 'done' or s == 'failed' or s == 'cancelled' end
local function set_status(job, stats, old, new)
  redis.call('HSET', job, 'status', new)
  if old then redis.call('HINCRBY', stats, old, -1) end
  redis.call('HINCRBY', stats, new, 1)
end
local function ack(stream, group, entry)
  if entry ~= '' then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
end
-- make a job final (once) and expire its keys; returns 1 when this call made it final
local function finish(job, stats, status, field, value, now, ttl, expire_keys)
  local old = redis.call('HGET', job, 'status')
  if (not old) or is_final(old) then return 0 end
  set_status(job, stats, old, status)
  redis.call('HSET', job, 'finished_at', now)
  -- the tenant's quota gets the job back; the body (up to ACTGEN_MAX_BODY_BYTES) is not kept
  -- for the result TTL. 'usage' names the tenant's usage hash (set by submit.lua).
  local usage = redis.call('HGET', job, 'usage')
  if usage then
    redis.call('HINCRBY', usage, 'jobs', -1)
    redis.call('HINCRBY', usage, 'bytes', -tonumber(redis.call('HGET', job, 'bytes') or '0'))
  end
  redis.call('HDEL', job, 'request')
  if field ~= '' then redis.call('HSET', job, field, value) end
  for _, k in ipairs(expire_keys) do redis.call('EXPIRE', k, ttl) end
  return 1
end
-- make a job final and ack its entry, only while the entry is ours (finish.lua, store.lua):
-- 1 if this call finished the job, 0 if it was final already, -1 if the entry is no longer ours
-- (our lease lapsed and another consumer took it). An empty entry or consumer skips that check.
local function finish_delivery(job, stats, jobs_stream, group, entry, consumer, status, field, value,
                               now, ttl, expire_keys)
  if entry ~= '' and consumer ~= '' then
    local mine = redis.call('XPENDING', jobs_stream, group, entry, entry, 1, consumer)
    if #mine == 0 then return -1 end
  end
  local n = finish(job, stats, status, field, value, now, ttl, expire_keys)
  ack(jobs_stream, group, entry)
  return n
end
-- mark a delivery running on a consumer (start.lua, admit.lua): {1, done item indices...}, or 0
-- when the job is final or cancelled (then acked). The same delivery started twice by one
-- process (a retried call whose reply was lost, a re-read pending entry) counts once.
local function start_delivery(job, stats, jobs_stream, cancel_flag, done, progress, group, entry,
                              consumer, now, ttl, token)
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
end
