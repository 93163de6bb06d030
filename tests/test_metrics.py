"""Per-workflow counters and lateness summaries (``payler/metrics.py``)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from payler import client
from payler.drivers.base import Rejection
from payler.metrics import Lateness, Metrics, Summary, lateness_ms
from payler.options import ProcessQueueOptions
from payler.payload import Payload
from payler.testing import FakeClock, MemoryBroker, MemoryStorage, make_payload, reset
from payler.workflow import WorkflowContext


def test_counts_per_interval_and_totals() -> None:
    metrics = Metrics()
    metrics.incr("received", 3)
    metrics.incr("spooled")
    metrics.incr("received")
    first = metrics.take()
    assert first.counts == {"received": 4, "spooled": 1}

    metrics.incr("delivered", 2)
    second = metrics.take()
    assert second.counts == {"delivered": 2}
    assert metrics.totals == {"received": 4, "spooled": 1, "delivered": 2}


def test_take_starts_a_new_interval() -> None:
    metrics = Metrics()
    metrics.incr("received")
    metrics.observe_lateness([5])
    assert metrics.take()
    empty = metrics.take()
    assert empty.counts == {}
    assert empty.lateness is None
    assert not empty
    assert metrics.totals == {"received": 1}


def test_incr_by_zero_counts_nothing() -> None:
    metrics = Metrics()
    metrics.incr("retried", 0)
    assert not metrics.take()
    assert metrics.totals == {}


def test_summary_is_falsy_only_when_nothing_happened() -> None:
    assert not Summary({}, None)
    assert Summary({"received": 1}, None)
    assert Summary({}, Lateness(1, 0, 0, 0, 0))


def test_summary_text_lists_counts_by_name_then_lateness() -> None:
    metrics = Metrics()
    metrics.incr("received", 2)
    metrics.incr("delivered", 1)
    metrics.observe_lateness([7])
    text = str(metrics.take())
    assert text == "delivered=1 received=2 lateness ms p50=7 p95=7 p99=7 max=7"


def test_lateness_percentiles_on_known_samples() -> None:
    # Plateaus wide enough that any usual percentile definition gives the same answer.
    samples = [10] * 120 + [100] * 75 + [1000] * 4 + [5000]
    random.Random(7).shuffle(samples)
    metrics = Metrics()
    metrics.observe_lateness(samples[:50])
    metrics.observe_lateness(iter(samples[50:]))  # any iterable, in several calls
    lateness = metrics.take().lateness
    assert lateness == Lateness(count=200, p50=10, p95=100, p99=1000, max=5000)


def test_lateness_of_one_sample() -> None:
    metrics = Metrics()
    metrics.observe_lateness([42])
    assert metrics.take().lateness == Lateness(1, 42, 42, 42, 42)


def test_early_deliveries_count_as_zero_lateness() -> None:
    metrics = Metrics()
    metrics.observe_lateness([-50, -1])
    assert metrics.take().lateness == Lateness(2, 0, 0, 0, 0)


def test_the_reservoir_stays_bounded() -> None:
    metrics = Metrics()
    rng = random.Random(1)
    metrics.observe_lateness(rng.randrange(1000) for _ in range(100_000))
    lateness = metrics.take().lateness
    assert lateness is not None
    assert lateness.count == 100_000  # every observation counts, though 10k samples are kept
    # a stationary distribution still gives sensible percentiles (uniform 0..999)
    assert lateness.p50 == pytest.approx(500, abs=50)
    assert lateness.p95 == pytest.approx(950, abs=30)
    assert lateness.p99 == pytest.approx(990, abs=15)
    assert 980 <= lateness.max <= 999
    # the next interval starts from nothing
    metrics.observe_lateness([3])
    assert metrics.take().lateness == Lateness(1, 3, 3, 3, 3)


def test_max_is_the_true_maximum_beyond_the_reservoir() -> None:
    values = [10] * 100_000
    values[-1] = 999_999
    metrics = Metrics()
    metrics.observe_lateness(values)
    lateness = metrics.take().lateness
    assert lateness is not None
    assert lateness.max == 999_999


def test_lateness_counts_from_the_due_time_or_the_receipt_if_later() -> None:
    assert lateness_ms(now_ms=1_000, due_ms=900, received_ms=500) == 100
    assert lateness_ms(now_ms=1_000, due_ms=-62_135_596_800_000, received_ms=980) == 20
    assert lateness_ms(now_ms=1_000, due_ms=1_005, received_ms=0) == -5  # early: counted as 0


async def test_a_message_due_before_it_arrived_does_not_wreck_the_percentiles() -> None:
    """One ``x-deliver-at`` of year 1 made p99 = 63,931,680,146,261 ms: it counts from receipt."""
    start_ms = 1_700_000_000_000
    clock = FakeClock(start_ms)
    reset()
    async with (
        MemoryBroker("memory://late", queue="payler-jobs", clock=clock) as broker,
        MemoryStorage("memory://late", clock=clock) as storage,
    ):
        for queue in ("payler-out", "payler-dead-letter"):
            await broker.ensure_queue(queue)
        options = ProcessQueueOptions(broker_url="memory://late", storage_url="memory://late")
        ctx = WorkflowContext("ingest", clock=clock)
        at = [
            {"x-deliver-at": "0001-01-01T00:00:00+00:00"},  # long before it arrived
            {"x-deliver-at": str(start_ms - 3_600_000)},  # an hour before
            {"x-delay": 0},
        ]
        batch = [make_payload(headers=h).model_copy(update={"created_ms": start_ms}) for h in at]
        assert await client.spool(batch, storage, broker, options, ctx) == []
        clock.advance(30)  # claimed 30 ms after it arrived
        stop = asyncio.Event()

        async def handler(batch: Sequence[Payload]) -> list[Rejection]:
            stop.set()
            return []

        await asyncio.wait_for(storage.serve(handler, stop), 5)
    reset()
    assert storage.metrics.take().lateness == Lateness(3, 30, 30, 30, 30)
