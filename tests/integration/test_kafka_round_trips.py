"""Round trips through Kafka on the real brokers (tansu and RabbitMQ), with payler as users run it:
AMQP → Kafka → AMQP and Kafka → Kafka, for everything the header mapping must keep — binary
values, repeated names, nulls, custom headers named like properties or like payler's own,
commas in names, tombstones, publish times (``payler/drivers/brokers/mapping.py``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aio_pika
import pytest

from payler.drivers.brokers.kafka import KafkaBroker
from payler.drivers.brokers.mapping import from_kafka_headers
from tests.conftest import AMQP_URL, Kafka, Rabbit
from tests.integration.conftest import Payler

pytestmark = pytest.mark.kafka


#: aio-pika's names of the AMQP properties payler carries.
PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "message_id",
    "reply_to",
    "type",
    "priority",
    "timestamp",
    "delivery_mode",
    "expiration",
    "app_id",
)


def write_config(tmp_path: Path, workflows: str) -> Path:
    config = tmp_path / "configuration.yaml"
    config.write_text(f"workflows:\n{workflows}\nstats_interval_seconds: 1\n")
    return config


@pytest.mark.rabbitmq
async def test_amqp_to_kafka_and_back_keeps_every_header_and_property(
    kafka: Kafka, rabbit: Rabbit, tmp_path: Path
) -> None:
    source, back, dead = rabbit.queue_name("in"), rabbit.queue_name("back"), kafka.topic("dlq")
    topic = kafka.topic("middle")
    config = write_config(
        tmp_path,
        f"""
  - name: "RabbitMQ to Kafka"
    callable: client.forward
    options: {{source_url: "{AMQP_URL}", queue: "{source}", destination_url: "{kafka.url()}",
               default_destination: "{topic}", dead_letter_queue: "{dead}"}}
  - name: "Kafka to the spool"
    callable: client.process_queue
    options: {{broker_url: "{kafka.url()}", queue: "{topic}", default_destination: "{back}",
               dead_letter_queue: "{dead}", default_delay_ms: 0}}
  - name: "The spool to RabbitMQ"
    callable: client.watch_storage
    options: {{broker_url: "{AMQP_URL}", declare_queues: ["{back}"],
               dead_letter_queue: "{rabbit.queue_name("dead")}"}}""",
    )
    env = {"PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"}
    binary_id = bytes(range(240, 256))  # 16 bytes, not UTF-8
    headers = {
        "binary-id": bytearray(binary_id),
        "utf8-bytes": bytearray(b"abc"),
        "nothing": None,
        "empty": "",
        "priority": "urgent",  # custom headers named like properties
        "app-id": 99,
        "content-type": "text/csv",
        "payler-typed": "mine",  # and like payler's own
        "a,b": 1,  # a comma in a typed header's name
        "pair": ["x", "y"],
        "one": ["only"],
        "mixed": [1, "two", None],
        "table": {"k": bytearray(b"\x00\xff"), "n": None},
        "price": Decimal("9.99"),
        "flag": True,
    }
    sent_at = datetime.fromtimestamp(int(time.time()) - 60, UTC)
    original = aio_pika.Message(
        b'{"order": 42}',
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id="corr-42",
        message_id="msg-42",
        reply_to="replies",
        type="order.created",
        priority=4,
        timestamp=sent_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=600,
        app_id="shop",
    )
    forward = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await rabbit.publish(source, original)
        [(_, message)] = await rabbit.collect(back, 1, timeout_s=30)
        [(_, record)] = await kafka.collect(topic, 1, timeout_s=10)
    finally:
        code = await forward.stop()
    assert code == 0, forward.log

    # On Kafka: what another consumer reads — raw bytes, a repeated header, a null, the
    # properties in payler's own headers, the original publish time.
    raw = list(record.headers)
    assert ("binary-id", binary_id) in raw and ("nothing", None) in raw
    assert [v for n, v in raw if n == "pair"] == [b"x", b"y"]
    assert ("priority", b"urgent") in raw and ("payler-priority", b"4") in raw
    assert ("payler-timestamp", str(int(sent_at.timestamp()) * 1000).encode()) in raw
    assert record.timestamp > sent_at.timestamp() * 1000 + 30_000  # stamped when forwarded

    # Back on RabbitMQ: as it was sent.
    assert message.body == original.body
    assert message.headers == {
        **headers,
        "binary-id": binary_id,
        "utf8-bytes": b"abc",
        "table": {"k": b"\x00\xff", "n": None},
    }
    for prop in PROPERTIES:
        assert getattr(message, prop) == getattr(original, prop), prop


async def test_kafka_to_kafka_keeps_records_as_another_producer_wrote_them(
    kafka: Kafka, tmp_path: Path
) -> None:
    source, out, dead = kafka.topic("in"), kafka.topic("out"), kafka.topic("dlq")
    config = write_config(
        tmp_path,
        f"""
  - name: spool
    callable: client.process_queue
    options: {{broker_url: "{kafka.url()}", queue: "{source}", default_destination: "{out}",
               dead_letter_queue: "{dead}", default_delay_ms: 0}}
  - name: deliver
    callable: client.watch_storage
    options: {{broker_url: "{kafka.url()}", declare_queues: ["{out}"],
               dead_letter_queue: "{dead}"}}""",
    )
    env = {"PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"}
    async with KafkaBroker(kafka.url() + "&partitions=1") as admin:
        await admin.ensure_queue(source)
    published_ms = round(time.time() * 1000) - 3_600_000  # an hour ago
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
        (
            b"full",
            b"\x00body\xff",
            [
                ("trace", b"\x01\xfe"),
                ("hop", b"a"),
                ("hop", None),
                ("hop", b"\xff"),
                ("content-type", b"text/plain"),
                ("priority", b"high"),
                ("a,b", b"c,d"),
                ("nothing", None),
                ("payler-foreign", b"x"),
            ],
        ),
        (b"deleted", None, [("why", b"gdpr")]),  # a tombstone
        (b"empty", b"", []),  # an empty body is not a tombstone
    ]

    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await kafka.produce(source, records, timestamp_ms=published_ms)
        arrived = await kafka.collect(out, len(records), timeout_s=30, settle_s=1.0)
    finally:
        code = await payler.stop()
    assert code == 0, payler.log

    got = {record.key: record for _, record in arrived}
    assert set(got) == {b"full", b"deleted", b"empty"}, payler.log
    for key, value, headers in records:
        record = got[key]
        assert record.value == value, key
        # The producer's own headers, in their order, values as they were.
        assert [(n, v) for n, v in record.headers if not n.startswith("payler-")] == [
            (n, v) for n, v in headers if not n.startswith("payler-")
        ], key
        # Published now, the original publish time in a header.
        assert record.timestamp > published_ms + 3_000_000, key
        _, properties = from_kafka_headers(record.headers, record.timestamp)
        assert properties.timestamp_ms == published_ms, key
    full_headers, full_properties = from_kafka_headers(got[b"full"].headers, None)
    assert full_headers["payler-foreign"] == "x"  # a foreign payler-* header is kept too
    assert full_properties.content_type == "text/plain"  # read from the plain name
    assert full_properties.priority is None  # "high" is no AMQP priority: a header only
