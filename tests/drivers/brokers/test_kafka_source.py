"""Kafka as a source (``payler/drivers/brokers/kafka_source.py``) on tansu: compressed topics,
spool ids that name the cluster and the topic's incarnation, records payler cannot decode,
tombstones."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from payler.drivers.base import Rejection
from payler.drivers.brokers import kafka_source
from payler.drivers.brokers.kafka import KafkaBroker
from payler.drivers.brokers.kafka_source import record_id
from payler.drivers.brokers.mapping import NULL_VALUE
from payler.payload import Payload
from tests.conftest import KAFKA_TEST_OPTIONS, Kafka, tansu_server
from tests.drivers.brokers.test_kafka import serve_until, uncommitted

pytestmark = pytest.mark.kafka


async def serve_all(url: str, topic: str, count: int) -> list[Payload]:
    """Serve ``topic`` in the URL's group until ``count`` distinct payloads came; return them."""
    served: dict[str, Payload] = {}
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        served.update((p.id, p) for p in batch)
        if len(served) >= count:
            stop.set()
        return []

    await serve_until(url, topic, handler, stop)
    return sorted(served.values(), key=lambda p: p.body)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_compressed_topics_are_consumed(kafka: Kafka, codec: str) -> None:
    topic = kafka.topic(codec)
    async with KafkaBroker(kafka.url()) as admin:
        await admin.ensure_queue(topic)
    records = [(b"k", f"{i:03}".encode() * 50, [("n", f"{i}".encode())]) for i in range(30)]
    await kafka.produce(topic, records, compression=codec)

    served = await serve_all(kafka.url(), topic, len(records))

    assert [(p.body, p.key, p.headers) for p in served] == [
        (value, key, {"n": n.decode()}) for key, value, [(_, n)] in records
    ]


def test_a_record_id_reads_back_from_its_right_end() -> None:
    assert record_id("lkc-1", "orders", 2, 1337) == "kafka:lkc-1:orders:2:1337"
    assert record_id("h:9092", "orders", 0, 5, "AAAA") == "kafka:h:9092:orders@AAAA:0:5"
    # Another cluster, or the same topic created anew: other ids for the same position.
    assert len({record_id(c, "t", 0, 0, i) for c in ("a", "b") for i in ("x", "y", None)}) == 6


async def test_spool_ids_name_the_cluster_and_the_topic_created_anew(kafka: Kafka) -> None:
    topic = kafka.topic("recreated")
    url = kafka.url() + "&partitions=1"
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(topic)
    await kafka.produce(topic, [(None, b"first", [])])
    [first] = await serve_all(url, topic, 1)

    admin_client = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin_client.start()
    try:
        await admin_client.delete_topics([topic])
        await admin_client.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin_client.close()
    await kafka.produce(topic, [(None, b"second", [])])  # offset 0 again
    [second] = await serve_all(kafka.url("fresh") + "&partitions=1", topic, 1)

    assert first.id.startswith(f"kafka:tansu_cluster:{topic}@") and first.id.endswith(":0:0")
    assert second.id.startswith(f"kafka:tansu_cluster:{topic}@") and second.id.endswith(":0:0")
    assert first.id != second.id  # the new topic's record is not taken for the old one's


@pytest.fixture
def second_cluster(tmp_path: Path) -> Iterator[str]:
    """Another tansu broker, with a cluster id of its own: its ``host:port``."""
    with tansu_server(tmp_path, cluster_id="second-cluster") as bootstrap:
        yield bootstrap


async def test_two_clusters_give_the_same_position_two_ids(
    kafka: Kafka, second_cluster: str
) -> None:
    topic = kafka.topic("twin")
    other = Kafka(second_cluster, kafka.prefix)
    ids = []
    for cluster in (kafka, other):
        url = f"kafka://{cluster.bootstrap}?group={kafka.prefix}&partitions=1&{KAFKA_TEST_OPTIONS}"
        async with KafkaBroker(url) as admin:
            await admin.ensure_queue(topic)
        await cluster.produce(topic, [(None, b"same place", [])])
        [payload] = await serve_all(url, topic, 1)
        ids.append(payload.id)
    assert ids[0].startswith("kafka:tansu_cluster:") and ids[1].startswith("kafka:second-cluster:")
    assert ids[0].removeprefix("kafka:tansu_cluster:").endswith(":0:0")


