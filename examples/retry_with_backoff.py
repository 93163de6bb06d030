"""A workflow of your own: retry failed jobs later, with exponential backoff.

Your consumers, when a job fails, publish it to the ``retries`` queue with two headers:
``x-retry-count`` (how many times it failed) and ``x-destination`` (the queue to retry it on).
This workflow spools each one for ``base_delay_ms * 2**count`` (capped at ``max_delay_ms``);
the built-in ``client.watch_storage`` delivers it back when it is due.

Run it: ``payler --config-file examples/retry_with_backoff.yaml``.

A workflow is ``async def workflow(ctx)``; see :mod:`payler.workflow` for what ``ctx`` holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from payler.drivers.base import Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.storages import storage_from_url
from payler.payload import Payload
from payler.workflow import WorkflowContext


def backoff_ms(retry_count: int, base_ms: int, max_ms: int) -> int:
    """The delay before retry number ``retry_count`` (0 for the first retry)."""
    return min(max_ms, base_ms * 2 ** min(retry_count, 32))


async def retry_with_backoff(ctx: WorkflowContext) -> None:
    # Without an options_model, ctx.options is the plain dict from the YAML file.
    options = ctx.options
    queue = options.get("queue", "retries")
    dead_letter_queue = options.get("dead_letter_queue", "retries-dead-letter")
    base_ms = int(options.get("base_delay_ms", 1_000))
    max_ms = int(options.get("max_delay_ms", 3_600_000))

    storage = storage_from_url(options["storage_url"], clock=ctx.clock, metrics=ctx.metrics)
    broker = broker_from_url(
        options["broker_url"], queue=queue, clock=ctx.clock, metrics=ctx.metrics
    )

    async def spool_retries(batch: Sequence[Payload]) -> list[Rejection]:
        due, invalid = [], []
        for payload in batch:
            count = payload.headers.get("x-retry-count", 0)
            target = payload.headers.get("x-destination")
            if not isinstance(count, int) or count < 0 or not isinstance(target, str):
                invalid.append((payload, "needs x-retry-count >= 0 and an x-destination queue"))
                continue
            delay = backoff_ms(count, base_ms, max_ms)
            due.append(
                payload.model_copy(
                    update={"due_ms": payload.created_ms + delay, "destination": target}
                )
            )
        ctx.metrics.incr("spooled", await storage.store(due))  # durable before the ack
        await broker.dead_letter(invalid, dead_letter_queue)  # bad input: kept, with a reason
        return []  # nothing rejected: the whole batch may be acknowledged

    async with storage, broker:
        await broker.ensure_queue(queue)
        await broker.ensure_queue(dead_letter_queue)
        ctx.ready()  # connected: from here on, errors are retried, not fatal
        await broker.serve(spool_retries, ctx.stop)  # returns once ctx.stop is set
