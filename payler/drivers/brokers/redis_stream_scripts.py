"""The Lua scripts of the Redis streams broker: what must see a stream and act on it in one step.

Redis runs a script atomically, so what a script reads of a stream (its counters, its groups'
progress) is still true when it acts on it (reads in the group, trims). Every script here needs
Redis 7 (``XINFO`` counters, ``XREADGROUP`` and ``XGROUP SETID ... ENTRIESREAD`` in scripts);
the broker falls back to plain commands where a server refuses them.

Stream ids are compared as ``<ms>-<seq>`` pairs of decimal numbers without leading zeros:
by length, then as text (digits collate in order in every locale), never as Lua numbers,
which are doubles and lose precision past 2**53.
"""

from __future__ import annotations

# Helpers every script starts with: a field of an XINFO reply (a flat name/value list), and
# whether stream id `a` comes before stream id `b`.
_HELPERS = """
local function field(reply, name)
  for i = 1, #reply, 2 do
    if reply[i] == name then return reply[i + 1] end
  end
  return false
end
local function before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if #a_ms ~= #b_ms then return #a_ms < #b_ms end
  if a_ms ~= b_ms then return a_ms < b_ms end
  if #a_seq ~= #b_seq then return #a_seq < #b_seq end
  return a_seq < b_seq
end
"""

#: Read new entries in the group (``XREADGROUP ... >``, not blocking), and first say how many
#: entries after the group's last-delivered id were removed (trimmed by a producer) before the
#: group read them: a stream trimmed under a group skips them silently.
#:
#: KEYS[1]: the stream. ARGV: group, consumer, count. Returns ``{lost, after, gap_end, through,
#: last, entries}``: ``lost`` entries after id ``after`` and before ``gap_end`` (up to and
#: including it when ``through`` is 1) were removed unread; ``last`` is the group's
#: last-delivered id once this read is done; ``entries`` as XREADGROUP gives them.
#:
#: The count is Redis 7's own bookkeeping: ``entries-added`` of the stream, less the entries
#: still in it, less ``entries-read`` of the group, exact while the stream has no deleted
#: entries (XDEL) past its first one; when Redis cannot count (``entries-read`` unknown), nothing
#: is reported. A loss found is then added to the group's ``entries-read`` (``XGROUP SETID``), so
#: that it is reported once, by whichever consumer of the group finds it first, across restarts.
READ_NEW = (
    _HELPERS
    + """
local stream, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', stream) == 0 then
  return redis.error_reply('NOGROUP the stream ' .. stream .. ' does not exist')
end
local mine = false
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  if field(g, 'name') == group then mine = g end
end
if not mine then
  return redis.error_reply('NOGROUP the stream ' .. stream .. ' has no group ' .. group)
end
local last, read = field(mine, 'last-delivered-id'), field(mine, 'entries-read')
local info = redis.call('XINFO', 'STREAM', stream)
local added, length = field(info, 'entries-added'), field(info, 'length')
local lost, gap_end, through = 0, '', 0
if read then
  if length == 0 then
    local newest = field(info, 'last-generated-id')
    if before(last, newest) then lost, gap_end, through = added - read, newest, 1 end
  else
    local first, deleted = field(info, 'first-entry')[1], field(info, 'max-deleted-entry-id')
    if before(last, first) and (deleted == '0-0' or before(deleted, first)) then
      lost, gap_end = added - length - read, first
    end
  end
end
local reply = redis.call(
  'XREADGROUP', 'GROUP', group, ARGV[2], 'COUNT', ARGV[3], 'STREAMS', stream, '>')
local entries = reply and reply[1][2] or {}
local now_last = last
if #entries > 0 then now_last = entries[#entries][1] end
if lost > 0 then
  redis.call('XGROUP', 'SETID', stream, group, now_last, 'ENTRIESREAD', read + lost + #entries)
else
  lost = 0
end
return {lost, last, gap_end, through, now_last, entries}
"""
)

#: Trim what every consumer group of a stream has read and acknowledged: ``XTRIM MINID ~`` to
#: the smallest, over the groups, of the oldest pending entry (read, not acknowledged) or, with
#: none pending, the last-delivered id. Never an entry some group has not read or acknowledged;
#: a stream without groups is not trimmed (its readers, if any, are unknown).
#:
#: KEYS[1]: the stream. Returns how many entries were trimmed.
TRIM_ACKED = (
    _HELPERS
    + """
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return 0 end
local floor = false
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local bound = field(g, 'last-delivered-id')
  if field(g, 'pending') > 0 then
    bound = redis.call('XPENDING', stream, field(g, 'name'))[2]
  end
  if not floor or before(bound, floor) then floor = bound end
end
if not floor then return 0 end
return redis.call('XTRIM', stream, 'MINID', '~', floor)
"""
)

#: Leave the group only when holding nothing: atomic, so no pending entry is dropped with the
#: consumer. KEYS[1]: the stream. ARGV: group, consumer.
FORGET_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

__all__ = ["FORGET_CONSUMER", "READ_NEW", "TRIM_ACKED"]
