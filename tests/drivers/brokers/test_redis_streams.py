"""The Redis streams broker against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis

from payler.drivers.base import Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.brokers.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE
from payler.drivers.brokers.mapping import from_stream_fields
from payler.drivers.brokers.redis_streams import (
    UNDECODABLE_FIELDS,
    RedisStreamsBroker,
    split_settings,
)
from payler.errors import ConfigError, StartupError
from payler.payload import Payload
from payler.testing import make_payload
from tests.conftest import REDIS_URL, free_port

redis = pytest.mark.redis

#: How long a test lets a serve run before it counts as hung.
SERVE_TIMEOUT_S = 10.0


@dataclass
class Streams:
    """A client on the real Redis, and stream names of this test's own (deleted after it)."""

    client: Redis
    prefix: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")
    names: list[str] = field(default_factory=list)

    def name(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        self.names.append(name)
        return name

    async def add(self, stream: str, count: int) -> list[bytes]:
        """``count`` entries as a plain producer writes them: only a ``body`` field."""
        return [await self.client.xadd(stream, {b"body": f"{i}".encode()}) for i in range(count)]

    async def pending(self, stream: str, group: str = "payler") -> int:
        summary = await self.client.xpending(stream, group)
        return int(summary["pending"])


@pytest.fixture
async def streams() -> AsyncIterator[Streams]:
    client = Redis.from_url(REDIS_URL)
    handle = Streams(client)
    try:
        yield handle
    finally:
        if handle.names:
            await client.delete(*handle.names)
        await client.aclose()


def url(**params: object) -> str:
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}{query}" if query else REDIS_URL


def opened(stream: str | None = None, batch_size: int = 10, **params: object) -> RedisStreamsBroker:
    broker = broker_from_url(url(**params), queue=stream, batch_size=batch_size)
    assert isinstance(broker, RedisStreamsBroker)
    return broker


async def serve_until(
    broker: RedisStreamsBroker,
    decide: Callable[[Sequence[Payload]], list[Rejection]],
    done: Callable[[], bool],
) -> None:
    """Serve until ``done()`` after a batch; ``decide`` returns each batch's rejections."""
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        rejections = decide(batch)
        if done():
            stop.set()
        return rejections

    await asyncio.wait_for(broker.serve(handler, stop), SERVE_TIMEOUT_S)


def test_payler_parameters_are_taken_out_of_the_url() -> None:
    redis_url, settings = split_settings(
        "redis://u:pw@host:6380/2?group=g&consumer=c&maxlen=500&min_idle_ms=5&block_ms=20"
        "&socket_timeout=3"
    )
    assert redis_url == "redis://u:pw@host:6380/2?socket_timeout=3"
    assert (settings.group, settings.consumer, settings.maxlen) == ("g", "c", 500)
    assert (settings.min_idle_ms, settings.block_ms) == (5, 20)
    _, defaults = split_settings("rediss://host/0")
    assert (defaults.group, defaults.maxlen, defaults.min_idle_ms, defaults.block_ms) == (
        "payler",
        None,
        60_000,
        1_000,
    )
    assert defaults.consumer  # hostname-pid
    with pytest.raises(ConfigError, match=r"u:\*\*\*@.*block_ms must be an integer >= 1"):
        split_settings("redis://u:secret@host/0?block_ms=0")  # BLOCK 0 would never return


@redis
async def test_entries_are_acked_only_after_the_handler_returned(streams: Streams) -> None:
    stream = streams.name("source")
    async with opened(stream, consumer="c1", block_ms=50) as broker:
        await broker.ensure_queue(stream)
        ids = await streams.add(stream, 25)
        seen: list[str] = []

        async def failing(batch: Sequence[Payload]) -> list[Rejection]:
            seen.extend(p.id for p in batch)
            raise RuntimeError("the spool is down")

        with pytest.raises(RuntimeError, match="spool is down"):
            await broker.serve(failing, asyncio.Event())
        assert len(seen) == 10
        assert await streams.pending(stream) == 10  # read, not acked

        # The same consumer, restarted: its pending entries come first, then the new ones.
        taken: list[Payload] = []
        await serve_until(broker, lambda b: taken.extend(b) or [], lambda: len(taken) >= 25)
    assert [p.id for p in taken] == [f"redis:{stream}:{i.decode()}" for i in ids]
    assert [p.id for p in taken[:10]] == seen
    first = taken[0]
    assert (first.body, first.source, first.destination, first.headers) == (b"0", stream, "", {})
    assert first.properties.timestamp_ms == int(ids[0].split(b"-")[0])  # the entry id's time
    assert first.due_ms == first.created_ms > 0
    assert await streams.pending(stream) == 0
    # On a clean stop, a consumer holding nothing leaves the group.
    assert await streams.client.xinfo_consumers(stream, "payler") == []


