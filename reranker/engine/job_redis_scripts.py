"""The Lua scripts of the Redis job store (job_redis.py): each one step that must be atomic.

KEYS and ARGV are listed above each; the job record is a hash, the queue a stream with the
consumer group ``workers``, the active jobs a set.
"""

SUBMIT = """
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[1]) then return redis.call('SCARD', KEYS[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[2])
return -1
"""

BEGIN = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED' then return 'finished' end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
redis.call('HSET', KEYS[1], 'status', 'IN_PROGRESS', 'done', 0, 'worker', ARGV[1], 'attempts', ARGV[3])
if redis.call('HGET', KEYS[1], 'started_at') == '' then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
local record = redis.call('HMGET', KEYS[1], 'type', 'total', 'spec')
if not record[3] then return 'gone' end
return {'run', record[1], record[2], record[3]}
"""

# KEYS: job, active set, stream. ARGV: job id, status, finished_at, output parts, error, ttl, group, entry.
FINISH = """
redis.call('XACK', KEYS[3], ARGV[7], ARGV[8])
redis.call('XDEL', KEYS[3], ARGV[8])
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[5])
redis.call('HSET', KEYS[1], 'output_parts', ARGV[4])
if ARGV[2] == 'COMPLETED' then redis.call('HSET', KEYS[1], 'done', redis.call('HGET', KEYS[1], 'total')) end
redis.call('HDEL', KEYS[1], 'spec', 'cancel')
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: stream, job. ARGV: group, entry, consumer, done. Returns {still held, cancel asked}.
BEAT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 or pending[1][2] ~= ARGV[3] then return {0, 0} end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
redis.call('HSET', KEYS[2], 'done', ARGV[4])
if redis.call('HGET', KEYS[2], 'cancel') == '1' then return {1, 1} end
return {1, 0}
"""

# KEYS: stream, job. ARGV: group, entry, consumer, lease ms. The next worker takes it at once,
# and the hand-back does not count as a failed delivery.
RELEASE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 or pending[1][2] ~= ARGV[3] then return 0 end
local count = math.max(0, pending[1][4] - 1)
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'RETRYCOUNT', count, 'JUSTID')
redis.call('HSET', KEYS[2], 'status', 'QUEUED', 'done', 0)
return 1
"""

# KEYS: job, active set. ARGV: job id, owner, finished_at, ttl, delete a finished job (1/0).
# Returns {what it did, the status it found, finished_at, output parts}: the job may have finished
# since the caller last read it.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return {'missing'} end
if status == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', ARGV[3])
  redis.call('HDEL', KEYS[1], 'spec')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('SREM', KEYS[2], ARGV[1])
  return {'cancelled', status}
end
if status == 'IN_PROGRESS' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return {'cancelling', status}
end
local found = redis.call('HMGET', KEYS[1], 'finished_at', 'output_parts')
if ARGV[5] ~= '1' then return {'finished', status, found[1] or '', ''} end
redis.call('DEL', KEYS[1])
return {'deleted', status, found[1] or '', found[2] or ''}
"""
