"""One bad message can only ever affect itself.

A batch step (a store, a publish) that raises something other than an outage cannot say which
payload it failed on: a value a storage refuses, a bug in a driver for one odd message. Rather
than fail the batch for ever (and restart the workflow into the same batch), :func:`isolate`
runs the step again on halves of the batch, down to single payloads: the payloads the step
still fails on alone are handed back with the reason, for the workflow to dead-letter, and the
rest of the batch goes on. Outages (:func:`~payler.errors.is_transient`) are not isolated: they
propagate, and the whole batch is retried later.

Two kinds of failure, told apart by the exception (:func:`is_refusal`):

- a *refusal* of the input (``ValueError``, ``OverflowError``: the codec, a validation, a value
  the backend cannot hold) is the payload's own fault: it is dead-lettered with the reason;
- anything else is a *bug* in payler or a driver (a driver refuses a payload by returning a
  rejection, not by raising). A payload that a bug hits alone, while the step works for the
  others, is dead-lettered too, logged with its traceback and counted (metric ``bugs``). But a
  step that fails with bugs for *every* payload in hand is broken as a whole (a bug on every
  path, a storage that refuses everything), not the payloads: the first error is raised, so
  that the workflow restarts with backoff and a traceback, instead of a whole stream being
  dead-lettered. (A step for which that is the wrong answer says ``step_can_break=False``.)

A step run again on a half may repeat some of its effect (a payload published twice), which the
at-least-once guarantee allows; a step's effect must be idempotent by payload id where it
matters (a store is).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from payler.codec import safe_text
from payler.errors import is_transient
from payler.metrics import Metrics

log = logging.getLogger("payler.isolation")

T = TypeVar("T")
R = TypeVar("R")


def _payload_id(item: Any) -> str:
    """A payload's id, or the payload's of a ``(payload, ...)`` tuple (for the log)."""
    if isinstance(item, tuple) and item:
        item = item[0]
    return str(getattr(item, "id", "?"))


async def isolate(
    step: Callable[[Sequence[T]], Awaitable[R]],
    batch: Sequence[T],
    what: str,
    *,
    metrics: Metrics | None = None,
    step_can_break: bool = True,
) -> tuple[list[R], list[tuple[T, str]]]:
    """Run ``step(batch)``; on an error that is not an outage, isolate the items it fails on.

    Returns the results of the calls that succeeded (one per sub-batch) and the items that
    failed alone, each with the reason (``what`` names the step: "the spool cannot store it").
    Items are payloads, or tuples whose first element is the payload. Raises an outage as it
    is, and (unless ``step_can_break`` is false) the first error when bugs failed every item
    (see the module docstring). ``metrics`` counts the items a bug failed alone (``bugs``).
    """
    try:
        return [await step(batch)], []
    except Exception as exc:
        if is_transient(exc):
            raise
        first = exc
    if len(batch) == 1:
        results: list[R] = []
        failures: list[tuple[T, Exception]] = [(batch[0], first)]
    else:
        log.info(
            "%s failed for a batch of %d (%s): isolating the payload(s) it fails on",
            what, len(batch), describe(first),
        )  # fmt: skip
        results, failures = await _split(step, batch)
    if step_can_break and not results and not any(is_refusal(e) for _, e in failures):
        raise first
    return results, [_reason(item, exc, what, metrics) for item, exc in failures]


async def _split(
    step: Callable[[Sequence[T]], Awaitable[R]], batch: Sequence[T]
) -> tuple[list[R], list[tuple[T, Exception]]]:
    """Run ``step`` on halves of ``batch`` (which failed as a whole), down to single items."""
    results: list[R] = []
    failures: list[tuple[T, Exception]] = []
    half = len(batch) // 2
    pending = [batch[half:], batch[:half]]  # the first half is tried first
    while pending:
        part = pending.pop()
        try:
            results.append(await step(part))
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(part) == 1:
                failures.append((part[0], exc))
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]
    return results, failures


def _reason(item: T, exc: Exception, what: str, metrics: Metrics | None) -> tuple[T, str]:
    """``item`` with why it failed alone; a bug is logged with its traceback and counted."""
    if is_refusal(exc):
        return item, f"{what}: {describe(exc)}"
    log.error(
        "%s: payload %s fails alone, with an error that is a bug in payler (please report it): "
        "it is dead-lettered with the error",
        what, _payload_id(item), exc_info=exc,
    )  # fmt: skip
    if metrics is not None:
        metrics.incr("bugs")
    return item, f"{what} (a bug in payler): {describe(exc)}"


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` refuses the input (bad data), rather than being a bug in payler."""
    return isinstance(exc, ValueError | OverflowError)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, in one line, short enough for a dead letter, and
    text every backend can hold (no lone surrogate)."""
    text = " ".join((str(exc) or repr(exc)).split())
    if len(text) > 500:
        text = text[:497] + "..."
    name = type(exc).__name__
    return safe_text(text if text.startswith(name) else f"{name}: {text}")
