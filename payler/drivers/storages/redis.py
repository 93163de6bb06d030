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
lose the last writes too, unless ``?wait_replicas=N`` makes every store wait (``WAIT``) until N
replicas have it. The local test server runs without persistence.

**One server or a Redis Cluster.** ``redis://`` names one server (standalone, or behind
Sentinel). ``redis+cluster://[[user]:password@]host:port[,host:port...][?shards=N&...]`` (or
``rediss+cluster://``) names a Redis Cluster, through redis-py's ``RedisCluster``: the spool is
split into N shards (16 by default), each a complete set of the keys under one hash tag, so
every script touches one slot (:mod:`payler.drivers.storages.redis_shards`). A store sends each
payload to the shard of its id; a claim reads the head of every shard's claim index, takes the
earliest ``limit`` of them all and claims each shard's share (so no shard waits while another
has older entries); the admin operations ask every shard and merge. Without ``shards`` a
``redis://`` spool keeps the unsharded key layout of earlier versions. How calls reach the
shards (pipelines, WAIT) and which errors are outages: :mod:`payler.drivers.storages.redis_calls`.

redis-py's own command retries are turned off: a lost connection surfaces at once as a
:class:`~payler.errors.TransientError` and the runtime restarts the workflow with backoff, the one
reconnect mechanism payler has. So do the replies of a server that cannot take writes for now,
recognised by their class (:func:`~payler.errors.is_transient`): READONLY (the server was
demoted to a replica: a failover), LOADING, BUSY, OOM, MISCONF, NOREPLICAS, MASTERDOWN...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from payler import codec
from payler.clock import Clock
from payler.drivers.storages import HARD_MAX_BODY_BYTES, redis_calls
from payler.drivers.storages import redis_scripts as scripts
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
from payler.drivers.storages.redis_calls import Shard
from payler.drivers.storages.redis_keys import DEFAULT_PREFIX, KeySpace
from payler.drivers.storages.redis_scripts import RECORD
from payler.drivers.storages.redis_shards import (
    CLUSTER_SCHEMES,
    RedisOptions,
    cluster_nodes,
    shard_keys,
    shard_of,
    split_options,
)
from payler.errors import StartupError, TransientError, transient_on
from payler.identity import derived_id
from payler.metrics import Metrics
from payler.payload import Payload
from payler.urls import mask_url, redact

#: The version of the key layout (see redis_keys.py) this module writes.
_LAYOUT = 1
#: Payloads and body bytes per store script call: they bound the size of one command (Redis
#: refuses arguments past 512 MB) and how long the server pauses to run it.
_STORE_CHUNK = 1000
_STORE_CHUNK_BYTES = 16 * 1024 * 1024

#: Expired tombstones forgotten per purge script call (the purge loops): bounds the server's pause.
_PURGE_CHUNK = 1000

# Outages (a lost connection, and the error replies of a server that cannot write now: READONLY
# after a failover, LOADING, OOM, BUSY, CLUSTERDOWN, TRYAGAIN...) are retried; any other error
# reply is a bug (redis_calls.is_outage says which is which).
_transient = transient_on(
    (RedisError, RedisClusterException, AttributeError), "Redis spool", when=redis_calls.is_outage
)


