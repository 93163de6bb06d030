"""RabbitMQ, through aio-pika (the connection and its channels) and aiormq (consuming and
publishing on those channels, with properties exactly as they are on the wire).

- Reconnecting, in one place: when the connection or a channel is lost, ``serve`` and
  ``process`` raise :class:`~payler.errors.TransientError` and the runtime restarts the workflow
  with backoff: a fresh connection, a fresh consumer, nothing half-restored. (aio-pika's robust
  connection restores consumers behind our back, with the delivery tags of messages in hand gone
  stale; one explicit mechanism is easier to reason about and to test.) Messages unacknowledged
  at the loss go back to the queue: at least once, nothing lost.
- Consuming (:mod:`.amqp.consumer`): a prefetch window sized to a byte budget
  (``prefetch_bytes``, :data:`DEFAULT_PREFETCH_BYTES` unless the URL's query says otherwise),
  messages taken in natural batches (whatever has arrived, up to ``batch_size`` and the budget,
  without waiting for more) and acknowledged once per batch after the handler returned. A message
  the handler refused for now is handed back after a backoff, never at once.
- Reading (:mod:`.amqp.messages`, :mod:`.amqp.tolerant`): a message payler cannot read — a value
  pamqp cannot decode, a property that is not UTF-8 — never kills the connection, and comes out
  as a payload with a ``defect``, which the workflow dead-letters alone. Timestamps are read as
  the seconds AMQP says they are, after 2106 too.
- Publishing with publisher confirms and ``mandatory``: an unroutable message comes back as a
  permanent rejection; the publishes of a batch are pipelined (sent together, confirmed
  together). Each payload is checked before anything is sent — a value AMQP cannot carry, a
  content header beyond the connection's ``frame_max`` — and refused alone. Messages go out
  persistent unless the payload's ``delivery_mode`` is 1.
- The publish of a batch is bounded by ``publish_timeout_s``. If the broker confirmed none of
  it by then, that is an outage (:class:`~payler.errors.TransientError`, outcome unknown); if it
  confirmed some, those stand and the others come back refused for now (retried; their outcome
  is unknown, so they may arrive twice): raising would have the confirmed ones published again.
  A connection blocked by a resource alarm (:mod:`.amqp.alarms`) fails its publishes at once.
- An existing queue is used as it is, whatever its arguments (Payler 0.2.0 declared
  ``payler-jobs`` non-durable; users declare theirs durable, with TTLs or DLXs): the queue is
  looked up passively and declared (durable) only when it does not exist, so payler never fails
  with PRECONDITION_FAILED on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from yarl import URL

from payler.backoff import Attempts, Backoff
from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.amqp import tolerant
from payler.drivers.brokers.amqp.alarms import Alarm
from payler.drivers.brokers.amqp.consumer import Consumer, PrefetchWindow
from payler.drivers.brokers.amqp.messages import (
    ENCODING_ERRORS,
    ORIGINAL_HEADERS,
    FrameTooLarge,
    Outgoing,
    dead_letter_outgoing,
    to_outgoing,
    to_payload,
)
from payler.drivers.brokers.base import Broker
from payler.errors import ConfigError, StartupError, TransientError
from payler.payload import Payload
from payler.scheduling import TIMESTAMP_RESOLUTION_MS
from payler.urls import mask_url, redact

__all__ = ["ORIGINAL_HEADERS", "RabbitMQBroker"]

log = logging.getLogger("payler.rabbitmq")

#: How long the first connection may take before start-up fails.
CONNECT_TIMEOUT_S = 10.0
#: How long closing may take (a connection blocked by an alarm answers slowly, or never).
CLOSE_TIMEOUT_S = 5.0
#: The default byte budget of a consumer's prefetch window (see :mod:`.amqp.consumer`).
DEFAULT_PREFETCH_BYTES = 32 * 1024 * 1024
#: The backoff of a message handed back for now: 0.5 s, doubling, at most 30 s.
HANDBACK_BACKOFF = Backoff(base_s=0.5, max_s=30.0)
#: Why a payload was not published: those before it were not confirmed in time.
_NOT_SENT = "not sent: the publishes before it were not confirmed in time (retried)"
#: payler's own settings in an ``amqp://`` URL's query (the rest is aiormq's).
_URL_SETTINGS = ("prefetch_bytes",)


class RabbitMQBroker(Broker):
    """A RabbitMQ broker (see the module docstring)."""

    #: AMQP timestamps count whole seconds.
    timestamp_slack_ms = TIMESTAMP_RESOLUTION_MS

    _connection: AbstractConnection | None = None
    _publish_channel: AbstractChannel | None = None

    def __init__(self, url: str, *, prefetch_bytes: int | None = None, **settings: Any) -> None:
        super().__init__(url, **settings)
        self._connect_url, url_budget = _split_url(url)
        #: The byte budget of the consumer's prefetch window.
        self.prefetch_bytes = prefetch_bytes or url_budget or DEFAULT_PREFETCH_BYTES
        #: The backoff of messages handed back for now (as a source).
        self.handback_backoff = HANDBACK_BACKOFF
        self._attempts = Attempts()
        self._alarm = Alarm(mask_url(url), self.clock)

    async def connect(self) -> None:
        tolerant.install()
        self._alarm = Alarm(mask_url(self.url), self.clock)  # per connection: blocked or not
        try:
            # aio-pika's own timeout does not cover its wait for an unblocked connection.
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                self._connection = await aio_pika.connect(
                    self._connect_url,
                    timeout=CONNECT_TIMEOUT_S,
                    client_properties={"connection_name": "payler"},
                )
                if self._connection.transport is not None:
                    self._alarm.watch(self._connection.transport.connection)
                self._publish_channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                if self.exchange:
                    await self._check_exchange(self.exchange)
        except StartupError:
            await self.close()
            raise
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            await self.close()
            raise StartupError(self._cannot_connect(exc)) from exc

    def _cannot_connect(self, exc: BaseException) -> str:
        text = _describe(exc)
        if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.OpenOk" in text:
            # The broker answered Connection.Open with Connection.Close: the virtual host does
            # not exist, or the user has no permissions on it (aiormq loses the reply text).
            url = URL(self._connect_url)
            vhost = "/" if url.path in ("", "/") else url.path[1:].replace("%2F", "/")
            user = url.user or "guest"
            return (
                f"RabbitMQ at {mask_url(self.url)} refused to open virtual host {vhost!r}: it "
                f"does not exist, or user {user!r} has no permissions on it (see `rabbitmqctl "
                f"list_vhosts` and `rabbitmqctl list_permissions -p {vhost}`)"
            )
        return f"cannot connect to RabbitMQ at {mask_url(self.url)}: {redact(text, self.url)}"

    async def close(self) -> None:
        connection, self._connection, self._publish_channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):  # closing a lost connection must not fail
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await connection.close()

    @property
    def connection(self) -> AbstractConnection:
        if self._connection is None:
            raise RuntimeError("the RabbitMQ broker is not connected (use it as `async with`)")
        return self._connection

    async def _check_exchange(self, name: str) -> None:
        async with self.connection.channel() as probe:
            try:
                await probe.get_exchange(name, ensure=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                raise StartupError(
                    f"RabbitMQ at {mask_url(self.url)} has no exchange {name!r} "
                    '(declare it, or publish to the default exchange: exchange: "")'
                ) from None

    async def ensure_queue(self, name: str) -> None:
        # A passive declare that fails closes its channel: use a throwaway one.
        async with self.connection.channel() as probe:
            try:
                await probe.declare_queue(name, passive=True)
                return
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
        async with self.connection.channel() as channel:
            await channel.declare_queue(name, durable=True)
        log.info("declared durable queue %r (it did not exist)", name)

    # -- as a source ---------------------------------------------------------------------------

    async def serve(self, handler: Handler, stop: asyncio.Event) -> None:
        if self.queue is None:
            raise ValueError("this broker was opened without a queue to serve")
        await self.ensure_queue(self.queue)
        lost = asyncio.Event()
        async with self.connection.channel() as channel:
            channel.close_callbacks.add(lambda *_: lost.set())
            consumer = Consumer(
                await channel.get_underlay_channel(),
                self.queue,
                window=PrefetchWindow(self.prefetch, self.prefetch_bytes),
                lost=lost,
                attempts=self._attempts,
                backoff=self.handback_backoff,
                clock=self.clock,
            )
            try:
                await consumer.start()
                while not stop.is_set():
                    batch = await consumer.next_batch(stop, self.batch_size)
                    if lost.is_set():
                        raise TransientError(
                            f"lost the RabbitMQ channel or consumer of {self.queue!r} "
                            f"({len(batch) + consumer.held} messages in hand will be redelivered)"
                        )
                    if batch:
                        await self._handle(batch, handler, consumer)
                    # Let the bodies go before the next ones arrive (the window sized to a byte
                    # budget counts on it).
                    batch.clear()
            finally:
                # Unacknowledged messages (the inbox and the held ones included) go back to the
                # queue when the channel closes: nothing held here is lost.
                await consumer.close()

    async def _handle(
        self, messages: list[DeliveredMessage], handler: Handler, consumer: Consumer
    ) -> None:
        received_ms = self.clock.now_ms()
        queue = self.queue or ""
        payloads = [to_payload(m, queue, received_ms) for m in messages]
        self.metrics.incr("received", len(messages))
        rejections = {r.payload_id: r for r in await handler(payloads)}
        await consumer.settle(messages, payloads, rejections)

    # -- looking into a queue (the admin operations) ----------------------------------------------

    async def peek(self, queue: str, limit: int) -> list[Payload]:
        """Get up to ``limit`` messages without acknowledging them; closing the channel puts
        them back where they were (RabbitMQ marks them redelivered: the only trace)."""
        async with self._held(queue, limit) as held:
            return [payload for _, payload in held]

    async def take(
        self, queue: str, limit: int, select: Callable[[Payload], bool], handler: Handler
    ) -> int:
        async with self._held(queue, limit) as held:
            chosen = [(m, p) for m, p in held if select(p)]
            if not chosen:
                return 0
            rejected = {r.payload_id for r in await handler([p for _, p in chosen])}
            taken = 0
            for message, payload in chosen:
                if payload.id not in rejected and message.delivery_tag is not None:
                    await message.channel.basic_ack(message.delivery_tag)
                    taken += 1
            return taken

    @contextlib.asynccontextmanager
    async def _held(
        self, queue: str, limit: int
    ) -> AsyncIterator[list[tuple[DeliveredMessage, Payload]]]:
        """Up to ``limit`` messages of ``queue``, held unacknowledged on a channel of their own;
        every one not acknowledged in the block goes back to the queue when it closes. Read as
        the consumer reads them (:func:`to_payload`: never raises, whatever a message holds)."""
        async with self.connection.channel() as channel:
            try:
                await channel.get_queue(queue, ensure=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                yield []
                return
            underlay = await channel.get_underlay_channel()
            received_ms = self.clock.now_ms()
            held: list[tuple[DeliveredMessage, Payload]] = []
            while len(held) < limit:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    message = await underlay.basic_get(queue, no_ack=False)
                if message.delivery_tag is None:  # Basic.GetEmpty: the queue is empty
                    break
                held.append((message, to_payload(message, queue, received_ms)))
            yield held

    # -- as a destination ----------------------------------------------------------------------

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        channel = await self._publishing_channel()
        frame_max = channel.connection.connection_tune.frame_max
        encode = dead_letter_outgoing if dead_letters else to_outgoing
        rejections, ready = [], []
        for payload, headers in items:
            try:
                ready.append((payload, encode(payload, headers, frame_max)))
            except FrameTooLarge as exc:
                rejections.append(Rejection(payload.id, f"too large for AMQP: {exc}", True))
            except ENCODING_ERRORS as exc:
                # A value AMQP cannot carry: retrying cannot help.
                rejections.append(Rejection(payload.id, f"cannot encode for AMQP: {exc}", True))
        if not ready:
            return rejections
        self._alarm.check()
        exchange = "" if dead_letters else self.exchange
        deadline = asyncio.get_running_loop().time() + self.publish_timeout_s
        answered, unconfirmed = 0, list[Payload]()
        for round_ in _rounds_of_unique_message_ids(ready):
            if unconfirmed:  # out of time: the later rounds are not sent at all
                rejections += [Rejection(p.id, _NOT_SENT) for p, _ in round_]
                continue
            refused, late = await self._publish_round(channel, exchange, round_, deadline)
            rejections += refused
            unconfirmed += late
            answered += len(round_) - len(late)
        if unconfirmed and not answered:
            raise TransientError(
                f"RabbitMQ at {mask_url(self.url)} did not confirm {len(unconfirmed)} "
                f"publish(es) within {self.publish_timeout_s:g} s: their outcome is unknown"
            )
        # The broker answers, slowly: what it confirmed is settled, the rest is retried.
        rejections += [Rejection(p.id, self._unconfirmed) for p in unconfirmed]
        self._alarm.cleared()
        return rejections

    @property
    def _unconfirmed(self) -> str:
        return (
            f"not confirmed within {self.publish_timeout_s:g} s (outcome unknown: retried, "
            "so it may arrive twice)"
        )

    async def _publishing_channel(self) -> aiormq.abc.AbstractChannel:
        if self._publish_channel is None:
            raise RuntimeError("the RabbitMQ broker is not connected (use it as `async with`)")
        try:
            return await self._publish_channel.get_underlay_channel()
        except aio_pika.exceptions.ChannelInvalidStateError as exc:
            raise TransientError(f"the RabbitMQ publishing channel is lost: {exc}") from exc

    async def _publish_round(
        self,
        channel: aiormq.abc.AbstractChannel,
        exchange: str,
        round_: list[tuple[Payload, Outgoing]],
        deadline: float,
    ) -> tuple[list[Rejection], list[Payload]]:
        """Publish together (pipelined confirms), then read each outcome: the refusals, and the
        payloads whose publish was not confirmed by ``deadline`` (loop time)."""
        sends = [
            asyncio.ensure_future(
                channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=payload.destination,
                    properties=message.properties,
                    mandatory=True,
                )
            )
            for payload, message in round_
        ]
        try:
            await self._alarm.wait(sends, deadline - asyncio.get_running_loop().time())
        finally:
            for send in sends:
                if not send.done():
                    send.cancel()  # its confirm, should it come, is ignored (and logged) by aiormq
        rejections, unconfirmed = list[Rejection](), list[Payload]()
        for (payload, _), send in zip(round_, sends, strict=True):
            if not send.done() or send.cancelled():
                unconfirmed.append(payload)
                continue
            result = send.exception()
            if result is None:
                continue
            if isinstance(result, aiormq.exceptions.PublishError):  # returned: unroutable
                rejections.append(Rejection(payload.id, _returned_reason(result, payload), True))
            elif isinstance(result, aiormq.exceptions.DeliveryError):  # nacked by the broker
                rejections.append(Rejection(payload.id, "the broker refused (nack) the publish"))
            elif isinstance(result, Exception):
                raise TransientError(
                    f"publishing to RabbitMQ failed: {_describe(result)}"
                ) from result
            else:
                raise result
        return rejections, unconfirmed


def _split_url(url: str) -> tuple[str, int | None]:
    """The URL for aio-pika (payler's own settings taken out), and ``prefetch_bytes`` if set."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _URL_SETTINGS}
    if not ours:
        return url, None
    value = ours["prefetch_bytes"]
    if not value.isdigit() or int(value) <= 0:
        raise ConfigError(
            f"broker URL {mask_url(url)!r}: prefetch_bytes must be a positive integer "
            f"(bytes), not {value!r}"
        )
    rest = urlencode([(k, v) for k, v in query if k not in _URL_SETTINGS])
    return urlunsplit(parts._replace(query=rest)), int(value)


def _rounds_of_unique_message_ids(
    ready: list[tuple[Payload, Outgoing]],
) -> list[list[tuple[Payload, Outgoing]]]:
    """Split a batch so that no message id is in flight twice at once.

    aiormq matches a returned (unroutable) message to its publish by message id: two publishes
    in flight with one id would have their outcomes mixed up. (Messages without an id get a
    random one from aiormq, so they never collide.)
    """
    rounds: list[list[tuple[Payload, Outgoing]]] = []
    seen: list[set[str]] = []
    for item in ready:
        message_id = item[1].properties.message_id
        index = 0
        if message_id is not None:
            while index < len(seen) and message_id in seen[index]:
                index += 1
        if index == len(rounds):
            rounds.append([])
            seen.append(set())
        rounds[index].append(item)
        if message_id is not None:
            seen[index].add(message_id)
    return rounds


def _returned_reason(error: aiormq.exceptions.PublishError, payload: Payload) -> str:
    frame = error.frame
    code = getattr(frame, "reply_code", None)
    text = getattr(frame, "reply_text", None) or "NO_ROUTE"
    return f"unroutable: no queue is bound to {payload.destination!r} ({text} {code or ''})".strip()


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
