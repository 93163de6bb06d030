"""Backoff: how long to wait before trying again, for every retry payler makes.

Every retry in payler has a backoff and a bound: a workflow restarted after an outage, a message
a destination refused for now, a delivery that failed. They all use :class:`Backoff`, so that no
path retries at once in a loop (a retry storm) and none waits longer than its cap.

:class:`Attempts` remembers, for a bounded number of recent keys, how often each was tried: a
source that hands a refused message back (a RabbitMQ nack, a Kafka rewind) has no delivery
count of its own to read.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: ``base_s * 2**attempt``, capped at ``max_s``.

    ``jitter`` spreads each delay over ``±jitter`` of itself, so that many retries that failed
    together do not come back together.
    """

    base_s: float = 1.0
    max_s: float = 30.0
    jitter: float = 0.2

    def delay_s(self, attempt: int) -> float:
        """The wait before retry number ``attempt + 1`` (``attempt`` 0: the first retry)."""
        exponent = min(max(attempt, 0), 62)  # 2**62 s is far past any cap: no overflow
        delay: float = min(self.max_s, self.base_s * 2.0**exponent)
        if self.jitter:
            delay *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(delay, self.max_s * (1 + self.jitter))


class Attempts:
    """How many times each of the last ``capacity`` keys was tried (least recent forgotten)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._counts: OrderedDict[str, int] = OrderedDict()

    def failed(self, key: str) -> int:
        """Count one more failure of ``key``; return how many failures came before it."""
        before = self._counts.pop(key, 0)
        self._counts[key] = before + 1
        while len(self._counts) > self.capacity:
            self._counts.popitem(last=False)
        return before

    def succeeded(self, key: str) -> None:
        """Forget ``key``: its next failure is a first one again."""
        self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)
