"""Redis streams as a broker, through redis-py's asyncio client (``redis.asyncio``).

``redis://[[user]:password@]host[:port][/DB][?PARAMS]`` (``rediss://`` for TLS). payler's own
query parameters are taken out before the URL goes to redis-py (whose own, such as
``socket_timeout``, pass through):

=================  ================  ==========================================================
``group``          ``payler``        the consumer group that reads the source stream
``consumer``       ``HOSTNAME-PID``  this reader's name in the group; give each instance a stable
                                     one so that a restart re-reads its own unfinished entries
``maxlen``         none              ``MAXLEN ~`` for every XADD to a destination stream
``min_idle_ms``    ``60000``         how long an entry stays pending before XAUTOCLAIM takes it
``block_ms``       ``1000``          how long one XREADGROUP waits; ``stop`` is seen within it
=================  ================  ==========================================================

**As a source** ``serve`` reads stream ``queue`` in the group with XREADGROUP, up to
``batch_size`` entries (whatever has arrived, waiting at most ``block_ms``; ``prefetch`` does not
apply), and XACKs a batch in one call, only after the handler returned; if the handler raises or
``serve`` is cancelled, nothing is acked. An entry stays in the group's pending list until it
is acked, so nothing read is lost:

- at start, and whenever the handler rejected some entries transiently, this consumer's own
  pending list (XREADGROUP from id ``0``) is read again before new entries: a restart's
  unfinished batch first, and a handed-back entry after the next read of new ones (so at most
  ``block_ms`` later when the stream is idle, without a busy loop);
- at start and every ``min_idle_ms / 2``, XAUTOCLAIM takes over entries that another consumer
  left pending for ``min_idle_ms`` (it crashed, or was renamed by a restart);
- a permanent rejection is acked: streams have no dead-letter exchange, the handler dead-letters;
- an entry deleted (trimmed) while pending is acked and logged: there is nothing left to deliver.

A missing group is created at the stream's first entry (``MKSTREAM``): nothing already in the
stream is skipped. On a clean stop this consumer leaves the group if it holds no pending entry.
Each entry becomes a payload whose id is ``redis:<stream>:<entry id>``, stable across
re-deliveries, so re-spooling is idempotent. Its fields are read with
:func:`~payler.drivers.brokers.mapping.from_stream_fields`; without a ``timestamp_ms`` property
the publish time is the entry id's millisecond part. An entry whose ``headers`` or
``properties`` cannot be decoded keeps its body, and its raw fields go in the header
``x-payler-undecodable-fields``: the workflow schedules or dead-letters it, it never crashes.

**As a destination** ``process`` XADDs every payload of a batch to stream ``payload.destination``
in one pipeline. A command error that a retry cannot mend (``WRONGTYPE``: the key is no stream)
is a permanent rejection; one that can (``OOM``, ``READONLY``, ``LOADING``...) a transient one; a
lost connection raises :class:`~payler.errors.TransientError`. Dead letters are XADDed the same
way, never trimmed by ``maxlen``. XADD creates missing streams, so ``ensure_queue`` only creates
the source's group, and checks that any other name is a stream or free.

redis-py's own retries are off, as for the Redis storage: a lost connection surfaces at once and
the runtime restarts the workflow with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.base import Broker
from payler.drivers.brokers.mapping import from_stream_fields, to_stream_fields
from payler.errors import ConfigError, StartupError, TransientError
from payler.identity import spool_id
from payler.payload import MessageProperties, Payload
from payler.urls import mask_url

log = logging.getLogger("payler.redis_streams")

#: On an entry whose fields cannot be decoded: its raw fields (but body and key), by name.
UNDECODABLE_FIELDS = "x-payler-undecodable-fields"
#: How long connecting and the first PING may take before start-up fails.
CONNECT_TIMEOUT_S = 5.0
#: How long a reply may take beyond the blocking time of the command.
REPLY_TIMEOUT_S = 10.0
#: Command errors that a later retry may mend: the payload is handed back, not dead-lettered.
_RETRYABLE = ("OOM", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS")
#: An entry id before 2001-09-09 is not a time (explicit ids): no publish time is taken from it.
_SMALLEST_EPOCH_MS = 1_000_000_000_000

# Leave the group only when holding nothing: atomic, so no pending entry can be dropped with it.
_FORGET_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

Entry = tuple[bytes, dict[bytes, bytes]]
_NO_PROPERTIES = MessageProperties()


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """payler's query parameters of a stream broker URL (see the module docstring)."""

    group: str = "payler"
    consumer: str = ""
    maxlen: int | None = None
    min_idle_ms: int = 60_000
    block_ms: int = 1_000


def split_settings(url: str) -> tuple[str, StreamSettings]:
    """``url`` without payler's parameters (for redis-py), and those parameters."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {name: value for name, value in query if name in StreamSettings.__slots__}
    rest = urlencode([(name, value) for name, value in query if name not in ours])

    def number(name: str, default: int, least: int) -> int:
        text = ours.get(name, str(default))
        if not text.isdigit() or int(text) < least:
            raise ConfigError(
                f"broker URL {mask_url(url)!r}: {name} must be an integer >= {least}, not {text!r}"
            )
        return int(text)

    for name in ("group", "consumer"):
        if name in ours and not ours[name]:
            raise ConfigError(f"broker URL {mask_url(url)!r}: {name} is empty")
    settings = StreamSettings(
        group=ours.get("group", "payler"),
        consumer=ours.get("consumer") or f"{socket.gethostname()}-{os.getpid()}",
        maxlen=number("maxlen", 0, 1) if "maxlen" in ours else None,
        min_idle_ms=number("min_idle_ms", 60_000, 0),
        block_ms=number("block_ms", 1_000, 1),  # BLOCK 0 would wait forever
    )
    return urlunsplit(parts._replace(query=rest)), settings


@contextlib.contextmanager
def _transient(doing: str) -> Iterator[None]:
    """A lost connection (or a group deleted under us) becomes a :class:`TransientError`."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise TransientError(f"Redis streams: {doing}: {exc}") from exc
    except ResponseError as exc:
        if str(exc).startswith("NOGROUP"):  # a restart creates the group again
            raise TransientError(f"Redis streams: {doing}: {exc}") from exc
        raise


