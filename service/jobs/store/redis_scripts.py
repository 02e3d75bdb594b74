"""The Lua scripts of the Redis job store (service/jobs/store/redis.py documents the key layout).

Redis runs each script atomically: every operation that reads and then writes is one script, so replicas
sharing one Redis stay correct. ARGV[1] is always the key prefix P. Missing hash fields read as false in Lua.
Times arrive as `repr(float)` text, which Lua's `tonumber` and Redis's score parser both read exactly.
"""

from __future__ import annotations

# Helpers, put in front of the scripts that use them.
#
# `ready_member`: the member of a job in `P ready`: its created_at as the 16 hex digits of the big-endian
# IEEE 754 double (for times >= 0 the bytes sort like the numbers, so the member orders exactly as
# created_at does, to the last bit, as SQLite's REAL does), then the id. Equal priorities (equal scores)
# are then ordered by member: arrival, then id. The id is the member from its 17th character on.
#
# `enqueue`: a queued job into `P delayed` (run_at still to come) or `P ready` (due).
#
# `bytes_lt` / `num_lt`: byte-wise string order (Lua's `<` on strings follows the locale) and the order of
# non-negative decimal integers without leading zeros (stream id parts, any size).
_HELPERS = """
local function ready_member(created, id)
  local c = tonumber(created) or 0
  if c < 0 then c = 0 end
  local b = struct.pack('>d', c)
  local hex = {}
  for i = 1, 8 do hex[i] = string.format('%02x', string.byte(b, i)) end
  return table.concat(hex) .. id
end
local function enqueue(p, id, created, priority, run_at, now)
  if tonumber(run_at) > tonumber(now) then
    redis.call('ZADD', p .. 'delayed', run_at, id)
  else
    redis.call('ZADD', p .. 'ready', 0 - (tonumber(priority) or 0), ready_member(created, id))
  end
end
local function bytes_lt(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function num_lt(a, b)
  if #a ~= #b then return #a < #b end
  return bytes_lt(a, b)
end
"""

# ARGV: P, id, '0' or '1'..idempotency key, created_at, run_at, now, task, priority, field/value pairs.
CREATE = _HELPERS + """
local p, id, created, run_at, now, task, priority = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local keyed, idem = string.sub(ARGV[3], 1, 1) == '1', string.sub(ARGV[3], 2)
local jk = p .. 'job:' .. id
if keyed then
  local first = redis.call('GET', p .. 'idem:' .. idem)
  if first then
    local existing = redis.call('HGETALL', p .. 'job:' .. first)
    if #existing > 0 then return {0, existing} end
  end
end
if redis.call('EXISTS', jk) == 1 then return redis.error_reply('job ' .. id .. ' exists already') end
if keyed then redis.call('SET', p .. 'idem:' .. idem, id) end
redis.call('HSET', jk, unpack(ARGV, 9))
redis.call('ZADD', p .. 'index', created, id)
redis.call('ZADD', p .. 'status:queued', created, id)
redis.call('ZADD', p .. 'task:' .. task, created, id)
enqueue(p, id, created, priority, run_at, now)
return {1}
"""

# ARGV: P, owner, lease_until, now. Due jobs move from `delayed` to `ready` (100 at a time, until none is
# due), then the head of `ready` is claimed; entries of jobs no longer queued are dropped on the way.
CLAIM = _HELPERS + """
local p, owner, lease, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ready, delayed = p .. 'ready', p .. 'delayed'
while true do
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 100)
  if #due == 0 then break end
  for _, id in ipairs(due) do
    redis.call('ZREM', delayed, id)
    local v = redis.call('HMGET', p .. 'job:' .. id, 'status', 'created_at', 'priority')
    if v[1] == 'queued' then redis.call('ZADD', ready, 0 - (tonumber(v[3]) or 0), ready_member(v[2], id)) end
  end
end
while true do
  local head = redis.call('ZRANGE', ready, 0, 0)
  if #head == 0 then return false end
  redis.call('ZREM', ready, head[1])
  local id = string.sub(head[1], 17)
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'created_at', 'run_at')
  if v[1] == 'queued' and v[3] and tonumber(v[3]) > tonumber(now) then
    redis.call('ZADD', delayed, v[3], id)  -- not due after all: where it belongs
  elseif v[1] == 'queued' then
    redis.call('HSET', jk, 'status', 'running', 'owner', owner, 'lease_until', lease, 'started_at', now)
    redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HINCRBY', jk, 'runs', 1)
    redis.call('ZREM', p .. 'status:queued', id)
    redis.call('ZADD', p .. 'status:running', v[2], id)
    redis.call('ZADD', p .. 'leases', lease, id)
    return redis.call('HGETALL', jk)
  end
end
"""

