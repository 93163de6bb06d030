"""The driver contract every broker and storage implements.

A driver is an async context manager: ``async with driver:`` connects (and raises
:class:`~payler.errors.StartupError` if it cannot), leaving the block closes it. Between the two:

- ``serve(handler, stop)`` produces payloads from the source in batches and calls
  ``await handler(batch)`` for each, one batch at a time. The handler returns the rejections:
  the payloads it could not take. Every payload of the batch that is *not* rejected is
  acknowledged to the source only **after** the handler returned, never before; a rejected one
  is handed back (a broker requeues it, a storage reschedules it) or, when the rejection is
  permanent, dead-lettered.
  If the handler raises, nothing of the batch is acknowledged (the source will deliver it again) and
  the exception propagates. ``serve`` returns once ``stop`` is set and the batch in hand is done;
  cancelling it abandons the batch unacknowledged, which is safe (at-least-once).
- ``process(batch)`` takes payloads to this driver's destination and returns only when the
  destination has them (publisher confirm, storage write acknowledged). It returns the rejections:
  the payloads the destination refused. A payload not in the returned list is durably there. It
  raises on a failure that leaves the outcome unknown (connection lost): the caller retries the
  whole batch, which at worst delivers some twice, never loses one.

Drivers never install signal handlers and never sleep on their own clock: time comes from the
:class:`~payler.clock.Clock` they are given.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from payler.payload import Payload


@dataclass(frozen=True, slots=True)
class Rejection:
    """A payload a destination or handler did not take, and why.

    ``permanent`` rejections (unroutable, invalid) are dead-lettered; the others are retried.
    """

    payload_id: str
    reason: str
    permanent: bool = False


Handler = Callable[[Sequence[Payload]], Awaitable[Sequence[Rejection]]]


class BaseDriver(ABC):
    """A connection to a broker or a storage; see the module docstring for the contract."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise :class:`~payler.errors.StartupError` if it cannot."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection. Idempotent; never raises for a connection already lost."""

    async def serve(self, handler: Handler, stop: asyncio.Event) -> None:
        """Feed batches to ``handler`` until ``stop`` is set (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} is not a source")

    async def process(self, batch: Sequence[Payload]) -> list[Rejection]:
        """Take ``batch`` to the destination (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} is not a destination")
