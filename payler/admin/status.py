"""The running daemon at a glance (``GET /v1/overview``, the console's overview page): each
workflow's state, its rates per minute and its lateness over the last minutes.

Rates and lateness come from the workflows' own :class:`~payler.metrics.Metrics` (the one
source of truth for counts): a :class:`RateTracker` keeps a snapshot of the totals and of the
lateness histogram every few seconds, and a rate is the growth since the oldest snapshot of the
window, per minute. Lateness percentiles are estimated from the histogram's buckets, as
Prometheus' ``histogram_quantile`` does: exact to the bucket, interpolated inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from payler.clock import Clock, SystemClock
from payler.metrics import LATENESS_BUCKETS
from payler.workflow import WorkflowContext, WorkflowState

#: The span rates and lateness are computed over.
DEFAULT_WINDOW_S = 300.0
#: How often the totals are snapshotted.
DEFAULT_TICK_S = 5.0
#: The counters whose rates the overview shows.
RATE_NAMES = ("received", "spooled", "delivered", "dead_lettered", "retried")


class Rates(BaseModel):
    """Per minute, over the overview's window."""

    received: float
    spooled: float
    delivered: float
    dead_lettered: float
    retried: float


class LatenessView(BaseModel):
    """Due time → publish confirmed, over the window (estimated from the histogram)."""

    count: int = Field(description="Entries delivered in the window.")
    p50_ms: float | None
    p99_ms: float | None
    beyond_buckets: bool = Field(
        description="True when a percentile lies past the last bucket (an hour): it is then "
        "that bucket's bound, a lower bound."
    )


class WorkflowOverview(BaseModel):
    name: str
    state: WorkflowState
    problem: str | None = Field(description="Why it last failed, while it restarts.")
    in_flight: int
    rates: Rates
    lateness: LatenessView
    totals: dict[str, int] = Field(description="Counts since payler started.")


class SpoolOverview(BaseModel):
    storage: str = Field(description="The spool's URL, password masked.")
    up: bool
    pending: int
    dead: int
    oldest_overdue_s: float = Field(description="How long the earliest pending entry is due.")
    error: str | None = None
    sampled_ms: int | None = Field(description="When these figures were read.")


class Overview(BaseModel):
    """The daemon at a glance."""

    version: str
    now_ms: int
    ready: bool
    reason: str | None
    window_s: float = Field(description="The span the rates and lateness are over.")
    workflows: list[WorkflowOverview]
    spools: list[SpoolOverview]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    at_ms: int
    totals: dict[str, dict[str, int]]  # workflow → counter → total
    lateness: dict[str, list[int]]  # workflow → observations per bucket (not cumulative)


class RateTracker:
    """Snapshots of the workflows' totals over a window (see the module docstring)."""

    def __init__(
        self,
        contexts: Callable[[], Sequence[WorkflowContext]],
        *,
        window_s: float = DEFAULT_WINDOW_S,
        tick_s: float = DEFAULT_TICK_S,
        clock: Clock | None = None,
    ) -> None:
        self.contexts = contexts
        self.window_ms = int(window_s * 1000)
        self.tick_s = tick_s
        self.clock: Clock = clock or SystemClock()
        self._snapshots: deque[_Snapshot] = deque()
        self.tick()

    def tick(self) -> None:
        """Take a snapshot; forget those the window no longer needs (it keeps the newest one
        older than the window, so that a rate always spans the whole window once it can)."""
        now = self._snapshot()
        self._snapshots.append(now)
        while len(self._snapshots) > 1 and self._snapshots[1].at_ms <= now.at_ms - self.window_ms:
            self._snapshots.popleft()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_s)
            self.tick()

    def workflows(self) -> tuple[float, list[WorkflowOverview]]:
        """The span (seconds) the figures are over, and each workflow's overview now."""
        now = self._snapshot()
        base = self._snapshots[0]  # at most one tick older than the window
        # At least a minute: just after a start, a few messages in a few seconds are no rate
        # of hundreds a minute; until then a rate is the count of the first minute.
        span_ms = max(60_000, now.at_ms - base.at_ms)
        per_minute = 60_000 / span_ms
        views = []
        for ctx in self.contexts():
            totals = now.totals[ctx.name]
            before = base.totals.get(ctx.name, {})
            grown = {n: max(0, totals[n] - before.get(n, 0)) for n in RATE_NAMES}
            late_now = now.lateness[ctx.name]
            late_before = base.lateness.get(ctx.name, [0] * len(late_now))
            counts = [max(0, a - b) for a, b in zip(late_now, late_before, strict=True)]
            views.append(
                WorkflowOverview(
                    name=ctx.name,
                    state=ctx.state,
                    problem=ctx.problem,
                    in_flight=ctx.metrics.in_flight,
                    rates=Rates(**{n: round(grown[n] * per_minute, 2) for n in RATE_NAMES}),
                    lateness=_lateness(counts),
                    totals={n: int(ctx.metrics.totals[n]) for n in (*RATE_NAMES, "duplicates")},
                )
            )
        return span_ms / 1000, views

    def _snapshot(self) -> _Snapshot:
        contexts = self.contexts()
        return _Snapshot(
            at_ms=self.clock.now_ms(),
            totals={c.name: {n: int(c.metrics.totals[n]) for n in RATE_NAMES} for c in contexts},
            lateness={
                c.name: list(c.metrics.histograms["lateness_seconds"].counts) for c in contexts
            },
        )


def _lateness(counts: list[int]) -> LatenessView:
    total = sum(counts)
    p50, beyond50 = quantile(0.5, LATENESS_BUCKETS, counts)
    p99, beyond99 = quantile(0.99, LATENESS_BUCKETS, counts)
    return LatenessView(
        count=total,
        p50_ms=None if p50 is None else round(p50 * 1000, 1),
        p99_ms=None if p99 is None else round(p99 * 1000, 1),
        beyond_buckets=beyond50 or beyond99,
    )


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> tuple[float | None, bool]:
    """The ``q``-quantile of observations counted per bucket (``counts[i]`` at or below
    ``bounds[i]``, above the bound before; the last count past every bound), interpolated
    linearly inside its bucket; ``None`` without observations. The flag is True when the
    quantile lies past the last bound (then the value is that bound)."""
    total = sum(counts)
    if total == 0:
        return None, False
    rank = q * total
    seen, lower = 0, 0.0
    for index, n in enumerate(counts):
        if n and seen + n >= rank:
            if index >= len(bounds):
                return float(bounds[-1]), True
            upper = float(bounds[index])
            return lower + (upper - lower) * (rank - seen) / n, False
        seen += n
        if index < len(bounds):
            lower = float(bounds[index])
    return float(bounds[-1]), True  # pragma: no cover - rank <= total always lands


__all__ = [
    "LatenessView",
    "Overview",
    "RateTracker",
    "Rates",
    "SpoolOverview",
    "WorkflowOverview",
    "quantile",
]
