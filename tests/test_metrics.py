"""Per-workflow counters and lateness summaries (``payler/metrics.py``)."""

from __future__ import annotations

import random

import pytest

from payler.metrics import Lateness, Metrics, Summary


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
