-- Queue a job; returns {job id, 1 duplicate | 0 new | 2 classifier unknown}.
-- Unused optional keys are passed as ''.
local idem_key = KEYS[1]
local job = KEYS[2]
local jobs_stream = KEYS[3]
local stats = KEYS[4]
local classifier = KEYS[5]
local classifier_meta = KEYS[6]
local classifier_jobs = KEYS[7]
local job_id = ARGV[1]
local request = ARGV[2]
local run_id = ARGV[3]
local epoch = ARGV[4]
local created_at = ARGV[5]
local n_items = ARGV[6]
local idem_ttl = ARGV[7]
local classifier_ttl = ARGV[8]

if idem_key ~= '' then
  local first = redis.call('GET', idem_key)
  if first then return {first, 1} end
end
if redis.call('EXISTS', job) == 1 then return {job_id, 1} end
if classifier ~= '' then  -- the job holds its classifier: known now, and its TTL starts again
  if redis.call('EXISTS', classifier) == 0 or redis.call('EXISTS', classifier_meta) == 0 then
    return {job_id, 2}
  end
  redis.call('SADD', classifier_jobs, job_id)
  for _, k in ipairs({classifier, classifier_meta, classifier_jobs}) do
    redis.call('EXPIRE', k, classifier_ttl)
  end
end
if idem_key ~= '' then redis.call('SET', idem_key, job_id, 'EX', idem_ttl) end
redis.call('HSET', job, 'status', 'queued', 'request', request, 'run_id', run_id,
  'epoch', epoch, 'created_at', created_at, 'n_items', n_items, 'deliveries', 0)
redis.call('HINCRBY', stats, 'queued', 1)
redis.call('XADD', jobs_stream, '*', 'job_id', job_id)
return {job_id, 0}
