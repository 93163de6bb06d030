"""The Redis streams broker against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from payler.clock import FakeClock
from payler.drivers.base import Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.brokers.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE
from payler.drivers.brokers.mapping import from_stream_fields
from payler.drivers.brokers.redis_streams import (
    UNDECODABLE_FIELDS,
    RedisStreamsBroker,
    server_identity,
    split_settings,
)
from payler.errors import ConfigError, StartupError, TransientError
from payler.payload import Payload
from payler.testing import make_payload
from tests.conftest import REDIS_URL, RedisServers, eventually, free_port, wait_for_role

redis = pytest.mark.redis
#: ``host:port/db`` of the test server, as spool ids name it.
SERVER = server_identity(REDIS_URL)

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
        "redis://u:pw@host:6380/2?group=g&consumer=c&trim=acked&min_idle_ms=5&block_ms=20"
        "&socket_timeout=3"
    )
    assert redis_url == "redis://u:pw@host:6380/2?socket_timeout=3"
    assert (settings.group, settings.consumer, settings.trim) == ("g", "c", "acked")
    assert (settings.min_idle_ms, settings.block_ms) == (5, 20)
    _, defaults = split_settings("rediss://host/0")
    assert (defaults.group, defaults.trim, defaults.min_idle_ms, defaults.block_ms) == (
        "payler",
        "none",
        60_000,
        1_000,
    )
    assert defaults.consumer  # hostname-pid
    with pytest.raises(ConfigError, match=r"u:\*\*\*@.*block_ms must be an integer >= 1"):
        split_settings("redis://u:secret@host/0?block_ms=0")  # BLOCK 0 would never return
    with pytest.raises(ConfigError, match="trim must be 'none' or 'acked'"):
        split_settings("redis://host/0?trim=yes")


def test_maxlen_is_refused_for_what_it_trims() -> None:
    # XADD MAXLEN ~ trimmed entries that the destination's groups had not read: they were lost
    # after payler had counted them delivered. The option is gone, with a clear error.
    with pytest.raises(ConfigError, match=r"u:\*\*\*@.*maxlen is not supported.*trim=acked"):
        split_settings("redis://u:secret@host/0?maxlen=10")


def test_the_server_identity_is_normalised_and_holds_no_secret() -> None:
    assert server_identity("redis://u:secret@Cache.Example:6380/2") == "cache.example:6380/2"
    assert server_identity("rediss://cache.example") == "cache.example:6379/0"
    assert server_identity("redis://cache.example/?db=3") == "cache.example:6379/3"
    assert server_identity("redis://[::1]:7000") == "[::1]:7000/0"
    assert server_identity("redis://:secret@host:6379/0") == "host:6379/0"


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
    assert [p.id for p in taken] == [f"redis:{SERVER}:{stream}:{i.decode()}" for i in ids]
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
async def test_a_handed_back_entry_waits_a_growing_backoff_while_the_rest_flows(
    streams: Streams,
) -> None:
    stream = streams.name("source")
    clock = FakeClock()
    broker = broker_from_url(url(block_ms=20), queue=stream, batch_size=10, clock=clock)
    seen: list[bytes] = []
    changed = asyncio.Event()

    async def refusing_one(batch: Sequence[Payload]) -> list[Rejection]:
        seen.extend(p.body for p in batch)
        changed.set()
        # "hot" is refused for now twice (its destination is full, say), then taken.
        return [Rejection(p.id, "full") for p in batch if p.body == b"hot" and hot() <= 2]

    def hot() -> int:
        return seen.count(b"hot")

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(SERVE_TIMEOUT_S):
            while not condition():
                changed.clear()
                await changed.wait()

    async def flows(body: str) -> None:
        """A new entry is read and handled: the loop went round, the rest flows."""
        await streams.client.xadd(stream, {"body": body})
        await until(lambda: body.encode() in seen)

    stop = asyncio.Event()
    async with broker:
        await broker.ensure_queue(stream)
        await streams.client.xadd(stream, {"body": "hot"})
        serving = asyncio.create_task(broker.serve(refusing_one, stop))
        await until(lambda: hot() == 1)
        for i in range(3):  # no clock time passes: the refused entry waits, the others flow
            await flows(f"a{i}")
        assert hot() == 1
        clock.advance(1_300)  # past the first backoff (1 s, +-20 %): handed over again
        await until(lambda: hot() == 2)
        clock.advance(1_300)  # refused again, it now waits 2 s (+-20 %): not yet
        await flows("c")
        assert hot() == 2
        clock.advance(1_300)
        await until(lambda: hot() == 3)  # and taken
        stop.set()
        await asyncio.wait_for(serving, SERVE_TIMEOUT_S)
    assert [b for b in seen if b != b"hot"] == [b"a0", b"a1", b"a2", b"c"]
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
async def test_an_entry_deleted_while_pending_is_acked_and_reported_lost(
    streams: Streams, caplog: pytest.LogCaptureFixture
) -> None:
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
    assert broker.metrics.totals["lost"] == 1
    assert f"1 entries of stream {stream!r} were deleted while pending" in caplog.text
    assert f"(ids {ids[1].decode()}): lost" in caplog.text


#: Entries that cannot be decoded, by what is wrong with them; each is dead-lettered alone.
BAD_ENTRIES: dict[str, dict[bytes, bytes]] = {
    # What JavaScript's JSON.stringify writes for a string cut inside an emoji.
    "lone surrogate": {b"body": b"s", b"headers": b'{"x-delay": 5, "name": "cut \\ud83d"}'},
    "table tag": {b"body": b"t", b"headers": b'{"__table__": 1}'},
    "too deep": {b"body": b"d", b"headers": b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}"},
    "not json": {b"body": b"j", b"headers": b"{not json", b"extra": b"\xff"},
    "not an object": {b"body": b"o", b"headers": b"[1, 2]"},
    "bad property": {b"body": b"p", b"properties": b'{"priority": "high"}'},
    "unknown property": {b"body": b"u", b"properties": b'{"colour": "red"}'},
    "field name not UTF-8": {b"body": b"n", b"\xff\xfe": b"v"},
}


@redis
async def test_an_undecodable_entry_becomes_a_defect_with_its_body_and_raw_fields(
    streams: Streams,
) -> None:
    stream = streams.name("source")
    for fields in BAD_ENTRIES.values():
        await streams.client.xadd(stream, {b"body": b"good"})
        await streams.client.xadd(stream, fields)  # type: ignore[arg-type]
    taken: list[Payload] = []
    async with opened(stream, block_ms=20) as broker:
        await serve_until(
            broker, lambda b: taken.extend(b) or [], lambda: len(taken) >= 2 * len(BAD_ENTRIES)
        )
    good, bad = taken[::2], taken[1::2]
    assert all(p.body == b"good" and p.defect is None for p in good)
    for payload, (what, fields) in zip(bad, BAD_ENTRIES.items(), strict=True):
        assert payload.defect is not None, what
        assert payload.defect.startswith("the stream entry cannot be decoded: "), what
        assert payload.body == fields[b"body"], what
        raw = {k.decode("utf-8", "backslashreplace"): v for k, v in fields.items() if k != b"body"}
        assert payload.headers == {
            UNDECODABLE_FIELDS: {k: v.decode() if v != b"\xff" else v for k, v in raw.items()}
        }, what
        assert payload.properties.timestamp_ms is not None  # the entry id's time: still known
    by_kind = dict(zip(BAD_ENTRIES, (p.defect for p in bad), strict=True))
    assert "lone UTF-16 surrogate" in str(by_kind["lone surrogate"])
    assert "nested more than" in str(by_kind["too deep"])
    assert "not an object" in str(by_kind["not an object"])
    assert "is not UTF-8" in str(by_kind["field name not UTF-8"])
    assert await streams.pending(stream) == 0  # handed over and acked like the others


@redis
async def test_a_producers_own_fields_keep_their_bytes(streams: Streams) -> None:
    stream = streams.name("source")
    await streams.client.xadd(stream, {b"body": b"b", b"tenant": b"t-1", b"blob": b"\x00\xff"})
    taken: list[Payload] = []
    async with opened(stream, block_ms=20) as broker:
        await serve_until(broker, lambda b: taken.extend(b) or [], lambda: bool(taken))
    [payload] = taken
    assert payload.defect is None
    assert payload.headers == {"tenant": "t-1", "blob": b"\x00\xff"}  # not U+FFFD


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
async def test_trim_acked_never_trims_what_a_group_has_not_read_and_acked(
    streams: Streams,
) -> None:
    out, unread = streams.name("out"), streams.name("no-group")
    await streams.client.xgroup_create(out, "reader", id="0", mkstream=True)
    async with opened(trim="acked") as publisher:
        batch = [make_payload(f"m{i}".encode(), destination=out) for i in range(300)]
        assert await publisher.process(batch) == []
        assert await streams.client.xlen(out) == 300  # the reader has read nothing yet

        # The reader reads 250 entries and acknowledges the first 200 of them.
        [(_, read)] = await streams.client.xreadgroup("reader", "r", {out: ">"}, count=250)
        await streams.client.xack(out, "reader", *[entry_id for entry_id, _ in read[:200]])
        assert await publisher.process([make_payload(b"m300", destination=out)]) == []
        # A stream nobody reads in a group is never trimmed: its readers are unknown.
        nobody = [make_payload(f"n{i}".encode(), destination=unread) for i in range(300)]
        assert await publisher.process(nobody) == []
    # Trimmed (by whole nodes of the stream: MINID ~), but never past the oldest pending entry.
    assert await streams.client.xlen(out) < 301
    [(first_id, first)] = await streams.client.xrange(out, count=1)
    assert first_id <= read[200][0] and first[b"body"] <= b"m200"
    pending = await streams.client.xreadgroup("reader", "r", {out: "0"}, count=100)
    assert [f[b"body"] for _, f in pending[0][1]] == [f"m{i}".encode() for i in range(200, 250)]
    rest = await streams.client.xreadgroup("reader", "r", {out: ">"}, count=100)
    assert [f[b"body"] for _, f in rest[0][1]] == [f"m{i}".encode() for i in range(250, 301)]
    assert await streams.client.xlen(unread) == 300


@redis
async def test_entries_a_producer_trims_away_unread_are_reported_lost(
    streams: Streams, caplog: pytest.LogCaptureFixture
) -> None:
    stream = streams.name("source")
    async with opened(stream, batch_size=10, block_ms=20) as broker:
        await broker.ensure_queue(stream)
        ids = await streams.add(stream, 500)
        taken: list[Payload] = []

        async def trimming(batch: Sequence[Payload]) -> list[Rejection]:
            if not taken:  # while payler works on its first batch, the producer trims
                await streams.client.xtrim(stream, maxlen=100, approximate=False)
            taken.extend(batch)
            if len(taken) >= 110:
                stop.set()
            return []

        stop = asyncio.Event()
        await asyncio.wait_for(broker.serve(trimming, stop), SERVE_TIMEOUT_S)
    assert [p.body for p in taken] == [f"{i}".encode() for i in [*range(10), *range(400, 500)]]
    assert broker.metrics.totals["lost"] == 390
    assert (
        f"390 entries of stream {stream!r} were trimmed away before payler read them "
        f"(ids after {ids[9].decode()} and before {ids[400].decode()}): lost"
    ) in caplog.text

    # Reported once: the group's own counter now includes them, for every consumer and restart.
    await streams.add(stream, 5)
    await streams.client.xtrim(stream, maxlen=0, approximate=False)  # all of it, read or not
    again: list[Payload] = []
    async with opened(stream, consumer="other", block_ms=20) as other:
        stop = asyncio.Event()

        async def nothing_comes(batch: Sequence[Payload]) -> list[Rejection]:
            again.extend(batch)
            return []

        serving = asyncio.create_task(other.serve(nothing_comes, stop))
        await eventually(lambda: other.metrics.totals["lost"] > 0, SERVE_TIMEOUT_S, "a loss")
        stop.set()
        await asyncio.wait_for(serving, SERVE_TIMEOUT_S)
    assert again == []
    assert other.metrics.totals["lost"] == 5  # the 5 new ones, not the 390 again
    last = (await streams.client.xinfo_stream(stream))["last-generated-id"].decode()
    assert f"(ids after {ids[-1].decode()} up to and including {last}): lost" in caplog.text


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


async def test_a_demoted_server_is_an_outage_to_retry_not_a_refusal(
    redis_servers: RedisServers,
) -> None:
    primary = redis_servers.start()
    replica = redis_servers.start(replica_of=primary)
    await wait_for_role(replica, "slave")
    out = "out"
    # A server demoted to a replica (a failover) refuses writes with READONLY, which redis-py
    # raises as a ReadOnlyError without its code in the message: an outage, to retry, not a
    # permanent refusal to dead-letter.
    async with broker_from_url(replica, queue="jobs") as demoted:
        [rejection] = await demoted.process([make_payload(b"1", destination=out)])
        assert not rejection.permanent
        assert "ReadOnlyError" in rejection.reason
        with pytest.raises(TransientError, match="ReadOnlyError"):  # the runtime reconnects
            await demoted.serve(lambda batch: asyncio.sleep(0, []), asyncio.Event())
    async with broker_from_url(primary) as publisher:
        assert await publisher.process([make_payload(b"2", destination=out)]) == []


async def test_two_servers_give_distinct_ids_to_entries_of_the_same_position(
    redis_servers: RedisServers,
) -> None:
    # Two servers feeding one spool, each with a stream "jobs" and an entry 1-1: two messages.

    async def entry_1_1_of(server: str) -> str:
        async with Redis.from_url(server) as raw:
            await raw.xadd("jobs", {"body": b"same"}, id="1-1")
        taken: list[Payload] = []
        async with broker_from_url(f"{server}?block_ms=20", queue="jobs") as broker:
            assert isinstance(broker, RedisStreamsBroker)
            await serve_until(broker, lambda b: taken.extend(b) or [], lambda: bool(taken))
        [payload] = taken
        return payload.id

    servers = [redis_servers.start(), redis_servers.start()]
    ids = [await entry_1_1_of(server) for server in servers]
    ports = [urlsplit(server).port for server in servers]
    assert ids == [f"redis:127.0.0.1:{port}/0:jobs:1-1" for port in ports]
