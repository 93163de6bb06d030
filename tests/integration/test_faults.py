"""Faults we test rather than hope about: kill -9, and the broker dropping payler's connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.conftest import AMQP_URL, Rabbit, rabbitmqctl
from tests.integration.conftest import Payler

pytestmark = pytest.mark.rabbitmq


def write_config(path: Path, jobs: str, out: str, dead: str) -> Path:
    path.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{queue: "{jobs}", default_destination: "{out}", dead_letter_queue: "{dead}"}}
  - callable: client.watch_storage
    options: {{declare_queues: ["{out}"], dead_letter_queue: "{dead}", lease_ms: 2000}}
"""
    )
    return path


class Collector:
    """Consumes a queue for the whole test, counting every delivery (duplicates included)."""

    def __init__(self, expected: int) -> None:
        self.ids: list[str] = []
        self.expected = expected
        self.complete = asyncio.Event()
        self.some = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        assert message.message_id is not None
        self.ids.append(message.message_id)
        await message.ack()
        if len(self.ids) >= self.expected // 5:
            self.some.set()
        if len(set(self.ids)) >= self.expected:
            self.complete.set()


@pytest.fixture
def queues(rabbit: Rabbit) -> tuple[str, str, str]:
    return rabbit.queue_name("jobs"), rabbit.queue_name("out"), rabbit.queue_name("dlq")


async def test_kill_9_mid_traffic_loses_nothing(
    rabbit: Rabbit, queues: tuple[str, str, str], tmp_path: Path
) -> None:
    jobs, out, dead = queues
    config = write_config(tmp_path / "configuration.yaml", jobs, out, dead)
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"}
    n = 400
    ids = [f"k-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    collector = Collector(n)
    channel = await rabbit.connection.channel()
    await (await channel.declare_queue(out, durable=True)).consume(collector.on_message)

    payler = await (await Payler.start(config, env, tmp_path)).running()
    for i, message_id in enumerate(ids):
        delay = {"x-delay": (i * 7) % 1500}
        await rabbit.publish(jobs, aio_pika.Message(b"k", message_id=message_id, headers=delay))
    await asyncio.wait_for(collector.some.wait(), 30)
    await payler.kill()  # SIGKILL: no drain, no goodbye, whatever was in flight

    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await asyncio.wait_for(collector.complete.wait(), 60)
    except TimeoutError:
        pass
    finally:
        assert await payler.stop() == 0, payler.log
    lost = set(ids) - set(collector.ids)
    assert not lost, f"{len(lost)} of {n} lost after kill -9"
    # At least once: a kill between a publish and its delete may deliver a message twice,
    # but that is the only way to get a duplicate, so there can be at most one batch of them.
    assert len(collector.ids) - n <= 100


@pytest.fixture
def payler_user() -> Iterator[str]:
    """A RabbitMQ user of payler's own, so the broker can drop its connections and no others."""
    user, password = f"payler-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield AMQP_URL.replace("guest:guest", f"{user}:{password}")
    finally:
        rabbitmqctl("delete_user", user)


async def test_payler_recovers_when_the_broker_drops_its_connections(
    rabbit: Rabbit, queues: tuple[str, str, str], tmp_path: Path, payler_user: str
) -> None:
    jobs, out, dead = queues
    config = write_config(tmp_path / "configuration.yaml", jobs, out, dead)
    env = {"BROKER_URL": payler_user, "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"}
    user = payler_user.partition("//")[2].partition(":")[0]
    n = 100
    collector = Collector(n)
    channel = await rabbit.connection.channel()
    await (await channel.declare_queue(out, durable=True)).consume(collector.on_message)
    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await asyncio.to_thread(
            rabbitmqctl, "close_all_user_connections", user, "test: broker-side disconnect"
        )
        for i in range(n):
            message = aio_pika.Message(b"r", message_id=f"r-{i}", headers={"x-delay": 100})
            await rabbit.publish(jobs, message)
        await asyncio.wait_for(collector.complete.wait(), 60)
    finally:
        code = await payler.stop()
    assert code == 0, payler.log
    assert sorted(set(collector.ids)) == sorted(f"r-{i}" for i in range(n))
