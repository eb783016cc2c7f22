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
  if field ~= '' then redis.call('HSET', job, field, value) end
  for _, k in ipairs(expire_keys) do redis.call('EXPIRE', k, ttl) end
  return 1
end
