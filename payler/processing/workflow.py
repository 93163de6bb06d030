"""``client.handle``: a source, an application of handlers, output brokers and a spool.

Two loops run side by side, on one set of connections:

- **the source side** consumes ``queue`` on ``source_url`` in batches (``batch_size``, with a
  ``prefetch`` that follows the handlers' ``concurrency``), runs each message through the
  application (:mod:`~payler.processing.runner`), then makes every outcome durable: immediate
  outputs published (confirmed) on their output broker, delayed outputs and retries stored in
  the spool, dead letters published to ``dead_letter_queue`` on ``dead_letter_output`` (the
  source broker by default; parked in the spool when refused for good) — and only then
  acknowledges the source messages.
- **the spool side** watches the spool (claims with leases, as ``watch_storage`` does). A due
  *delayed output* (destination ``<output>:<queue>``) is published to its output broker; a due
  *retry* (destination :data:`RETRY_DESTINATION`) is handed back to the application — not to a
  broker — with its attempt number, and its outcome made durable the same way; the spool entry
  is settled only after.

**At least once, duplicates recognisable.** A crash anywhere costs at worst a re-run: the source
message (or spool entry) comes again and its handler runs again. Each output's id derives from
the source message's id and the output's index (``<source id>#<index>``): the same on every
re-run. It is the output's message id (unless the handler set one), so a consumer can drop a
duplicate; in the spool the id is the entry's, so a delayed output or a retry stored twice is
one entry. (A retry's entry id is ``<source id>#attempt-<n>``.)

**The breaker** (``breaker:``): when dead letters pile up, the source side stops consuming; the
message that tripped it and the batch's later would-be dead letters go back to the source
(nothing more is dead-lettered), the workflow logs why at ERROR and reports ``tripped`` (not
ready on ``/readyz``, ``payler_workflow_state``) until the daemon is restarted. The spool side
goes on delivering delayed outputs, and leaves due retries in the spool meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payler.client import _dead_letter_or_park
from payler.drivers.base import Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.brokers.base import Broker
from payler.drivers.storages import storage_from_url
from payler.drivers.storages.base import SpoolStorage, WatchSettings
from payler.faults import fault_point
from payler.identity import content_digest, is_content_id, random_spool_id
from payler.isolation import isolate
from payler.payload import Payload
from payler.processing.application import Application, Delivery, Outcome
from payler.processing.breaker import Breaker
from payler.processing.messages import ATTEMPT_HEADER, ORIGIN_HEADER
from payler.processing.options import SOURCE_OUTPUT, HandleOptions
from payler.processing.runner import run_all
from payler.urls import mask_url
from payler.workflow import WorkflowContext

#: The spool destination of a retry: the handler's own input, through the application.
RETRY_DESTINATION = "@retry"


async def handle(ctx: WorkflowContext) -> None:
    """Run an application's handlers between a source and its outputs (module docstring)."""
    options: HandleOptions = ctx.options
    # One storage driver per side: each is used by one task at a time (a SQLite connection
    # cannot interleave two transactions), and the watch side is still woken by local stores.
    storage = storage_from_url(options.storage_url, clock=ctx.clock, metrics=ctx.metrics)
    spool = storage_from_url(options.storage_url, clock=ctx.clock, metrics=ctx.metrics)
    source = broker_from_url(
        options.source_url,
        queue=options.queue,
        prefetch=options.source_prefetch,
        batch_size=options.source_batch_size,
        batch_wait_ms=options.batch_wait_ms,
        clock=ctx.clock,
        metrics=ctx.metrics,
    )
    outputs: dict[str, Broker] = {SOURCE_OUTPUT: source}
    for name, url in options.outputs.items():
        outputs[name] = broker_from_url(url, clock=ctx.clock, metrics=ctx.metrics)
    async with contextlib.AsyncExitStack() as stack:
        for driver in (storage, spool, *outputs.values()):
            await stack.enter_async_context(driver)
        await source.ensure_queue(options.queue)
        await outputs[options.dead_letter_output].ensure_queue(options.dead_letter_queue)
        for name, queues in options.declare_queues.items():
            for queue in queues:
                await outputs[name].ensure_queue(queue)
        ctx.ready()
        ctx.log.info(
            "handling %r at %s with %s (%d handler(s); outputs: %s; spool: %s; dead letters: %r)",
            options.queue,
            mask_url(options.source_url),
            options.application.name,
            len(options.application.handlers),
            ", ".join(f"{n}={mask_url(u)}" for n, u in options.output_urls.items()),
            mask_url(options.storage_url),
            options.dead_letter_queue,
        )
        handling = Handling(ctx, options, storage, source, outputs, spool=spool)
        settings = WatchSettings(
            batch_size=options.spool_batch_size,
            lease_ms=options.lease_ms,
            max_poll_interval_s=options.max_poll_interval_ms / 1000,
            retry_base_s=options.retry_base_ms / 1000,
            retry_max_s=options.retry_max_ms / 1000,
        )
        await _together(
            handling.consume(),
            spool.serve(ctx.metrics.track(handling.on_spool), ctx.stop, settings=settings),
        )


