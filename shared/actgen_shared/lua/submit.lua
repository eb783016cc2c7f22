-- Queue a job; returns {job id, outcome}: 0 new, 1 duplicate (the first job of its idempotency
-- key), 2 classifier unknown, 3 the idempotency key was used with another body, 4 the tenant has
-- max_jobs queued or running, 5 their request bodies would hold more than max_bytes.
-- Unused optional keys are passed as ''.
local idem_key = KEYS[1]
local job = KEYS[2]
local jobs_stream = KEYS[3]
local stats = KEYS[4]
local classifier = KEYS[5]
local classifier_meta = KEYS[6]
local classifier_jobs = KEYS[7]
local usage = KEYS[8]
local run_marker = KEYS[9]
local bank_index = KEYS[10]
local run_tenants = KEYS[11]
local job_id = ARGV[1]
local request = ARGV[2]
local run_id = ARGV[3]
local epoch = ARGV[4]
local created_at = ARGV[5]
local n_items = ARGV[6]
local idem_ttl = ARGV[7]
local classifier_ttl = ARGV[8]
local body_hash = ARGV[9]
local max_jobs = tonumber(ARGV[10])
local max_bytes = tonumber(ARGV[11])
local bank_ttl = ARGV[12]
local return_latents = ARGV[13]
local tenant = ARGV[14]

if idem_key ~= '' then
  local first = redis.call('GET', idem_key)
  if first then
    local first_id, first_hash = string.match(first, '^(%S+) ?(%S*)$')
    if not first_id then return {first, 1} end
    -- a key stored without a hash (an older version, or a caller that sent none) matches any body
    if body_hash ~= '' and first_hash ~= '' and first_hash ~= body_hash then return {first_id, 3} end
    return {first_id, 1}
  end
end
if redis.call('EXISTS', job) == 1 then return {job_id, 1} end
local in_flight = tonumber(redis.call('HGET', usage, 'jobs') or '0')
if in_flight >= max_jobs then return {job_id, 4} end
local held = tonumber(redis.call('HGET', usage, 'bytes') or '0')
if held + #request > max_bytes then return {job_id, 5} end
if classifier ~= '' then  -- the job holds its classifier: known now, and its TTL starts again
  if redis.call('EXISTS', classifier) == 0 or redis.call('EXISTS', classifier_meta) == 0 then
    return {job_id, 2}
  end
  redis.call('SADD', classifier_jobs, job_id)
  for _, k in ipairs({classifier, classifier_meta, classifier_jobs}) do
    redis.call('EXPIRE', k, classifier_ttl)
  end
end
if idem_key ~= '' then
  local value = job_id
  if body_hash ~= '' then value = job_id .. ' ' .. body_hash end
  redis.call('SET', idem_key, value, 'EX', idem_ttl)
end
redis.call('HSET', job, 'status', 'queued', 'request', request, 'run_id', run_id,
  'epoch', epoch, 'created_at', created_at, 'n_items', n_items, 'deliveries', 0,
  'usage', usage, 'bytes', #request, 'return_latents', return_latents)
redis.call('HINCRBY', usage, 'jobs', 1)
redis.call('HINCRBY', usage, 'bytes', #request)
redis.call('SET', run_marker, '1', 'EX', idem_ttl)
redis.call('SADD', run_tenants, tenant)
redis.call('EXPIRE', run_tenants, idem_ttl)
if bank_index ~= '' then
  redis.call('HSETNX', bank_index, '_', '1')
  redis.call('EXPIRE', bank_index, bank_ttl)
end
redis.call('HINCRBY', stats, 'queued', 1)
redis.call('XADD', jobs_stream, '*', 'job_id', job_id)
return {job_id, 0}
