-- Store finished items, each once (HSETNX on the done-hash). Given a result, then also finish
-- the job with it as finish.lua does (status done, only while the entry is ours, acked), saving
-- the worker a round trip once a job's last items are stored.
-- Returns {items that were new} or, given a result, {items that were new, finish.lua's answer}.
-- After the fixed keys and arguments come, per item, ITEM_KEYS keys and ITEM_ARGS arguments.
local job = KEYS[1]
local done = KEYS[2]
local results = KEYS[3]
local stats = KEYS[4]
local jobs_stream = KEYS[5]
local progress = KEYS[6]
local cancel_flag = KEYS[7]
local bank_index = KEYS[8]
local ttl = ARGV[1]
local results_maxlen = ARGV[2]
local bank_cap = tonumber(ARGV[3])
local push_bank = ARGV[4] == '1'
local job_id = ARGV[5]
local epoch = ARGV[6]
local n_items = tonumber(ARGV[7])
local bank_ttl = ARGV[8]
local group = ARGV[9]
local entry = ARGV[10]
local consumer = ARGV[11]
local now = ARGV[12]
local result = ARGV[13]
local FIXED_KEYS, FIXED_ARGS, ITEM_KEYS, ITEM_ARGS = 8, 13, 3, 6

local status = redis.call('HGET', job, 'status')
local stored = 0
if status and not is_final(status) then  -- nothing is stored for a final or unknown job
  for i = 0, n_items - 1 do
    local k, a = FIXED_KEYS + i * ITEM_KEYS + 1, FIXED_ARGS + i * ITEM_ARGS + 1
    local image_key, latent_key, bank = unpack(KEYS, k, k + ITEM_KEYS - 1)
    local index, class_id, guide_id, has_latent, png, latent = unpack(ARGV, a, a + ITEM_ARGS - 1)
    if redis.call('HSETNX', done, index, '') == 1 then
      redis.call('SET', image_key, png, 'EX', ttl)
      local stored_latent_key = ''
      if has_latent == '1' then
        redis.call('SET', latent_key, latent, 'EX', ttl)
        stored_latent_key = latent_key
        if push_bank then
          redis.call('LPUSH', bank, latent)
          redis.call('LTRIM', bank, 0, bank_cap - 1)
          redis.call('EXPIRE', bank, bank_ttl)
          redis.call('HSET', bank_index, class_id, '1')
          redis.call('EXPIRE', bank_index, bank_ttl)
        end
      end
      local id = redis.call('XADD', results, 'MAXLEN', '~', results_maxlen, '*', 'job_id', job_id,
        'index', index, 'class_id', class_id, 'guide_id', guide_id, 'epoch', epoch,
        'image_key', image_key, 'latent_key', stored_latent_key)
      redis.call('HSET', done, index, id)
      stored = stored + 1
    end
  end
  redis.call('EXPIRE', done, ttl)
  redis.call('EXPIRE', results, ttl)
end
if result == '' then return {stored} end
return {stored, finish_delivery(job, stats, jobs_stream, group, entry, consumer, 'done', 'result',
  result, now, ttl, {job, done, progress, cancel_flag})}