handle.options_model = HandleOptions  # type: ignore[attr-defined]


class Handling:
    """The two sides of a running ``handle`` workflow (see the module docstring)."""

    def __init__(
        self,
        ctx: WorkflowContext,
        options: HandleOptions,
        storage: SpoolStorage,
        source: Broker,
        outputs: dict[str, Broker],
        *,
        spool: SpoolStorage | None = None,
    ) -> None:
        self.ctx = ctx
        self.options = options
        self.app: Application = options.application
        #: The source side's storage, and the spool side's (the one it claims from).
        self.storage = storage
        self.spool = spool or storage
        self.source = source
        self.outputs = outputs
        self.brokers = frozenset(outputs)
        self.breaker = Breaker(options.breaker.limits(), ctx.clock)
        self.consuming = asyncio.Event()  # set: stop consuming the source
        if ctx.tripped is not None:  # tripped before a restart: stays tripped
            self.breaker.tripped = ctx.tripped

    # -- the source side -----------------------------------------------------------------------

    async def consume(self) -> None:
        """Consume the source until the workflow stops, or the breaker trips (then wait for the
        stop, the spool side running on)."""
        if self.breaker.tripped is None:
            relay = asyncio.ensure_future(self._relay_stop())
            try:
                await self.source.serve(self.ctx.metrics.track(self.on_source), self.consuming)
            finally:
                relay.cancel()
        if self.breaker.tripped is not None and not self.ctx.stopping:
            self.ctx.log.error(
                "not consuming %r: the dead-letter breaker is tripped (%s); the messages stay "
                "in the source. Fix the cause, then restart payler to resume.",
                self.options.queue,
                self.breaker.tripped,
            )
            await self.ctx.stop.wait()

    async def _relay_stop(self) -> None:
        await self.ctx.stop.wait()
        self.consuming.set()

    async def on_source(self, batch: Sequence[Payload]) -> list[Rejection]:
        """Run one source batch; return the messages to hand back to the source."""
        deliveries = []
        renamed: dict[str, str] = {}  # random id → the id the source knows the message by
        for message in batch:
            payload = message
            if self.options.spool_id == "random" and is_content_id(message.id):
                fresh = random_spool_id(message.id.partition(":")[0], message.source)
                payload = message.model_copy(update={"id": fresh})
                renamed[fresh] = message.id
            deliveries.append(Delivery(payload, payload.id, 1))
        rejections = await self._run(deliveries, self.storage)
        # The source settles its messages by the ids it gave them: a hand-back must name those.
        return [
            Rejection(renamed.get(r.payload_id, r.payload_id), r.reason, r.permanent)
            for r in rejections
        ]

    async def _run(self, deliveries: Sequence[Delivery], storage: SpoolStorage) -> list[Rejection]:
        outcomes = await run_all(
            self.app,
            deliveries,
            concurrency=self.options.concurrency,
            order_by=self.options.order_by,
            clock=self.ctx.clock,
            metrics=self.ctx.metrics,
            brokers=self.brokers,
        )
        return await self.settle(outcomes, storage)

    # -- the spool side ------------------------------------------------------------------------

    async def on_spool(self, batch: Sequence[Payload]) -> list[Rejection]:
        """Deliver due delayed outputs; run due retries through the application."""
        retries: list[Delivery] = []
        due: list[Payload] = []
        held: list[Rejection] = []
        for payload in batch:
            if payload.destination != RETRY_DESTINATION:
                due.append(payload)
            elif self.breaker.tripped is not None:
                held.append(Rejection(payload.id, "the dead-letter breaker is tripped"))
            else:
                retries.append(_retried(payload))
        rejections = await self._deliver_due(due) if due else []
        if retries:
            rejections += await self._run(retries, self.spool)
        return held + rejections

    async def _deliver_due(self, entries: Sequence[Payload]) -> list[Rejection]:
        by_broker: dict[str, list[Payload]] = {}
        dead: list[tuple[Payload, str]] = []
        for entry in entries:
            name, _, queue = entry.destination.partition(":")
            if entry.defect is not None:
                dead.append((entry, entry.defect))
            elif name not in self.outputs or not queue:
                dead.append((entry, f"output broker {name!r} is not configured"))
            else:
                by_broker.setdefault(name, []).append(
                    entry.model_copy(update={"destination": queue})
                )
        retry: list[Rejection] = []
        delivered = 0
        for name, payloads in by_broker.items():
            published, broken = await isolate(
                self.outputs[name].process, payloads, "payler cannot publish it"
            )
            refused = {r.payload_id: r for part in published for r in part}
            dead += broken
            delivered += len(payloads) - len(refused) - len(broken)
            for payload in payloads:
                rejection = refused.get(payload.id)
                if rejection is None:
                    continue
                if rejection.permanent:
                    dead.append(
                        (payload, f"output to {name}:{payload.destination}: {rejection.reason}")
                    )
                elif payload.attempts + 1 >= self.options.max_delivery_attempts:
                    reason = f"gave up after {payload.attempts + 1} attempts: {rejection.reason}"
                    dead.append((payload, reason))
                else:
                    retry.append(Rejection(payload.id, rejection.reason))
        self.ctx.metrics.incr("delivered", delivered)
        self.ctx.metrics.incr("retried", len(retry))
        return retry + await self._dead_letter(dead, self.spool)

    # -- making outcomes durable ---------------------------------------------------------------

    async def settle(self, outcomes: Sequence[Outcome], storage: SpoolStorage) -> list[Rejection]:
        """Publish, store and dead-letter what ``outcomes`` say, durably; return the inputs to
        hand back to their source (their dead letters were refused for now, or the breaker is
        tripped), each once."""
        hand_back: dict[str, str] = {}
        self._count(outcomes, hand_back)
        plan = _Plan()
        for outcome in outcomes:
            if outcome.delivery.payload.id not in hand_back:
                plan.add(outcome, self.options.default_output, self.ctx.clock.now_ms())
        again: dict[str, str] = {}  # output id → why it was refused for now
        for name, payloads in plan.immediate.items():
            plan.dead += await self._publish(name, payloads, again)
        retried = {id(plan.outcome_of[i]): (plan.outcome_of[i], why) for i, why in again.items()}
        for outcome, why in retried.values():
            # An output refused for now: the message runs again later, through the spool
            # (with backoff; its outputs are then the same, recognisable duplicates).
            entry = self._again(outcome, why)
            if isinstance(entry, str):
                plan.dead.append((outcome.delivery.payload, entry))
            else:
                plan.outcome_of[entry.id] = outcome
                plan.later.append(entry)
        stored, unstorable = await isolate(
            lambda batch: _store_outputs(storage, batch), plan.later, "the spool cannot store it"
        )
        self.ctx.metrics.incr("spooled", sum(stored))
        for entry, reason in unstorable:  # a retry that cannot be stored: its message is dead
            retry = entry.destination == RETRY_DESTINATION
            plan.dead.append((plan.outcome_of[entry.id].delivery.payload if retry else entry,
                              reason))  # fmt: skip
        fault_point("after-outputs")
        for rejection in await self._dead_letter(plan.dead, storage):
            source = plan.outcome_of.get(rejection.payload_id)
            payload_id = source.delivery.payload.id if source else rejection.payload_id
            hand_back.setdefault(payload_id, rejection.reason)
        return [Rejection(payload_id, reason) for payload_id, reason in hand_back.items()]

    def _again(self, outcome: Outcome, reason: str) -> Payload | str:
        """The retry entry that runs ``outcome``'s message again because an output of it was
        refused for now; or, after the last attempt, why it is dead-lettered."""
        delivery = outcome.delivery
        policy = self.app.policy(outcome.handler)
        error = f"an output was refused for now: {reason}"
        if delivery.attempt >= policy.max_attempts:
            return f"gave up after {delivery.attempt} attempts: {error}"
        self.ctx.metrics.handler(outcome.handler, "retried")
        at_ms = self.ctx.clock.now_ms() + policy.delay_ms(delivery.attempt)
        return _retry_entry(Outcome(delivery, outcome.handler, retry_at_ms=at_ms, error=error))

    def _count(self, outcomes: Sequence[Outcome], hand_back: dict[str, str]) -> None:
        """Feed the breaker; once tripped, would-be dead letters go back to their source."""
        was_tripped = self.breaker.tripped is not None
        for outcome in outcomes:
            if outcome.dead is not None:
                if self.breaker.record(invalid=True):
                    why = f"the dead-letter breaker is tripped ({self.breaker.tripped})"
                    hand_back[outcome.delivery.payload.id] = why
            elif outcome.retry_at_ms is None:
                self.breaker.record(invalid=False)
        if self.breaker.tripped is not None and not was_tripped:
            self.ctx.log.error(
                "dead-letter breaker tripped: %s; stopping consumption of %r (the messages stay "
                "in the source; restart payler to resume)",
                self.breaker.tripped,
                self.options.queue,
            )
            self.ctx.trip(f"dead-letter breaker: {self.breaker.tripped}")
            self.consuming.set()

    async def _publish(
        self,
        name: str,
        payloads: list[Payload],
        again: dict[str, str],
    ) -> list[tuple[Payload, str]]:
        """Publish immediate outputs to broker ``name``; return those to dead-letter, and note
        in ``again`` the outputs refused for now (with why)."""
        published, broken = await isolate(
            self.outputs[name].process, payloads, "payler cannot publish it"
        )
        refused = [r for part in published for r in part]
        self.ctx.metrics.incr("delivered", len(payloads) - len(refused) - len(broken))
        by_id = {p.id: p for p in payloads}
        dead = list(broken)
        for rejection in refused:
            output = by_id[rejection.payload_id]
            if rejection.permanent:
                reason = f"output to {name}:{output.destination}: {rejection.reason}"
                dead.append((output, reason))
            else:
                again[output.id] = rejection.reason
        return dead

    async def _dead_letter(
        self, dead: Sequence[tuple[Payload, str]], storage: SpoolStorage
    ) -> list[Rejection]:
        broker = self.outputs[self.options.dead_letter_output]
        return await _dead_letter_or_park(
            dead, broker, storage, self.options.dead_letter_queue, self.ctx
        )