class RedisStreamsBroker(Broker):
    """Redis streams as source and destination (see the module docstring)."""

    def __init__(self, url: str, **settings: Any) -> None:
        super().__init__(url, **settings)
        self._redis_url, self.settings = split_settings(url)
        self._client: Redis | None = None

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
        pending_from: bytes | None = b"0"  # this consumer's pending list first (a restart's)
        reread = False  # something was handed back: read the pending list after new entries
        claim_from, claim_at = b"0-0", self.clock.now_ms()
        while not stop.is_set():
            if pending_from is not None:
                entries = await self._read(pending_from, block_ms=None)
                if not entries:
                    pending_from = None
                    continue
                pending_from = entries[-1][0]
            elif self.clock.now_ms() >= claim_at:
                claim_from, entries = await self._autoclaim(claim_from)
                if claim_from == b"0-0":  # the whole pending list was scanned
                    claim_at = self.clock.now_ms() + claim_every_ms
            else:
                entries = await self._read(b">", block_ms=self.settings.block_ms)
                if reread:
                    pending_from, reread = b"0", False
            if entries and await self._handle(entries, handler):
                reread = True
        with _transient(f"leaving the group of {self.stream!r}"):
            await self.client.eval(
                _FORGET_CONSUMER, 1, self.stream, self.settings.group, self.settings.consumer
            )

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
            log.warning("%d pending entries of %r were deleted, unhandled", len(reply[2]), stream)
        return reply[0], [(i, f) for i, f in reply[1] if i is not None]

    async def _handle(self, entries: list[Entry], handler: Handler) -> bool:
        """Hand the batch over, then ack it; whether some entries stay pending (handed back)."""
        received_ms = self.clock.now_ms()
        done = [entry_id for entry_id, fields in entries if not fields]  # deleted: nothing left
        if done:
            log.warning("%d pending entries of %r were deleted, unhandled", len(done), self.stream)
        taken = [(i, self._decode(i, f, received_ms)) for i, f in entries if f]
        rejections: dict[str, Rejection] = {}
        if taken:
            self.metrics.incr("received", len(taken))
            rejections = {r.payload_id: r for r in await handler([p for _, p in taken])}
        for entry_id, payload in taken:
            rejection = rejections.get(payload.id)
            if rejection is not None and rejection.permanent:
                log.warning("acking %s, rejected for good: %s", payload.id, rejection.reason)
            if rejection is None or rejection.permanent:
                done.append(entry_id)
        if done:
            with _transient(f"acknowledging {len(done)} entries of {self.stream!r}"):
                await self.client.xack(self.stream, self.settings.group, *done)
        return len(done) < len(entries)

    def _decode(self, entry_id: bytes, fields: Mapping[bytes, bytes], received_ms: int) -> Payload:
        stream = self.stream
        try:
            body, key, headers, properties = from_stream_fields(fields)
        except (ValueError, TypeError, ArithmeticError) as exc:
            log.warning("entry %s of %r cannot be decoded: %s", entry_id, stream, exc)
            body, key, properties = fields.get(b"body", b""), fields.get(b"key"), _NO_PROPERTIES
            raw = {k.decode(errors="replace"): _text(v) for k, v in fields.items()}
            headers = {UNDECODABLE_FIELDS: {k: raw[k] for k in raw.keys() - {"body", "key"}}}
        published_ms = int(entry_id.partition(b"-")[0])
        if properties.timestamp_ms is None and published_ms >= _SMALLEST_EPOCH_MS:
            properties = properties.model_copy(update={"timestamp_ms": published_ms})
        return Payload(
            id=spool_id("redis", stream, entry_id.decode(), body, ""),
            body=body,
            key=key,
            headers=headers,
            properties=properties,
            source=stream,
            destination="",
            due_ms=received_ms,
            created_ms=received_ms,
        )

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
            # Dead letters are never trimmed away: they are what an operator has to look at.
            maxlen = None if dead_letters else self.settings.maxlen
            pipe.xadd(payload.destination, fields, maxlen=maxlen)
            sending.append(payload)
        if not sending:
            return rejections
        with _transient("publishing"):
            results = await pipe.execute(raise_on_error=False)
        for payload, result in zip(sending, results, strict=True):
            if isinstance(result, ResponseError):
                reason = f"Redis refused XADD to {payload.destination!r}: {result}"
                permanent = not str(result).startswith(_RETRYABLE)
                rejections.append(Rejection(payload.id, reason, permanent))
            elif isinstance(result, BaseException):
                raise TransientError(f"Redis streams: publishing: {result}") from result
        return rejections


def _text(value: bytes) -> str | bytes:
    """``value`` as text when it is UTF-8, else as it is."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value
