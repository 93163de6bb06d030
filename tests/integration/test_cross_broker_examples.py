"""The cross-broker examples in examples/, run as they are (only environment variables set),
against the real RabbitMQ and Redis and the tansu Kafka-compatible broker."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis

from tests.conftest import AMQP_URL, REDIS_URL, Kafka, Rabbit
from tests.integration.conftest import Payler

EXAMPLES = Path(__file__).parents[2] / "examples"


async def start(example: str, env: dict[str, str], cwd: Path) -> Payler:
    return await (await Payler.start(EXAMPLES / example, env, cwd)).running()


@pytest.mark.kafka
async def test_kafka_delayed_topics(kafka: Kafka, tmp_path: Path) -> None:
    delayed, due, dead = kafka.topic("delayed"), kafka.topic("due"), kafka.topic("dead")
    env = {
        "KAFKA_URL": kafka.url(),
        "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db",
        "DELAYED_TOPIC": delayed,
        "DUE_TOPIC": due,
        "DEAD_LETTER_TOPIC": dead,
    }
    payler = await start("kafka_delayed_topics.yaml", env, tmp_path)
    try:
        sent_at = time.time()
        records = [
            (b"user-1", f"event-{i}".encode(), [("x-delay", b"400"), ("n", str(i).encode())])
            for i in range(10)
        ]
        await kafka.produce(delayed, records)
        arrived = await kafka.collect(due, 10, timeout_s=30, settle_s=1.0)
    finally:
        assert await payler.stop() == 0, payler.log
    assert len(arrived) == 10, payler.log
    values = [record.value for _, record in arrived]  # type: ignore[attr-defined]
    assert values == [f"event-{i}".encode() for i in range(10)]  # one key: its order kept
    for at, record in arrived:
        assert at - sent_at >= 0.4
        assert record.key == b"user-1"  # type: ignore[attr-defined]
        headers = dict(record.headers)  # type: ignore[attr-defined]
        assert "x-delay" not in headers
        assert headers["n"] == record.value.removeprefix(b"event-")  # type: ignore[attr-defined]


@pytest.mark.kafka
@pytest.mark.rabbitmq
async def test_rabbitmq_to_kafka_and_back_keeps_the_message(
    kafka: Kafka, rabbit: Rabbit, tmp_path: Path
) -> None:
    """A → B → A: forwarded to Kafka as it comes, bridged back to RabbitMQ with a delay."""
    source, back = rabbit.queue_name("events"), rabbit.queue_name("back")
    topic = kafka.topic("events")
    env = {
        "BROKER_URL": AMQP_URL,
        "KAFKA_URL": kafka.url(),
        "SOURCE_QUEUE": source,
        "DESTINATION_TOPIC": topic,
        "SOURCE_TOPIC": topic,
        "DESTINATION_QUEUE": back,
        "DEAD_LETTER_TOPIC": kafka.topic("dead"),
        "DEAD_LETTER_QUEUE": rabbit.queue_name("dead"),
        "DEFAULT_DELAY_MS": "300",
        "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db",
    }
    forward = await start("rabbitmq_to_kafka.yaml", env, tmp_path)
    bridge = await start("kafka_to_rabbitmq_delayed.yaml", env, tmp_path)
    headers = {"text": "é", "n": 7, "flag": True, "price": Decimal("9.99"), "table": {"a": [1]}}
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
        app_id="shop",
    )
    try:
        sent_at = time.time()
        await rabbit.publish(source, original)
        [(arrived_at, message)] = await rabbit.collect(back, 1, timeout_s=30)
    finally:
        codes = [await forward.stop(), await bridge.stop()]
    assert codes == [0, 0], forward.log + bridge.log
    assert arrived_at - sent_at >= 0.3  # the bridge's default delay
    assert message.body == original.body
    assert message.headers == headers
    for prop in ("content_type", "content_encoding", "correlation_id", "message_id", "reply_to",
                 "type", "priority", "app_id"):  # fmt: skip
        assert getattr(message, prop) == getattr(original, prop), prop


@pytest.mark.redis
@pytest.mark.rabbitmq
async def test_redis_stream_to_rabbitmq(rabbit: Rabbit, tmp_path: Path) -> None:
    stream, out = f"{rabbit.prefix}-stream", rabbit.queue_name("out")
    env = {
        "REDIS_URL": REDIS_URL,
        "BROKER_URL": AMQP_URL,
        "SOURCE_STREAM": stream,
        "DESTINATION_QUEUE": out,
        "DEAD_LETTER_STREAM": f"{stream}-dead",
        "DEAD_LETTER_QUEUE": rabbit.queue_name("dead"),
        "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db",
    }
    client = aioredis.from_url(REDIS_URL)
    payler = await start("redis_stream_to_rabbitmq.yaml", env, tmp_path)
    try:
        sent_at = time.time()
        await client.xadd(
            stream,
            {
                "body": b"from a stream",
                "headers": json.dumps({"x-delay": 300, "tenant": "acme"}),
                "properties": json.dumps({"content_type": "text/plain", "message_id": "s-1"}),
            },
        )
        await client.xadd(stream, {"body": b"plain producer", "type": "ping"})
        arrived = await rabbit.collect(out, 2, timeout_s=30)
    finally:
        code = await payler.stop()
        await client.delete(stream, f"{stream}-dead")
        await client.aclose()
    assert code == 0, payler.log
    by_body = {m.body: (at, m) for at, m in arrived}
    at, message = by_body[b"from a stream"]
    assert at - sent_at >= 0.3
    assert message.headers == {"tenant": "acme"}
    assert (message.content_type, message.message_id) == ("text/plain", "s-1")
    _, plain = by_body[b"plain producer"]
    assert plain.headers == {"type": "ping"}  # a producer's own field, kept as a header
