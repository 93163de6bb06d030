"""The built-in workflows, under the original Payler's names (and ``forward``).

- ``client.process_queue``: broker → spool. Consume ``queue``; schedule each message from its
  headers; store the batch durably; dead-letter the invalid ones with the reason; *then* ack.
- ``client.watch_storage``: spool → broker. Claim due payloads; publish them (confirmed,
  mandatory) to their destination without the scheduling headers; delete each entry only after
  its publish was confirmed. Unroutable ones are dead-lettered with the reason; transient
  failures are retried with backoff, then dead-lettered after ``max_attempts``.
- ``client.forward``: broker → broker, no spool. Consume a source; publish each message
  (confirmed) to its destination on another broker or the same; acknowledge the source after.
- ``client.handle``: broker → your handlers → brokers, with delayed outputs and retries through
  the spool (:mod:`payler.processing`).

Source and destination brokers are chosen by URL, so the spool workflows also move messages
between brokers: ``process_queue`` on a Kafka topic with ``watch_storage`` on RabbitMQ is a
delayed Kafka → RabbitMQ bridge.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Sequence

from payler.backoff import Backoff
from payler.codec import safe_text
from payler.drivers.base import Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.brokers.base import DEFAULT_PUBLISH_TIMEOUT_S, Broker
from payler.drivers.storages import storage_from_url
from payler.drivers.storages.base import SpoolStorage, Stored, WatchSettings
from payler.errors import InvalidSchedule, is_transient
from payler.faults import fault_point
from payler.identity import is_content_id, random_spool_id
from payler.isolation import describe, isolate
from payler.logs import shown_headers
from payler.options import ForwardOptions, ProcessQueueOptions, WatchStorageOptions
from payler.payload import MessageProperties, Payload
from payler.processing.options import HandleOptions
from payler.scheduling import SchedulingRules, schedule
from payler.scheduling import destination as route
from payler.urls import mask_url
from payler.workflow import WorkflowContext


async def process_queue(ctx: WorkflowContext) -> None:
    """Consume a queue and spool each message until it is due (see the module docstring)."""
    options: ProcessQueueOptions = ctx.options
    storage = storage_from_url(
        options.storage_url,
        clock=ctx.clock,
        metrics=ctx.metrics,
        max_body_bytes=options.max_body_bytes,
        min_free_bytes=options.min_free_bytes,
    )
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
            ctx.metrics.track(lambda batch: spool(batch, storage, broker, options, ctx)),
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
    """Schedule, store and dead-letter one batch; return only once all of it is durable.

    Whatever one message raises — a defect of its source encoding, invalid scheduling headers, a
    value the spool cannot store, a bug — it is dead-lettered alone, with the reason, and the
    rest of the batch is stored. Returned: the messages to hand back to the source for now (their
    dead-lettering was refused for now).

    First the spool must admit the batch (:meth:`SpoolStorage.admission`): while its file system
    is below the free-space watermark, this waits, holding the batch unacknowledged (so the
    source stops sending and keeps the rest), while delivering goes on elsewhere. Stopping while
    waiting hands the whole batch back to the source.
    """
    rules = scheduling_rules(options)
    scheduled, invalid, odd_times = [], [], []
    for payload in batch:
        outcome = _scheduled(payload, rules, options, broker, storage.max_body_bytes, ctx)
        if isinstance(outcome, str):
            invalid.append((payload, outcome))
            continue
        scheduled.append(outcome[0])
        if outcome[1]:
            odd_times.append(payload)
    if odd_times:
        ctx.log.warning(
            "%d message(s) carry an implausible publish time (before 2001, or longer ago than "
            "max_delay_ms): their delay counts from their receipt instead (first: %s, stamped %s)",
            len(odd_times), odd_times[0].id, odd_times[0].properties.timestamp_ms,
        )  # fmt: skip
    incoming = sum(len(p.body) for p in scheduled)
    if scheduled and not await _admitted(storage, incoming, ctx):
        return [Rejection(p.id, "payler stopped while the spool was too full") for p in batch]
    parts, unstorable = await isolate(
        storage.store_batch, scheduled, "the spool cannot store it", metrics=ctx.metrics
    )
    invalid += unstorable
    stored = sum(parts, Stored())
    fault_point("after-store")
    ctx.metrics.incr("spooled", len(stored.new))
    if stored.duplicates:
        ctx.metrics.incr("duplicates", len(stored.duplicates))
        # Expected after a crash: the source redelivers what it had not seen acknowledged.
        ctx.log.warning(
            "%d of %d messages were not spooled again: the same message (same id, same "
            "content) is in the spool already, or was delivered within the dedupe window "
            "(a redelivery): %s",
            len(stored.duplicates), len(scheduled), _some(stored.duplicates),
        )  # fmt: skip
    if stored.renamed:
        # A producer reusing message ids: the new message is kept, under an id of its own.
        ctx.log.warning(
            "%d message(s) came with the id of a different message in the spool (pending, dead "
            "or delivered within the dedupe window): spooled under derived ids: %s",
            len(stored.renamed),
            _some(f"{old} as {new}" for old, new in stored.renamed.items()),
        )
    return await _dead_letter_or_park(invalid, broker, storage, options.dead_letter_queue, ctx)


#: How often a paused ingest looks at the spool's free space again (backoff, capped).
ADMISSION_BACKOFF = Backoff(base_s=0.05, max_s=1.0)


async def _admitted(storage: SpoolStorage, incoming_bytes: int, ctx: WorkflowContext) -> bool:
    """Wait until the spool admits ``incoming_bytes`` more; False if stopping first.

    Logs once at WARNING when ingest pauses, once at INFO when it resumes.
    """
    reason = await storage.admission(incoming_bytes)
    if reason is None:
        return True
    ctx.log.warning(
        "consuming paused: the spool cannot take more now (%s); messages wait in the source, "
        "and delivering goes on, which frees space",
        reason,
    )
    paused_ms, attempt = ctx.clock.now_ms(), 0
    while reason is not None:
        stopping = asyncio.ensure_future(ctx.stop.wait())
        sleeping = asyncio.ensure_future(ctx.clock.sleep(ADMISSION_BACKOFF.delay_s(attempt)))
        try:
            await asyncio.wait([stopping, sleeping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            sleeping.cancel()
        if ctx.stop.is_set():
            return False
        attempt += 1
        reason = await storage.admission(incoming_bytes)
    ctx.log.info(
        "consuming resumed: the spool has room again (paused %.1f s)",
        (ctx.clock.now_ms() - paused_ms) / 1000,
    )
    return True


def _some(items: Iterable[str], shown: int = 10) -> str:
    """The first ``shown`` of ``items``, comma-separated, and how many more there are."""
    items = list(items)
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _scheduled(
    payload: Payload,
    rules: SchedulingRules,
    options: ProcessQueueOptions,
    broker: Broker,
    limit: int | None,
    ctx: WorkflowContext,
) -> tuple[Payload, bool] | str:
    """``payload`` scheduled for the spool (and whether its publish time was ignored as
    implausible), or why it cannot be scheduled. Never raises."""
    if payload.defect is not None:
        return payload.defect
    if limit is not None and len(payload.body) > limit:
        return f"body of {len(payload.body)} bytes is over the spool's limit of {limit} bytes"
    try:
        when = schedule(
            payload.headers,
            received_ms=payload.created_ms,
            published_ms=payload.properties.timestamp_ms,
            rules=rules,
            timestamp_slack_ms=broker.timestamp_slack_ms,
        )
        update: dict[str, object] = {"due_ms": when.due_ms, "destination": when.destination}
        if options.spool_id == "random" and is_content_id(payload.id):
            update["id"] = random_spool_id(payload.id.partition(":")[0], payload.source)
        return payload.model_copy(update=update), when.publish_time_ignored
    except InvalidSchedule as exc:
        return exc.reason
    except Exception as exc:  # a bug in payler, for this message alone
        ctx.log.exception("scheduling message %s failed (a bug in payler)", payload.id)
        ctx.metrics.incr("bugs")
        return f"payler could not schedule it (a bug in payler): {describe(exc)}"


async def _dead_letter_or_park(
    invalid: Sequence[tuple[Payload, str]],
    broker: Broker,
    storage: SpoolStorage,
    queue: str,
    ctx: WorkflowContext,
) -> list[Rejection]:
    """Dead-letter each message to ``queue``; park in the spool what ``queue`` refuses for
    good even in its minimal form; return what to hand back to the source for now.

    Never raises for the dead-lettering: the rest of the batch is stored, and must be
    acknowledged whatever happens here. A message whose dead letter failed (an outage, a bug) or
    that could not even be parked goes back to the source, which hands it over again later.
    """
    if not invalid:
        return []
    for payload, reason in invalid:
        ctx.log.warning(
            "dead-lettering message %s: %s%s", payload.id, reason, shown_headers(payload.headers)
        )
    try:
        refused = await broker.dead_letter(invalid, queue)
    except Exception as exc:
        return _dead_lettering_failed(invalid, queue, exc, ctx)
    reasons = {p.id: reason for p, reason in invalid}
    by_id = {p.id: p for p, _ in invalid}
    refused = _known(refused, list(by_id.values()), "the dead-letter destination", ctx)
    back = [r for r in refused if not r.permanent]
    for rejection in (r for r in refused if r.permanent):
        payload = by_id[rejection.payload_id]
        try:
            await _park(storage, payload, f"{reasons[payload.id]}; {rejection.reason}")
        except Exception as exc:
            ctx.log.error(
                "message %s stays in the source: the dead-letter destination %r refused it "
                "(%s) and the spool could not park it (%s)",
                payload.id, queue, rejection.reason, describe(exc),
                exc_info=None if is_transient(exc) else exc,
            )  # fmt: skip
            back.append(Rejection(payload.id, f"parking it failed: {describe(exc)}"))
            continue
        ctx.metrics.incr("parked")
        ctx.log.error(
            "dead letter %s is refused by %r (%s): parked in the spool as dead instead",
            payload.id, queue, rejection.reason,
        )  # fmt: skip
    return back


def _dead_lettering_failed(
    items: Sequence[tuple[Payload, str]], queue: str, exc: Exception, ctx: WorkflowContext
) -> list[Rejection]:
    """Log that dead-lettering ``items`` to ``queue`` failed as a whole; they are to be retried
    (the outcome is unknown: they may arrive twice)."""
    transient = is_transient(exc)
    ctx.log.log(
        logging.WARNING if transient else logging.ERROR,
        "dead-lettering %d message(s) to %r failed (%s): they will be retried",
        len(items), queue, describe(exc),
        exc_info=None if transient else exc,
    )  # fmt: skip
    return [Rejection(p.id, f"dead-lettering failed: {describe(exc)}") for p, _ in items]


async def _park(storage: SpoolStorage, payload: Payload, reason: str) -> None:
    """Keep ``payload`` in the spool as dead. If the spool cannot hold it as it is (a message
    both the dead-letter destination and the spool refuse), keep what identifies it: its ids,
    source and the reason, without body, headers or other properties."""
    reason = safe_text(reason)
    try:
        await storage.park([(payload, reason)])
    except Exception as exc:
        if is_transient(exc):
            raise
        props = payload.properties
        bare = payload.model_copy(
            update={
                "id": safe_text(payload.id),
                "body": b"",
                "headers": {},
                "properties": MessageProperties(
                    message_id=props.message_id and safe_text(props.message_id),
                    correlation_id=props.correlation_id and safe_text(props.correlation_id),
                ),
                "source": safe_text(payload.source),
                "key": None,
            }
        )
        dropped = (
            f"{reason}; the spool refused it too ({describe(exc)}): its body of "
            f"{len(payload.body)} bytes, headers and other properties are dropped"
        )
        await storage.park([(bare, dropped)])


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
        options.broker_url,
        exchange=options.exchange,
        # A publish still in the air when the lease ends could be delivered twice (another
        # instance re-claims the entry): the publish gives up before, leaving a third of the
        # lease for the acknowledgement. Not much earlier: a publish given up on may still be
        # confirmed, and is then delivered twice too.
        publish_timeout_s=min(DEFAULT_PUBLISH_TIMEOUT_S, options.lease_ms / 1000 * 2 / 3),
        clock=ctx.clock,
        metrics=ctx.metrics,
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
            ctx.metrics.track(lambda batch: deliver(batch, broker, options, ctx)),
            ctx.stop,
            settings=settings,
        )


watch_storage.options_model = WatchStorageOptions  # type: ignore[attr-defined]


async def deliver(
    batch: Sequence[Payload], broker: Broker, options: WatchStorageOptions, ctx: WorkflowContext
) -> list[Rejection]:
    """Publish one batch; dead-letter what cannot be delivered; return what to retry later.

    ``attempts`` counts every refused delivery of a payload (a nack, an unroutable publish when
    ``retry_unroutable`` is set; an outage that fails the whole batch raises, and the storage
    gives the batch back without counting it); one that reaches ``max_attempts`` is
    dead-lettered with its last error. A payload the dead-letter destination refuses for good
    is returned as a permanent rejection: the storage parks it as dead. Whatever the
    dead-lettering does, the payloads that were published are settled (deleted) all the same.
    """
    sending, give_up = _triage(batch, options, ctx.clock.now_ms())
    published, broken = await isolate(
        broker.process, sending, "payler cannot publish it", metrics=ctx.metrics
    )
    rejections = _known(
        [r for part in published for r in part], sending, "the destination broker", ctx
    )
    fault_point("after-publish")
    give_up += broken
    by_id = {p.id: p for p in sending}
    retry: list[Rejection] = []
    for rejection in rejections:
        payload = by_id[rejection.payload_id]
        if rejection.permanent and not options.retry_unroutable:
            give_up.append((payload, rejection.reason))
        elif payload.attempts + 1 >= options.max_attempts:
            give_up.append((payload, _gave_up(payload.attempts + 1, rejection.reason)))
        else:
            retry.append(Rejection(rejection.payload_id, rejection.reason))
    retry += await _dead_letter_due(give_up, broker, options, ctx)
    ctx.metrics.incr("delivered", len(sending) - len(rejections) - len(broken))
    ctx.metrics.incr("retried", sum(1 for r in retry if not r.permanent))
    return retry


def _gave_up(attempts: int, last_error: str | None) -> str:
    """Why a payload is given up after ``attempts`` failed deliveries (a reason already given
    up for, whose dead letter failed, is kept as it was)."""
    if last_error is not None and last_error.startswith("gave up after "):
        return last_error
    return f"gave up after {attempts} attempts: {last_error}"


def _triage(
    batch: Sequence[Payload], options: WatchStorageOptions, now_ms: int
) -> tuple[list[Payload], list[tuple[Payload, str]]]:
    """The payloads to publish, and those to dead-letter at once (with the reason)."""
    give_up: list[tuple[Payload, str]] = []
    sending = []
    for payload in batch:
        late_ms = now_ms - payload.due_ms
        if payload.defect is not None:
            give_up.append((payload, payload.defect))
        elif payload.attempts >= options.max_attempts:
            give_up.append((payload, _gave_up(payload.attempts, payload.last_error)))
        elif options.max_lateness_ms is not None and late_ms > options.max_lateness_ms:
            reason = (
                f"missed its due time by {late_ms} ms (max_lateness_ms {options.max_lateness_ms})"
            )
            give_up.append((payload, reason))
        else:
            sending.append(payload)
    return sending, give_up


async def _dead_letter_due(
    give_up: Sequence[tuple[Payload, str]],
    broker: Broker,
    options: WatchStorageOptions,
    ctx: WorkflowContext,
) -> list[Rejection]:
    """Dead-letter spool entries; return what to retry (refused for now, or the dead-lettering
    failed) and what to park as dead in the spool (refused for good: permanent rejections).

    Never raises: whatever the dead-lettering does, the payloads published before it must be
    settled (deleted), not published again. A payload whose dead letter failed is retried (with
    the spool's backoff) with the reason it was given up for, so that the next attempt gives it
    up again for that reason, not for the failure of its dead letter (which is logged).
    """
    if not give_up:
        return []
    for payload, reason in give_up:
        ctx.log.warning(
            "dead-lettering payload %s: %s%s", payload.id, reason, shown_headers(payload.headers)
        )
    try:
        refused = await broker.dead_letter(give_up, options.dead_letter_queue)
    except Exception as exc:
        # The outcome of these dead letters is unknown: retry them (they may arrive twice),
        # with the reason they were given up for, which the next attempt dead-letters again.
        _dead_lettering_failed(give_up, options.dead_letter_queue, exc, ctx)
        return [Rejection(p.id, reason) for p, reason in give_up]
    reasons = {p.id: reason for p, reason in give_up}
    outcome = []
    for rejection in _known(refused, [p for p, _ in give_up], "the dead-letter destination", ctx):
        if rejection.permanent:
            ctx.log.error(
                "payload %s: the dead-letter destination %r refused it (%s): parked in the "
                "spool as dead",
                rejection.payload_id, options.dead_letter_queue, rejection.reason,
            )  # fmt: skip
            ctx.metrics.incr("parked")
            reason = safe_text(f"{reasons[rejection.payload_id]}; {rejection.reason}")
            outcome.append(Rejection(rejection.payload_id, reason, permanent=True))
        else:
            outcome.append(rejection)
    return outcome


def _known(
    rejections: Sequence[Rejection], batch: Sequence[Payload], who: str, ctx: WorkflowContext
) -> list[Rejection]:
    """The rejections that name a payload of ``batch`` (a driver that names another is a bug:
    logged, and the rejection ignored rather than failing the whole batch)."""
    ids = {p.id for p in batch}
    known = [r for r in rejections if r.payload_id in ids]
    if len(known) < len(rejections):
        ctx.log.error(
            "%s rejected payload ids it was not given (a bug in payler): %s",
            who, sorted({r.payload_id for r in rejections} - ids)[:5],
        )  # fmt: skip
    return known


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
            ctx.metrics.track(
                lambda batch: relay(batch, destination, rules, options.dead_letter_queue, ctx)
            ),
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
    """Publish one batch to ``destination``; dead-letter what it refuses for good there.

    What the destination refuses for now, and what the dead-letter destination refuses (there
    is no spool to park it in), goes back to the source, which hands it over again later.
    """
    routed, give_up = [], []
    for payload in batch:
        if payload.defect is not None:
            give_up.append((payload, payload.defect))
            continue
        try:
            target = route(payload.headers, rules)
        except InvalidSchedule as exc:
            give_up.append((payload, exc.reason))
            continue
        except Exception as exc:  # a bug in payler, for this message alone
            ctx.log.exception("routing message %s failed (a bug in payler)", payload.id)
            ctx.metrics.incr("bugs")
            reason = f"payler could not route it (a bug in payler): {describe(exc)}"
            give_up.append((payload, reason))
            continue
        routed.append(payload.model_copy(update={"destination": target}))
    published, broken = await isolate(
        destination.process, routed, "payler cannot publish it", metrics=ctx.metrics
    )
    rejections = _known([r for part in published for r in part], routed, "the destination", ctx)
    give_up += broken
    by_id = {p.id: p for p in routed}
    give_up += [(by_id[r.payload_id], r.reason) for r in rejections if r.permanent]
    ctx.metrics.incr("delivered", len(routed) - len(rejections) - len(broken))
    # What the destination refused for now goes back to the source, to come again.
    back = [r for r in rejections if not r.permanent]
    if not give_up:
        return back
    for payload, reason in give_up:
        ctx.log.warning(
            "dead-lettering message %s: %s%s", payload.id, reason, shown_headers(payload.headers)
        )
    try:
        refused = await destination.dead_letter(give_up, dead_letter_queue)
    except Exception as exc:  # the published ones are acknowledged all the same
        return back + _dead_lettering_failed(give_up, dead_letter_queue, exc, ctx)
    for rejection in refused:
        if rejection.permanent:
            ctx.log.error(
                "message %s stays in the source: the dead-letter destination %r refused it "
                "(%s)",
                rejection.payload_id, dead_letter_queue, rejection.reason,
            )  # fmt: skip
    # What the dead-letter destination refused goes back to the source too: without a spool,
    # the source keeps it (and hands it over again after a backoff).
    return back + [Rejection(r.payload_id, r.reason) for r in refused]


async def handle(ctx: WorkflowContext) -> None:
    """Run an application's handlers between a source and its outputs: see
    :mod:`payler.processing.workflow`."""
    from payler.processing.workflow import handle as run_handlers  # noqa: PLC0415 - no cycle

    await run_handlers(ctx)


handle.options_model = HandleOptions  # type: ignore[attr-defined]
