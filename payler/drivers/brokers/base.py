"""What payler's workflows need of a broker, beyond the driver contract.

A :class:`Broker` is a :class:`~payler.drivers.base.BaseDriver` that, as a source, consumes one
queue (``serve``) and, as a destination, publishes each payload to ``payload.destination``
(``process``), confirmed and mandatory: a payload the broker cannot route is *rejected*
(permanently), never dropped. Published payloads lose their scheduling headers
(:data:`~payler.scheduling.SCHEDULING_HEADERS`), so a message routed back into payler is not
delayed twice.

Payloads a broker's ``serve`` produces are fresh from the source: their ``destination`` is empty
and their ``due_ms`` is the time they were received; the workflow schedules them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from payler.clock import Clock, SystemClock
from payler.drivers.base import BaseDriver
from payler.metrics import Metrics
from payler.payload import Payload

#: Headers added to a dead-lettered message: why, from where, and when (epoch ms).
DEAD_LETTER_REASON = "x-payler-dead-letter-reason"
DEAD_LETTER_SOURCE = "x-payler-dead-letter-source"
DEAD_LETTERED_AT = "x-payler-dead-lettered-at"


class Broker(BaseDriver):
    """A message broker driver (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        queue: str | None = None,
        prefetch: int = 200,
        batch_size: int = 100,
        exchange: str = "",
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.url = url
        self.queue = queue
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.exchange = exchange
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics or Metrics()

    @abstractmethod
    async def ensure_queue(self, name: str) -> None:
        """Make sure queue ``name`` exists: use it as it is, or declare it durable if missing."""

    @abstractmethod
    async def dead_letter(self, items: Sequence[tuple[Payload, str]], queue: str) -> None:
        """Publish each payload, headers intact plus the reason, to dead-letter ``queue``.

        Returns once the broker confirmed all; raises :class:`~payler.errors.TransientError`
        otherwise (the caller must then not acknowledge the originals).
        """


def dead_letter_headers(payload: Payload, reason: str, now_ms: int) -> dict[str, object]:
    """The headers of a dead-lettered copy of ``payload``."""
    return {
        **payload.headers,
        DEAD_LETTER_REASON: reason,
        DEAD_LETTER_SOURCE: payload.source,
        DEAD_LETTERED_AT: now_ms,
    }
