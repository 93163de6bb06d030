"""Redis streams as a broker, through redis-py's asyncio client (``redis.asyncio``).

``redis://[[user]:password@]host[:port][/DB][?PARAMS]`` (``rediss://`` for TLS). payler's own
query parameters are taken out before the URL goes to redis-py (whose own, such as
``socket_timeout``, pass through):

=================  ================  ==========================================================
``group``          ``payler``        the consumer group that reads the source stream
``consumer``       ``HOSTNAME-PID``  this reader's name in the group; give each instance a stable
                                     one so that a restart re-reads its own unfinished entries
``trim``           ``none``          ``acked``: after each publish, trim every destination stream
                                     of what all its consumer groups have read and acknowledged
                                     (never an entry a group has not: :data:`~payler.drivers.
                                     brokers.redis_stream_scripts.TRIM_ACKED`)
``min_idle_ms``    ``60000``         how long an entry stays pending before XAUTOCLAIM takes it
``block_ms``       ``1000``          how long one read waits for new entries; ``stop`` is seen
                                     within it
=================  ================  ==========================================================

(``maxlen``, ``XADD MAXLEN ~`` on every publish, is refused: it trimmed entries that the
stream's consumer groups had not read yet, after payler had counted them delivered.)

**As a source** ``serve`` reads stream ``queue`` in the group, up to ``batch_size`` entries
(whatever has arrived, waiting at most ``block_ms``), and XACKs a batch in one call, only after
the handler returned; if the handler raises or ``serve`` is
cancelled, nothing is acked. An entry stays in the group's pending list until it is acked, so
nothing read is lost:

- at start, this consumer's own pending list (XREADGROUP from id ``0``) is read first: a
  restart's unfinished batch;
- an entry the handler handed back for now stays pending and is handed over again after a
  backoff (:data:`HANDBACK_BACKOFF`, growing with each hand-back: XCLAIM of just that entry),
  while the other entries flow meanwhile; with ``prefetch`` entries so waiting, no new ones are
  read until some are settled;
- at start and every ``min_idle_ms / 2``, XAUTOCLAIM takes over entries that another consumer
  left pending for ``min_idle_ms`` (it crashed, or was renamed by a restart);
- a permanent rejection is acked: streams have no dead-letter exchange, the handler dead-letters.

**Entries removed before payler handled them are reported as lost**, in a WARNING naming how
many and their ids, and in the ``lost`` counter: entries a producer trimmed (``XADD MAXLEN``,
``XTRIM``) after the group's last-delivered id, before the group read them — found by each read
of new entries (:data:`~payler.drivers.brokers.redis_stream_scripts.READ_NEW`, Redis 7 and later:
older servers read without that check) — and pending entries deleted before they were handled
(XAUTOCLAIM's deleted ids, empty pending entries), which are acked.

A missing group is created at the stream's first entry (``MKSTREAM``): nothing already in the
stream is skipped. On a clean stop this consumer leaves the group if it holds no pending entry.
Each entry becomes a payload whose id is ``redis:<server>:<stream>:<entry id>``, where
``<server>`` is ``host:port/db`` of the URL (normalised; never its user or password): stable
across re-deliveries, so re-spooling is idempotent, and distinct for two servers with a stream
of the same name. Its fields are read with
:func:`~payler.drivers.brokers.mapping.from_stream_fields`; without a ``timestamp_ms`` property
the publish time is the entry id's millisecond part. Whatever an entry holds, it only affects
itself: one that cannot be decoded comes out as a payload with a ``defect`` (the reason), its
body and its raw fields (in the header :data:`UNDECODABLE_FIELDS`), which the workflow
dead-letters.

**As a destination** ``process`` XADDs every payload of a batch to stream ``payload.destination``
in one pipeline. A command error that a retry cannot mend (``WRONGTYPE``: the key is no stream)
is a permanent rejection; an outage reply (READONLY after a failover, OOM, LOADING, BUSY,
MISCONF, NOREPLICAS..., by class: :func:`~payler.errors.is_transient`) a rejection for now, after
which the next command connects again (a failover may have moved the master); a lost connection
raises :class:`~payler.errors.TransientError`. Dead letters are XADDed the same way, never
trimmed. XADD creates missing streams, so ``ensure_queue`` only creates the source's group, and
checks that any other name is a stream or free.

redis-py's own retries are off, as for the Redis storage: a lost connection, or a server that
cannot serve the group's reads (READONLY, UNBLOCKED: demoted to a replica), surfaces at once and
the runtime restarts the workflow with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from payler.backoff import Attempts, Backoff
from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.base import Broker
from payler.drivers.brokers.mapping import from_stream_fields, to_stream_fields
from payler.drivers.brokers.redis_stream_scripts import FORGET_CONSUMER, READ_NEW, TRIM_ACKED
from payler.drivers.brokers.redis_stream_settings import (
    server_identity,
    split_settings,
)
from payler.errors import StartupError, TransientError, is_transient
from payler.identity import spool_id
from payler.isolation import describe
from payler.payload import MessageProperties, Payload
from payler.urls import mask_url

log = logging.getLogger("payler.redis_streams")

#: On an entry whose fields cannot be decoded: its raw fields (but body and key), by name.
UNDECODABLE_FIELDS = "x-payler-undecodable-fields"
#: How long connecting and the first PING may take before start-up fails.
CONNECT_TIMEOUT_S = 5.0
#: How long a reply may take beyond the blocking time of the command.
REPLY_TIMEOUT_S = 10.0
#: The wait before an entry the handler handed back is handed over again, by hand-back: below
#: the default ``min_idle_ms``, so that this consumer retries its own entries before others do.
HANDBACK_BACKOFF = Backoff(base_s=1.0, max_s=30.0)
#: An entry id before 2001-09-09 is not a time (explicit ids): no publish time is taken from it.
_SMALLEST_EPOCH_MS = 1_000_000_000_000

Entry = tuple[bytes, dict[bytes, bytes] | None]


@contextlib.contextmanager
def _transient(doing: str) -> Iterator[None]:
    """An outage (a lost connection, a server that cannot serve writes now, a group deleted
    under us) becomes a :class:`TransientError`; any other error propagates as it is."""
    try:
        yield
    except RedisError as exc:
        # NOGROUP: the stream or its group was deleted; a restart creates them again.
        if is_transient(exc) or str(exc).startswith("NOGROUP"):
            raise TransientError(f"Redis streams: {doing}: {describe(exc)}") from exc
        raise


class _HandBacks:
    """Entries the handler handed back for now, each due again after a backoff."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self._due: dict[bytes, int] = {}
        self._attempts = Attempts()

    def hand_back(self, entry_ids: Iterable[bytes], now_ms: int) -> None:
        for entry_id in entry_ids:
            before = self._attempts.failed(entry_id.decode())
            self._due[entry_id] = now_ms + round(self.backoff.delay_s(before) * 1000)

    def settled(self, entry_ids: Iterable[bytes]) -> None:
        for entry_id in entry_ids:
            self._due.pop(entry_id, None)
            self._attempts.succeeded(entry_id.decode())

    def take_due(self, now_ms: int, limit: int) -> list[bytes]:
        """Up to ``limit`` entries due again (no longer waiting), oldest first."""
        due = sorted((i for i, at in self._due.items() if at <= now_ms), key=_id_key)[:limit]
        for entry_id in due:
            del self._due[entry_id]
        return due

    def waiting(self, entry_id: bytes, now_ms: int) -> bool:
        return self._due.get(entry_id, now_ms) > now_ms

    def __len__(self) -> int:
        return len(self._due)

    def wait_ms(self, now_ms: int) -> int | None:
        """How long until the next entry is due again; ``None`` when none waits."""
        return min(self._due.values()) - now_ms if self._due else None