@dataclass(slots=True)
class _Plan:
    """What a batch's outcomes come to: outputs to publish now (per output broker), entries to
    store (delayed outputs, retries), dead letters; and which outcome each output stems from."""

    immediate: dict[str, list[Payload]] = field(default_factory=dict)
    later: list[Payload] = field(default_factory=list)
    dead: list[tuple[Payload, str]] = field(default_factory=list)
    outcome_of: dict[str, Outcome] = field(default_factory=dict)

    def add(self, outcome: Outcome, default_output: str, now_ms: int) -> None:
        if outcome.dead is not None:
            self.dead.append((outcome.delivery.payload, outcome.dead))
            return
        for broker, output in outcome.outputs:
            name = broker or default_output
            self.outcome_of[output.id] = outcome
            if output.due_ms > now_ms:
                spooled = f"{name}:{output.destination}"
                self.later.append(output.model_copy(update={"destination": spooled}))
            else:
                self.immediate.setdefault(name, []).append(output)
        if outcome.retry_at_ms is not None:
            entry = _retry_entry(outcome)
            self.outcome_of[entry.id] = outcome
            self.later.append(entry)


async def _store_outputs(storage: SpoolStorage, batch: Sequence[Payload]) -> int:
    """Store delayed outputs and retry entries; return how many were new.

    Their ids are deterministic (output *i* of source *S*), and a run again after a crash
    stamps them with a new ``timestamp`` (the time of the run): the spool compares their
    content without it, so that the second run's copy is recognised as the first's, while a
    different message reusing a source's id (different body or headers) is still kept apart.
    """
    unstamped = [
        p.model_copy(update={"properties": p.properties.model_copy(update={"timestamp_ms": None})})
        for p in batch
    ]
    digests = [content_digest(p) for p in unstamped]
    return len((await storage.store_batch(batch, digests=digests)).new)


