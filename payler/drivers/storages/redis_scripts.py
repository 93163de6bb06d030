"""The Lua scripts of the Redis spool storage (:mod:`payler.drivers.storages.redis`).

Each runs atomically on one server (on a Redis Cluster, on the shard whose keys it gets: every
key a script touches carries that shard's hash tag, so all of them live in one slot).
"""

from __future__ import annotations

#: The hash fields that make up a payload, in the order the scripts return them.
RECORD = ("id", "body", "meta", "destination", "due_ms", "created_ms", "attempts", "last_error")

# -- the Lua scripts ----------------------------------------------------------------------------
# Every script but the listing gets KEYS = (visible, due:pending, due:dead, delivered,
# delivered:digests) and, as its first ARGV, the key prefixes of entries and of the
# per-destination indexes; its own arguments follow.

SPOOL = f"""
local FIELDS = {{{", ".join(f"'{field}'" for field in RECORD)}}}
local VISIBLE, PENDING, DEAD, DELIVERED, DIGESTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ENTRY, PENDING_TO, DEAD_TO = ARGV[1], ARGV[2], ARGV[3]
-- The destination of an entry that is pending and leased under `token`; nil otherwise.
local function held(entry, token)
  local got = redis.call('HMGET', entry, 'token', 'state', 'destination')
  if got[1] == token and got[2] == 'pending' then return got[3] end
  return nil
end
-- Index an unleased pending entry: visible at its due time.
local function pend(id, destination, due)
  redis.call('ZADD', VISIBLE, due, id)
  redis.call('ZADD', PENDING, due, id)
  redis.call('ZADD', PENDING_TO .. destination, due, id)
end
local function unpend(id, destination)
  redis.call('ZREM', VISIBLE, id)
  redis.call('ZREM', PENDING, id)
  redis.call('ZREM', PENDING_TO .. destination, id)
end
local function unbury(id, destination)
  redis.call('ZREM', DEAD, id)
  redis.call('ZREM', DEAD_TO .. destination, id)
end
-- The lookup sets (KeySpace.lookup): <prefix>by:<field>:<value>, the prefix being ENTRY less
-- its 'entry:'. The entry's hash keeps the values, to take it out of them when it goes.
local BY = string.sub(ENTRY, 1, -7) .. 'by:'
local function index_ids(id, entry, message_id, correlation_id)
  if message_id ~= '' then
    redis.call('SADD', BY .. 'message_id:' .. message_id, id)
    redis.call('HSET', entry, 'message_id', message_id)
  end
  if correlation_id ~= '' then
    redis.call('SADD', BY .. 'correlation_id:' .. correlation_id, id)
    redis.call('HSET', entry, 'correlation_id', correlation_id)
  end
end
local function unindex_ids(id, entry)
  local got = redis.call('HMGET', entry, 'message_id', 'correlation_id')
  if got[1] then redis.call('SREM', BY .. 'message_id:' .. got[1], id) end
  if got[2] then redis.call('SREM', BY .. 'correlation_id:' .. got[2], id) end
end
"""

# ARGV[4]: the state of the new entries ('pending', or 'dead' to park them); ARGV[5..]: per
# payload, id, body, meta, destination, due_ms, created_ms, attempts, has_error ('0'/'1'),
# last_error, message_id, correlation_id ('' for none), digest, derived id. The rule of
# payler/drivers/storages/dedupe.py: an id already stored (pending, dead, or a delivered entry's
# tombstone) with the same digest, or none, is a duplicate, left as it is; with another digest,
# the payload goes under its derived id (unless that is taken too: the same reuse, redelivered).
# Returns, per payload, the id it was stored under, or '' for a duplicate.
STORE = """
-- The digest stored under `id`: '' when the entry has none, nil when there is no such entry.
local function stored_digest(id)
  if redis.call('EXISTS', ENTRY .. id) == 1 then
    return redis.call('HGET', ENTRY .. id, 'digest') or ''
  end
  if redis.call('ZSCORE', DELIVERED, id) then return redis.call('HGET', DIGESTS, id) or '' end
  return nil
end
local out, state = {}, ARGV[4]
for i = 5, #ARGV, 13 do
  local id, destination, due, digest = ARGV[i], ARGV[i + 3], ARGV[i + 4], ARGV[i + 11]
  local seen = stored_digest(id)
  if seen and seen ~= '' and seen ~= digest then
    id = ARGV[i + 12]
    seen = stored_digest(id)
  end
  if seen then
    out[#out + 1] = ''
  else
    local entry = ENTRY .. id
    redis.call('HSET', entry, 'id', id, 'body', ARGV[i + 1], 'meta', ARGV[i + 2],
      'destination', destination, 'due_ms', due, 'visible_ms', due,
      'created_ms', ARGV[i + 5], 'attempts', ARGV[i + 6], 'state', state, 'digest', digest)
    if ARGV[i + 7] == '1' then redis.call('HSET', entry, 'last_error', ARGV[i + 8]) end
    index_ids(id, entry, ARGV[i + 9], ARGV[i + 10])
    if state == 'dead' then
      redis.call('ZADD', DEAD, due, id)
      redis.call('ZADD', DEAD_TO .. destination, due, id)
    else
      pend(id, destination, due)
    end
    out[#out + 1] = id
  end
end
return out
"""

