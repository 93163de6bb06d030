"""An in-memory broker: for users' own tests and fast unit tests of the core.

``memory://NAME`` is a set of named queues shared by every driver of this process that names the
same broker. It keeps RabbitMQ's rules where they matter to payler: publishing to a queue that does
not exist is a permanent rejection (unroutable), a served batch is acknowledged only after the
handler returned, and what the handler raised for goes back to the head of the queue. What the
handler rejected for now goes back too, after a backoff (:data:`HAND_BACK_BACKOFF`, growing per
message): never at once, which would be a retry storm. Meanwhile the rest of the queue flows.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from payler.backoff import Attempts, Backoff
from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.base import Broker
from payler.payload import Payload
from payler.scheduling import TIMESTAMP_RESOLUTION_MS


class _Queues:
    def __init__(self) -> None:
        self.messages: dict[str, deque[Payload]] = {}
        self.changed = asyncio.Event()
        self.refuse: dict[str, Callable[[Payload], str | None]] = {}


_brokers: dict[str, _Queues] = {}

#: How long a message the handler rejected for now is held before it is handed over again.
HAND_BACK_BACKOFF = Backoff(base_s=0.5, max_s=30.0)


class MemoryBroker(Broker):
    """A broker in this process (see the module docstring).

    ``refuse`` lets a test make a destination refuse payloads for good: destination name →
    a function of the payload giving the reason (``{"dlq": lambda p: "too large"}``), or
    ``None`` from that function to take the payload after all.
    """

    refuse: dict[str, Callable[[Payload], str | None]]
    #: Timestamps as RabbitMQ's: whole seconds (the rules payler's core is tested with).
    timestamp_slack_ms = TIMESTAMP_RESOLUTION_MS

    async def connect(self) -> None:
        name = self.url.partition("://")[2] or "default"
        self._queues = _brokers.setdefault(name, _Queues())
        self.refuse = self._queues.refuse

    async def close(self) -> None:
        pass

    @classmethod
    def forget_all(cls) -> None:
        """Drop every in-memory broker of this process (between tests)."""
        _brokers.clear()

    async def ensure_queue(self, name: str) -> None:
        self._queues.messages.setdefault(name, deque())

    def publish(self, queue: str, payload: Payload) -> None:
        """Put ``payload`` on ``queue`` as a producer would (the queue is created if missing)."""
        self._queues.messages.setdefault(queue, deque()).append(payload)
        self._queues.changed.set()

    def messages(self, queue: str) -> list[Payload]:
        """What is waiting on ``queue`` now, oldest first."""
        return list(self._queues.messages.get(queue, ()))

    async def wait_for(self, queue: str, count: int, timeout_s: float = 5.0) -> list[Payload]:
        """Wait until ``queue`` holds at least ``count`` messages; raise TimeoutError after."""
        async with asyncio.timeout(timeout_s):
            while len(self._queues.messages.get(queue, ())) < count:
                self._queues.changed.clear()
                await self._queues.changed.wait()
        return self.messages(queue)

    async def serve(self, handler: Handler, stop: asyncio.Event) -> None:
        if self.queue is None:
            raise ValueError("this broker was opened without a queue to serve")
        await self.ensure_queue(self.queue)
        pending = self._queues.messages[self.queue]
        # Handed back for now: (when to hand it over again, tie-breaker, payload).
        held: list[tuple[int, int, Payload]] = []
        order = itertools.count()
        attempts = Attempts()
        try:
            while not stop.is_set():
                now_ms = self.clock.now_ms()
                while held and held[0][0] <= now_ms:
                    pending.append(heapq.heappop(held)[2])
                if not pending:
                    wake_s = (held[0][0] - now_ms) / 1000 if held else None
                    await self._wait(stop, wake_s)
                    continue
                batch = [
                    pending.popleft().model_copy(
                        update={
                            "source": self.queue,
                            "destination": "",
                            "due_ms": now_ms,
                            "created_ms": now_ms,
                        }
                    )
                    for _ in range(min(self.batch_size, len(pending)))
                ]
                self.metrics.incr("received", len(batch))
                try:
                    rejections = {r.payload_id: r for r in await handler(batch)}
                except BaseException:
                    pending.extendleft(reversed(batch))
                    raise
                for payload in batch:
                    rejection = rejections.get(payload.id)
                    if rejection is None or rejection.permanent:
                        attempts.succeeded(payload.id)
                        continue
                    delay_s = HAND_BACK_BACKOFF.delay_s(attempts.failed(payload.id))
                    again_ms = self.clock.now_ms() + round(delay_s * 1000)
                    heapq.heappush(held, (again_ms, next(order), payload))
        finally:
            # Held messages were never acknowledged: they are the queue's again.
            pending.extendleft(reversed([p for _, _, p in sorted(held)]))

    async def _wait(self, stop: asyncio.Event, timeout_s: float | None) -> None:
        """Until a message is published, ``stop`` is set, or ``timeout_s`` (on the clock)."""
        self._queues.changed.clear()
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._queues.changed.wait()),
            asyncio.ensure_future(stop.wait()),
        ]
        if timeout_s is not None:
            waiters.append(asyncio.ensure_future(self.clock.sleep(timeout_s)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def peek(self, queue: str, limit: int) -> list[Payload]:
        return [p.model_copy(update={"source": queue}) for p in self.messages(queue)[:limit]]

    async def take(
        self, queue: str, limit: int, select: Callable[[Payload], bool], handler: Handler
    ) -> int:
        waiting = self._queues.messages.get(queue, deque())
        chosen = [p for p in list(waiting)[:limit] if select(p)]
        if not chosen:
            return 0
        rejected = {r.payload_id for r in await handler(chosen)}
        taken = [p for p in chosen if p.id not in rejected]
        for payload in taken:
            waiting.remove(payload)
        return len(taken)

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        rejections = []
        for payload, headers in items:
            queue = self._queues.messages.get(payload.destination)
            if queue is None and not dead_letters:
                reason = f"unroutable: no queue is bound to {payload.destination!r} (NO_ROUTE 312)"
                rejections.append(Rejection(payload.id, reason, permanent=True))
                continue
            refusal = self.refuse.get(payload.destination)
            refused = refusal(payload) if refusal is not None else None
            if refused is not None:
                rejections.append(Rejection(payload.id, refused, permanent=True))
                continue
            queue = self._queues.messages.setdefault(payload.destination, deque())
            queue.append(payload.model_copy(update={"headers": dict(headers)}))
        self._queues.changed.set()
        return rejections