# ARGV: P, id, owner, run_at, now, last_error JSON. 1 if requeued, 0 if not running for owner.
RETRY = _HELPERS + """
local p, id, owner, run_at, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local jk = p .. 'job:' .. id
local v = redis.call('HMGET', jk, 'status', 'owner', 'created_at', 'priority')
if v[1] ~= 'running' or v[2] ~= owner then return 0 end
redis.call('HSET', jk, 'status', 'queued', 'run_at', run_at, 'last_error', ARGV[6])
redis.call('HDEL', jk, 'owner', 'lease_until', 'progress')
redis.call('ZREM', p .. 'status:running', id)
redis.call('ZREM', p .. 'leases', id)
redis.call('ZADD', p .. 'status:queued', v[3], id)
enqueue(p, id, v[3], v[4], run_at, now)
return 1
"""

RENEW = """
local p, owner, lease = ARGV[1], ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'owner')
  if v[1] == 'running' and v[2] == owner then
    redis.call('HSET', jk, 'lease_until', lease)
    redis.call('ZADD', p .. 'leases', lease, id)
    n = n + 1
  end
end
return n
"""

PROGRESS = """
local jk = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('HGET', jk, 'status') == 'running' then
  redis.call('HSET', jk, 'progress', ARGV[3])
  return 1
end
return 0
"""

# ARGV: P, id, final status, finished_at, '1' to return the job, '1' to clear last_error first (a failure:
# the pairs then carry its new value, if any), then field/value pairs to set.
FINISH = _HELPERS + """
local p, id, status, fin = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = p .. 'job:' .. id
local v = redis.call('HMGET', jk, 'status', 'created_at', 'webhook')
local current = v[1]
if not current then return false end
local changed = 0
if current == 'queued' or current == 'running' then
  if current == 'queued' then
    redis.call('ZREM', p .. 'ready', ready_member(v[2], id))
    redis.call('ZREM', p .. 'delayed', id)
  end
  redis.call('ZREM', p .. 'status:' .. current, id)
  redis.call('ZREM', p .. 'leases', id)
  redis.call('HDEL', jk, 'lease_until')
  if ARGV[6] == '1' then redis.call('HDEL', jk, 'last_error') end
  redis.call('HSET', jk, 'status', status, 'finished_at', fin)
  if #ARGV >= 7 then redis.call('HSET', jk, unpack(ARGV, 7)) end
  if v[3] then
    redis.call('HSET', jk, 'webhook_state', 'pending', 'webhook_next_at', fin)
    redis.call('ZADD', p .. 'webhooks', fin, id)
  end
  redis.call('ZADD', p .. 'status:' .. status, v[2], id)
  redis.call('ZADD', p .. 'finished', fin, id)
  changed = 1
end
if ARGV[5] == '1' then return {changed, redis.call('HGETALL', jk)} end
return {changed}
"""

