"""The built-in workflows, under the original Payler's names (and ``forward``).

- ``client.process_queue``: broker → spool. Consume ``queue``; schedule each message from its
  headers; store the batch durably; dead-letter the invalid ones with the reason; *then* ack.
- ``client.watch_storage``: spool → broker. Claim due payloads; publish them (confirmed,
  mandatory) to their destination without the scheduling headers; delete each entry only after
  its publish was confirmed. Unroutable ones are dead-lettered with the reason; transient
  failures are retried with backoff, then dead-lettered after ``max_attempts``.
- ``client.forward``: broker → broker, no spool. Consume a source; publish each message
  (confirmed) to its destination on another broker or the same; acknowledge the source after.

Source and destination brokers are chosen by URL, so the spool workflows also move messages
between brokers: ``process_queue`` on a Kafka topic with ``watch_storage`` on RabbitMQ is a
delayed Kafka → RabbitMQ bridge.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from payler.drivers.base import Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.brokers.base import Broker
from payler.drivers.storages import storage_from_url
from payler.drivers.storages.base import SpoolStorage, WatchSettings
from payler.errors import InvalidSchedule
from payler.faults import fault_point
from payler.identity import is_content_id, random_spool_id
from payler.options import ForwardOptions, ProcessQueueOptions, WatchStorageOptions
from payler.payload import Payload
from payler.scheduling import SchedulingRules, schedule
from payler.scheduling import destination as route
from payler.urls import mask_url
from payler.workflow import WorkflowContext


async def process_queue(ctx: WorkflowContext) -> None:
    """Consume a queue and spool each message until it is due (see the module docstring)."""
    options: ProcessQueueOptions = ctx.options
    storage = storage_from_url(options.storage_url, clock=ctx.clock, metrics=ctx.metrics)
    broker = broker_from_url(
        options.broker_url,
        queue=options.queue,
        prefetch=options.prefetch,
        batch_size=options.batch_size,
        clock=ctx.clock,
        metrics=ctx.metrics,
    )
    async with storage, broker:
        await broker.ensure_queue(options.queue)
        await broker.ensure_queue(options.dead_letter_queue)
        ctx.ready()
        ctx.log.info(
            "spooling messages of queue %r at %s into %s (dead letters: %r)",
            options.queue,
            mask_url(options.broker_url),
            mask_url(options.storage_url),
            options.dead_letter_queue,
        )
        await broker.serve(
            lambda batch: spool(batch, storage, broker, options, ctx),
            ctx.stop,
        )


process_queue.options_model = ProcessQueueOptions  # type: ignore[attr-defined]


@functools.cache
def scheduling_rules(options: ProcessQueueOptions) -> SchedulingRules:
    """The scheduling rules a ``process_queue`` workflow's options describe."""
    return SchedulingRules(
        default_destination=options.default_destination,
        default_delay_ms=options.default_delay_ms,
        max_delay_ms=options.max_delay_ms,
        delay_from=options.delay_from,
    )


async def spool(
    batch: Sequence[Payload],
    storage: SpoolStorage,
    broker: Broker,
    options: ProcessQueueOptions,
    ctx: WorkflowContext,
) -> list[Rejection]:
    """Schedule, store and dead-letter one batch; return only once all of it is durable."""
    rules = scheduling_rules(options)
    scheduled, invalid = [], []
    limit = storage.max_body_bytes
    for payload in batch:
        if limit is not None and len(payload.body) > limit:
            invalid.append((payload, f"body of {len(payload.body)} bytes is over the spool's "
                                     f"limit of {limit} bytes"))  # fmt: skip
            continue
        try:
            when = schedule(
                payload.headers,
                received_ms=payload.created_ms,
                published_ms=payload.properties.timestamp_ms,
                rules=rules,
            )
        except InvalidSchedule as exc:
            invalid.append((payload, exc.reason))
            continue
        update: dict[str, object] = {"due_ms": when.due_ms, "destination": when.destination}
        if options.spool_id == "random" and is_content_id(payload.id):
            update["id"] = random_spool_id(payload.id.partition(":")[0], payload.source)
        scheduled.append(payload.model_copy(update=update))
    new = await storage.store(scheduled)
    fault_point("after-store")
    ctx.metrics.incr("spooled", new)
    if len(scheduled) > new:
        ctx.metrics.incr("duplicates", len(scheduled) - new)
        # Expected after a crash (the source redelivers); otherwise a producer reuses ids.
        ctx.log.warning(
            "%d of %d messages were not spooled again: their ids are in the spool already, or "
            "were delivered within the dedupe window (a redelivery, or message ids reused)",
            len(scheduled) - new,
            len(scheduled),
        )
    if invalid:
        for payload, reason in invalid:
            ctx.log.warning("dead-lettering message %s: %s", payload.id, reason)
        await broker.dead_letter(invalid, options.dead_letter_queue)
    return []