def _retry_entry(outcome: Outcome) -> Payload:
    """The spool entry that runs ``outcome``'s message again at ``retry_at_ms``."""
    delivery = outcome.delivery
    attempt = delivery.attempt + 1
    return delivery.payload.model_copy(
        update={
            "id": f"{delivery.origin}#attempt-{attempt}",
            "headers": {
                **delivery.payload.headers,
                ATTEMPT_HEADER: attempt,
                ORIGIN_HEADER: delivery.origin,
            },
            "destination": RETRY_DESTINATION,
            "due_ms": outcome.retry_at_ms,
            "attempts": delivery.attempt,
            "last_error": outcome.error,
        }
    )


def _retried(entry: Payload) -> Delivery:
    """The delivery a due retry entry stands for: payler's own headers taken off."""
    headers = dict(entry.headers)
    attempt = headers.pop(ATTEMPT_HEADER, None)
    origin = headers.pop(ORIGIN_HEADER, None)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        attempt = entry.attempts + 1
    if not isinstance(origin, str) or not origin:
        origin = entry.id.partition("#attempt-")[0]
    return Delivery(entry.model_copy(update={"headers": headers}), origin, attempt)


async def _together(*steps: Awaitable[None]) -> None:
    """Run ``steps`` until all return; the first to raise cancels the others, and its error
    (not an exception group: the runtime classifies it) propagates."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def run(app: Application, *, log_level: str = "INFO", **options: Any) -> None:
    """Run ``app`` as a ``handle`` workflow in this process, as ``payler`` runs a configuration:
    until SIGINT or SIGTERM. ``options`` are the workflow's (``queue=``, ``source_url=``,
    ``outputs=``, ``storage_url=``...); the HTTP server starts when ``PAYLER_HTTP_PORT`` is set.
    Invalid options, or a failure to start, end the process with exit status 2 and one line,
    as ``payler`` does.
    """
    from pydantic import ValidationError  # noqa: PLC0415 - only this entry needs them

    from payler import cli, eventloop, logs  # noqa: PLC0415
    from payler.config import Loaded, LoadedWorkflow, PaylerConfig, WorkflowConfig  # noqa: PLC0415
    from payler.errors import ConfigError, StartupError  # noqa: PLC0415
    from payler.http.settings import resolve  # noqa: PLC0415
    from payler.runtime import Runtime  # noqa: PLC0415

    logs.setup(log_level.upper())
    try:
        validated = HandleOptions.model_validate({"app": app, **options})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(options)'}: {e['msg']}" for e in exc.errors()
        )
        cli._fail(ConfigError(f"{app.name}: {problems}"))
    entry = WorkflowConfig(name=app.name, callable="client.handle")
    config = PaylerConfig(workflows=[entry])
    loaded = Loaded(
        path=Path(f"<{app.name}>"),
        config=config,
        workflows=[LoadedWorkflow(0, entry, handle, validated)],
        http=resolve(None, os.environ, where="PAYLER_HTTP_PORT"),
    )
    try:
        eventloop.run(cli._serve(Runtime(loaded)))
    except (ConfigError, StartupError) as exc:
        cli._fail(exc)


log = logging.getLogger("payler.processing")

__all__ = ["RETRY_DESTINATION", "Handling", "handle", "run"]
