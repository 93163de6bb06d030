"""Counters, histograms and gauges, per workflow: the one source of truth for what payler did.

payler logs no line per message at INFO: under load that is unreadable. Instead each workflow
counts what it does, and the runtime logs one summary line per workflow and interval (only when
something happened). The same :class:`Metrics` object is what ``/metrics`` exports
(:mod:`payler.http.exposition` reads it at scrape time): a count is kept once, never twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar

MetricName = Literal[
    "received",  # messages taken from a source broker
    "spooled",  # payloads newly written to the spool (duplicates not counted)
    "duplicates",  # payloads already in the spool (a redelivered source message)
    "dead_lettered",  # messages sent to the dead-letter destination, with a reason
    # messages the dead-letter destination refused even as a minimal copy, kept in the spool as
    # dead instead (``state: dead``; logged as errors): look at them, and at that destination
    "parked",
    # messages that payler's own code (or a driver's) raised for alone, dead-lettered with the
    # error (as a minimal copy, or parked, when it was their dead letter that raised): a bug to
    # report; each is logged with its traceback
    "bugs",
    "delivered",  # payloads confirmed by the destination broker
    "retried",  # deliveries that failed transiently and were rescheduled
    "restarts",  # times the workflow was restarted after it failed (an outage, or a bug)
    # source messages removed by someone else before payler could handle them: entries of a
    # Redis stream trimmed away before the group read them, or deleted while pending
    "lost",
]

HistogramName = Literal[
    "lateness_seconds",  # due time → publish confirmed, per delivered payload
    "store_batch_seconds",  # one spool store call (a batch), wall time
    "publish_batch_seconds",  # one confirmed publish call (a batch), wall time
]

#: Bucket upper bounds, seconds. Lateness spans milliseconds (a healthy watcher) to hours (a
#: daemon that was down); batch durations milliseconds to a publish timeout.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BUCKETS: dict[str, tuple[float, ...]] = {
    "lateness_seconds": LATENESS_BUCKETS,
    "store_batch_seconds": DURATION_BUCKETS,
    "publish_batch_seconds": DURATION_BUCKETS,
}


def lateness_ms(now_ms: int, due_ms: int, received_ms: int) -> int:
    """How late a payload is at ``now_ms``: counted from its due time, or from when payler
    received it if that came later. A message due before it even arrived (an ``x-deliver-at``
    in the past, a backlog at the source) is late only by the time payler held it: its
    lateness says how payler did, not how old the message is.
    """
    return now_ms - max(due_ms, received_ms)


#: Lateness samples kept per interval; beyond it, a uniform-enough subsample is kept.
_MAX_SAMPLES = 10_000

B = TypeVar("B")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Lateness:
    """Delivery time minus due time over an interval, milliseconds."""

    count: int
    p50: int
    p95: int
    p99: int
    max: int

    def __str__(self) -> str:
        return f"lateness ms p50={self.p50} p95={self.p95} p99={self.p99} max={self.max}"


@dataclass(frozen=True, slots=True)
class Summary:
    """What a workflow did over one interval."""

    counts: dict[str, int]
    lateness: Lateness | None

    def __bool__(self) -> bool:
        return bool(self.counts) or self.lateness is not None

    def __str__(self) -> str:
        parts = [f"{name}={n}" for name, n in sorted(self.counts.items())]
        if self.lateness is not None:
            parts.append(str(self.lateness))
        return " ".join(parts)


@dataclass(slots=True)
class Histogram:
    """Cumulative observations in fixed buckets (Prometheus' histogram, without the library)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; +Inf last
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        index = len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                index = i
                break
        self.counts[index] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)`` per bucket, ``inf`` last."""
        total, out = 0, []
        for bound, n in zip([*self.bounds, float("inf")], self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    """A workflow's counters since the last :meth:`take`, plus running totals.

    ``totals`` (and ``by_reason``, ``histograms``, ``in_flight``) only ever grow or move with
    the work: they are what ``/metrics`` exports. The interval counts feed the log summaries.
    """

    def __init__(self) -> None:
        self._interval: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        #: Per (counter, reason class): dead letters by why (see :mod:`payler.reasons`).
        self.by_reason: Counter[tuple[str, str]] = Counter()
        self.histograms: dict[str, Histogram] = {
            name: Histogram(bounds) for name, bounds in _BUCKETS.items()
        }
        #: Messages handed to a step and not yet settled (received → stored, claimed →
        #: published and settled).
        self.in_flight = 0
        self._lateness: list[int] = []
        self._seen = 0
        self._max = 0

    def incr(self, name: MetricName, n: int = 1, *, reasons: Iterable[str] = ()) -> None:
        """Count ``n`` more ``name``; ``reasons``: the reason class of each (dead letters)."""
        if n:
            self._interval[name] += n
            self.totals[name] += n
        for reason in reasons:
            self.by_reason[(name, reason)] += 1

    def observe(self, name: HistogramName, values_s: Iterable[float]) -> None:
        histogram = self.histograms[name]
        for value in values_s:
            histogram.observe(value)

    @contextmanager
    def timer(self, name: HistogramName) -> Iterator[None]:
        """Observe how long the block took (wall time on a monotonic clock: a duration)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.histograms[name].observe(time.perf_counter() - started)

    def track(
        self, handler: Callable[[Sequence[B]], Awaitable[R]]
    ) -> Callable[[Sequence[B]], Awaitable[R]]:
        """``handler``, counting the batches it holds as messages in flight."""

        async def tracked(batch: Sequence[B]) -> R:
            self.in_flight += len(batch)
            try:
                return await handler(batch)
            finally:
                self.in_flight -= len(batch)

        return tracked

    def observe_lateness(self, values_ms: Iterable[int]) -> None:
        for value in values_ms:
            self._seen += 1
            self._max = max(self._max, value)
            if len(self._lateness) < _MAX_SAMPLES:
                self._lateness.append(max(0, value))
            # Once full, overwrite a slot now and then: cheap, and good enough for percentiles.
            elif self._seen % (self._seen // _MAX_SAMPLES + 1) == 0:
                self._lateness[self._seen % _MAX_SAMPLES] = max(0, value)

    def take(self) -> Summary:
        """The interval's summary; starts a new interval."""
        counts = dict(self._interval)
        samples = sorted(self._lateness)
        lateness = _lateness(samples, self._seen, self._max) if samples else None
        self._interval.clear()
        self._lateness = []
        self._seen = self._max = 0
        return Summary(counts, lateness)


def _lateness(samples: list[int], seen: int, true_max: int) -> Lateness:
    def pct(p: float) -> int:
        return samples[min(len(samples) - 1, int(p * len(samples)))]

    return Lateness(seen, pct(0.50), pct(0.95), pct(0.99), max(samples[-1], true_max))
