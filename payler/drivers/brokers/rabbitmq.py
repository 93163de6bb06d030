"""RabbitMQ, through aio-pika.

- Reconnecting, in one place: when the connection or a channel is lost, ``serve`` and
  ``process`` raise :class:`~payler.errors.TransientError` and the runtime restarts the workflow
  with backoff: a fresh connection, a fresh consumer, nothing half-restored. (aio-pika's robust
  connection restores consumers behind our back, with the delivery tags of messages in hand gone
  stale; one explicit mechanism is easier to reason about and to test.) Messages unacknowledged
  at the loss go back to the queue: at least once, nothing lost.
- Consuming with a prefetch window; messages taken in natural batches (whatever has arrived, up
  to ``batch_size``, without waiting for more), and acknowledged once per batch after the handler
  returned.
- Publishing with publisher confirms and ``mandatory``: an unroutable message comes back as a
  permanent rejection; the publishes of a batch are pipelined (sent together, confirmed together).
- An existing queue is used as it is, whatever its arguments (Payler 0.2.0 declared
  ``payler-jobs`` non-durable; users declare theirs durable, with TTLs or DLXs): the queue is
  looked up passively and declared (durable) only when it does not exist, so payler never fails
  with PRECONDITION_FAILED on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import pamqp.encode
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    DeliveryMode,
)

from payler import codec
from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.base import Broker
from payler.errors import StartupError, TransientError
from payler.identity import spool_id
from payler.payload import MessageProperties, Payload
from payler.scheduling import TIMESTAMP_RESOLUTION_MS
from payler.urls import mask_url, redact

log = logging.getLogger("payler.rabbitmq")

#: On a dead-lettered message whose headers AMQP cannot carry: the headers as JSON text.
ORIGINAL_HEADERS = "x-payler-original-headers"

#: AMQP routing keys are short strings: at most 255 bytes.
MAX_ROUTING_KEY_BYTES = 255
#: How long the first connection may take before start-up fails.
CONNECT_TIMEOUT_S = 10.0


class RabbitMQBroker(Broker):
    """A RabbitMQ broker (see the module docstring)."""

    #: AMQP timestamps count whole seconds.
    timestamp_slack_ms = TIMESTAMP_RESOLUTION_MS

    _connection: AbstractConnection | None = None
    _publish_channel: AbstractChannel | None = None

    async def connect(self) -> None:
        try:
            self._connection = await aio_pika.connect(
                self.url,
                timeout=CONNECT_TIMEOUT_S,
                client_properties={"connection_name": "payler"},
            )
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
            raise StartupError(
                f"cannot connect to RabbitMQ at {mask_url(self.url)}: "
                f"{redact(_describe(exc), self.url)}"
            ) from exc

    async def close(self) -> None:
        connection, self._connection, self._publish_channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):  # closing a lost connection must not fail
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
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        lost = asyncio.Event()
        async with self.connection.channel() as channel:
            channel.close_callbacks.add(lambda *_: lost.set())
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await channel.get_queue(self.queue, ensure=False)

            async def on_message(message: AbstractIncomingMessage) -> None:
                inbox.put_nowait(message)

            consumer_tag = await queue.consume(on_message)
            # The broker cancels the consumer (the channel staying open) when the queue is
            # deleted or fails over: that, too, is a loss to restart from.
            underlay = await channel.get_underlay_channel()

            async def on_cancel(_frame: object) -> None:
                lost.set()

            underlay.on_consumer_cancel_callbacks.add(on_cancel)
            try:
                while not stop.is_set():
                    batch = await _next_batch(inbox, stop, lost, self.batch_size)
                    if lost.is_set():
                        raise TransientError(
                            f"lost the RabbitMQ channel or consumer of {self.queue!r} "
                            f"({len(batch)} messages in hand will be redelivered)"
                        )
                    if batch:
                        await self._handle(batch, handler)
            finally:
                # Unacknowledged messages (the inbox included) go back to the queue when the
                # channel closes: nothing held here is lost.
                with contextlib.suppress(Exception):
                    await queue.cancel(consumer_tag)

    async def _handle(self, messages: list[AbstractIncomingMessage], handler: Handler) -> None:
        received_ms = self.clock.now_ms()
        payloads = [self._decode(m, received_ms) for m in messages]
        self.metrics.incr("received", len(messages))
        rejections = {r.payload_id: r for r in await handler(payloads)}
        try:
            if not rejections:
                await messages[-1].ack(multiple=True)
                return
            for message, payload in zip(messages, payloads, strict=True):
                rejection = rejections.get(payload.id)
                if rejection is None:
                    await message.ack()
                else:
                    await message.nack(requeue=not rejection.permanent)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.MessageProcessError) as exc:
            raise TransientError(
                f"could not acknowledge {len(messages)} messages of {self.queue!r} "
                f"(they will be redelivered): {_describe(exc)}"
            ) from exc

    def _decode(
        self, message: AbstractIncomingMessage, received_ms: int, queue: str | None = None
    ) -> Payload:
        queue = queue or self.queue or ""
        payload = Payload(
            id="",
            body=message.body,
            headers=dict(message.headers or {}),
            properties=MessageProperties(
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                correlation_id=message.correlation_id,
                message_id=message.message_id,
                reply_to=message.reply_to,
                type=message.type,
                priority=message.priority,
                timestamp_ms=_epoch_ms(message.timestamp),
                delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
                expiration=_expiration_ms(message.expiration),
                app_id=message.app_id,
            ),
            source=queue,
            destination="",
            due_ms=received_ms,
            created_ms=received_ms,
        )
        # The digest (and so the metadata's JSON) is needed only without a message id.
        meta = "" if message.message_id else payload.meta_json()
        payload.id = spool_id("amqp", queue, message.message_id, payload.body, meta)
        return payload

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
                if payload.id not in rejected:
                    await message.ack()
                    taken += 1
            return taken

    @contextlib.asynccontextmanager
    async def _held(
        self, queue: str, limit: int
    ) -> AsyncIterator[list[tuple[AbstractIncomingMessage, Payload]]]:
        """Up to ``limit`` messages of ``queue``, held unacknowledged on a channel of their own;
        every one not acknowledged in the block goes back to the queue when it closes."""
        async with self.connection.channel() as channel:
            try:
                declared = await channel.get_queue(queue, ensure=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                yield []
                return
            received_ms = self.clock.now_ms()
            held: list[tuple[AbstractIncomingMessage, Payload]] = []
            while len(held) < limit:
                message = await declared.get(no_ack=False, fail=False, timeout=CONNECT_TIMEOUT_S)
                if message is None:
                    break
                held.append((message, self._decode(message, received_ms, queue)))
            yield held

    # -- as a destination ----------------------------------------------------------------------

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        exchange = await self._exchange("" if dead_letters else self.exchange)
        rejections, ready = [], []
        for payload, headers in items:
            try:
                _check_routing_key(payload.destination)
                message = (_dead_letter_message if dead_letters else _encode)(payload, headers)
            except (TypeError, ValueError, OverflowError, struct.error) as exc:
                # A value AMQP cannot carry: retrying cannot help.
                rejections.append(Rejection(payload.id, f"cannot encode for AMQP: {exc}", True))
                continue
            ready.append((payload, message))
        for round_ in _rounds_of_unique_message_ids(ready):
            rejections += await self._publish_round(exchange, round_)
        return rejections

    async def _publish_round(
        self, exchange: AbstractExchange, round_: list[tuple[Payload, aio_pika.Message]]
    ) -> list[Rejection]:
        """Publish together (pipelined confirms), then read each outcome."""
        results = await asyncio.gather(
            *(exchange.publish(message, payload.destination) for payload, message in round_),
            return_exceptions=True,
        )
        rejections = []
        for (payload, _), result in zip(round_, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if isinstance(result, aio_pika.exceptions.PublishError):  # returned: unroutable
                rejections.append(Rejection(payload.id, _returned_reason(result, payload), True))
            elif isinstance(result, aio_pika.exceptions.DeliveryError):  # nacked by the broker
                rejections.append(Rejection(payload.id, "the broker refused (nack) the publish"))
            elif isinstance(result, Exception):
                raise TransientError(
                    f"publishing to RabbitMQ failed: {_describe(result)}"
                ) from result
            else:
                raise result
        return rejections

    async def _exchange(self, name: str) -> AbstractExchange:
        if self._publish_channel is None:
            raise RuntimeError("the RabbitMQ broker is not connected (use it as `async with`)")
        if not name:
            return self._publish_channel.default_exchange
        return await self._publish_channel.get_exchange(name, ensure=False)


async def _next_batch(
    inbox: asyncio.Queue[AbstractIncomingMessage],
    stop: asyncio.Event,
    lost: asyncio.Event,
    limit: int,
) -> list[AbstractIncomingMessage]:
    """Wait for one message (or ``stop``, or ``lost``), then take whatever else has arrived."""
    if inbox.empty():
        getter = asyncio.ensure_future(inbox.get())
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
        await asyncio.wait([getter, *waiters], return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if not getter.done():
            getter.cancel()
            return []
        batch = [getter.result()]
    else:
        batch = []
    while len(batch) < limit and not inbox.empty():
        batch.append(inbox.get_nowait())
    return batch


def _rounds_of_unique_message_ids(
    ready: list[tuple[Payload, aio_pika.Message]],
) -> list[list[tuple[Payload, aio_pika.Message]]]:
    """Split a batch so that no message id is in flight twice at once.

    aiormq matches a returned (unroutable) message to its publish by message id: two publishes
    in flight with one id would have their outcomes mixed up. (Messages without an id get a
    random one from aiormq, so they never collide.)
    """
    rounds: list[list[tuple[Payload, aio_pika.Message]]] = []
    seen: list[set[str]] = []
    for item in ready:
        message_id = item[1].message_id
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


def _check_routing_key(destination: str) -> None:
    if len(destination.encode()) > MAX_ROUTING_KEY_BYTES:
        raise ValueError(
            f"the destination {destination[:40]!r}... is longer than AMQP's "
            f"{MAX_ROUTING_KEY_BYTES}-byte routing keys"
        )


def _dead_letter_message(payload: Payload, headers: Mapping[str, Any]) -> aio_pika.Message:
    try:
        return _encode(payload, headers)
    except (TypeError, ValueError, OverflowError, struct.error):
        # Headers AMQP cannot carry still reach the dead-letter queue, as lossless JSON text.
        kept = {k: v for k, v in headers.items() if k not in payload.headers}
        return _encode(payload, {**kept, ORIGINAL_HEADERS: codec.dumps(payload.headers)})


def _encode(payload: Payload, headers: Mapping[str, Any]) -> aio_pika.Message:
    """The AMQP message for ``payload`` with ``headers``; an error if a value cannot be sent."""
    props = payload.properties
    table = _amqp_table(dict(headers))
    # Encoded once here, so that a value AMQP cannot carry (an integer beyond 64 bits, say) is
    # refused for this payload alone, not discovered by the publish, failing the whole batch.
    pamqp.encode.field_table(table)
    return aio_pika.Message(
        body=payload.body,
        headers=table,
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        correlation_id=props.correlation_id,
        message_id=props.message_id,
        reply_to=props.reply_to,
        type=props.type,
        priority=props.priority,
        timestamp=(
            datetime.fromtimestamp(props.timestamp_ms / 1000, UTC)
            if props.timestamp_ms is not None
            else None
        ),
        delivery_mode=DeliveryMode(props.delivery_mode) if props.delivery_mode else None,
        expiration=int(props.expiration) / 1000 if props.expiration else None,
        app_id=props.app_id,
    )


def _expiration_ms(seconds: object) -> str | None:
    # aio-pika decodes the AMQP expiration (milliseconds, as text) into float seconds.
    if isinstance(seconds, int | float):
        return str(round(seconds * 1000))
    return None


def _amqp_table(value: Any) -> Any:
    """Header values as pamqp encodes them: byte strings travel as AMQP byte arrays."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _amqp_table(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_amqp_table(v) for v in value]
    return value


def _epoch_ms(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def _returned_reason(error: aio_pika.exceptions.PublishError, payload: Payload) -> str:
    frame = error.frame
    code = getattr(frame, "reply_code", None)
    text = getattr(frame, "reply_text", None) or "NO_ROUTE"
    return f"unroutable: no queue is bound to {payload.destination!r} ({text} {code or ''})".strip()


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