class RedisStreamsBroker(Broker):
    """Redis streams as source and destination (see the module docstring)."""

    def __init__(self, url: str, **settings: Any) -> None:
        super().__init__(url, **settings)
        self._redis_url, self.settings = split_settings(url)
        #: ``host:port/db``: the server's part of every spool id this broker's entries get.
        self.server = server_identity(self._redis_url)
        self._client: Redis | None = None
        self._counts_trims = True  # READ_NEW works here (Redis 7); cleared if refused

    async def connect(self) -> None:
        try:
            self._client = client = Redis.from_url(
                self._redis_url,
                decode_responses=False,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=self.settings.block_ms / 1000 + REPLY_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
            )
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await client.ping()
        except (RedisError, OSError, ValueError) as exc:  # TimeoutError is an OSError
            await self.close()
            what = str(exc) or type(exc).__name__
            raise StartupError(f"cannot connect to Redis at {mask_url(self.url)}: {what}") from exc
        register = client.register_script
        self._read_new_script, self._trim_script = register(READ_NEW), register(TRIM_ACKED)
        self._forget_script = register(FORGET_CONSUMER)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):  # the connection may be lost already
                await client.aclose()

    @property
    def client(self) -> Redis:
        """The redis-py client (bytes in, bytes out)."""
        if self._client is None:
            raise RuntimeError("the Redis streams broker is not connected (use it as `async with`)")
        return self._client

    async def ensure_queue(self, name: str) -> None:
        """The source stream: create its group (and the stream) if missing. Any other stream is
        created by its first XADD: only check that ``name`` is not a key of another type."""
        with _transient(f"preparing stream {name!r}"):
            if name == self.queue:
                await self._create_group(name)
                return
            kind = await self.client.type(name)
        if kind not in (b"stream", b"none"):
            raise StartupError(f"Redis key {name!r} is a {kind!r}, not a stream")

    async def _create_group(self, stream: str) -> None:
        group = self.settings.group
        try:
            await self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if str(exc).startswith("BUSYGROUP"):
                return
            if str(exc).startswith("WRONGTYPE"):
                raise StartupError(f"Redis key {stream!r} is not a stream: {exc}") from exc
            raise
        log.info("created consumer group %r of stream %r (from its first entry)", group, stream)

    # -- as a source ---------------------------------------------------------------------------

    @property
    def stream(self) -> str:
        """The source stream (the broker's ``queue``)."""
        if self.queue is None:
            raise ValueError("this broker was opened without a stream to serve")
        return self.queue

    async def serve(self, handler: Handler, stop: asyncio.Event) -> None:
        await self.ensure_queue(self.stream)
        claim_every_ms = self.settings.min_idle_ms // 2
        handbacks = _HandBacks(HANDBACK_BACKOFF)
        pending_from: bytes | None = b"0"  # this consumer's pending list first (a restart's)
        claim_from, claim_at = b"0-0", self.clock.now_ms()
        while not stop.is_set():
            now_ms = self.clock.now_ms()
            if pending_from is not None:
                entries = await self._read(pending_from, block_ms=None)
                if not entries:
                    pending_from = None
                    continue
                pending_from = entries[-1][0]
            elif due := handbacks.take_due(now_ms, self.batch_size):
                entries = await self._reclaim(due)
            elif now_ms >= claim_at:
                claim_from, entries = await self._autoclaim(claim_from)
                if claim_from == b"0-0":  # the whole pending list was scanned
                    claim_at = now_ms + claim_every_ms
            elif len(handbacks) >= self.prefetch:
                # ``prefetch`` entries wait to be handed over again (their destination refuses
                # for now): read no new ones until some are settled.
                await self.clock.sleep(self._wait_ms(handbacks, now_ms) / 1000)
                continue
            else:
                entries = await self._read_new(self._wait_ms(handbacks, now_ms))
            # An entry handed back for now waits for its turn, even when XAUTOCLAIM returns it.
            entries = [(i, f) for i, f in entries if not handbacks.waiting(i, now_ms)]
            if entries:
                settled, handed_back = await self._handle(entries, handler)
                handbacks.settled(settled)
                handbacks.hand_back(handed_back, self.clock.now_ms())
        with _transient(f"leaving the group of {self.stream!r}"):
            args = [self.settings.group, self.settings.consumer]
            await self._forget_script(keys=[self.stream], args=args)

    def _wait_ms(self, handbacks: _HandBacks, now_ms: int) -> int:
        """How long to wait for new entries: ``block_ms``, or less when a handed-back entry is
        due sooner (at least 1: ``BLOCK 0`` would wait forever)."""
        block_ms, wait_ms = self.settings.block_ms, handbacks.wait_ms(now_ms)
        return max(1, block_ms if wait_ms is None else min(block_ms, wait_ms))

    async def _read(self, from_id: bytes, block_ms: int | None) -> list[Entry]:
        streams: dict[str | bytes, bytes] = {self.stream: from_id}
        with _transient(f"reading stream {self.stream!r}"):
            reply: Any = await self.client.xreadgroup(
                self.settings.group,
                self.settings.consumer,
                streams,  # type: ignore[arg-type]  # redis-py types ids as int | bytes | str
                count=self.batch_size,
                block=block_ms,
            )
        return list(reply[0][1]) if reply else []

    async def _read_new(self, block_ms: int) -> list[Entry]:
        """New entries for the group, after reporting any that were trimmed away unread."""
        if not self._counts_trims:
            return await self._read(b">", block_ms)
        stream, settings = self.stream, self.settings
        try:
            with _transient(f"reading stream {stream!r}"):
                reply = await self._read_new_script(
                    keys=[stream], args=[settings.group, settings.consumer, self.batch_size]
                )
        except ResponseError as exc:  # no outage: a server without Redis 7's counters
            self._counts_trims = False
            log.warning(
                "stream %r: this server cannot count entries trimmed away unread (%s, needs "
                "Redis 7): reading without that check",
                stream, describe(exc),
            )  # fmt: skip
            return []
        lost, after, gap_end, through, last, raw = reply
        if lost:
            upto = "up to and including" if through else "and before"
            ids = f"after {after.decode()} {upto} {gap_end.decode()}"
            self._lost(lost, ids, "were trimmed away before payler read")
        entries: list[Entry] = [(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in raw]
        if not entries:
            # Nothing new: wait (reading, not in the group) for an entry after the group's
            # last one; the next turn reads it in the group, with the check above.
            with _transient(f"waiting on stream {stream!r}"):
                await self.client.xread({stream: last}, count=1, block=block_ms)
        return entries

    async def _autoclaim(self, start: bytes) -> tuple[bytes, list[Entry]]:
        """Take over up to ``batch_size`` entries pending for ``min_idle_ms`` in other consumers."""
        stream = self.stream
        with _transient(f"claiming entries of {stream!r}"):
            reply = await self.client.xautoclaim(
                stream,
                self.settings.group,
                self.settings.consumer,
                self.settings.min_idle_ms,
                start_id=start,
                count=self.batch_size,
            )
        if len(reply) > 2 and reply[2]:  # deleted entries: XAUTOCLAIM dropped them already
            self._lost_pending(reply[2])
        return reply[0], [(i, f) for i, f in reply[1] if i is not None]

    async def _reclaim(self, entry_ids: list[bytes]) -> list[Entry]:
        """The pending entries ``entry_ids`` (handed back earlier), read again."""
        stream, group = self.stream, self.settings.group
        with _transient(f"reading pending entries of {stream!r}"):
            reply: Any = await self.client.xclaim(
                stream,
                group,
                self.settings.consumer,
                0,
                entry_ids,  # type: ignore[arg-type]  # redis-py types ids as int | bytes | str
            )
            entries: list[Entry] = [(i, f) for i, f in reply if i is not None]
            claimed = {entry_id for entry_id, _ in entries}
            missing = [i for i in entry_ids if i not in claimed]
            if missing:  # acked by another consumer since (it claimed them), or deleted
                pipe = self.client.pipeline(transaction=False)
                for entry_id in missing:
                    pipe.xrange(stream, entry_id, entry_id, count=1)
                found = await pipe.execute()
                gone = [i for i, there in zip(missing, found, strict=True) if not there]
                if gone:
                    self._lost_pending(gone)
                    await self.client.xack(stream, group, *gone)
        return entries

    async def _handle(
        self, entries: list[Entry], handler: Handler
    ) -> tuple[list[bytes], list[bytes]]:
        """Hand the batch over, then ack it. Returns the ids settled (acked) and those handed
        back (left pending, to be handed over again later)."""
        received_ms = self.clock.now_ms()
        done = [entry_id for entry_id, fields in entries if not fields]  # deleted: nothing left
        if done:
            self._lost_pending(done)
        taken = [(i, self._decode(i, f, received_ms)) for i, f in entries if f]
        rejections: dict[str, Rejection] = {}
        if taken:
            self.metrics.incr("received", len(taken))
            rejections = {r.payload_id: r for r in await handler([p for _, p in taken])}
        handed_back = []
        for entry_id, payload in taken:
            rejection = rejections.get(payload.id)
            if rejection is not None and rejection.permanent:
                log.warning("acking %s, rejected for good: %s", payload.id, rejection.reason)
            if rejection is None or rejection.permanent:
                done.append(entry_id)
            else:
                handed_back.append(entry_id)
        if done:
            with _transient(f"acknowledging {len(done)} entries of {self.stream!r}"):
                await self.client.xack(self.stream, self.settings.group, *done)
        return done, handed_back

    def _lost_pending(self, entry_ids: Sequence[bytes]) -> None:
        first, last = min(entry_ids, key=_id_key), max(entry_ids, key=_id_key)
        ids = first.decode() if first == last else f"{first.decode()} to {last.decode()}"
        self._lost(len(entry_ids), ids, "were deleted while pending, before payler handled")

    def _lost(self, count: int, ids: str, what: str) -> None:
        self.metrics.incr("lost", count)
        log.warning("%d entries of stream %r %s them (ids %s): lost", count, self.stream, what, ids)

    def _decode(self, entry_id: bytes, fields: Mapping[bytes, bytes], received_ms: int) -> Payload:
        """The payload of one entry. Never raises: whatever the entry holds (or whatever goes
        wrong with it), it becomes a payload with a ``defect``, for the workflow to dead-letter."""
        ms = int(entry_id.partition(b"-")[0])
        published_ms = ms if ms >= _SMALLEST_EPOCH_MS else None
        common: dict[str, Any] = {
            "id": spool_id("redis", f"{self.server}:{self.stream}", entry_id.decode(), b"", ""),
            "source": self.stream,
            "destination": "",
            "due_ms": received_ms,
            "created_ms": received_ms,
        }
        try:
            body, key, headers, properties = from_stream_fields(fields)
            if properties.timestamp_ms is None and published_ms is not None:
                properties = properties.model_copy(update={"timestamp_ms": published_ms})
            return Payload(body=body, key=key, headers=headers, properties=properties, **common)
        except Exception as exc:  # one entry can only ever affect itself
            reason = f"the stream entry cannot be decoded: {describe(exc)}"
            log.warning("entry %s of %r: %s", entry_id.decode(), self.stream, reason)
            return _undecodable(fields, published_ms, reason, common)

    # -- as a destination ----------------------------------------------------------------------

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        rejections: list[Rejection] = []
        sending: list[Payload] = []
        pipe = self.client.pipeline(transaction=False)
        for payload, headers in items:
            if not payload.destination:
                rejections.append(Rejection(payload.id, "no destination stream", permanent=True))
                continue
            try:
                fields: dict[Any, Any] = to_stream_fields(payload, headers)
            except (TypeError, ValueError) as exc:  # a header value JSON cannot carry
                reason = f"cannot encode for a Redis stream: {exc}"
                rejections.append(Rejection(payload.id, reason, permanent=True))
                continue
            pipe.xadd(payload.destination, fields)
            sending.append(payload)
        if not sending:
            return rejections
        # Dead letters are never trimmed: they are what an operator has to look at.
        trimming = [] if dead_letters or self.settings.trim == "none" else _streams(sending)
        for stream in trimming:
            await self._trim_script(keys=[stream], client=pipe)  # queued in the pipeline
        with _transient("publishing"):
            results = await pipe.execute(raise_on_error=False)
        outage = False
        for payload, result in zip(sending, results, strict=False):
            if isinstance(result, ResponseError):
                reason = f"Redis refused XADD to {payload.destination!r}: {describe(result)}"
                permanent = not is_transient(result)
                outage = outage or not permanent
                rejections.append(Rejection(payload.id, reason, permanent))
            elif isinstance(result, BaseException):
                raise TransientError(f"Redis streams: publishing: {result}") from result
        for stream, result in zip(trimming, results[len(sending) :], strict=True):
            if isinstance(result, BaseException):
                log.warning("trimming stream %r failed: %s", stream, describe(result))
        if outage:
            # The server cannot take writes now (a failover, say): connect again for the next
            # command, which may find the new master where the URL's name now points.
            with contextlib.suppress(RedisError, OSError):
                await self.client.connection_pool.disconnect()
        return rejections


def _undecodable(
    fields: Mapping[bytes, bytes], published_ms: int | None, reason: str, common: dict[str, Any]
) -> Payload:
    """An entry that cannot be decoded, for the dead letter: its body and key as they are, its
    other fields raw (as text where they are UTF-8), and why."""
    raw = {_name(k): _text(v) for k, v in fields.items() if k not in (b"body", b"key")}
    return Payload(
        body=fields.get(b"body", b""),
        key=fields.get(b"key"),
        headers={UNDECODABLE_FIELDS: raw},
        properties=MessageProperties(timestamp_ms=published_ms),
        defect=reason,
        **common,
    )


def _streams(payloads: Iterable[Payload]) -> list[str]:
    """The destination streams of ``payloads``, each once, in order."""
    return list(dict.fromkeys(p.destination for p in payloads))


def _id_key(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id's sort key: its two numbers."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _name(name: bytes) -> str:
    """A field name as text: its invalid UTF-8 bytes escaped (``\\xff``), never dropped."""
    return name.decode("utf-8", "backslashreplace")


def _text(value: bytes) -> str | bytes:
    """``value`` as text when it is UTF-8, else as it is."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value