# ARGV: P, now, '1' for owner_gone (every running job, and every pending webhook due now).
RECOVER = _HELPERS + """
local p, now, all = ARGV[1], ARGV[2], ARGV[3]
local ids
if all == '1' then
  ids = redis.call('ZRANGE', p .. 'status:running', 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', '(' .. now)
end
local n = 0
for _, id in ipairs(ids) do
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'created_at', 'priority', 'attempts')
  if v[1] == 'running' then
    local attempts = math.max((tonumber(v[4]) or 0) - 1, 0)
    redis.call('HSET', jk, 'status', 'queued', 'run_at', now, 'attempts', attempts)
    redis.call('HDEL', jk, 'owner', 'lease_until', 'progress')
    redis.call('ZREM', p .. 'status:running', id)
    redis.call('ZADD', p .. 'status:queued', v[2], id)
    enqueue(p, id, v[2], v[3], now, now)
    n = n + 1
  end
  redis.call('ZREM', p .. 'leases', id)
end
if all == '1' then
  local hooks = p .. 'webhooks'
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', hooks, '(' .. now, '+inf')) do
    local jk = p .. 'job:' .. id
    if redis.call('HGET', jk, 'webhook_state') == 'pending' then
      redis.call('HSET', jk, 'webhook_next_at', now)
      redis.call('ZADD', hooks, now, id)
    else
      redis.call('ZREM', hooks, id)
    end
  end
end
return n
"""

# ARGV: P, finished_before, batch, offset. Jobs whose webhook is pending stay (and stay in `finished`):
# the caller skips them with `offset` (it adds up the `kept` of each batch), so the scan moves on.
EXPIRE = """
local p, before, batch, offset = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', p .. 'finished', '-inf', '(' .. before, 'LIMIT', offset, batch)
local n, kept = 0, 0
for _, id in ipairs(ids) do
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'idempotency_key', 'task', 'webhook_state')
  local final = v[1] == 'succeeded' or v[1] == 'failed' or v[1] == 'cancelled'
  if final and v[4] == 'pending' then
    kept = kept + 1
  else
    if final then
      if v[2] then
        local ik = p .. 'idem:' .. v[2]
        if redis.call('GET', ik) == id then redis.call('DEL', ik) end
      end
      redis.call('DEL', jk, p .. 'events:' .. id)
      redis.call('ZREM', p .. 'status:' .. v[1], id)
      redis.call('ZREM', p .. 'index', id)
      if v[3] then redis.call('ZREM', p .. 'task:' .. v[3], id) end
      redis.call('ZREM', p .. 'webhooks', id)
      n = n + 1
    end
    redis.call('ZREM', p .. 'finished', id)
  end
end
return {n, #ids, kept}
"""

# ARGV: P, key (index, status:{s} or task:{name}), status to keep ('' for all), cursor score ('+inf' at
# first), '0' or '1'..cursor id, limit, scan budget. Walks the set newest first from strictly after the
# cursor (score, then id, both descending, as ZREVRANGEBYSCORE orders ties), at most about `scan` entries,
# and returns {jobs, cursor score, cursor id, 1 if the set is exhausted}.
LIST = _HELPERS + """
local p, key, want, score, limit, scan = ARGV[1], ARGV[1] .. ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[6]),
  tonumber(ARGV[7])
local has_id, cursor = string.sub(ARGV[5], 1, 1) == '1', string.sub(ARGV[5], 2)
local out, seen = {}, 0
local function take(id)
  local jk = p .. 'job:' .. id
  if want ~= '' and redis.call('HGET', jk, 'status') ~= want then return end
  local h = redis.call('HGETALL', jk)
  if #h > 0 then out[#out + 1] = h end
end
local max = score
if has_id then
  for _, id in ipairs(redis.call('ZREVRANGEBYSCORE', key, score, score)) do
    if bytes_lt(id, cursor) then
      take(id)
      seen, cursor = seen + 1, id
      if #out >= limit then return {out, score, '1' .. cursor, 0} end
    end
  end
  max = '(' .. score
end
local budget = math.max(scan - seen, 1)
local rows = redis.call('ZREVRANGEBYSCORE', key, max, '-inf', 'WITHSCORES', 'LIMIT', 0, budget)
for i = 1, #rows, 2 do
  take(rows[i])
  score, cursor = rows[i + 1], rows[i]
  if #out >= limit then return {out, score, '1' .. cursor, 0} end
end
local done, flagged = 0, '0'
if #rows < 2 * budget then done = 1 end
if has_id or #rows > 0 then flagged = '1' .. cursor end
return {out, score, flagged, done}
"""

