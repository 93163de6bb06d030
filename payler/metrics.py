"""Counters and lateness, per workflow, summarised in periodic log lines.

payler logs no line per message at INFO: under load that is unreadable. Instead each workflow
counts what it does, and the runtime logs one summary line per workflow and interval (only when
something happened).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

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
]


def lateness_ms(now_ms: int, due_ms: int, received_ms: int) -> int:
    """How late a payload is at ``now_ms``: counted from its due time, or from when payler
    received it if that came later. A message due before it even arrived (an ``x-deliver-at``
    in the past, a backlog at the source) is late only by the time payler held it: its
    lateness says how payler did, not how old the message is.
    """
    return now_ms - max(due_ms, received_ms)


#: Lateness samples kept per interval; beyond it, a uniform-enough subsample is kept.
_MAX_SAMPLES = 10_000


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


class Metrics:
    """A workflow's counters since the last :meth:`take`, plus running totals."""

    def __init__(self) -> None:
        self._interval: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self._lateness: list[int] = []
        self._seen = 0
        self._max = 0

    def incr(self, name: MetricName, n: int = 1) -> None:
        if n:
            self._interval[name] += n
            self.totals[name] += n

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