def split_prefix(url: str) -> tuple[str, str]:
    """``url`` without its ``prefix`` query parameter (redis-py would reject it), and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefixes[-1] if prefixes else DEFAULT_PREFIX


class RedisStorage(SpoolStorage):
    """The spool in Redis, one server or a Redis Cluster; see
    :class:`~payler.drivers.storages.base.SpoolStorage`.

    ``connect_timeout_s`` bounds how long :meth:`connect` waits for the server's answer.
    """

    schemes = ("redis", "rediss", *CLUSTER_SCHEMES)
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
        self._redis_url, options = split_options(url)
        self.options = options
        self._nodes: list[tuple[str, int]] = []
        if options.cluster:
            self._redis_url, self._nodes = cluster_nodes(self._redis_url)
        #: The spool's keys (when sharded, the shards' keys start with its prefix).
        self.keys = KeySpace(options.prefix)
        self._shards = [Shard.of(keys) for keys in shard_keys(options.prefix, options.shards)]
        self._client: Redis | RedisCluster | None = None

    @property
    def shards(self) -> list[KeySpace]:
        """The keys of each shard (one, :attr:`keys`, when unsharded)."""
        return [shard.keys for shard in self._shards]

    def shard(self, payload_id: str) -> KeySpace:
        """The keys of the shard that holds (or would hold) ``payload_id``."""
        return self._shard(payload_id).keys

    def _shard(self, payload_id: str) -> Shard:
        if len(self._shards) == 1:
            return self._shards[0]
        return self._shards[shard_of(payload_id, len(self._shards))]

    async def connect(self) -> None:
        """Create the client and PING the server (every node of a cluster).

        Raises :class:`~payler.errors.StartupError` naming the (password-masked) URL.
        """
        try:
            common: dict[str, Any] = {
                "decode_responses": False,
                "socket_connect_timeout": self.connect_timeout_s,
                "retry": Retry(NoBackoff(), 0),
            }
            client: Redis | RedisCluster
            if self.options.cluster:
                # Retries off here too: a node lost, the next call finds the new topology.
                self._client = client = RedisCluster.from_url(
                    self._redis_url,
                    startup_nodes=[ClusterNode(host, port) for host, port in self._nodes[1:]],
                    **common,
                )
            else:
                self._client = client = Redis.from_url(self._redis_url, **common)
            async with asyncio.timeout(self.connect_timeout_s):
                await client.ping()
        except (RedisError, RedisClusterException, OSError, ValueError) as exc:
            await self.close()  # (TimeoutError is an OSError)
            what = redact(str(exc) or type(exc).__name__, self.url)
            if isinstance(exc, ValueError):  # the URL itself: its text may quote the password
                what = "the URL cannot be parsed (characters such as / in a password: %2F)"
            raise StartupError(
                f"cannot use the Redis spool storage {mask_url(self.url)!r}: {what}"
            ) from exc
        script = client.register_script
        self._store_script = script(scripts.SPOOL + scripts.STORE)
        self._claim_script = script(scripts.SPOOL + scripts.CLAIM)
        self._ack_script = script(scripts.SPOOL + scripts.ACK)
        self._retry_script = script(scripts.SPOOL + scripts.RETRY)
        self._dead_script = script(scripts.SPOOL + scripts.DEAD_LETTER)
        self._reschedule_script = script(scripts.SPOOL + scripts.RESCHEDULE)
        self._cancel_script = script(scripts.SPOOL + scripts.CANCEL)
        self._list_script = script(scripts.LIST)
        self._purge_script = script(scripts.SPOOL + scripts.PURGE)
        try:
            await self._check_shards()
            await self._upgrade()
        except (RedisError, RedisClusterException) as exc:
            await self.close()
            raise StartupError(
                f"cannot use the Redis spool storage {mask_url(self.url)!r}: "
                f"{redact(str(exc), self.url)}"
            ) from exc

    async def _check_shards(self) -> None:
        """Record a sharded spool's shard count, or refuse a spool sharded otherwise: ids would
        map to other shards, and their entries be out of reach of get, cancel and dedupe."""
        client, count = self.client, self.options.shards
        if count is not None:
            await client.set(self.keys.shards, count, nx=True)
        recorded = await client.get(self.keys.shards)
        if (None if recorded is None else int(recorded)) != count:
            has = "unsharded" if recorded is None else f"{int(recorded)} shards"
            wants = "unsharded" if count is None else f"{count} shards"
            raise StartupError(
                f"the Redis spool {mask_url(self.url)!r} (prefix {self.options.prefix!r}) has "
                f"{has}, but this URL says {wants}: use its shard count (changing it needs "
                "an empty spool, or another prefix)"
            )

    async def _upgrade(self) -> None:
        """Bring a spool made by an earlier payler to this key layout (additive only).

        Layout 1 added the lookup sets: the entries already stored are indexed once, by
        whichever process opens the spool first (another doing the same meanwhile only adds
        the same members again). A sharded spool has had them from the start.
        """
        client = self.client
        if self.options.shards is not None:
            return
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
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await client.aclose()  # the connection may be lost already

    @property
    def client(self) -> Redis | RedisCluster:
        """The redis-py client (bytes in, bytes out); a ``RedisCluster`` on a cluster."""
        if self._client is None:
            raise RuntimeError("the Redis storage is not connected (use it as `async with`)")
        return self._client

    async def _run(self, shard: Shard, script: AsyncScript, *args: str | int | bytes) -> Any:
        """Run one of the spool scripts (not the listing) on ``shard``."""
        return await redis_calls.run(shard, script, *args)

    async def _run_many(
        self, many: Sequence[tuple[Shard, AsyncScript, Sequence[str | int | bytes]]]
    ) -> list[Any]:
        """:func:`~.redis_calls.run_many` on this storage's client."""
        return await redis_calls.run_many(self.client, many)

    async def _each_shard(self, command: Callable[[Any, Shard], object]) -> list[Any]:
        """:func:`~.redis_calls.each_shard` over every shard of the spool."""
        return await redis_calls.each_shard(self.client, self._shards, command)

    def _by_shard(self, ids: Iterable[str]) -> dict[int, list[int]]:
        """The positions of ``ids``, by shard number."""
        groups: dict[int, list[int]] = {}
        count = len(self._shards)
        for position, payload_id in enumerate(ids):
            number = 0 if count == 1 else shard_of(payload_id, count)
            groups.setdefault(number, []).append(position)
        return groups

    # -- the hooks -------------------------------------------------------------------------------

    @_transient
    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        outcomes: list[bytes] = [b""] * len(batch)
        chunks: list[tuple[Shard, list[int], list[str | int | bytes]]] = []
        for number, positions in self._by_shard(p.id for p in batch).items():
            for start, end in _chunks([batch[i] for i in positions]):
                args: list[str | int | bytes] = []
                for i in positions[start:end]:
                    p, digest = batch[i], digests[i]
                    error = (0, "") if p.last_error is None else (1, p.last_error)
                    args += [p.id, p.body, p.meta_json(), p.destination, p.due_ms, p.created_ms]
                    args += [p.attempts, *error]
                    args += [p.properties.message_id or "", p.properties.correlation_id or ""]
                    args += [digest, derived_id(p.id, digest)]
                chunks.append((self._shards[number], positions[start:end], args))
        if self.options.wait_replicas:
            done = await self._store_waiting([(shard, args) for shard, _, args in chunks], state)
        else:
            calls = [(shard, self._store_script, [state, *args]) for shard, _, args in chunks]
            done = await self._run_many(calls)
        for (_, positions, _), results in zip(chunks, done, strict=True):
            for i, outcome in zip(positions, results, strict=True):
                outcomes[i] = outcome
        stored = Stored()
        for p, got in zip(batch, outcomes, strict=True):
            if not got:
                stored.duplicates.append(p.id)
                continue
            stored.new.append(got.decode())
            if got.decode() != p.id:
                stored.renamed[p.id] = got.decode()
        return stored

    async def _store_waiting(
        self, chunks: Sequence[tuple[Shard, Sequence[str | int | bytes]]], state: EntryState
    ) -> list[list[bytes]]:
        """Store ``chunks`` (shard, script arguments) and return only once ``wait_replicas``
        replicas of every master they went to have them (``WAIT``); raise a
        :class:`~payler.errors.TransientError` when fewer acknowledged in time: the source is
        not acknowledged, the batch comes again (its entries are then duplicates, stored)."""
        for attempt in range(2):
            outcome = await redis_calls.store_and_wait(
                self.client,
                self._store_script,
                chunks,
                state,
                self.options.wait_replicas,
                self.options.wait_timeout_ms,
            )
            if outcome is not None:
                return outcome
            if attempt == 0:  # NOSCRIPT: a master (new after a failover) lacks the script
                await self.client.script_load(self._store_script.script)
        raise TransientError("Redis spool: a master refused the store script twice (NOSCRIPT)")

    @_transient
    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        token = new_token()
        shares = await self._claim_shares(now_ms, limit)
        lease_end = now_ms + lease_ms
        claimed = await self._run_many(
            [
                (self._shards[n], self._claim_script, (now_ms, share, lease_end, token))
                for n, share in shares.items()
            ]
        )
        records = [record for got in claimed for record in got]
        payloads = sorted(map(_payload, records), key=lambda p: (p.due_ms, p.id))
        return [Claim(p, token) for p in payloads]

    async def _claim_shares(self, now_ms: int, limit: int) -> dict[int, int]:
        """How many entries to claim in each shard, from one pipelined read of every shard's
        head (its first 2 × ``limit`` / shards visible entries): the earliest ``limit`` of them
        all, so that a shard with older entries goes first and none waits while others are
        drained. What is left of ``limit`` goes to the shards whose head was full (they may
        have more). Another instance may claim some of them first: a shard's claim then takes
        its next visible ones (still due, still earliest first within the shard)."""
        count = len(self._shards)
        if count == 1:
            return {0: limit}
        head = min(limit, -(-2 * limit // count))
        heads = await self._each_shard(
            lambda pipe, shard: pipe.zrangebyscore(
                shard.keys.visible, "-inf", now_ms, start=0, num=head, withscores=True
            )
        )
        merged = sorted(
            (score, member, number) for number, got in enumerate(heads) for member, score in got
        )
        shares: dict[int, int] = {}
        for _, _, number in merged[:limit]:
            shares[number] = shares.get(number, 0) + 1
        full = [number for number, got in enumerate(heads) if len(got) == head]
        for i in range(limit - min(limit, len(merged)) if full else 0):
            number = full[i % len(full)]
            shares[number] = shares.get(number, 0) + 1
        return shares

    @_transient
    async def _ack(self, claims: Sequence[Claim], tombstone_until_ms: int) -> int:
        calls: list[tuple[Shard, AsyncScript, list[str | int | bytes]]] = []
        for number, positions in self._by_shard(c.payload.id for c in claims).items():
            args: list[str | int | bytes] = [tombstone_until_ms]
            args += [part for i in positions for part in (claims[i].payload.id, claims[i].token)]
            calls.append((self._shards[number], self._ack_script, args))
        return sum(int(settled) for settled in await self._run_many(calls))

    @_transient
    async def _purge_tombstones(self, now_ms: int) -> None:
        async def purge(shard: Shard) -> None:
            forgotten = _PURGE_CHUNK
            while forgotten == _PURGE_CHUNK:  # a chunk at a time: the server pauses for none long
                forgotten = int(await self._run(shard, self._purge_script, now_ms, _PURGE_CHUNK))

        await redis_calls.gather_all(purge(shard) for shard in self._shards)

    @_transient
    async def _retry(self, claim: Claim, due_ms: int, reason: str, attempts: int) -> bool:
        args = (claim.payload.id, claim.token, due_ms, reason, attempts)
        shard = self._shard(claim.payload.id)
        return bool(await self._run(shard, self._retry_script, *args))

    @_transient
    async def _dead_letter(self, claim: Claim, reason: str) -> bool:
        args = (claim.payload.id, claim.token, reason)
        shard = self._shard(claim.payload.id)
        return bool(await self._run(shard, self._dead_script, *args))

    @_transient
    async def _next_visible_ms(self) -> int | None:
        heads = await self._each_shard(
            lambda pipe, shard: pipe.zrange(shard.keys.visible, 0, 0, withscores=True)
        )
        firsts = [int(head[0][1]) for head in heads if head]
        return min(firsts) if firsts else None

    @_transient
    async def _get(self, payload_id: str) -> Payload | None:
        keys = self.shard(payload_id)
        record = await self.client.hmget(keys.entry(payload_id), list(RECORD))
        return None if record[0] is None else _payload(record)

    @_transient
    async def _state_of(self, payload_id: str) -> EntryState | None:
        state = await self.client.hget(self.shard(payload_id).entry(payload_id), "state")
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

        async def list_in(shard: Shard) -> list[Any]:
            return list(
                await self._list_script(
                    keys=[shard.index(destination, state)],
                    args=[
                        shard.keys.entry_prefix,
                        limit,
                        "-inf" if due_from_ms is None else f"({due_from_ms}",
                        "" if due_to_ms is None else due_to_ms,
                        after_due,
                        after_id,
                    ],
                )
            )

        pages = await redis_calls.gather_all(list_in(shard) for shard in self._shards)
        # Each shard's page is in (due, id) order, ids byte-wise: so is their merge.
        merged = sorted(
            (_payload(record) for page in pages for record in page),
            key=lambda p: (p.due_ms, p.id.encode()),
        )
        items = merged[:limit]
        more = len(merged) > limit
        return Page(items, encode_cursor(items[-1].due_ms, items[-1].id) if more else None)

    @_transient
    async def _count(self, destination: str | None, state: EntryState) -> int:
        """O(shards): every (state, destination) pair has an index of its own in each shard."""
        counts = await self._each_shard(
            lambda pipe, shard: pipe.zcard(shard.index(destination, state))
        )
        return sum(int(count) for count in counts)

    @_transient
    async def _count_due(
        self, destination: str | None, state: EntryState, start_ms: int | None, end_ms: int | None
    ) -> int:
        """O(shards × log n): ZCOUNT on the due-time index of the state (and destination)."""
        low = "-inf" if start_ms is None else start_ms
        high = "+inf" if end_ms is None else f"({end_ms}"
        counts = await self._each_shard(
            lambda pipe, shard: pipe.zcount(shard.index(destination, state), low, high)
        )
        return sum(int(count) for count in counts)

    @_transient
    async def _lookup(
        self, field: LookupField, value: str, state: EntryState, limit: int
    ) -> list[Payload]:
        found = await redis_calls.gather_all(
            self._lookup_in(shard, field, value, state, limit) for shard in self._shards
        )
        return sorted((p for got in found for p in got), key=lambda p: p.id.encode())[:limit]

    async def _lookup_in(
        self, shard: Shard, field: LookupField, value: str, state: EntryState, limit: int
    ) -> list[Payload]:
        """The first ``limit`` entries of ``shard`` in ``state`` with that value, by id."""
        client, keys = self.client, shard.keys
        index = keys.lookup(field, value)
        # One value: a handful of entries. (Bytes: the client does not decode responses.)
        ids = sorted(
            bytes(m) if isinstance(m, bytes) else m.encode() for m in await client.smembers(index)
        )
        found: list[Payload] = []
        gone: list[bytes] = []
        for chunk in (ids[i : i + 500] for i in range(0, len(ids), 500)):
            async with client.pipeline(transaction=False) as pipe:
                for payload_id in chunk:
                    pipe.hmget(keys.entry(payload_id.decode()), [*RECORD, "state"])
                records = await pipe.execute()
            for payload_id, record in zip(chunk, records, strict=True):
                if record[0] is None:
                    gone.append(payload_id)  # a record removed by hand: drop its index entry
                elif record[-1] == state.encode() and len(found) < limit:
                    found.append(_payload(record[:-1]))
        if gone:
            await client.srem(index, *gone)
        return found

    @_transient
    async def _cancel(self, payload_id: str) -> bool:
        shard = self._shard(payload_id)
        return bool(await self._run(shard, self._cancel_script, payload_id))

    @_transient
    async def _reschedule(self, payload_id: str, due_ms: int) -> bool:
        shard = self._shard(payload_id)
        return bool(await self._run(shard, self._reschedule_script, payload_id, due_ms))


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


__all__ = ["RedisOptions", "RedisStorage", "split_prefix"]