@redis
async def test_a_handed_back_entry_is_read_again_and_a_permanent_rejection_is_acked(
    streams: Streams,
) -> None:
    stream = streams.name("source")
    await streams.add(stream, 5)
    taken: list[str] = []
    handed_back: set[str] = set()

    def decide(batch: Sequence[Payload]) -> list[Rejection]:
        taken.extend(p.id for p in batch)
        rejections = []
        for payload in batch:
            if payload.body == b"1" and payload.id not in handed_back:
                handed_back.add(payload.id)
                rejections.append(Rejection(payload.id, "try later"))
            elif payload.body == b"3":
                rejections.append(Rejection(payload.id, "never", permanent=True))
        return rejections

    async with opened(stream, block_ms=50) as broker:
        await serve_until(broker, decide, lambda: len(taken) >= 6)
    [again] = handed_back
    assert taken.count(again) == 2  # handed back once, then taken
    assert len(set(taken)) == 5 and len(taken) == 6  # the permanent rejection came only once
    assert await streams.pending(stream) == 0


@redis
async def test_a_dead_consumers_pending_entries_are_claimed_by_another(streams: Streams) -> None:
    stream = streams.name("source")
    await streams.add(stream, 10)
    async with opened(stream, consumer="a") as dead:

        async def crashing(batch: Sequence[Payload]) -> list[Rejection]:
            raise RuntimeError("consumer a dies with its batch in hand")

        with pytest.raises(RuntimeError):
            await dead.serve(crashing, asyncio.Event())
    [consumer_a] = await streams.client.xinfo_consumers(stream, "payler")
    assert (consumer_a["name"], consumer_a["pending"]) == (b"a", 10)

    taken: list[Payload] = []
    async with opened(stream, consumer="b", min_idle_ms=20, block_ms=20) as heir:
        await serve_until(heir, lambda b: taken.extend(b) or [], lambda: len(taken) >= 10)
    assert sorted(p.body for p in taken) == sorted(f"{i}".encode() for i in range(10))
    assert await streams.pending(stream) == 0


@redis
async def test_an_entry_deleted_while_pending_is_acked_and_skipped(streams: Streams) -> None:
    stream = streams.name("source")
    ids = await streams.add(stream, 3)
    async with opened(stream, consumer="c", block_ms=20) as broker:

        async def failing(batch: Sequence[Payload]) -> list[Rejection]:
            raise RuntimeError("down")

        with pytest.raises(RuntimeError):
            await broker.serve(failing, asyncio.Event())
        await streams.client.xdel(stream, ids[1])  # trimmed while pending, say
        taken: list[Payload] = []
        await serve_until(broker, lambda b: taken.extend(b) or [], lambda: len(taken) >= 2)
    assert [p.body for p in taken] == [b"0", b"2"]
    assert await streams.pending(stream) == 0


@redis
async def test_an_undecodable_entry_keeps_its_body_and_raw_fields(streams: Streams) -> None:
    stream = streams.name("source")
    await streams.client.xadd(stream, {"body": b"b", "headers": b"{not json", "extra": b"\xff"})
    taken: list[Payload] = []
    async with opened(stream, block_ms=20) as broker:
        await serve_until(broker, lambda b: taken.extend(b) or [], lambda: bool(taken))
    [payload] = taken
    assert payload.body == b"b"
    assert payload.headers == {UNDECODABLE_FIELDS: {"headers": "{not json", "extra": b"\xff"}}