async def watch_storage(ctx: WorkflowContext) -> None:
    """Deliver due payloads from the spool to the broker (see the module docstring)."""
    options: WatchStorageOptions = ctx.options
    storage = storage_from_url(
        options.storage_url,
        clock=ctx.clock,
        metrics=ctx.metrics,
        dedupe_window_ms=options.dedupe_window_ms,
    )
    broker = broker_from_url(
        options.broker_url, exchange=options.exchange, clock=ctx.clock, metrics=ctx.metrics
    )
    settings = WatchSettings(
        batch_size=options.batch_size,
        lease_ms=options.lease_ms,
        max_poll_interval_s=options.max_poll_interval_ms / 1000,
        retry_base_s=options.retry_base_ms / 1000,
        retry_max_s=options.retry_max_ms / 1000,
    )
    async with storage, broker:
        for queue in [*options.declare_queues, options.dead_letter_queue]:
            await broker.ensure_queue(queue)
        ctx.ready()
        ctx.log.info(
            "delivering due payloads from %s to %s (exchange %r; dead letters: %r)",
            mask_url(options.storage_url),
            mask_url(options.broker_url),
            options.exchange,
            options.dead_letter_queue,
        )
        await storage.serve(
            lambda batch: deliver(batch, broker, options, ctx), ctx.stop, settings=settings
        )


watch_storage.options_model = WatchStorageOptions  # type: ignore[attr-defined]


async def deliver(
    batch: Sequence[Payload], broker: Broker, options: WatchStorageOptions, ctx: WorkflowContext
) -> list[Rejection]:
    """Publish one batch; dead-letter what cannot be delivered; return what to retry later.

    ``attempts`` counts every failed delivery of a payload (a nack, a lost connection, an
    unroutable publish when ``retry_unroutable`` is set); one that reaches ``max_attempts`` is
    dead-lettered with its last error.
    """
    now_ms = ctx.clock.now_ms()
    give_up: list[tuple[Payload, str]] = []
    sending = []
    for payload in batch:
        late_ms = now_ms - payload.due_ms
        if payload.attempts >= options.max_attempts:
            give_up.append(
                (payload, f"gave up after {payload.attempts} attempts: {payload.last_error}")
            )
        elif options.max_lateness_ms is not None and late_ms > options.max_lateness_ms:
            reason = (
                f"missed its due time by {late_ms} ms (max_lateness_ms {options.max_lateness_ms})"
            )
            give_up.append((payload, reason))
        else:
            sending.append(payload)
    rejections = await broker.process(sending)
    fault_point("after-publish")
    by_id = {p.id: p for p in sending}
    retry = []
    for rejection in rejections:
        payload = by_id[rejection.payload_id]
        if rejection.permanent and not options.retry_unroutable:
            give_up.append((payload, rejection.reason))
        elif payload.attempts + 1 >= options.max_attempts:
            give_up.append(
                (payload, f"gave up after {payload.attempts + 1} attempts: {rejection.reason}")
            )
        else:
            retry.append(Rejection(rejection.payload_id, rejection.reason))
    for payload, reason in give_up:
        ctx.log.warning("dead-lettering payload %s: %s", payload.id, reason)
    await broker.dead_letter(give_up, options.dead_letter_queue)
    ctx.metrics.incr("delivered", len(sending) - len(rejections))
    ctx.metrics.incr("retried", len(retry))
    return retry


async def forward(ctx: WorkflowContext) -> None:
    """Take messages from one broker to another, without delay (see the module docstring)."""
    options: ForwardOptions = ctx.options
    source = broker_from_url(
        options.source_url,
        queue=options.queue,
        prefetch=options.prefetch,
        batch_size=options.batch_size,
        clock=ctx.clock,
        metrics=ctx.metrics,
    )
    destination = broker_from_url(options.destination_url, clock=ctx.clock, metrics=ctx.metrics)
    rules = SchedulingRules(default_destination=options.default_destination)
    async with source, destination:
        await source.ensure_queue(options.queue)
        await destination.ensure_queue(options.default_destination)
        await destination.ensure_queue(options.dead_letter_queue)
        ctx.ready()
        ctx.log.info(
            "forwarding %r at %s to %s (default destination %r; dead letters: %r)",
            options.queue,
            mask_url(options.source_url),
            mask_url(options.destination_url),
            options.default_destination,
            options.dead_letter_queue,
        )
        await source.serve(
            lambda batch: relay(batch, destination, rules, options.dead_letter_queue, ctx),
            ctx.stop,
        )


forward.options_model = ForwardOptions  # type: ignore[attr-defined]


async def relay(
    batch: Sequence[Payload],
    destination: Broker,
    rules: SchedulingRules,
    dead_letter_queue: str,
    ctx: WorkflowContext,
) -> list[Rejection]:
    """Publish one batch to ``destination``; dead-letter what it refuses for good there."""
    routed, give_up = [], []
    for payload in batch:
        try:
            target = route(payload.headers, rules)
        except InvalidSchedule as exc:
            give_up.append((payload, exc.reason))
            continue
        routed.append(payload.model_copy(update={"destination": target}))
    rejections = await destination.process(routed)
    by_id = {p.id: p for p in routed}
    give_up += [(by_id[r.payload_id], r.reason) for r in rejections if r.permanent]
    for payload, reason in give_up:
        ctx.log.warning("dead-lettering message %s: %s", payload.id, reason)
    await destination.dead_letter(give_up, dead_letter_queue)
    ctx.metrics.incr("delivered", len(routed) - len(rejections))
    # What the destination refused for now goes back to the source, to come again.
    return [r for r in rejections if not r.permanent]
