"""Time, only through an injected clock, so tests can drive it.

Every due time in payler is an integer count of milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What payler needs of time."""

    def now_ms(self) -> int:
        """Wall-clock time, epoch milliseconds (UTC)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told to: ``advance()``, or a ``sleep()`` that jumps ahead.

    ``sleep(s)`` advances the clock by ``s`` and yields once to the event loop, so code that waits
    for a due time runs at once in tests instead of sleeping.
    """

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, milliseconds: int) -> None:
        self._now_ms += milliseconds

    async def sleep(self, seconds: float) -> None:
        self._now_ms += max(0, round(seconds * 1000))
        await asyncio.sleep(0)
