"""``/metrics``: what the workflows' :class:`~payler.metrics.Metrics` hold, in the Prometheus
text format, through prometheus-client, on a registry of payler's own.

The collector reads the runtime's counters at scrape time: a count is kept once, in the
workflow's ``Metrics``, and the log summaries and this export are two views of it. Labels are
bounded: ``workflow`` (the configuration's names), ``reason`` (:data:`~payler.reasons.
REASON_CLASSES`), ``state`` (:data:`~payler.workflow.WORKFLOW_STATES`), ``storage`` (the
configuration's spool URLs, passwords masked) — never a message id or a destination.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from payler import __version__
from payler.http.sampling import SpoolSampler
from payler.metrics import HistogramName, MetricName
from payler.reasons import REASON_CLASSES
from payler.workflow import WORKFLOW_STATES, WorkflowContext

#: Counters (``payler_<name>_total``): the metric, and what it counts.
COUNTERS: tuple[tuple[MetricName, str], ...] = (
    ("received", "Messages taken from a source broker."),
    ("spooled", "Messages newly written to the spool (duplicates not counted)."),
    ("duplicates", "Messages already in the spool (a redelivered source message)."),
    ("delivered", "Spool entries (or forwarded messages) confirmed by their destination."),
    ("retried", "Deliveries that failed for now and were rescheduled with backoff."),
    ("restarts", "Times the workflow was restarted after a failure."),
)
HISTOGRAMS: tuple[tuple[HistogramName, str], ...] = (
    ("lateness_seconds", "Due time to publish confirmed, per delivered spool entry."),
    ("store_batch_seconds", "Duration of one spool store (a batch)."),
    ("publish_batch_seconds", "Duration of one confirmed publish (a batch)."),
)


class RuntimeView(Protocol):
    """What the exposition (and the probes) read of the runtime."""

    @property
    def contexts(self) -> list[WorkflowContext]: ...


class PaylerCollector(Collector):
    """Collects payler's metrics from the runtime and the spool sampler at scrape time."""

    def __init__(self, runtime: RuntimeView, sampler: SpoolSampler | None) -> None:
        self.runtime = runtime
        self.sampler = sampler

    def collect(self) -> Iterable[Metric]:
        contexts = list(self.runtime.contexts)
        yield from _counters(contexts)
        yield from _histograms(contexts)
        yield from _gauges(contexts)
        if self.sampler is not None:
            yield from self.sampler.metrics()
        info = InfoMetricFamily("payler_build", "payler's version and Python's.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info


def _counters(contexts: Sequence[WorkflowContext]) -> Iterator[Metric]:
    for name, help_text in COUNTERS:
        family = CounterMetricFamily(f"payler_{name}", help_text, labels=["workflow"])
        for ctx in contexts:
            family.add_metric([ctx.name], ctx.metrics.totals[name])
        yield family
    dead = CounterMetricFamily(
        "payler_dead_lettered",
        "Messages sent to a dead-letter destination, by reason class.",
        labels=["workflow", "reason"],
    )
    jobs = CounterMetricFamily(
        "payler_workflow_jobs",
        "The original Payler's counter: messages taken to their next stop (success) or not "
        "(failed: dead-lettered or retried).",
        labels=["workflow", "status"],
    )
    for ctx in contexts:
        totals = ctx.metrics.totals
        for reason in REASON_CLASSES:
            dead.add_metric([ctx.name, reason], ctx.metrics.by_reason[("dead_lettered", reason)])
        success = totals["spooled"] + totals["duplicates"] + totals["delivered"]
        jobs.add_metric([ctx.name, "success"], success)
        jobs.add_metric([ctx.name, "failed"], totals["dead_lettered"] + totals["retried"])
    yield dead
    yield jobs


def _histograms(contexts: Sequence[WorkflowContext]) -> Iterator[Metric]:
    for name, help_text in HISTOGRAMS:
        family = HistogramMetricFamily(f"payler_{name}", help_text, labels=["workflow"])
        for ctx in contexts:
            histogram = ctx.metrics.histograms[name]
            buckets = [(_bound(b), n) for b, n in histogram.cumulative()]
            family.add_metric([ctx.name], buckets, histogram.sum)
        yield family


def _gauges(contexts: Sequence[WorkflowContext]) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily(
        "payler_in_flight_messages",
        "Messages handed to a step and not yet settled.",
        labels=["workflow"],
    )
    state = GaugeMetricFamily(
        "payler_workflow_state",
        "1 for the workflow's current state (starting, ready, restarting, stopped), else 0.",
        labels=["workflow", "state"],
    )
    for ctx in contexts:
        in_flight.add_metric([ctx.name], ctx.metrics.in_flight)
        for name in WORKFLOW_STATES:
            state.add_metric([ctx.name, name], 1 if ctx.state == name else 0)
    yield in_flight
    yield state


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def make_registry(runtime: RuntimeView, sampler: SpoolSampler | None) -> CollectorRegistry:
    """A registry of payler's own (not the process-wide default) with payler's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PaylerCollector(runtime, sampler))
    return registry


__all__ = ["COUNTERS", "HISTOGRAMS", "PaylerCollector", "RuntimeView", "make_registry"]
