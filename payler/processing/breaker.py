"""The dead-letter breaker: stop consuming when dead letters pile up.

After a bad deploy (a handler that rejects everything, a schema change the producers made),
dead-lettering every message would empty the source into the dead-letter queue. The breaker
(Arroyo's DLQ limits) trips instead when

- ``max_consecutive_invalid`` messages in a row were dead-lettered, or
- over the last ``window_s`` seconds, at least ``min_messages`` messages were settled and the
  share of them that was dead-lettered exceeds ``max_invalid_ratio``.

Once tripped it stays tripped (the workflow stops consuming, logs why at ERROR and reports
not ready) until the daemon is restarted. Only dead letters count as invalid: a handler failure
that is retried is not one (until its last attempt).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from payler.clock import Clock


@dataclass(frozen=True, slots=True)
class BreakerLimits:
    """The limits; a limit left ``None`` is not checked."""

    max_invalid_ratio: float | None = None
    max_consecutive_invalid: int | None = None
    window_s: float = 60.0
    min_messages: int = 20

    @property
    def enabled(self) -> bool:
        return self.max_invalid_ratio is not None or self.max_consecutive_invalid is not None


class Breaker:
    """Counts settled messages and trips on :class:`BreakerLimits` (see the module docstring)."""

    def __init__(self, limits: BreakerLimits, clock: Clock) -> None:
        self.limits = limits
        self.clock = clock
        #: Why it tripped; ``None`` while it has not.
        self.tripped: str | None = None
        self.consecutive = 0
        # One bucket per second: [second, settled, invalid]. Bounded by the window's length.
        self._buckets: deque[list[int]] = deque()

    def record(self, invalid: bool) -> bool:
        """Count one settled message; return whether the breaker is (now) tripped."""
        if self.tripped is not None:
            return True
        if not self.limits.enabled:
            return False
        second = self.clock.now_ms() // 1000
        if self._buckets and self._buckets[-1][0] == second:
            bucket = self._buckets[-1]
        else:
            bucket = [second, 0, 0]
            self._buckets.append(bucket)
        bucket[1] += 1
        bucket[2] += int(invalid)
        self.consecutive = self.consecutive + 1 if invalid else 0
        limits = self.limits
        if limits.max_consecutive_invalid is not None and (
            self.consecutive >= limits.max_consecutive_invalid
        ):
            self.tripped = f"{self.consecutive} messages in a row were dead-lettered"
            self.tripped += f" (max_consecutive_invalid: {limits.max_consecutive_invalid})"
            return True
        if invalid and limits.max_invalid_ratio is not None:
            oldest = second - int(limits.window_s) + 1
            while self._buckets and self._buckets[0][0] < oldest:
                self._buckets.popleft()
            settled = sum(b[1] for b in self._buckets)
            dead = sum(b[2] for b in self._buckets)
            if settled >= limits.min_messages and dead / settled > limits.max_invalid_ratio:
                self.tripped = (
                    f"{dead} of the last {settled} messages were dead-lettered within "
                    f"{limits.window_s:g} s (max_invalid_ratio: {limits.max_invalid_ratio:g})"
                )
                return True
        return False


__all__ = ["Breaker", "BreakerLimits"]
