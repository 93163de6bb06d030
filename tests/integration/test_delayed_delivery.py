"""End to end, as a user runs it: ``payler --config-file`` against the real RabbitMQ, with the
embedded storage and with MongoDB (SecantusDB), publishing through an ordinary AMQP client.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from payler.drivers.storages import storage_from_url
from tests.conftest import AMQP_URL, Rabbit
from tests.integration.conftest import Payler

pytestmark = pytest.mark.rabbitmq


@dataclass
class Setup:
    env: dict[str, str]
    storage_url: str
    config: Path
    jobs: str
    out: str
    dead: str


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("mongodb", marks=pytest.mark.mongodb),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def setup(request: pytest.FixtureRequest, tmp_path: Path, rabbit: Rabbit) -> Setup:
    """payler's configuration for this test: its own queues, and one of the storages."""
    if request.param == "sqlite":
        storage_url = f"sqlite:///{tmp_path}/spool.db"
        env = {"PAYLER_STORAGE_URL": storage_url}
    elif request.param in ("redis", "postgres"):
        storage_url = request.getfixturevalue(
            "redis_spool_url" if request.param == "redis" else "postgres_url"
        )
        env = {"PAYLER_STORAGE_URL": storage_url}
    else:
        # The original Payler's variable, as its users set it.
        storage_url = request.getfixturevalue("mongodb_url")
        env = {"MONGODB_URL": storage_url}
    env |= {"BROKER_URL": AMQP_URL, "PAYLER_LOG_LEVEL": "INFO"}
    jobs, out, dead = rabbit.queue_name("jobs"), rabbit.queue_name("out"), rabbit.queue_name("dlq")
    config = tmp_path / "configuration.yaml"
    config.write_text(
        f"""
workflows:
  - name: "Fetch payloads from RabbitMQ and store them"
    location: "payler"
    callable: "client.process_queue"
    options:
      queue: "{jobs}"
      default_destination: "{out}"
      dead_letter_queue: "{dead}"
  - name: "Re-inject payloads to RabbitMQ"
    callable: "client.watch_storage"
    options:
      declare_queues: ["{out}"]
      dead_letter_queue: "{dead}"
      max_poll_interval_ms: 500
stats_interval_seconds: 1
"""
    )
    return Setup(env, storage_url, config, jobs, out, dead)


def delayed(body: bytes, delay: int | str, message_id: str, **headers: object) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        headers={"x-delay": delay, **headers},
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id=f"corr-{message_id}",
        message_id=message_id,
        reply_to="replies",
        type="test.event",
        priority=3,
        timestamp=datetime.now(UTC),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        app_id="payler-tests",
    )


