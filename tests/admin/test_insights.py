"""What the console shows, computed where the data is: the due-time histogram, dead letters
grouped by reason class, discarding dead letters, and the overview's rates and lateness."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from payler.admin.operations import Admin
from payler.admin.status import RateTracker, quantile
from payler.admin.target import AdminTarget
from payler.admin.views import DiscardRequest
from payler.clock import FakeClock
from payler.drivers.brokers.base import (
    DEAD_LETTER_DESTINATION,
    DEAD_LETTER_REASON,
    DEAD_LETTER_TRUNCATED,
)
from payler.drivers.storages.memory import MemoryStorage
from payler.metrics import LATENESS_BUCKETS
from payler.payload import Payload
from payler.testing import MemoryBroker, make_payload, reset
from payler.workflow import WorkflowContext

HOUR = 3_600_000
T0 = 1_700_000_000_000


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    clock = FakeClock(T0)
    target = AdminTarget("memory://insights", "memory://insights", dead_letter_queues=("dlq",))
    async with Admin(target, clock=clock) as admin:
        yield admin
    reset()


async def spool(admin: Admin) -> MemoryStorage:
    async with admin.storage() as storage:
        assert isinstance(storage, MemoryStorage)
        return storage


async def test_due_histogram_counts_per_bucket_with_overdue_and_later(admin: Admin) -> None:
    storage = await spool(admin)
    dues = [T0 - 5, T0, T0 + 10, T0 + HOUR - 1, T0 + HOUR, T0 + 3 * HOUR, T0 + 9 * HOUR]
    await storage.store(
        [
            make_payload(destination="out", due_ms=due, payload_id=f"p{i}")
            for i, due in enumerate(dues)
        ]
    )
    await storage.store([make_payload(destination="other", due_ms=T0, payload_id="o")])
    histogram = await admin.due_histogram(T0, T0 + 4 * HOUR, HOUR)
    assert [b.count for b in histogram.buckets] == [4, 1, 0, 1]
    assert [b.start_ms for b in histogram.buckets] == [T0 + i * HOUR for i in range(4)]
    assert histogram.buckets[0].start_at == "2023-11-14T22:13:20.000Z"
    assert (histogram.overdue, histogram.later) == (1, 1)
    only = await admin.due_histogram(T0, T0 + 4 * HOUR, HOUR, destination="other")
    assert [b.count for b in only.buckets] == [1, 0, 0, 0]
    # A last bucket cut short by the range's end.
    short = await admin.due_histogram(T0, T0 + HOUR + 1, HOUR)
    assert [b.count for b in short.buckets] == [4, 1]
    with pytest.raises(ValueError, match="at most 200 buckets"):
        await admin.due_histogram(T0, T0 + 1000 * HOUR, HOUR)
    with pytest.raises(ValueError, match="end after it starts"):
        await admin.due_histogram(T0, T0, HOUR)


def dead_letter(reason: str, destination: str = "out", **headers: object) -> Payload:
    return make_payload(
        b"dead",
        headers={DEAD_LETTER_REASON: reason, DEAD_LETTER_DESTINATION: destination, **headers},
    )


async def test_reasons_grouped_with_counts_from_spool_and_queue(admin: Admin) -> None:
    storage = await spool(admin)
    await storage.park(
        [
            (make_payload(payload_id="s1", destination="out"), "gave up after 10 attempts: nack"),
            (make_payload(payload_id="s2", destination="out"), "gave up after 3 attempts: nack"),
            (make_payload(payload_id="s3", destination="out"), "unroutable: no queue 'z'"),
        ]
    )
    broker = MemoryBroker("memory://insights")
    await broker.connect()
    for _ in range(2):
        broker.publish("dlq", dead_letter("x-delay is not a number ('soon')"))
    broker.publish("dlq", dead_letter("unroutable: no queue 'x'", "x"))
    broker.publish("dlq", dead_letter("unroutable: no queue 'y'", "y"))
    broker.publish("dlq", dead_letter("unroutable: no queue 'y'", "y"))

    groups = await admin.reason_groups()
    assert [(g.reason_class, g.count, g.spool, g.queue) for g in groups.groups] == [
        ("unroutable", 4, 1, 3),
        ("invalid-schedule", 2, 0, 2),  # ties keep the order of REASON_CLASSES
        ("max-attempts", 2, 2, 0),
    ]
    assert groups.groups[0].example == "unroutable: no queue 'y'"  # the most frequent text
    assert (groups.total, groups.complete, groups.queue_errors) == (8, True, {})
    assert len(broker.messages("dlq")) == 5  # looked at, not taken
    by_destination = await admin.reason_groups(destination="y")
    assert [(g.reason_class, g.count) for g in by_destination.groups] == [("unroutable", 2)]


async def test_discard_deletes_the_selected_dead_letters_for_good(admin: Admin) -> None:
    storage = await spool(admin)
    await storage.park(
        [
            (make_payload(payload_id="s1", destination="out"), "unroutable: no queue 'out'"),
            (make_payload(payload_id="s2", destination="out"), "gave up after 3 attempts"),
        ]
    )
    broker = MemoryBroker("memory://insights")
    await broker.connect()
    broker.publish("dlq", dead_letter("unroutable: no queue 'x'", "x"))
    minimal = dead_letter("unroutable: no queue 'x'", "x", **{DEAD_LETTER_TRUNCATED: 1})
    broker.publish("dlq", minimal)
    broker.publish("dlq", dead_letter("x-delay is not a number ('soon')"))

    with pytest.raises(ValueError, match="select the dead letters to discard"):
        await admin.discard(DiscardRequest(), who="test")
    done = await admin.discard(DiscardRequest(reason_class="unroutable"), who="test")
    # A minimal copy cannot be replayed, but it can be discarded.
    assert (done.discarded, done.failed) == (3, [])
    assert await storage.get("s1") is None
    assert await storage.get("s2") is not None
    [left] = broker.messages("dlq")
    assert left.headers[DEAD_LETTER_REASON].startswith("x-delay")
    assert broker.messages("out") == []  # nothing was published
    by_id = await admin.discard(DiscardRequest(ids=["s2"]), who="test")
    assert by_id.discarded == 1
    assert await storage.count(state="dead") == 0


def test_quantile_interpolates_inside_its_bucket() -> None:
    bounds = (0.01, 0.1, 1.0)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) == (None, False)
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == (0.005, False)
    value, beyond = quantile(0.5, bounds, [0, 10, 10, 0])
    assert (round(value or 0, 6), beyond) == (0.1, False)
    assert quantile(0.99, bounds, [50, 0, 0, 50]) == (1.0, True)


async def test_rate_tracker_rates_per_minute_over_its_window() -> None:
    clock = FakeClock(T0)
    ctx = WorkflowContext(name="deliver", clock=clock)
    ctx.ready()
    tracker = RateTracker(lambda: [ctx], window_s=120, tick_s=5, clock=clock)
    [before] = tracker.workflows()[1]
    assert before.rates.delivered == 0 and before.lateness.p50_ms is None
    for _ in range(12):  # a minute: 10 delivered every 5 s, each 20 ms late
        clock.advance(5_000)
        ctx.metrics.incr("delivered", 10)
        ctx.metrics.observe("lateness_seconds", [0.02] * 10)
        tracker.tick()
    span_s, [view] = tracker.workflows()
    assert span_s == 60
    assert (view.rates.delivered, view.rates.received, view.totals["delivered"]) == (120, 0, 120)
    assert view.state == "ready" and view.lateness.count == 120
    assert view.lateness.p50_ms is not None and 10 < view.lateness.p50_ms <= 25
    for _ in range(36):  # three quiet minutes: the window (two) forgets the busy one
        clock.advance(5_000)
        tracker.tick()
    span_s, [quiet] = tracker.workflows()
    assert 120 <= span_s <= 125
    assert (quiet.rates.delivered, quiet.lateness.count, quiet.totals["delivered"]) == (0, 0, 120)
    assert len(LATENESS_BUCKETS) + 1 == len(ctx.metrics.histograms["lateness_seconds"].counts)
