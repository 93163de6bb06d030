"""One bad message can only ever affect itself.

A batch step (a store, a publish) that raises something other than an outage cannot say which
payload it failed on: a value a storage refuses, a bug in a driver for one odd message. Rather
than fail the batch for ever (and restart the workflow into the same batch), :func:`isolate`
runs the step again on halves of the batch, down to single payloads: the payloads the step
still fails on alone are handed back with the reason, for the workflow to dead-letter, and the
rest of the batch goes on. Outages (:func:`~payler.errors.is_transient`) are not isolated: they
propagate, and the whole batch is retried later.

A step run again on a half may repeat some of its effect (a payload published twice), which the
at-least-once guarantee allows; a step's effect must be idempotent by payload id where it
matters (a store is).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from payler.errors import is_transient
from payler.payload import Payload

log = logging.getLogger("payler.isolation")

R = TypeVar("R")


async def isolate(
    step: Callable[[Sequence[Payload]], Awaitable[R]], batch: Sequence[Payload], what: str
) -> tuple[list[R], list[tuple[Payload, str]]]:
    """Run ``step(batch)``; on an error that is not an outage, isolate the payloads it fails on.

    Returns the results of the calls that succeeded (one per sub-batch) and the payloads that
    failed alone, each with the reason (``what`` names the step, "the spool cannot store it").
    """
    try:
        return [await step(batch)], []
    except Exception as exc:
        if is_transient(exc):
            raise
        log.error(
            "%s failed for a batch of %d (%s): isolating the payload(s) it fails on",
            what, len(batch), describe(exc), exc_info=exc,
        )  # fmt: skip
        if len(batch) == 1:
            return [], [(batch[0], f"{what}: {describe(exc)}")]
    results: list[R] = []
    failed: list[tuple[Payload, str]] = []
    pending = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    while pending:
        part = pending.pop()
        try:
            results.append(await step(part))
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(part) == 1:
                failed.append((part[0], f"{what}: {describe(exc)}"))
            else:
                pending += [part[: len(part) // 2], part[len(part) // 2 :]]
    return results, failed


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, in one line, short enough for a dead letter."""
    text = " ".join((str(exc) or repr(exc)).split())
    if len(text) > 500:
        text = text[:497] + "..."
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"