async def test_what_payler_cannot_decode_comes_out_as_a_defect_with_the_record_kept(
    kafka: Kafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = kafka.topic("odd")
    url = kafka.url() + "&partitions=1"
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(topic)
    hostile = [
        ("payler-typed", b'["d", "t", "s"]'),
        ("d", b"[" * 5000 + b"]" * 5000),  # too deep for payler's JSON
        ("t", b'{"__datetime__": 5}'),  # a tag holding the wrong type
        ("s", b'"\\ud83d"'),  # a lone surrogate
        ("bin", b"\xff\xfe"),
    ]
    await kafka.produce(
        topic,
        [
            (None, b"a", []),
            (None, b"b", hostile),
            (b"k", b"c", [("bug", b"1"), ("bug", None)]),
            (None, b"d", []),
        ],
    )
    decode = kafka_source.from_kafka_headers

    def buggy(records, timestamp_ms, problems=None):  # type: ignore[no-untyped-def]
        if any(name == "bug" for name, _ in records):
            raise KeyError("a bug in payler for one record")
        return decode(records, timestamp_ms, problems)

    monkeypatch.setattr(kafka_source, "from_kafka_headers", buggy)

    a, b, c, d = await serve_all(url, topic, 4)

    assert [p.defect for p in (a, b, d)] == [None, None, None]
    # Hostile headers are kept as they came, not decoded, and nothing fails.
    assert b.headers["t"] == '{"__datetime__": 5}' and b.headers["bin"] == b"\xff\xfe"
    assert len(b.headers["d"]) == 10_000 and b.headers["s"] == '"\\ud83d"'
    # What payler itself fails on is one payload with a defect, its record kept as it came.
    assert c.defect is not None and "KeyError" in c.defect
    assert (c.body, c.key, c.headers) == (b"c", b"k", {"bug": [b"1", None]})


async def test_a_tombstone_is_told_from_an_empty_body(
    kafka: Kafka, caplog: pytest.LogCaptureFixture
) -> None:
    topic = kafka.topic("compacted")
    url = kafka.url() + "&partitions=1"
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(topic)
    await kafka.produce(
        topic,
        [
            (b"k1", None, []),
            (b"k2", b"", []),
            (b"k3", None, [(NULL_VALUE, b"theirs")]),  # found by the fuzzer
        ],
    )

    with caplog.at_level(logging.WARNING, logger="payler"):
        tombstone, empty, marked = sorted(
            await serve_all(url, topic, 3), key=lambda p: p.key or b""
        )

    assert (tombstone.body, tombstone.headers) == (b"", {NULL_VALUE: True})
    assert (empty.body, empty.headers) == (b"", {})
    # A producer's own header in payler's namespace: replaced by the mark, and said.
    assert (marked.body, marked.headers) == (b"", {NULL_VALUE: True})
    assert any(
        "tombstone mark" in r.getMessage() and marked.id in r.getMessage() for r in caplog.records
    )


class Rival:
    """Another member of a consumer group, on a thread (and event loop) of its own: it keeps
    its membership while the test's own loop is stalled. It never commits."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self.assigned = threading.Event()
        self.leave = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._member()), daemon=True)

    async def _member(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, group_id=self.group,
            enable_auto_commit=False, session_timeout_ms=1000, heartbeat_interval_ms=100,
        )  # fmt: skip
        await consumer.start()
        try:
            while not self.leave.is_set():
                await consumer.getmany(timeout_ms=50)
                if consumer.assignment():
                    self.assigned.set()
        finally:
            await consumer.stop()  # leaves the group


async def test_a_member_the_group_went_on_without_goes_on_and_its_batch_is_read_again(
    kafka: Kafka,
) -> None:
    """A member stalls with a batch in hand (a process paused, a machine swapping) until the
    group has expired it and given its partition to another member. When it comes back its
    commit is refused: that is a rebalance, not an outage. It rejoins, and the batch it had
    stored is read again from the committed offset (at least once, never lost); ``serve``
    goes on."""
    topic = kafka.topic("stalled")
    url = kafka.url() + "&partitions=1"
    async with KafkaBroker(url) as admin:
        await admin.ensure_queue(topic)
    ends = await kafka.produce(topic, [(None, f"{i}".encode(), []) for i in range(5)])
    rival = Rival(kafka.bootstrap, KafkaBroker(url).settings.group, topic)
    handed: list[list[bytes]] = []
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        handed.append([p.body for p in batch])
        if len(handed) == 1:
            # The stall: this loop blocks (no heartbeat) until the rival has the partition.
            rival.thread.start()
            took_over = rival.assigned.wait(timeout=30)
            rival.leave.set()
            rival.thread.join(timeout=30)
            assert took_over, "the group never gave the partition to the other member"
        if sum(map(len, handed)) >= 10:
            stop.set()
        return []

    await serve_until(url, topic, handler, stop, timeout_s=60)

    assert handed[0] == [f"{i}".encode() for i in range(5)]
    assert sorted(b for batch in handed[1:] for b in batch) == handed[0]  # read again, once
    assert await uncommitted(kafka, topic, ends) == {}
