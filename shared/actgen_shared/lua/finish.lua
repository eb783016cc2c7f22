-- Make a job final and ack its entry. Returns 1 if this call finished the job, 0 if it was
-- final already, -1 if the entry is no longer ours (our lease lapsed and another consumer took
-- it: only the owner may finish a job). An empty entry or consumer skips the ownership check.
local job = KEYS[1]
local stats = KEYS[2]
local jobs_stream = KEYS[3]
local done = KEYS[4]
local progress = KEYS[5]
local cancel_flag = KEYS[6]
local group = ARGV[1]
local entry = ARGV[2]
local status = ARGV[3]
local field = ARGV[4]
local value = ARGV[5]
local now = ARGV[6]
local ttl = ARGV[7]
local consumer = ARGV[8]

return finish_delivery(job, stats, jobs_stream, group, entry, consumer, status, field, value, now,
  ttl, {job, done, progress, cancel_flag})
