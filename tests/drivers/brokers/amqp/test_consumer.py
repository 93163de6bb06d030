"""The consumer's rules without a broker: the prefetch window sized to bytes, and the backoff of
messages handed back (a recording channel stands in for aiormq's)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from payler.backoff import Attempts, Backoff
from payler.drivers.base import Rejection
from payler.drivers.brokers.amqp.consumer import RECENT_BATCHES, Consumer, PrefetchWindow
from payler.testing import FakeClock, make_payload

MB = 1 << 20


def test_the_window_starts_at_one_and_fits_the_budget_to_the_bodies_seen() -> None:
    window = PrefetchWindow(limit=200, budget_bytes=32 * MB)
    assert window.size == 1  # slow start: the first body tells the size
    window.observe([1_000, 2_000])
    assert window.resize_to() == 200  # small bodies: the configured prefetch
    window.size = 200
    window.observe([10 * MB])
    assert window.resize_to() == 3  # 3 × 10 MB fit in 32 MB
    window.size = 3
    window.observe([50 * MB])
    assert window.resize_to() == 1  # larger than the budget: one at a time, never none


def test_the_window_shrinks_at_once_but_grows_only_by_doubling() -> None:
    window = PrefetchWindow(limit=200, budget_bytes=100 * MB)
    window.size = 10
    window.observe([10 * MB])
    assert window.resize_to() is None  # fits: 10 × 10 MB
    window.observe([11 * MB])
    assert window.resize_to() == 9
    window.size = 9
    for _ in range(RECENT_BATCHES):
        window.observe([6 * MB])  # the 11 MB batch is forgotten; 16 fit: less than double
    assert window.resize_to() is None
    for _ in range(RECENT_BATCHES):
        window.observe([5 * MB])  # 20 fit: more than double
    assert window.resize_to() == 20


@dataclass
class RecordingChannel:
    """What the consumer asks of aiormq's channel, recorded."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    on_consumer_cancel_callbacks: set[Any] = field(default_factory=set)
    nacked: asyncio.Queue[int] = field(default_factory=asyncio.Queue)

    async def basic_qos(self, *, prefetch_count: int) -> None:
        self.calls.append(("qos", prefetch_count))

    async def basic_consume(self, queue: str, callback: Any) -> Basic.ConsumeOk:
        self.calls.append(("consume", queue))
        return Basic.ConsumeOk(consumer_tag=f"tag-{len(self.calls)}")

    async def basic_cancel(self, tag: str) -> None:
        self.calls.append(("cancel", tag))

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag, multiple))

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        self.calls.append(("nack", tag, requeue))
        self.nacked.put_nowait(tag)


class SleepLog(FakeClock):
    """A fake clock that remembers every sleep asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


def message(tag: int, body: bytes = b"b") -> DeliveredMessage:
    return DeliveredMessage(
        delivery=Basic.Deliver(delivery_tag=tag),
        header=ContentHeader(0, len(body), Basic.Properties()),
        body=body,
        channel=cast(Any, None),
    )


async def test_a_message_refused_for_now_is_nacked_after_a_growing_capped_backoff() -> None:
    channel, clock = RecordingChannel(), SleepLog()
    backoff = Backoff(base_s=0.5, max_s=30.0, jitter=0.2)
    consumer = Consumer(
        cast(Any, channel), "jobs", window=PrefetchWindow(200, 32 * MB),
        lost=asyncio.Event(), attempts=Attempts(), backoff=backoff, clock=clock,
    )  # fmt: skip
    await consumer.start()
    payload = make_payload(payload_id="again")
    for tag in range(1, 10):  # refused on every delivery
        await consumer.settle([message(tag)], [payload], {"again": Rejection("again", "full")})
        assert ("nack", tag, True) not in channel.calls  # held, not nacked at once
        assert consumer.held == 1
        assert await asyncio.wait_for(channel.nacked.get(), 1) == tag  # the fake clock's sleep
        assert channel.calls[-1] == ("nack", tag, True)
    expected = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    for asked, nominal in zip(clock.sleeps, expected, strict=True):
        assert nominal * 0.8 <= asked <= min(nominal * 1.2, 36)
    # Taken at last: forgotten, so a later refusal starts from the shortest backoff again.
    await consumer.settle([message(10)], [payload], {})
    await consumer.settle([message(11)], [payload], {"again": Rejection("again", "full")})
    assert await asyncio.wait_for(channel.nacked.get(), 1) == 11
    assert clock.sleeps[-1] <= 0.6


async def test_one_acknowledgement_per_batch_but_never_over_a_held_message() -> None:
    channel = RecordingChannel()
    consumer = Consumer(
        cast(Any, channel), "jobs", window=PrefetchWindow(200, 32 * MB),
        lost=asyncio.Event(), attempts=Attempts(), backoff=Backoff(base_s=60), clock=FakeClock(),
    )  # fmt: skip
    await consumer.start()
    payloads = [make_payload(payload_id=f"p{i}") for i in range(3)]
    await consumer.settle([message(1), message(2), message(3)], payloads, {})
    assert ("ack", 3, True) in channel.calls  # the whole batch at once
    await consumer.settle([message(4)], [payloads[0]], {"p0": Rejection("p0", "later")})
    channel.calls.clear()
    await consumer.settle([message(5), message(6)], payloads[1:], {})
    # ``multiple`` would acknowledge the held message 4 too.
    assert [c for c in channel.calls if c[0] == "ack"] == [("ack", 5, False), ("ack", 6, False)]
    await consumer.close()


async def test_large_bodies_shrink_the_window_by_consuming_again() -> None:
    channel = RecordingChannel()
    consumer = Consumer(
        cast(Any, channel), "jobs", window=PrefetchWindow(200, 32 * MB),
        lost=asyncio.Event(), attempts=Attempts(), backoff=Backoff(), clock=FakeClock(),
    )  # fmt: skip
    await consumer.start()
    assert channel.calls == [("qos", 1), ("consume", "jobs")]
    consumer.inbox.put_nowait(message(1, b"small"))
    batch = await consumer.next_batch(asyncio.Event(), 100)
    await consumer.settle(batch, [make_payload(payload_id="s")], {})
    # RabbitMQ applies a prefetch to new consumers only: cancel, then consume again.
    assert channel.calls[-3:] == [("cancel", "tag-2"), ("qos", 200), ("consume", "jobs")]
    big = b"x" * (40 * MB)
    for tag in (2, 3):
        consumer.inbox.put_nowait(message(tag, big))
    batch = await consumer.next_batch(asyncio.Event(), 100)
    assert len(batch) == 1  # a batch is cut at the byte budget too
    await consumer.settle(batch, [make_payload(payload_id="b")], {})
    assert channel.calls[-2:] == [("qos", 1), ("consume", "jobs")]


@pytest.mark.parametrize("limit", [1, 5])
def test_a_window_never_exceeds_the_configured_prefetch(limit: int) -> None:
    window = PrefetchWindow(limit=limit, budget_bytes=32 * MB)
    window.observe([1])
    assert window.wanted() == limit
