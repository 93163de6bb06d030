"""The Redis spool storage, through redis-py's asyncio client (``redis.asyncio``).

``redis://[[user]:password@]host[:port][/DB][?prefix=PREFIX&...]`` (or ``rediss://`` for TLS).
Every key of the spool starts with PREFIX, ``payler:`` by default, so several spools can share one
database; :mod:`payler.drivers.storages.redis_keys` lists the keys. The other query parameters are
redis-py's (``ssl_cert_reqs``, ``socket_timeout``, ...).

Each entry is a hash (the payload, its due, visibility and attempts, its state, lease token and
content digest);
sorted sets index it by visibility time (what claims read) and by due time (what the admin
listing reads, overall and per destination). Every operation that changes an entry is one Lua
script, which Redis runs atomically: a claim takes up to ``limit`` visible entries, gives them a
fresh fencing token and moves their visibility to ``now + lease`` in one step, so two claimants
never hold the same entry and no WATCH/MULTI retry loop is needed. A store, an ack of a whole
batch, a retry or a dead-letter is likewise one script call, one round trip. An acked entry's
hash is deleted; its id stays in a sorted set of tombstones, scored by when the dedupe window
ends, and its digest in a hash beside it, which ``store`` consults (telling a redelivery from a
reused id) and a script purges.

**Durability is what the server's persistence gives**, no more: a store returns once Redis has
the write in memory. Run Redis with ``appendonly yes`` and ``appendfsync always`` for a store that
survives a Redis crash (with ``everysec`` up to a second of stores can be lost, and with no
persistence at all a restart loses the whole spool). Replication is asynchronous: a failover can
lose the last writes too. The local test server runs without persistence. One Redis server
(standalone, or behind Sentinel); not Redis Cluster (the scripts reach keys they compute).

redis-py's own command retries are turned off: a lost connection surfaces at once as a
:class:`~payler.errors.TransientError` and the runtime restarts the workflow with backoff, the one
reconnect mechanism payler has. So do the replies of a server that cannot take writes for now,
recognised by their class (:func:`~payler.errors.is_transient`): READONLY (the server was
demoted to a replica: a failover), LOADING, BUSY, OOM, MISCONF, NOREPLICAS, MASTERDOWN...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from payler import codec
from payler.clock import Clock
from payler.drivers.storages import HARD_MAX_BODY_BYTES
from payler.drivers.storages.base import (
    DEFAULT_DEDUPE_WINDOW_MS,
    LOOKUP_FIELDS,
    Claim,
    EntryState,
    LookupField,
    Page,
    SpoolStorage,
    decode_cursor,
    encode_cursor,
    new_token,
)
from payler.drivers.storages.dedupe import Stored
from payler.drivers.storages.redis_keys import DEFAULT_PREFIX, KeySpace
from payler.errors import StartupError, is_transient, transient_on
from payler.identity import derived_id
from payler.metrics import Metrics
from payler.payload import Payload
from payler.urls import mask_url, redact

#: The version of the key layout (see redis_keys.py) this module writes.
_LAYOUT = 1
#: The hash fields that make up a payload, in the order the scripts return them.
_RECORD = ("id", "body", "meta", "destination", "due_ms", "created_ms", "attempts", "last_error")
#: Payloads and body bytes per store script call: they bound the size of one command (Redis
#: refuses arguments past 512 MB) and how long the server pauses to run it.
_STORE_CHUNK = 1000
_STORE_CHUNK_BYTES = 16 * 1024 * 1024

#: Expired tombstones forgotten per purge script call (the purge loops): bounds the server's pause.
_PURGE_CHUNK = 1000

# -- the Lua scripts ----------------------------------------------------------------------------
# Every script but the listing gets KEYS = (visible, due:pending, due:dead, delivered,
# delivered:digests) and, as its first ARGV, the key prefixes of entries and of the
# per-destination indexes; its own arguments follow.

_SPOOL = f"""
local FIELDS = {{{", ".join(f"'{field}'" for field in _RECORD)}}}
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
_STORE = """
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
_CLAIM = """
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
_ACK = """
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
_PURGE = """
local ids = redis.call('ZRANGEBYSCORE', DELIVERED, '-inf', ARGV[4], 'LIMIT', 0, ARGV[5])
for _, id in ipairs(ids) do
  redis.call('ZREM', DELIVERED, id)
  redis.call('HDEL', DIGESTS, id)
