"""The examples run as they are: the YAML files in examples/, with only env vars set."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import pytest

from payler import config
from payler.runtime import Runtime
from payler.testing import MemoryBroker, make_payload, reset
from tests.conftest import AMQP_URL, Rabbit
from tests.integration.conftest import Payler

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.rabbitmq
async def test_retry_with_backoff_example(rabbit: Rabbit, tmp_path: Path) -> None:
    retries, work, dead = (rabbit.queue_name(r) for r in ("retries", "work", "dead"))
    env = {
        "BROKER_URL": AMQP_URL,
        "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/retries.db",
        "RETRY_QUEUE": retries,
        "RETRY_DEAD_LETTER_QUEUE": dead,
        "RETRY_BASE_DELAY_MS": "200",
    }
    await rabbit.channel.declare_queue(work, durable=True)
    payler = await (
        await Payler.start(EXAMPLES / "retry_with_backoff.yaml", env, tmp_path)
    ).running()
    try:
        sent = {}
        for count in (3, 0, 2, 1):  # due after 1600, 200, 800, 400 ms
            sent[f"job-{count}"] = time.time()
            await rabbit.publish(
                retries,
                aio_pika.Message(
                    f"job-{count}".encode(),
                    headers={"x-retry-count": count, "x-destination": work},
                ),
            )
        await rabbit.publish(retries, aio_pika.Message(b"no-destination"))
        arrived = await rabbit.collect(work, 4, timeout_s=20)
        dead_letters = await rabbit.collect(dead, 1, timeout_s=10)
    finally:
        assert await payler.stop() == 0, payler.log
    assert [m.body for _, m in arrived] == [b"job-0", b"job-1", b"job-2", b"job-3"]
    for arrival, message in arrived:
        count = int(message.body.decode().split("-")[1])
        assert arrival - sent[message.body.decode()] >= 0.2 * 2**count
        assert message.headers == {"x-retry-count": count}  # x-destination stripped
    [(_, dead_letter)] = dead_letters
    assert dead_letter.body == b"no-destination"
    assert "x-destination" in str(dead_letter.headers["x-payler-dead-letter-reason"])


async def test_the_example_on_in_memory_drivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How you test a workflow of your own without services: memory:// URLs, payler.testing."""
    reset()
    monkeypatch.setenv("BROKER_URL", "memory://example")
    monkeypatch.setenv("PAYLER_STORAGE_URL", "memory://example")
    monkeypatch.setenv("RETRY_BASE_DELAY_MS", "10")
    loaded = config.load(EXAMPLES / "retry_with_backoff.yaml")
    async with MemoryBroker("memory://example") as broker:
        await broker.ensure_queue("work")
        broker.publish(
            "retries",
            make_payload(b"job", headers={"x-retry-count": 2, "x-destination": "work"}),
        )
        stop = asyncio.Event()
        runtime = asyncio.create_task(Runtime(loaded).run(stop))
        [delivered] = await broker.wait_for("work", 1, timeout_s=5)
        stop.set()
        await asyncio.wait_for(runtime, 5)
    assert delivered.body == b"job"
    assert delivered.headers == {"x-retry-count": 2}
    reset()
