"""The spool gauges: pending and dead entries, and the age of the oldest overdue entry.

Counting a backlog per message would cost a write per message; instead each spool of the
configuration is sampled every ``sample_interval_seconds`` (a count and a one-entry listing per
spool), and ``/metrics`` shows the last sample. A spool that cannot be read shows
``payler_spool_up 0`` and keeps its last values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

from prometheus_client.core import GaugeMetricFamily, Metric

from payler.admin.operations import Admin
from payler.admin.target import AdminTarget
from payler.backoff import Backoff
from payler.clock import Clock, SystemClock
from payler.isolation import describe
from payler.urls import mask_url, mask_urls

log = logging.getLogger("payler.http")


@dataclass(slots=True)
class Sample:
    pending: int = 0
    dead: int = 0
    oldest_overdue_s: float = 0.0
    up: bool = False
    #: Why the last sample failed (password-free), while ``up`` is False.
    error: str | None = None
    #: When the last sample was taken (epoch ms), None before the first.
    sampled_ms: int | None = None


class SpoolSampler:
    """Samples every spool of the configuration; :meth:`metrics` shows the last samples."""

    def __init__(self, target: AdminTarget, interval_s: float, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.interval_s = interval_s
        urls = target.storage_urls or (target.storage_url,)
        self._admins = {
            url: Admin(replace(target, storage_url=url), clock=self.clock) for url in urls
        }
        self.samples = {url: Sample() for url in urls}
        #: Set after each round of samples (tests wait for it).
        self.sampled = asyncio.Event()
        self._sampling = asyncio.Lock()
        self._last_round_ms: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until ``stop`` is set (a failing spool is sampled again, with backoff)."""
        failures = 0
        try:
            while not stop.is_set():
                async with self._sampling:
                    ok = await self.sample_once()
                failures = 0 if ok else failures + 1
                wait = self.interval_s if ok else min(self.interval_s, Backoff().delay_s(failures))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            for admin in self._admins.values():
                await admin.close()

    async def fresh(self, max_age_s: float = 1.0) -> dict[str, Sample]:
        """The samples, taken again first when older than ``max_age_s`` (the console's
        overview is live; concurrent callers share one round)."""
        async with self._sampling:
            last = self._last_round_ms
            if last is None or self.clock.now_ms() - last > max_age_s * 1000:
                await self.sample_once()
        return self.samples

    async def sample_once(self) -> bool:
        ok = True
        for url, admin in self._admins.items():
            sample = self.samples[url]
            try:
                async with admin.storage() as storage:
                    sample.pending = await storage.count()
                    sample.dead = await storage.count(state="dead")
                    first = (await storage.list(limit=1)).items
                now_ms = self.clock.now_ms()
                overdue_ms = now_ms - first[0].due_ms if first else 0
                sample.oldest_overdue_s = max(0, overdue_ms) / 1000
                sample.up, sample.error = True, None
            except Exception as exc:  # an outage, or anything: the gauges say so
                sample.error = mask_urls(describe(exc))
                if sample.up or ok:
                    log.warning("cannot sample the spool %s: %s", mask_url(url), sample.error)
                sample.up = ok = False
                await admin.close()
            sample.sampled_ms = self.clock.now_ms()
        self._last_round_ms = self.clock.now_ms()
        self.sampled.set()
        return ok

    def metrics(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "payler_pending_entries", "Pending spool entries (sampled).", labels=["storage"]
        )
        dead = GaugeMetricFamily(
            "payler_dead_entries",
            "Entries parked as dead in the spool (sampled).",
            labels=["storage"],
        )
        overdue = GaugeMetricFamily(
            "payler_oldest_overdue_seconds",
            "How long the earliest pending entry has been due (0 when none is): the misfire lag.",
            labels=["storage"],
        )
        up = GaugeMetricFamily(
            "payler_spool_up", "1 when the last sample of the spool succeeded.", labels=["storage"]
        )
        for url, sample in self.samples.items():
            label = [mask_url(url)]
            pending.add_metric(label, sample.pending)
            dead.add_metric(label, sample.dead)
            overdue.add_metric(label, sample.oldest_overdue_s)
            up.add_metric(label, 1 if sample.up else 0)
        yield from (pending, dead, overdue, up)


__all__ = ["Sample", "SpoolSampler"]