# ARGV: P, id, then run, seq, event, data for each event. Ids at or below the log's last id are skipped
# (a replayed append), as is a log for a job that does not exist (expired meanwhile).
APPEND_EVENTS = _HELPERS + """
local p, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'job:' .. id) == 0 then return 0 end
local key = p .. 'events:' .. id
local run, seq = '0', '0'
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #top > 0 then
  local dash = string.find(top[1][1], '-', 1, true)
  run, seq = string.sub(top[1][1], 1, dash - 1), string.sub(top[1][1], dash + 1)
end
local n = 0
for i = 3, #ARGV, 4 do
  local r, s = ARGV[i], ARGV[i + 1]
  if num_lt(run, r) or (run == r and num_lt(seq, s)) then
    redis.call('XADD', key, r .. '-' .. s, 'e', ARGV[i + 2], 'd', ARGV[i + 3])
    run, seq, n = r, s, n + 1
  end
end
return n
"""

# ARGV: P, now, lease_until, limit. Entries of jobs whose webhook is no longer pending are dropped.
CLAIM_WEBHOOKS = """
local p, now, lease, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = p .. 'webhooks'
local out, taken = {}, {}
while #out < limit do
  local want = limit - #out
  local ids = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, want)
  local dropped = 0
  for _, id in ipairs(ids) do
    local jk = p .. 'job:' .. id
    if taken[id] then
      -- leased already by this call (a lease_until not after now)
    elseif redis.call('HGET', jk, 'webhook_state') == 'pending' then
      redis.call('HSET', jk, 'webhook_next_at', lease)
      redis.call('ZADD', key, lease, id)
      taken[id] = true
      out[#out + 1] = redis.call('HGETALL', jk)
    else
      redis.call('ZREM', key, id)
      dropped = dropped + 1
    end
  end
  if #ids < want or dropped == 0 then break end
end
return out
"""

# ARGV: P, id, '1' if delivered, next_at ('' to give up), '0' or '1'..error. Only a pending webhook changes.
WEBHOOK_ATTEMPTED = """
local p, id, delivered, next_at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = p .. 'job:' .. id
local key = p .. 'webhooks'
if redis.call('HGET', jk, 'webhook_state') ~= 'pending' then return 0 end
redis.call('HINCRBY', jk, 'webhook_attempts', 1)
if delivered == '1' then
  redis.call('HSET', jk, 'webhook_state', 'delivered')
  redis.call('HDEL', jk, 'webhook_next_at', 'webhook_error')
  redis.call('ZREM', key, id)
  return 1
end
if string.sub(ARGV[5], 1, 1) == '1' then
  redis.call('HSET', jk, 'webhook_error', string.sub(ARGV[5], 2))
else
  redis.call('HDEL', jk, 'webhook_error')
end
if next_at ~= '' then
  redis.call('HSET', jk, 'webhook_next_at', next_at)
  redis.call('ZADD', key, next_at, id)
else
  redis.call('HSET', jk, 'webhook_state', 'failed')
  redis.call('HDEL', jk, 'webhook_next_at')
  redis.call('ZREM', key, id)
end
return 1
"""

# ARGV: P, now, start, count. Brings `count` jobs of `P index` (from rank `start`) written by a version
# before this layout up to it: run_at, the task index, queued jobs into ready/delayed. Idempotent.
MIGRATE = _HELPERS + """
local p, now, start, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGE', p .. 'index', start, start + count - 1)
for _, id in ipairs(ids) do
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'task', 'created_at', 'run_at', 'priority')
  if v[1] then
    local run_at = v[4] or v[3]
    if not v[4] then redis.call('HSET', jk, 'run_at', run_at) end
    redis.call('ZADD', p .. 'task:' .. v[2], v[3], id)
    if v[1] == 'queued' then enqueue(p, id, v[3], v[5], run_at, now) end
  end
end
return #ids
"""
