"""Running a batch of messages through an application: concurrency and per-key ordering.

- At most ``concurrency`` handler runs are in flight at once (a batch handler's run counts as
  one). The source's prefetch follows this bound (see the ``handle`` workflow's options): a slow
  handler slows consumption, it does not grow memory.
- ``order_by`` keeps the order of messages that share a key: ``key`` (the Kafka record key),
  ``partition`` (the Kafka partition), ``header:NAME`` (an AMQP or stream header). Messages of
  one key run one after the other, in the order the source gave them; messages of different
  keys (and every message when ``order_by`` is None) run concurrently. A message whose run
  fails is retried later through the spool: the messages after it do not wait for it.
- Messages routed to a batch handler are gathered per handler, in chunks of its ``max_size``.

:func:`run_all` never raises for what a message or a handler does: a bug of payler's that one
message triggers dead-letters that message alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence

from payler.clock import Clock
from payler.isolation import describe
from payler.metrics import Metrics
from payler.payload import Payload
from payler.processing.application import NO_HANDLER, Application, Delivery, Handler, Outcome

log = logging.getLogger("payler.processing")


def order_key(payload: Payload, order_by: str | None) -> Hashable | None:
    """The ordering key of ``payload`` under ``order_by`` (None: no ordering)."""
    if order_by is None:
        return None
    if order_by == "key":
        return payload.key
    if order_by == "partition":  # kafka:<topic>:<partition>:<offset>
        parts = payload.id.rsplit(":", 2)
        return parts[1] if len(parts) == 3 else None
    name = order_by.removeprefix("header:")
    value = payload.headers.get(name)
    return value if isinstance(value, Hashable) else repr(value)


async def run_all(
    app: Application,
    deliveries: Sequence[Delivery],
    *,
    concurrency: int,
    order_by: str | None,
    clock: Clock,
    metrics: Metrics | None = None,
    brokers: frozenset[str] | None = None,
) -> list[Outcome]:
    """The outcome of each delivery, in the order given (see the module docstring)."""
    outcomes: dict[int, Outcome] = {}
    limit = asyncio.Semaphore(concurrency)
    chains: dict[Hashable, list[tuple[int, Delivery, Handler]]] = {}
    batches: dict[str, list[tuple[int, Delivery]]] = {}
    handlers: dict[str, Handler] = {}
    for index, delivery in enumerate(deliveries):
        routed: Handler | str | None = None
        if delivery.payload.defect is None:
            routed = _route(app, delivery)
        if routed is None:  # a defect: dead-lettered with it
            outcomes[index] = await app.run(delivery, clock=clock, metrics=metrics)
        elif isinstance(routed, str):  # no handler, or several
            outcomes[index] = app.dead(delivery, NO_HANDLER, routed, metrics)
        elif routed.batch is not None:
            batches.setdefault(routed.name, []).append((index, delivery))
            handlers[routed.name] = routed
        else:
            key = order_key(delivery.payload, order_by)
            chain_key = ("key", key) if key is not None else ("one", index)
            chains.setdefault(chain_key, []).append((index, delivery, routed))

    async def run_one(index: int, delivery: Delivery, handler: Handler) -> None:
        async with limit:
            outcomes[index] = await _one(app, delivery, handler, clock, metrics, brokers)

    async def run_chain(chain: list[tuple[int, Delivery, Handler]]) -> None:
        for index, delivery, handler in chain:
            await run_one(index, delivery, handler)

    async def run_batch(handler: Handler, chunk: list[tuple[int, Delivery]]) -> None:
        async with limit:
            done = await _guarded(
                lambda: app.run_batch(
                    handler, [d for _, d in chunk], clock=clock, metrics=metrics, brokers=brokers
                ),
                [d for _, d in chunk],
            )
        by_id = {o.delivery.payload.id: o for o in done}
        for index, delivery in chunk:
            outcomes[index] = by_id[delivery.payload.id]

    tasks: list[Awaitable[None]] = [run_chain(chain) for chain in chains.values()]
    for name, members in batches.items():
        size = handlers[name].batch.max_size  # type: ignore[union-attr]  # a batch handler
        tasks += [run_batch(handlers[name], members[i : i + size])
                  for i in range(0, len(members), size)]  # fmt: skip
    await asyncio.gather(*tasks)
    return [outcomes[i] for i in range(len(deliveries))]


async def _one(
    app: Application,
    delivery: Delivery,
    handler: Handler,
    clock: Clock,
    metrics: Metrics | None,
    brokers: frozenset[str] | None,
) -> Outcome:
    done = await _guarded(
        lambda: _listed(
            app.run(delivery, clock=clock, metrics=metrics, handler=handler, brokers=brokers)
        ),
        [delivery],
    )
    return done[0]


async def _listed(outcome: Awaitable[Outcome]) -> list[Outcome]:
    return [await outcome]


async def _guarded(
    step: Callable[[], Awaitable[list[Outcome]]], deliveries: Sequence[Delivery]
) -> list[Outcome]:
    """``step()``, or, if payler itself fails on these messages, a dead letter for each."""
    try:
        return await step()
    except Exception as exc:
        log.exception("handling %d message(s) failed (a bug in payler)", len(deliveries))
        reason = f"payler could not handle it (a bug in payler): {describe(exc)}"
        return [Outcome(d, NO_HANDLER, dead=reason) for d in deliveries]


def _route(app: Application, delivery: Delivery) -> Handler | str:
    try:
        return app.route(app.message(delivery.payload))
    except Exception as exc:  # matchers never raise; a bug of payler's in routing might
        log.exception("routing message %s failed (a bug in payler)", delivery.origin)
        return f"payler could not route it (a bug in payler): {describe(exc)}"


__all__ = ["order_key", "run_all"]