# ARGV[4..7]: now, limit, lease end, token. Earliest visible first, ties by id.
CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', VISIBLE, '-inf', ARGV[4], 'LIMIT', 0, ARGV[5])
local records = {}
for _, id in ipairs(ids) do
  local entry = ENTRY .. id
  if redis.call('EXISTS', entry) == 0 then
    -- Its record is gone (evicted, deleted by hand): drop the dangling index entry rather
    -- than recreate a partial record that would block the id and fail every claim.
    redis.call('ZREM', VISIBLE, id)
  else
    redis.call('ZADD', VISIBLE, ARGV[6], id)
    redis.call('HSET', entry, 'token', ARGV[7], 'visible_ms', ARGV[6])
    records[#records + 1] = redis.call('HMGET', entry, unpack(FIELDS))
  end
end
return records
"""

# ARGV[4]: when the tombstones may go; ARGV[5..]: id, token pairs. A delivered entry is deleted;
# only its id (and digest) stays, in the tombstones (keeping a redelivered copy out of `store`).
ACK = """
local settled = 0
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  local destination = held(ENTRY .. id, ARGV[i + 1])
  if destination then
    local digest = redis.call('HGET', ENTRY .. id, 'digest')
    unindex_ids(id, ENTRY .. id)
    redis.call('DEL', ENTRY .. id)
    unpend(id, destination)
    redis.call('ZADD', DELIVERED, ARGV[4], id)
    if digest then redis.call('HSET', DIGESTS, id, digest) end
    settled = settled + 1
  end
end
return settled
"""

# ARGV[4..5]: now, how many to forget at most. Returns how many it forgot.
PURGE = """
local ids = redis.call('ZRANGEBYSCORE', DELIVERED, '-inf', ARGV[4], 'LIMIT', 0, ARGV[5])
for _, id in ipairs(ids) do
  redis.call('ZREM', DELIVERED, id)
  redis.call('HDEL', DIGESTS, id)
end
return #ids
"""

# ARGV[4..8]: id, token, due_ms, reason, attempts.
RETRY = """
local id, due = ARGV[4], ARGV[6]
local entry = ENTRY .. id
local destination = held(entry, ARGV[5])
if not destination then return 0 end
redis.call('HSET', entry, 'due_ms', due, 'visible_ms', due,
           'last_error', ARGV[7], 'attempts', ARGV[8])
redis.call('HDEL', entry, 'token')
pend(id, destination, due)
return 1
"""

# ARGV[4..6]: id, token, reason.
DEAD_LETTER = """
local id = ARGV[4]
local entry = ENTRY .. id
local destination = held(entry, ARGV[5])
if not destination then return 0 end
redis.call('HSET', entry, 'state', 'dead', 'last_error', ARGV[6])
redis.call('HDEL', entry, 'token')
unpend(id, destination)
local due = redis.call('HGET', entry, 'due_ms')
redis.call('ZADD', DEAD, due, id)
redis.call('ZADD', DEAD_TO .. destination, due, id)
return 1
"""

# ARGV[4..5]: id, due_ms.
RESCHEDULE = """
local id, due = ARGV[4], ARGV[5]
local entry = ENTRY .. id
local destination = redis.call('HGET', entry, 'destination')
if not destination then return 0 end
redis.call('HSET', entry, 'state', 'pending', 'due_ms', due, 'visible_ms', due)
redis.call('HDEL', entry, 'token')
unbury(id, destination)
pend(id, destination, due)
return 1
"""

# ARGV[4]: id.
CANCEL = """
local id = ARGV[4]
local destination = redis.call('HGET', ENTRY .. id, 'destination')
if not destination then return 0 end
unindex_ids(id, ENTRY .. id)
redis.call('DEL', ENTRY .. id)
unpend(id, destination)
unbury(id, destination)
return 1
"""

# KEYS[1]: an index by due ms. ARGV: the entry key prefix, the page size, the ZCOUNT bound below
# the due range ('-inf' or '(<ms>'), the end of the due range ('' for none), and the cursor's
# due ms and id ('' for none). Returns up to size + 1 records (one more tells a next page).
LIST = f"""
local FIELDS = {{{", ".join(f"'{field}'" for field in RECORD)}}}
local index, size = KEYS[1], tonumber(ARGV[2])
-- Byte-wise `a > b`, the order of members with equal scores (Lua's own `>` follows the locale).
local function later(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
local start = redis.call('ZCOUNT', index, '-inf', ARGV[3])
if ARGV[5] ~= '' then
  -- The cursor's due time holds a run of ids in byte order: binary-search the first one after.
  local low = redis.call('ZCOUNT', index, '-inf', '(' .. ARGV[5])
  local high = low + redis.call('ZCOUNT', index, ARGV[5], ARGV[5])
  while low < high do
    local mid = math.floor((low + high) / 2)
    if later(redis.call('ZRANGE', index, mid, mid)[1], ARGV[6]) then
      high = mid
    else
      low = mid + 1
    end
  end
  start = math.max(start, low)
end
local hits = redis.call('ZRANGE', index, start, start + size, 'WITHSCORES')
local records = {{}}
for i = 1, #hits, 2 do
  if ARGV[4] ~= '' and tonumber(hits[i + 1]) > tonumber(ARGV[4]) then break end
  records[#records + 1] = redis.call('HMGET', ARGV[1] .. hits[i], unpack(FIELDS))
end
return records
"""


__all__ = [
    "ACK",
    "CANCEL",
    "CLAIM",
    "DEAD_LETTER",
    "LIST",
    "PURGE",
    "RECORD",
    "RESCHEDULE",
    "RETRY",
    "SPOOL",
    "STORE",
]