end
return #ids
"""

# ARGV[4..8]: id, token, due_ms, reason, attempts.
_RETRY = """
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
_DEAD_LETTER = """
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
_RESCHEDULE = """
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
_CANCEL = """
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
_LIST = f"""
local FIELDS = {{{", ".join(f"'{field}'" for field in _RECORD)}}}
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


# Outages (a lost connection, and the error replies of a server that cannot write now: READONLY
# after a failover, LOADING, OOM, BUSY...) are retried; any other error reply is a bug.
_transient = transient_on((RedisError,), "Redis spool", when=is_transient)


def split_prefix(url: str) -> tuple[str, str]:
    """``url`` without its ``prefix`` query parameter (redis-py would reject it), and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefixes[-1] if prefixes else DEFAULT_PREFIX


class RedisStorage(SpoolStorage):
    """The spool in Redis; see :class:`~payler.drivers.storages.base.SpoolStorage`.

    ``connect_timeout_s`` bounds how long :meth:`connect` waits for the server's answer.
    """

    schemes = ("redis", "rediss")
    hard_max_body_bytes = HARD_MAX_BODY_BYTES["redis"]

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        dedupe_window_ms: int = DEFAULT_DEDUPE_WINDOW_MS,
        max_body_bytes: int | None = None,
        min_free_bytes: int | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            url,
            clock=clock,
            metrics=metrics,
            dedupe_window_ms=dedupe_window_ms,
            max_body_bytes=max_body_bytes,
            min_free_bytes=min_free_bytes,
        )
        self.connect_timeout_s = connect_timeout_s
        self._redis_url, prefix = split_prefix(url)
        self.keys = keys = KeySpace(prefix)
        self._client: Redis | None = None
        self._indexes = [
            keys.visible,
            keys.by_due("pending"),
            keys.by_due("dead"),
            keys.delivered,
            keys.delivered_digests,
        ]
        self._key_prefixes = [
            keys.entry_prefix,
            keys.destination_prefix("pending"),
            keys.destination_prefix("dead"),
        ]

    async def connect(self) -> None:
        """Create the client and PING the server.

        Raises :class:`~payler.errors.StartupError` naming the (password-masked) URL.
        """
        try:
            self._client = client = Redis.from_url(
                self._redis_url,
                decode_responses=False,
                socket_connect_timeout=self.connect_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            async with asyncio.timeout(self.connect_timeout_s):
                await client.ping()
        except (RedisError, OSError, ValueError) as exc:  # TimeoutError is an OSError
            await self.close()
            what = redact(str(exc) or type(exc).__name__, self.url)
            if isinstance(exc, ValueError):  # the URL itself: its text may quote the password
                what = "the URL cannot be parsed (characters such as / in a password: %2F)"
            raise StartupError(
                f"cannot use the Redis spool storage {mask_url(self.url)!r}: {what}"
            ) from exc
        script = client.register_script
        self._store_script, self._claim_script = script(_SPOOL + _STORE), script(_SPOOL + _CLAIM)
        self._ack_script, self._retry_script = script(_SPOOL + _ACK), script(_SPOOL + _RETRY)
        self._dead_script = script(_SPOOL + _DEAD_LETTER)
        self._reschedule_script = script(_SPOOL + _RESCHEDULE)
        self._cancel_script, self._list_script = script(_SPOOL + _CANCEL), script(_LIST)
        self._purge_script = script(_SPOOL + _PURGE)
        try:
            await self._upgrade()
        except RedisError as exc:
            await self.close()
            raise StartupError(
                f"cannot use the Redis spool storage {mask_url(self.url)!r}: "
                f"{redact(str(exc), self.url)}"
            ) from exc

    async def _upgrade(self) -> None:
        """Bring a spool made by an earlier payler to this key layout (additive only).

        Layout 1 added the lookup sets: the entries already stored are indexed once, by
        whichever process opens the spool first (another doing the same meanwhile only adds
        the same members again).
        """
        client = self.client
        if int(await client.get(self.keys.schema) or 0) >= _LAYOUT:
            return
        async for key in client.scan_iter(match=self.keys.match_entries, count=1000):
            payload_id, meta, state = await client.hmget(key, ["id", "meta", "state"])
            if payload_id is None or meta is None or state not in (b"pending", b"dead"):
                continue
            try:
                properties = codec.loads(meta).get("properties", {})
            except (ValueError, AttributeError):
                continue  # unreadable metadata: it is dead-lettered when claimed
            async with client.pipeline(transaction=False) as pipe:
                for field in LOOKUP_FIELDS:
                    value = properties.get(field)
                    if isinstance(value, str) and value:
                        pipe.sadd(self.keys.lookup(field, value), payload_id)
                        pipe.hset(key, field, value)
                await pipe.execute()
        await client.set(self.keys.schema, _LAYOUT)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):  # the connection may be lost already
                await client.aclose()

    @property
    def client(self) -> Redis:
        """The redis-py client (bytes in, bytes out)."""
        if self._client is None:
            raise RuntimeError("the Redis storage is not connected (use it as `async with`)")
        return self._client

    async def _run(self, script: AsyncScript, *args: str | int | bytes) -> Any:
        """Run one of the spool scripts (not the listing) with its keys and key prefixes."""
        return await script(keys=self._indexes, args=[*self._key_prefixes, *args])

    # -- the hooks -------------------------------------------------------------------------------

    @_transient
    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        stored = Stored()
        for start, end in _chunks(batch):
            args: list[str | int | bytes] = []
            for p, digest in zip(batch[start:end], digests[start:end], strict=True):
                error = (0, "") if p.last_error is None else (1, p.last_error)
                args += [p.id, p.body, p.meta_json(), p.destination, p.due_ms, p.created_ms]
                args += [p.attempts, *error]
                args += [p.properties.message_id or "", p.properties.correlation_id or ""]
                args += [digest, derived_id(p.id, digest)]
            outcome = await self._run(self._store_script, state, *args)
            for p, got in zip(batch[start:end], outcome, strict=True):
                if not got:
                    stored.duplicates.append(p.id)
                    continue
                stored.new.append(got.decode())
                if got.decode() != p.id:
                    stored.renamed[p.id] = got.decode()
        return stored

    @_transient
    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        token = new_token()
        records = await self._run(self._claim_script, now_ms, limit, now_ms + lease_ms, token)
        payloads = sorted(map(_payload, records), key=lambda p: (p.due_ms, p.id))
        return [Claim(p, token) for p in payloads]

    @_transient
    async def _ack(self, claims: Sequence[Claim], tombstone_until_ms: int) -> int:
        pairs = [part for c in claims for part in (c.payload.id, c.token)]
        return int(await self._run(self._ack_script, tombstone_until_ms, *pairs))

    @_transient
    async def _purge_tombstones(self, now_ms: int) -> None:
        forgotten = _PURGE_CHUNK
        while forgotten == _PURGE_CHUNK:  # a chunk at a time: the server pauses for none long
            forgotten = int(await self._run(self._purge_script, now_ms, _PURGE_CHUNK))

    @_transient
    async def _retry(self, claim: Claim, due_ms: int, reason: str, attempts: int) -> bool:
        args = (claim.payload.id, claim.token, due_ms, reason, attempts)
        return bool(await self._run(self._retry_script, *args))

    @_transient
    async def _dead_letter(self, claim: Claim, reason: str) -> bool:
        args = (claim.payload.id, claim.token, reason)
        return bool(await self._run(self._dead_script, *args))

    @_transient
    async def _next_visible_ms(self) -> int | None:
        first = await self.client.zrange(self.keys.visible, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    @_transient
    async def _get(self, payload_id: str) -> Payload | None:
        record = await self.client.hmget(self.keys.entry(payload_id), list(_RECORD))
        return None if record[0] is None else _payload(record)

    @_transient
    async def _state_of(self, payload_id: str) -> EntryState | None:
        state = await self.client.hget(self.keys.entry(payload_id), "state")
        if state is None:
            return None
        return "dead" if state == b"dead" else "pending"

    @_transient
    async def _list(
        self,
        destination: str | None,
        due_from_ms: int | None,
        due_to_ms: int | None,
        state: EntryState,
        limit: int,
        cursor: str | None,
    ) -> Page:
        after_due, after_id = decode_cursor(cursor) if cursor else ("", "")
        records = await self._list_script(
            keys=[self._index(destination, state)],
            args=[
                self.keys.entry_prefix,
                limit,
                "-inf" if due_from_ms is None else f"({due_from_ms}",
                "" if due_to_ms is None else due_to_ms,
                after_due,
                after_id,
            ],
        )
        items = [_payload(record) for record in records[:limit]]
        more = len(records) > limit
        return Page(items, encode_cursor(items[-1].due_ms, items[-1].id) if more else None)

    @_transient
    async def _count(self, destination: str | None, state: EntryState) -> int:
        """O(1): every (state, destination) pair has an index of its own."""
        return int(await self.client.zcard(self._index(destination, state)))

    @_transient
    async def _count_due(
        self, destination: str | None, state: EntryState, start_ms: int | None, end_ms: int | None
    ) -> int:
        """O(log n): ZCOUNT on the due-time index of the state (and destination)."""
        low = "-inf" if start_ms is None else start_ms
        high = "+inf" if end_ms is None else f"({end_ms}"
        return int(await self.client.zcount(self._index(destination, state), low, high))

    @_transient
    async def _lookup(
        self, field: LookupField, value: str, state: EntryState, limit: int
    ) -> list[Payload]:
        index = self.keys.lookup(field, value)
        # One value: a handful of entries. (Bytes: the client does not decode responses.)
        ids = sorted(
            bytes(m) if isinstance(m, bytes) else m.encode()
            for m in await self.client.smembers(index)
        )
        found: list[Payload] = []
        gone: list[bytes] = []
        for chunk in (ids[i : i + 500] for i in range(0, len(ids), 500)):
            async with self.client.pipeline(transaction=False) as pipe:
                for payload_id in chunk:
                    pipe.hmget(self.keys.entry(payload_id.decode()), [*_RECORD, "state"])
                records = await pipe.execute()
            for payload_id, record in zip(chunk, records, strict=True):
                if record[0] is None:
                    gone.append(payload_id)  # a record removed by hand: drop its index entry
                elif record[-1] == state.encode() and len(found) < limit:
                    found.append(_payload(record[:-1]))
        if gone:
            await self.client.srem(index, *gone)
        return found

    @_transient
    async def _cancel(self, payload_id: str) -> bool:
        return bool(await self._run(self._cancel_script, payload_id))

    @_transient
    async def _reschedule(self, payload_id: str, due_ms: int) -> bool:
        return bool(await self._run(self._reschedule_script, payload_id, due_ms))

    def _index(self, destination: str | None, state: EntryState) -> str:
        if destination is None:
            return self.keys.by_due(state)
        return self.keys.by_destination(state, destination)


def _chunks(batch: Sequence[Payload]) -> Iterator[tuple[int, int]]:
    """``batch`` in runs (start, end) of at most ``_STORE_CHUNK`` payloads and about
    ``_STORE_CHUNK_BYTES``."""
    start, size = 0, 0
    for end, payload in enumerate(batch):
        if end > start and (end - start == _STORE_CHUNK or size > _STORE_CHUNK_BYTES):
            yield start, end
            start, size = end, 0
        size += len(payload.body)
    yield start, len(batch)


def _payload(record: Sequence[Any]) -> Payload:
    payload_id, body, meta, destination, due_ms, created_ms, attempts, last_error = record
    return Payload.from_stored(
        id=payload_id.decode(),
        body=body,
        meta_json=meta,
        destination=destination.decode(),
        due_ms=int(due_ms),
        created_ms=int(created_ms),
        attempts=int(attempts),
        last_error=None if last_error is None else last_error.decode(),
    )


__all__ = ["RedisStorage", "split_prefix"]