async def test_delays_and_delivers_every_message_intact(
    setup: Setup, rabbit: Rabbit, tmp_path: Path
) -> None:
    payler = await (await Payler.start(setup.config, setup.env, tmp_path)).running()
    try:
        n = 120 if "mongodb" in setup.storage_url else 300
        delays = [0, 50, 300, "700", 1200, "1800"]
        sent: dict[str, tuple[float, int, aio_pika.Message]] = {}
        for i in range(n):
            message_id = f"m-{i}-{uuid.uuid4().hex[:6]}"
            delay = delays[i % len(delays)]
            message = delayed(
                f'{{"n": {i}}}'.encode(),
                delay,
                message_id,
                n=i,
                raw=bytearray(b"\x00\xff"),
                price=Decimal("12.50"),
                nested={"list": [1, "two", True]},
            )
            sent[message_id] = (time.time(), int(delay), message)
            await rabbit.publish(setup.jobs, message)
        bad = {
            "not a number": delayed(b"bad-1", "soon", "bad-1"),
            "negative": delayed(b"bad-2", -5, "bad-2"),
            "over the maximum": delayed(b"bad-3", 10**13, "bad-3"),
        }
        for message in bad.values():
            await rabbit.publish(setup.jobs, message)

        arrived = await rabbit.collect(setup.out, n, timeout_s=30)
        extra = await rabbit.drain(setup.out)  # anything beyond n would be a duplicate
        dead = await rabbit.collect(setup.dead, len(bad), timeout_s=10)
    finally:
        code = await payler.stop()

    assert code == 0, payler.log
    ids = [m.message_id for _, m in arrived] + [m.message_id for m in extra]
    missing = set(sent) - set(ids)
    assert not missing, f"{len(missing)} messages lost, e.g. {sorted(missing)[:5]}"
    assert len(ids) == len(set(ids)) == n, "duplicates delivered"
    for arrival, message in arrived:
        assert message.message_id is not None
        published, delay, original = sent[message.message_id]
        early_ms = published * 1000 + delay - arrival * 1000
        assert early_ms <= 0, f"{message.message_id} arrived {early_ms:.0f} ms before it was due"
        assert arrival * 1000 - (published * 1000 + delay) < 5_000, "far too late"
        assert message.body == original.body
        expected_headers = {k: v for k, v in (original.headers or {}).items() if k != "x-delay"}
        assert message.headers == expected_headers
        for prop in ("content_type", "content_encoding", "correlation_id", "reply_to", "type",
                     "priority", "delivery_mode", "app_id"):  # fmt: skip
            assert getattr(message, prop) == getattr(original, prop), prop
        assert message.timestamp is not None and original.timestamp is not None
        assert abs(message.timestamp.timestamp() - original.timestamp.timestamp()) < 1

    reasons = {m.body: m.headers.get("x-payler-dead-letter-reason") for _, m in dead}
    assert set(reasons) == {b"bad-1", b"bad-2", b"bad-3"}, payler.log
    for (what, message), body in zip(bad.items(), (b"bad-1", b"bad-2", b"bad-3"), strict=True):
        reason = reasons[body]
        assert isinstance(reason, str) and reason, body
        assert what in reason, (what, reason)
        assert message.body == body
    # The summary lines count, no line per message at INFO.
    assert "spooled=" in payler.log and "delivered=" in payler.log
    assert not any("m-1-" in line for line in payler.lines if " INFO " in line)


async def test_sigterm_mid_traffic_loses_nothing(
    setup: Setup, rabbit: Rabbit, tmp_path: Path
) -> None:
    n = 100 if "mongodb" in setup.storage_url else 400
    ids = [f"s-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    rng = random.Random(7)
    delivered: list[str] = []
    enough_delivered, all_delivered = asyncio.Event(), asyncio.Event()

    async def publish_all() -> None:
        for message_id in ids:
            await rabbit.publish(setup.jobs, delayed(b"x", rng.randrange(0, 2_500), message_id))

    channel = await rabbit.connection.channel()
    out = await channel.declare_queue(setup.out, durable=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        assert message.message_id is not None
        delivered.append(message.message_id)
        await message.ack()
        if len(delivered) >= n // 10:
            enough_delivered.set()
        if len(delivered) >= n:
            all_delivered.set()

    await out.consume(on_message)
    payler = await (await Payler.start(setup.config, setup.env, tmp_path)).running()
    publisher = asyncio.create_task(publish_all())
    try:
        async with asyncio.timeout(30):
            await enough_delivered.wait()
    finally:
        code = await payler.stop()  # SIGTERM while messages are still being published
    await publisher
    assert code == 0, payler.log
    assert "payler stopped" in payler.log

    # Every message is somewhere: delivered, still in the source queue, or in the spool.
    in_source = await rabbit.count(setup.jobs)
    async with storage_from_url(setup.storage_url) as storage:
        in_spool = await storage.count()
    assert len(set(delivered)) + in_source + in_spool == n, (len(delivered), in_source, in_spool)

    # And a restart delivers the rest: nothing lost, nothing twice.
    payler = await (await Payler.start(setup.config, setup.env, tmp_path)).running()
    try:
        await asyncio.wait_for(all_delivered.wait(), 40)
        await rabbit.drain(setup.out)  # settle: a duplicate would arrive just after
    except TimeoutError:
        pass
    finally:
        code = await payler.stop()
    assert code == 0, payler.log
    assert sorted(delivered) == sorted(ids), f"lost: {len(set(ids) - set(delivered))}"
    await channel.close()