@redis
async def test_process_keeps_body_key_typed_headers_and_properties(streams: Streams) -> None:
    out = streams.name("out")
    custom = {"kept": "yes", "n": 7, "blob": b"\x00\x01", "nested": {"list": [1, "two", True]}}
    sent = make_payload(
        b"\x00payload",
        headers={"x-delay": 5, "x-destination": out, **custom},
        destination=out,
        content_type="application/json",
        correlation_id="c-1",
        message_id="m-1",
        priority=7,
        timestamp_ms=1_700_000_000_123,
        delivery_mode=2,
        expiration="60000",
    ).model_copy(update={"key": b"k-1"})
    async with opened() as publisher:
        assert await publisher.process([sent]) == []
    [(_, fields)] = await streams.client.xrange(out)
    body, key, headers, properties = from_stream_fields(fields)
    assert (body, key) == (b"\x00payload", b"k-1")
    assert headers == custom  # less the scheduling headers
    assert properties == sent.properties

    # And back in as a source: the same message, its publish time kept.
    taken: list[Payload] = []
    async with opened(out, block_ms=20) as broker:
        await serve_until(broker, lambda b: taken.extend(b) or [], lambda: bool(taken))
    [back] = taken
    assert (back.body, back.key, back.headers, back.properties) == (body, key, headers, properties)


@redis
async def test_a_destination_that_is_not_a_stream_is_a_permanent_rejection(
    streams: Streams,
) -> None:
    not_a_stream, out = streams.name("string"), streams.name("out")
    await streams.client.set(not_a_stream, "x")
    wrong = make_payload(b"1", destination=not_a_stream)
    nowhere = make_payload(b"2", destination="")
    ok = make_payload(b"3", destination=out)
    async with opened() as publisher:
        rejections = await publisher.process([wrong, nowhere, ok])
    by_id = {r.payload_id: r for r in rejections}
    assert set(by_id) == {wrong.id, nowhere.id}
    assert all(r.permanent for r in rejections)
    assert "WRONGTYPE" in by_id[wrong.id].reason and not_a_stream in by_id[wrong.id].reason
    assert await streams.client.xlen(out) == 1


@redis
async def test_maxlen_trims_destination_streams(streams: Streams) -> None:
    out = streams.name("out")
    async with opened(maxlen=10) as publisher:
        batch = [make_payload(f"{i}".encode(), destination=out) for i in range(500)]
        assert await publisher.process(batch) == []
    # Approximate (MAXLEN ~): trimmed by whole nodes of the stream, never below 10.
    assert 10 <= await streams.client.xlen(out) < 500


@redis
async def test_dead_letters_keep_their_headers_plus_the_reason(streams: Streams) -> None:
    dead = streams.name("dead")
    payload = make_payload(b"bad", headers={"x-delay": "soon", "kept": 1}, message_id="m-9")
    payload = payload.model_copy(update={"source": "jobs"})
    async with opened() as broker:
        await broker.dead_letter([(payload, "x-delay is not a number")], dead)
    [(_, fields)] = await streams.client.xrange(dead)
    body, _, headers, properties = from_stream_fields(fields)
    assert body == b"bad" and properties.message_id == "m-9"
    assert headers["x-delay"] == "soon" and headers["kept"] == 1
    assert headers[DEAD_LETTER_REASON] == "x-delay is not a number"
    assert headers[DEAD_LETTER_SOURCE] == "jobs"


@redis
async def test_ensure_queue_creates_the_group_of_the_source_only(streams: Streams) -> None:
    source, other, wrong = streams.name("source"), streams.name("other"), streams.name("wrong")
    await streams.client.set(wrong, "x")
    async with opened(source) as broker:
        await broker.ensure_queue(source)
        await broker.ensure_queue(source)  # BUSYGROUP: the group is used as it is
        await broker.ensure_queue(other)  # created by its first XADD: nothing to do
        with pytest.raises(StartupError, match="not a stream"):
            await broker.ensure_queue(wrong)
    [group] = await streams.client.xinfo_groups(source)
    assert group["name"] == b"payler"
    assert not await streams.client.exists(other)


async def test_an_unreachable_server_fails_at_once_with_the_password_masked() -> None:
    broker = RedisStreamsBroker(f"redis://user:secret@127.0.0.1:{free_port()}/0?group=g")
    started = time.monotonic()
    with pytest.raises(StartupError) as failure:
        await broker.connect()
    assert time.monotonic() - started < 3
    assert "secret" not in str(failure.value) and "user:***@" in str(failure.value)
    await broker.close()
    await broker.close()  # idempotent
