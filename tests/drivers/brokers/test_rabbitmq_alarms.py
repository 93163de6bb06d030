"""The RabbitMQ driver under a resource alarm, on a node of this module's own (an alarm on the
shared broker would block every engineer's tests)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator

import pytest

from payler.drivers.brokers.rabbitmq import RabbitMQBroker
from payler.errors import TransientError
from payler.testing import make_payload
from tests.rabbitmq_node import Node, rabbitmq_node

pytestmark = pytest.mark.rabbitmq


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with rabbitmq_node(tmp_path_factory.mktemp("rabbitmq-node")) as started:
        yield started


async def alarm(node: Node, watermark: str, *, in_force: bool) -> None:
    """Set the node's memory watermark and wait (boundedly) until its alarm is (not) in force."""
    await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", watermark)
    deadline = time.monotonic() + 30
    while (
        "resource_limit" in await asyncio.to_thread(node.ctl, "eval", "rabbit_alarm:get_alarms().")
    ) != in_force:
        assert time.monotonic() < deadline, f"the memory alarm did not become {in_force}"


async def test_a_memory_alarm_fails_publishes_at_once_and_is_logged_once(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, a publish on a blocked connection waited for ever: the workflow stalled while
    # the leases of its entries expired and other instances delivered them again.
    caplog.set_level(logging.WARNING, "payler.rabbitmq")
    out = f"alarm-{uuid.uuid4().hex[:8]}"
    async with RabbitMQBroker(node.url, publish_timeout_s=30) as broker:
        await broker.ensure_queue(out)
        assert await broker.process([make_payload(b"before", destination=out)]) == []
        await alarm(node, "0", in_force=True)
        try:
            started = time.monotonic()
            with pytest.raises(TransientError, match=r"blocks publishing .*'low on memory'"):
                await asyncio.wait_for(broker.process([make_payload(b"1", destination=out)]), 60)
            assert time.monotonic() - started < 10  # told blocked: not the 30 s timeout
            # Known to be blocked, the next publish fails without waiting at all.
            started = time.monotonic()
            with pytest.raises(TransientError, match="low on memory"):
                await broker.process([make_payload(b"2", destination=out)])
            assert time.monotonic() - started < 1
        finally:
            await alarm(node, "0.4", in_force=False)
    # The workflow, restarted, publishes again.
    async with RabbitMQBroker(node.url, publish_timeout_s=30) as broker:
        assert await broker.process([make_payload(b"after", destination=out)]) == []
    logged = [r.getMessage() for r in caplog.records if r.name == "payler.rabbitmq"]
    blocked = [line for line in logged if "blocks publishing" in line]
    assert len(blocked) == 1 and "resource alarm 'low on memory'" in blocked[0], logged
    assert len([line for line in logged if "takes publishes again" in line]) == 1, logged
