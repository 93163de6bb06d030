"""Consuming one queue: a prefetch window sized to a byte budget, and refused messages handed
back after a backoff.

**Bytes in flight.** RabbitMQ's prefetch counts messages (it does not implement
``prefetch_size``), and pushes a consumer as many as its window allows: with the default window
of 200, ten 50 MB bodies arrive together. :class:`PrefetchWindow` sizes the window to a byte
budget instead: ``budget // largest body seen lately`` messages (at least 1, at most the
configured ``prefetch``), where "lately" is the last :data:`RECENT_BATCHES` batches. A consumer
starts with a window of 1 (slow start: the first body tells the size), and batches are also cut
at the budget. The bound this gives, exactly:

- while bodies are no larger than the largest of the last batches, the bodies delivered and not
  yet acknowledged take at most ``max(budget, one body)`` bytes;
- when larger bodies start to arrive, at most one window of them (its size chosen for the
  smaller ones) is in flight before the window shrinks to fit.

RabbitMQ applies a new ``basic.qos`` only to consumers created after it, so a resize cancels the
consumer and consumes again on the same channel (messages in hand stay valid; the new window is
reduced by those still waiting in the inbox). It grows only when it can at least double (or
reach ``prefetch``), so that varying sizes do not re-consume on every batch.

**Handing back.** A message the handler refused for now (a destination that refuses it for the
moment, say) is not nacked at once: RabbitMQ would redeliver it at once, thousands of times a
second. It is held, unacknowledged, for a backoff that grows with each refusal of the same
payload id (:class:`~payler.backoff.Attempts`) up to a cap, then nacked with requeue. Held
messages keep their place in the prefetch window — which bounds how many can be held, and stops
consumption when every message in the window is refused (backpressure) — but not their bodies:
only the delivery tag is kept. (A resize starts a new window, in which the messages held under
the old one do not count: they are released within the backoff's cap.) Other messages flow
meanwhile. On a restart the count starts again (it lives in the broker object), and competing
consumers count apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Sequence

import aiormq
from aiormq.abc import AbstractChannel, DeliveredMessage

from payler.backoff import Attempts, Backoff
from payler.clock import Clock
from payler.drivers.base import Rejection
from payler.errors import TransientError
from payler.payload import Payload

log = logging.getLogger("payler.rabbitmq")

#: The window is sized to the largest body of this many recent batches.
RECENT_BATCHES = 16
#: What aiormq raises on a channel or connection that is gone.
_LOST = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


class PrefetchWindow:
    """How many messages a consumer may have unacknowledged (see the module docstring)."""

    def __init__(self, limit: int, budget_bytes: int) -> None:
        self.limit = max(1, limit)
        self.budget_bytes = max(1, budget_bytes)
        #: The window in force: 1 until the first bodies are seen.
        self.size = 1
        self._recent: deque[int] = deque(maxlen=RECENT_BATCHES)

    def observe(self, body_sizes: Iterable[int]) -> None:
        """Note the body sizes of one batch."""
        self._recent.append(max(body_sizes, default=0))

    def wanted(self) -> int:
        """The window that fits the budget, for bodies as large as the recent ones."""
        largest = max(self._recent, default=0)
        return max(1, min(self.limit, self.budget_bytes // max(1, largest)))

    def resize_to(self) -> int | None:
        """The window to switch to now, or None to keep the one in force."""
        wanted = self.wanted()
        if wanted < self.size or (wanted > self.size and wanted >= min(2 * self.size, self.limit)):
            return wanted
        return None


class Consumer:
    """One queue consumed on one channel, its deliveries collected in an inbox.

    ``lost`` is set when the broker cancels the consumer (the queue was deleted, a node failed
    over); the caller also sets it when the channel closes.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        *,
        window: PrefetchWindow,
        lost: asyncio.Event,
        attempts: Attempts,
        backoff: Backoff,
        clock: Clock,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.window = window
        self.lost = lost
        self.attempts = attempts
        self.backoff = backoff
        self.clock = clock
        self.inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        self._tag: str | None = None
        self._held: dict[int, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self.channel.on_consumer_cancel_callbacks.add(self._on_cancel)
        await self._consume(self.window.size)

    async def _consume(self, prefetch: int) -> None:
        await self.channel.basic_qos(prefetch_count=prefetch)
        ok = await self.channel.basic_consume(self.queue, self._on_message)
        self._tag = ok.consumer_tag

    async def _on_message(self, message: DeliveredMessage) -> None:
        self.inbox.put_nowait(message)

    async def _on_cancel(self, _frame: object) -> None:
        # The broker cancelled the consumer, the channel staying open: a loss to restart from.
        self.lost.set()

    async def next_batch(self, stop: asyncio.Event, limit: int) -> list[DeliveredMessage]:
        """Wait for one message (or ``stop``, or ``lost``), then take whatever else has arrived,
        up to ``limit`` messages and the window's byte budget."""
        inbox = self.inbox
        if inbox.empty():
            getter = asyncio.ensure_future(inbox.get())
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.lost.wait())]
            await asyncio.wait([getter, *waiters], return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if not getter.done():
                getter.cancel()
                return []
            batch = [getter.result()]
        else:
            batch = [inbox.get_nowait()]
        size = len(batch[0].body)
        while len(batch) < limit and not inbox.empty() and size < self.window.budget_bytes:
            batch.append(inbox.get_nowait())
            size += len(batch[-1].body)
        self.window.observe(len(m.body) for m in batch)
        return batch

    async def settle(
        self,
        messages: Sequence[DeliveredMessage],
        payloads: Sequence[Payload],
        rejections: dict[str, Rejection],
    ) -> None:
        """Acknowledge what was taken, reject what was refused for good, hold what was refused
        for now; then resize the window if the bodies call for it."""
        try:
            if not rejections and not self._held:
                # One acknowledgement for the batch (and for nothing held: ``multiple`` would
                # acknowledge a held message too, whose delivery tag is lower).
                await self.channel.basic_ack(_tag(messages[-1]), multiple=True)
                if len(self.attempts):
                    for payload in payloads:
                        self.attempts.succeeded(payload.id)
            else:
                for message, payload in zip(messages, payloads, strict=True):
                    rejection = rejections.get(payload.id)
                    if rejection is None or rejection.permanent:
                        self.attempts.succeeded(payload.id)
                    if rejection is None:
                        await self.channel.basic_ack(_tag(message))
                    elif rejection.permanent:
                        await self.channel.basic_nack(_tag(message), requeue=False)
                    else:
                        self._hold(_tag(message), payload.id, rejection.reason)
            resize = self.window.resize_to()
            if resize is not None:
                await self._resize(resize)
        except _LOST as exc:
            raise TransientError(
                f"could not acknowledge {len(messages)} messages of {self.queue!r} "
                f"(they will be redelivered): {type(exc).__name__}: {exc}"
            ) from exc

    async def _resize(self, window: int) -> None:
        """Consume again with ``window``: RabbitMQ applies a prefetch to new consumers only."""
        if self._tag is not None:
            # Deliveries sent before the CancelOk reach the inbox before it returns.
            await self.channel.basic_cancel(self._tag)
            self._tag = None
        # What waits in the inbox was delivered to the old consumer: it counts in the window.
        prefetch = max(1, window - self.inbox.qsize())
        log.debug("queue %r: prefetch window %d -> %d", self.queue, self.window.size, window)
        await self._consume(prefetch)
        self.window.size = window

    def _hold(self, delivery_tag: int, key: str, reason: str) -> None:
        delay_s = self.backoff.delay_s(self.attempts.failed(key))
        if not self._held:
            log.warning(
                "queue %r: message %s refused for now (%s): handed back after %.1f s; every "
                "message refused for now is held for a backoff (up to %.0f s) before it is "
                "redelivered",
                self.queue, key, reason, delay_s, self.backoff.max_s,
            )  # fmt: skip
        task = asyncio.create_task(self._hand_back(delivery_tag, delay_s))
        self._held[delivery_tag] = task
        task.add_done_callback(lambda _: self._held.pop(delivery_tag, None))

    async def _hand_back(self, delivery_tag: int, delay_s: float) -> None:
        await self.clock.sleep(delay_s)
        try:
            await self.channel.basic_nack(delivery_tag, requeue=True)
        except _LOST:
            # The channel is gone: the broker has given the message back already.
            self.lost.set()

    @property
    def held(self) -> int:
        """How many messages are held for their backoff."""
        return len(self._held)

    async def close(self) -> None:
        """Stop consuming; held messages go back to the queue when the channel closes."""
        for task in list(self._held.values()):
            task.cancel()
        if self._tag is not None:
            with contextlib.suppress(Exception):  # a lost channel cannot cancel, nor needs to
                await self.channel.basic_cancel(self._tag)
            self._tag = None


def _tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    if tag is None:  # only a basic.get-empty has none; a consumer never sees one
        raise TransientError("a delivered message has no delivery tag")
    return tag
