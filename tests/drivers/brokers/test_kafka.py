"""The Kafka driver against a Kafka-compatible broker (tansu, started by a fixture)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.brokers.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE
from payler.drivers.brokers.kafka import KafkaBroker
from payler.drivers.brokers.mapping import NULL_VALUE, from_kafka_headers
from payler.errors import ConfigError, StartupError, TransientError
from payler.payload import Payload
from payler.testing import make_payload
from tests.conftest import KAFKA_TEST_OPTIONS, Kafka, free_port, tansu_server

pytestmark = pytest.mark.kafka


@pytest.fixture
async def broker(kafka: Kafka) -> AsyncIterator[KafkaBroker]:
    async with KafkaBroker(kafka.url(), batch_size=10) as driver:
        yield driver


async def serve_until(
    url: str, topic: str, handler: Handler, stop: asyncio.Event, timeout_s: float = 30
) -> None:
    """Serve ``topic`` with a fresh driver (a new member of the URL's group) until ``stop``."""
    async with KafkaBroker(url, queue=topic, batch_size=10) as driver:
        await asyncio.wait_for(driver.serve(handler, stop), timeout_s)


async def uncommitted(kafka: Kafka, topic: str, ends: dict[int, int]) -> dict[int, int]:
    """Per partition of ``topic``, how many of the records that end at ``ends`` (partition →
    last offset + 1) the test's group has not committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, group_id=f"{kafka.prefix}-payler"
    )
    await consumer.start()
    try:
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in ends}
    finally:
        await consumer.stop()
    return {p: end - (committed[p] or 0) for p, end in ends.items() if end != committed[p]}


def values(records: list[tuple[float, Any]]) -> list[bytes]:
    return [record.value for _, record in records]


# -- connecting ---------------------------------------------------------------------------------


async def test_an_unreachable_broker_fails_start_up_at_once() -> None:
    url = f"kafka://127.0.0.1:{free_port()}?group=payler"
    started = time.monotonic()
    with pytest.raises(StartupError, match=re.escape(f"cannot connect to Kafka at {url}")):
        async with KafkaBroker(url):
            pass
    assert time.monotonic() - started < 5


def test_the_url_is_checked_and_a_password_never_shown() -> None:
    assert isinstance(broker_from_url("kafka://a:9092,b:9092?group=g"), KafkaBroker)
    assert KafkaBroker("kafka://a:9092,b:9092").settings.bootstrap_servers == ["a:9092", "b:9092"]
    with pytest.raises(ConfigError) as info:
        KafkaBroker("kafka://user:s3cret@host:9092")
    assert "s3cret" not in str(info.value) and "user:***@host" in str(info.value)
    with pytest.raises(ConfigError, match="unknown option 'grup'"):
        KafkaBroker("kafka://host:9092?grup=typo")
    with pytest.raises(ConfigError, match="partitions must be a positive integer"):
        KafkaBroker("kafka://host:9092?partitions=many")
    with pytest.raises(ConfigError, match="auto_offset_reset must be earliest or latest"):
        KafkaBroker("kafka://host:9092?auto_offset_reset=now")
    settings = KafkaBroker("kafka://h:1?group=g&session_timeout_ms=2000&partitions=1").settings
    assert (settings.group, settings.session_timeout_ms, settings.partitions) == ("g", 2000, 1)


async def test_a_missing_topic_is_created_and_an_existing_one_used_as_it_is(
    broker: KafkaBroker, kafka: Kafka
) -> None:
    existing, fresh = kafka.topic("existing"), kafka.topic("fresh")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(existing, 1, 1)])
        await broker.ensure_queue(existing)
        await broker.ensure_queue(fresh)
        await broker.ensure_queue(fresh)  # twice: nothing to do
        described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()
    assert (described[existing], described[fresh]) == (1, 3)
    with pytest.raises(StartupError, match="invalid Kafka topic name"):
        await broker.ensure_queue("no spaces allowed")


# -- as a destination ---------------------------------------------------------------------------


async def test_publish_keeps_key_headers_properties_timestamp_and_per_key_order(
    broker: KafkaBroker, kafka: Kafka
) -> None:
    out = kafka.topic("out")
    await broker.ensure_queue(out)
    headers = {
        "x-delay": 5,
        "x-destination": out,
        "kept": "yes",
        "count": 3,
        "flag": True,
        "blob": b"\x00\x01",
        "table": {"a": [1, "b", None]},
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "price": Decimal("1.50"),
    }
    first = make_payload(
        b"hello",
        headers=headers,
        destination=out,
        content_type="text/plain",
        correlation_id="c-1",
        message_id="m-1",
        priority=7,
        timestamp_ms=1_700_000_000_123,
        delivery_mode=2,
        expiration="60000",
        app_id="tests",
    )
    first.key = b"order-1"
    # The same key, one batch: the records must arrive in this order.
    rest = [make_payload(f"{i}".encode(), destination=out) for i in range(40)]
    for payload in rest:
        payload.key = b"order-1"

    before_ms = time.time_ns() // 1_000_000
    assert await broker.process([first, *rest]) == []
    after_ms = time.time_ns() // 1_000_000

    records = [record for _, record in await kafka.collect(out, 41, timeout_s=10)]
    assert [r.value for r in records] == [b"hello"] + [f"{i}".encode() for i in range(40)]
    assert len({r.partition for r in records}) == 1
    record = records[0]
    assert record.key == b"order-1"
    # Produced now (so that retention counts from now); the publish time travels in a header.
    assert before_ms <= record.timestamp <= after_ms
    raw = dict(record.headers)
    assert raw["payler-timestamp"] == b"1700000000123"
    assert raw["kept"] == b"yes" and raw["payler-content-type"] == b"text/plain"
    assert "x-delay" not in raw and "x-destination" not in raw  # not delayed twice
    got_headers, properties = from_kafka_headers(record.headers, record.timestamp)
    assert got_headers == {k: v for k, v in headers.items() if not k.startswith("x-")}
    assert properties == first.properties


async def test_a_published_payload_is_served_back_as_it_was(
    broker: KafkaBroker, kafka: Kafka
) -> None:
    topic = kafka.topic("loop")
    await broker.ensure_queue(topic)
    sent = make_payload(
        b"\x00binary\xff",
        headers={"n": 1, "s": "text", "b": b"\x01", "nested": {"l": [1.5, False]}},
        destination=topic,
        correlation_id="c-9",
        priority=3,
        timestamp_ms=1_700_000_000_999,
    )
    sent.key = b"k"
    assert await broker.process([sent]) == []
    served: list[Payload] = []
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        served.extend(batch)
        stop.set()
        return []

    await serve_until(kafka.url(), topic, handler, stop)
    [got] = served
    # The cluster's id, the topic with its id, the partition, the offset.
    assert re.fullmatch(rf"kafka:tansu_cluster:{topic}@[A-Za-z0-9_-]{{22}}:\d:0", got.id), got.id
    assert (got.body, got.key, got.headers, got.properties) == (
        sent.body,
        sent.key,
        sent.headers,
        sent.properties,
    )
    assert (got.source, got.destination) == (topic, "")


async def test_records_of_other_producers_are_taken_as_they_come(kafka: Kafka) -> None:
    topic = kafka.topic("foreign")
    async with KafkaBroker(kafka.url()) as admin:
        await admin.ensure_queue(topic)
    await kafka.produce(
        topic,
        [
            (None, b"bare", []),
            # A typed header that is not payler's JSON, and a priority that is not a number.
            (b"k", b"odd", [("payler-typed-headers", b"n"), ("n", b"{oops"), ("priority", b"hi")]),
        ],
        timestamp_ms=1_700_000_000_000,
    )
    served: dict[bytes, Payload] = {}
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        served.update((p.body, p) for p in batch)
        if len(served) == 2:
            stop.set()
        return []

    await serve_until(kafka.url(), topic, handler, stop)
    bare, odd = served[b"bare"], served[b"odd"]
    assert (bare.key, bare.headers, bare.properties.timestamp_ms) == (None, {}, 1_700_000_000_000)
    # Nothing dropped: what is not what payler would write is kept as it came.
    assert (odd.key, odd.headers) == (b"k", {"n": "{oops", "priority": "hi"})
    assert odd.properties.priority is None and odd.defect is None


async def test_records_kafka_refuses_for_good_are_rejected_permanently(
    broker: KafkaBroker, kafka: Kafka
) -> None:
    out = kafka.topic("out")
    await broker.ensure_queue(out)
    fine = make_payload(b"fine", destination=out)
    bad_name = make_payload(b"nowhere", destination="no spaces allowed!")
    # Over Kafka's default message.max.bytes (1 MB), which the producer checks before sending
    # (tansu itself takes records of any size).
    too_large = make_payload(b"x" * 2_000_000, destination=out)

    rejections = {r.payload_id: r for r in await broker.process([bad_name, fine, too_large])}

    assert set(rejections) == {bad_name.id, too_large.id}
    assert all(r.permanent for r in rejections.values())
    assert "invalid Kafka topic name 'no spaces allowed!'" in rejections[bad_name.id].reason
    assert "MessageSizeTooLargeError" in rejections[too_large.id].reason
    assert values(await kafka.collect(out, 1, timeout_s=10, settle_s=0.5)) == [b"fine"]
    # Where the topics take larger records, the URL says so.
    async with KafkaBroker(kafka.url() + "&max_request_size=4000000") as larger:
        assert await larger.process([too_large]) == []


async def test_dead_letters_carry_the_reason_and_the_original_headers(
    broker: KafkaBroker, kafka: Kafka
) -> None:
    dlq = kafka.topic("dlq")
    await broker.ensure_queue(dlq)
    payload = make_payload(b"bad", headers={"x-delay": "soon", "n": 1})
    payload.source = "jobs"
    payload.key = b"k"

    await broker.dead_letter([(payload, "x-delay is not a number")], dlq)

    [(_, record)] = await kafka.collect(dlq, 1, timeout_s=10)
    headers, _ = from_kafka_headers(record.headers, record.timestamp)
    assert (record.key, record.value) == (b"k", b"bad")
    assert headers["x-delay"] == "soon" and headers["n"] == 1
    assert headers[DEAD_LETTER_REASON] == "x-delay is not a number"
    assert headers[DEAD_LETTER_SOURCE] == "jobs"


class FreezingProxy:
    """A TCP proxy in front of a broker that can stop passing bytes on: a broker that hangs."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port, self.upstream_port = port, upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


async def test_a_publish_never_outlives_the_publish_timeout(tmp_path: Path) -> None:
    proxy_port = free_port()
    with tansu_server(tmp_path, advertised_port=proxy_port) as upstream:
        async with FreezingProxy(proxy_port, int(upstream.rpartition(":")[2])) as proxy:
            url = f"kafka://127.0.0.1:{proxy_port}?group=g&{KAFKA_TEST_OPTIONS}"
            async with KafkaBroker(url, publish_timeout_s=1.0) as broker:
                await broker.ensure_queue("known")
                assert await broker.process([make_payload(b"before", destination="known")]) == []
                proxy.freeze()  # the broker stops answering (a hung broker, a partition)
                try:
                    # A topic payler has sent to, and one it has no metadata for yet.
                    for topic in ("known", "unknown"):
                        started = time.monotonic()
                        with pytest.raises(TransientError, match=r"longer than 1 s|cannot reach"):
                            await asyncio.wait_for(
                                broker.process([make_payload(b"x", destination=topic)]), 10
                            )
                        assert time.monotonic() - started < 2.5
                finally:
                    proxy.thaw()


async def test_tombstones_are_published_as_tombstones_and_dead_lettered_as_records(
    broker: KafkaBroker, kafka: Kafka
) -> None:
    out, dlq = kafka.topic("out"), kafka.topic("dlq")
    for topic in (out, dlq):
        await broker.ensure_queue(topic)
    tombstone = make_payload(b"", headers={NULL_VALUE: True}, destination=out)
    tombstone.key = b"deleted"
    keyless = make_payload(b"", headers={NULL_VALUE: True}, destination=out)

    assert await broker.process([tombstone, keyless]) == []
    assert await broker.dead_letter([(tombstone, "why")], dlq) == []

    records = {r.key: r for _, r in await kafka.collect(out, 2, timeout_s=10)}
    assert records[b"deleted"].value is None
    assert NULL_VALUE not in dict(records[b"deleted"].headers)
    # Kafka clients refuse a tombstone without a key: an empty record that says it was one.
    assert records[None].value == b""
    assert from_kafka_headers(records[None].headers, None)[0] == {NULL_VALUE: True}
    # A compacted dead-letter topic must not delete the dead letter: it is a record.
    [(_, dead)] = await kafka.collect(dlq, 1, timeout_s=10)
    assert (dead.key, dead.value) == (b"deleted", b"")
    assert from_kafka_headers(dead.headers, None)[0][NULL_VALUE] is True


# -- as a source --------------------------------------------------------------------------------


async def test_serve_commits_only_after_the_handler_returned(kafka: Kafka) -> None:
    source, url = kafka.topic("source"), kafka.url()
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(source)
    ends = await kafka.produce(source, [(f"k{i}".encode(), f"{i}".encode(), []) for i in range(25)])
    stop = asyncio.Event()
    seen: list[str] = []

    async def failing(batch: Sequence[Payload]) -> list[Rejection]:
        seen.extend(p.id for p in batch)
        raise RuntimeError("the spool is down")

    with pytest.raises(RuntimeError, match="spool is down"):
        await serve_until(url, source, failing, stop)
    assert seen  # it got a batch, failed, and committed none of it
    assert sum((await uncommitted(kafka, source, ends)).values()) == 25

    taken: list[Payload] = []

    async def taking(batch: Sequence[Payload]) -> list[Rejection]:
        taken.extend(batch)
        if len({p.id for p in taken}) == 25:
            stop.set()
        return []

    # A new member of the same group: the failed batch comes again, then everything else.
    await serve_until(url, source, taking, stop)
    assert set(seen) <= {p.id for p in taken}
    assert sorted(int(p.body) for p in taken) == list(range(25))
    assert all(re.fullmatch(rf"kafka:tansu_cluster:{source}@[\w-]+:\d:\d+", p.id) for p in taken)
    assert all(p.key == b"k" + p.body and p.source == source for p in taken)
    assert await uncommitted(kafka, source, ends) == {}


async def test_a_record_refused_for_now_alone_is_taken_again_after_a_backoff(
    kafka: Kafka,
) -> None:
    # One partition, so that the order of the records is the order they are consumed in.
    source = kafka.topic("source")
    url = kafka.url() + "&partitions=1&retry_base_ms=300&retry_max_ms=1000"
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(source)
    ends = await kafka.produce(source, [(None, f"{i}".encode(), []) for i in range(25)])
    stop = asyncio.Event()
    handed: list[tuple[float, int]] = []

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        handed.extend((time.monotonic(), int(p.body)) for p in batch)
        bodies = [body for _, body in handed]
        rejections = []
        for payload in batch:
            if payload.body == b"3":
                rejections.append(Rejection(payload.id, "invalid", permanent=True))
            if payload.body == b"7" and bodies.count(7) <= 3:
                rejections.append(Rejection(payload.id, "the destination is full"))
        if set(bodies) == set(range(25)) and bodies.count(7) == 4:
            stop.set()
        return rejections

    await serve_until(url, source, handler, stop)
    counts = Counter(body for _, body in handed)
    # Refused three times, taken the fourth; every other record handed over once, never again.
    assert counts[7] == 4
    assert all(counts[i] == 1 for i in range(25) if i != 7), counts
    # Each time after a longer backoff: 300 ms, 600 ms, then the 1000 ms cap (±20 % jitter).
    times = [at for at, body in handed if body == 7]
    waits = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert waits[0] >= 0.24 and waits[1] >= 0.48 and waits[2] >= 0.8, waits
    assert await uncommitted(kafka, source, ends) == {}


async def test_the_other_partitions_flow_on_while_one_waits_for_its_refused_record(
    kafka: Kafka,
) -> None:
    source = kafka.topic("source")
    url = kafka.url() + "&partitions=4&retry_base_ms=1500&retry_max_ms=1500"
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(source)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        for partition in range(4):
            for i in range(5):
                await producer.send(source, f"{partition}-{i}".encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()
    stop = asyncio.Event()
    handed: list[str] = []

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        handed.extend(p.body.decode() for p in batch)
        rejections = [
            Rejection(p.id, "the destination is full")
            for p in batch
            if p.body == b"0-1" and handed.count("0-1") == 1
        ]
        if len(set(handed)) == 20 and handed.count("0-1") == 2:
            stop.set()
        return rejections

    await serve_until(url, source, handler, stop)
    counts = Counter(handed)
    assert counts["0-1"] == 2 and all(n == 1 for body, n in counts.items() if body != "0-1"), counts
    # While partition 0 waited 1.5 s for its refused record, the others were all handled.
    retried_at = len(handed) - 1 - handed[::-1].index("0-1")
    others = [i for i, body in enumerate(handed) if not body.startswith("0-")]
    assert max(others) < retried_at, handed


async def test_a_member_joining_the_group_midway_loses_nothing(kafka: Kafka) -> None:
    source, url = kafka.topic("source"), kafka.url()
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(source)
    handled: Counter[str] = Counter()
    first_wave, everything = asyncio.Event(), asyncio.Event()
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        handled.update(p.id for p in batch)
        if len(handled) >= 30:
            first_wave.set()
        if len(handled) == 90:
            everything.set()
        return []

    records = [(f"k{i}".encode(), f"{i}".encode(), []) for i in range(90)]
    ends = await kafka.produce(source, records[:30])
    first = asyncio.create_task(serve_until(url, source, handler, stop, timeout_s=60))
    await asyncio.wait_for(first_wave.wait(), 30)
    # The second member's join revokes the first one's partitions: a rebalance mid-stream.
    second = asyncio.create_task(serve_until(url, source, handler, stop, timeout_s=60))
    ends |= await kafka.produce(source, records[30:])
    try:
        await asyncio.wait_for(everything.wait(), 30)
    finally:
        stop.set()
        await asyncio.gather(first, second)
    assert len(handled) == 90
    assert await uncommitted(kafka, source, ends) == {}
