"""Retries of a handler's failures: the policy, and the exceptions a handler raises to decide.

A handler that raises is a *transient* failure by default: the message is retried later through
the spool, at ``now + backoff`` (exponential with jitter: :class:`~payler.backoff.Backoff`),
without being held in memory; after ``max_attempts`` runs it is dead-lettered with the last
error (type, message and a short traceback). A handler may instead raise:

- :class:`RetryLater` — "try again after ``delay_ms``" (it counts as an attempt);
- :class:`Reject` — "this message will never work": dead-lettered now, never retried.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

from payler.backoff import Backoff
from payler.isolation import describe

#: The frames of a traceback kept in a dead letter's reason (the innermost ones).
TRACEBACK_FRAMES = 3


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a handler's failures are retried: ``max_attempts`` runs in all (1: never retried),
    the n-th retry after ``base_ms * 2**(n-1)`` (capped at ``max_ms``), ±``jitter``."""

    max_attempts: int = 5
    base_ms: int = 1_000
    max_ms: int = 300_000
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_ms < 0 or self.max_ms < self.base_ms:
            raise ValueError("retry delays need 0 <= base_ms <= max_ms")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay_ms(self, attempt: int) -> int:
        """The wait after failed attempt number ``attempt`` (1 for the first run)."""
        backoff = Backoff(self.base_ms / 1000, self.max_ms / 1000, self.jitter)
        return round(backoff.delay_s(attempt - 1) * 1000)


class RetryLater(Exception):
    """Raised by a handler: retry this message after ``delay_ms`` (the policy's backoff when
    None). Counts as an attempt: after ``max_attempts`` the message is dead-lettered."""

    def __init__(self, reason: str = "retry requested", *, delay_ms: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_ms = delay_ms


class Reject(Exception):
    """Raised by a handler: dead-letter this message now, with ``reason``; never retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_failure(exc: BaseException) -> str:
    """``Type: message (at file:line in function ← ...)``: the last error, short enough for a
    dead letter's reason."""
    frames = traceback.extract_tb(exc.__traceback__)[-TRACEBACK_FRAMES:]
    where = " ← ".join(
        f"{frame.filename.rpartition('/')[2]}:{frame.lineno} in {frame.name}"
        for frame in reversed(frames)
    )
    text = describe(exc)
    return f"{text} (at {where})" if where else text


__all__ = ["Reject", "RetryLater", "RetryPolicy", "describe_failure"]
