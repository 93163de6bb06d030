"""The RabbitMQ driver against the real RabbitMQ on 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import aio_pika
import pytest

from payler.drivers.base import Rejection
from payler.drivers.brokers.rabbitmq import RabbitMQBroker
from payler.errors import StartupError, TransientError
from payler.payload import Payload
from payler.testing import make_payload
from tests.conftest import AMQP_URL, Rabbit, eventually

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def broker() -> AsyncIterator[RabbitMQBroker]:
    async with RabbitMQBroker(AMQP_URL, batch_size=10, prefetch=20) as driver:
        yield driver


async def test_an_existing_queue_is_used_as_it_is(broker: RabbitMQBroker, rabbit: Rabbit) -> None:
    # As the original Payler 0.2.0 declared it: not durable, no arguments.
    legacy = rabbit.queue_name("legacy")
    await rabbit.channel.declare_queue(legacy, durable=False)
    # As users declare theirs: durable, with arguments payler knows nothing of.
    custom = rabbit.queue_name("custom")
    await rabbit.channel.declare_queue(custom, durable=True, arguments={"x-message-ttl": 60_000})

    await broker.ensure_queue(legacy)
    await broker.ensure_queue(custom)

    # Unchanged: redeclaring with the original settings still passes (a change would raise
    # PRECONDITION_FAILED here).
    channel = await rabbit.connection.channel()
    await channel.declare_queue(legacy, durable=False)
    await channel.declare_queue(custom, durable=True, arguments={"x-message-ttl": 60_000})


async def test_a_missing_queue_is_declared_durable(broker: RabbitMQBroker, rabbit: Rabbit) -> None:
    name = rabbit.queue_name("fresh")
    await broker.ensure_queue(name)
    channel = await rabbit.connection.channel()
    await channel.declare_queue(name, durable=True)  # PRECONDITION_FAILED if not durable


async def test_publish_is_confirmed_and_unroutable_is_rejected(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    out = rabbit.queue_name("out")
    await broker.ensure_queue(out)
    ok = make_payload(
        b"hello",
        headers={"x-delay": 5, "x-destination": out, "kept": "yes", "blob": b"\x00\x01"},
        destination=out,
        content_type="text/plain",
        correlation_id="c-1",
        message_id="m-1",
        priority=7,
        timestamp_ms=1_700_000_000_000,
        delivery_mode=2,
        expiration="60000",
    )
    lost = make_payload(b"nowhere", destination=f"{out}-missing")

    rejections = await broker.process([ok, lost])

    assert [(r.payload_id, r.permanent) for r in rejections] == [(lost.id, True)]
    assert "unroutable" in rejections[0].reason and f"{out}-missing" in rejections[0].reason
    [message] = await rabbit.drain(out)
    assert message.body == b"hello"
    assert message.headers == {"kept": "yes", "blob": b"\x00\x01"}
    assert (message.content_type, message.correlation_id, message.message_id) == (
        "text/plain",
        "c-1",
        "m-1",
    )
    assert message.priority == 7 and message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.timestamp is not None and message.timestamp.timestamp() == 1_700_000_000
    assert message.expiration == 60


async def test_serve_acks_only_after_the_handler_returned(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    source = rabbit.queue_name("source")
    await broker.ensure_queue(source)
    for i in range(25):
        await rabbit.publish(source, aio_pika.Message(f"{i}".encode(), message_id=f"id-{i}"))
    broker.queue = source
    stop = asyncio.Event()
    seen: list[str] = []

    async def failing(batch: Sequence[Payload]) -> list[Rejection]:
        seen.extend(p.id for p in batch)
        raise RuntimeError("the spool is down")

    with pytest.raises(RuntimeError, match="spool is down"):
        await broker.serve(failing, stop)
    assert seen  # it got a batch, failed, and acknowledged none of it
    assert await rabbit.count(source) == 25

    taken: list[Payload] = []
    handed_back: set[str] = set()

    acked: set[str] = set()

    async def taking(batch: Sequence[Payload]) -> list[Rejection]:
        taken.extend(batch)
        # Hand the first of each batch back, once (transient: it must come again).
        first = batch[0].id
        rejections = [] if first in handed_back else [Rejection(first, "try later")]
        handed_back.add(first)
        acked.update(p.id for p in batch if not rejections or p.id != first)
        if len(acked) == 25:
            stop.set()
        return rejections

    await asyncio.wait_for(broker.serve(taking, stop), 10)
    assert {p.id for p in taken} == {f"amqp:{source}:id-{i}" for i in range(25)}
    assert all(p.source == source and p.destination == "" for p in taken)
    # Every handed-back message came again after being handed back.
    for payload_id in handed_back:
        assert [p.id for p in taken].count(payload_id) >= 2
    await broker.close()  # the acknowledgements are flushed before the connection closes
    assert await rabbit.count(source) == 0


async def test_one_message_id_twice_in_a_batch_keeps_each_outcome_apart(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    # aiormq matches a returned message to its publish by message id: two in flight with one
    # id would swap outcomes, losing the unroutable one.
    out = rabbit.queue_name("out")
    await broker.ensure_queue(out)
    lost = make_payload(b"lost", destination=f"{out}-missing", message_id="same")
    kept = make_payload(b"kept", destination=out, message_id="same")

    rejections = await broker.process([lost, kept])

    assert [(r.payload_id, r.permanent) for r in rejections] == [(lost.id, True)]
    assert [m.body for m in await rabbit.drain(out)] == [b"kept"]


async def test_a_value_amqp_cannot_carry_fails_that_payload_alone(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    out = rabbit.queue_name("out")
    await broker.ensure_queue(out)
    huge = make_payload(b"huge", headers={"n": 10**30}, destination=out)
    long_key = make_payload(b"long", destination="q" * 300)
    fine = make_payload(b"fine", destination=out)

    rejections = await broker.process([huge, long_key, fine])

    assert {r.payload_id: r.permanent for r in rejections} == {huge.id: True, long_key.id: True}
    assert all("cannot encode for AMQP" in r.reason for r in rejections)
    assert [m.body for m in await rabbit.drain(out)] == [b"fine"]
    # Dead-lettering it still works: the headers travel as JSON text.
    dead = rabbit.queue_name("dead")
    await broker.ensure_queue(dead)
    await broker.dead_letter([(huge, "cannot encode")], dead)
    [message] = await rabbit.drain(dead)
    assert message.headers["x-payler-original-headers"] == '{"n":1000000000000000000000000000000}'


async def test_a_missing_exchange_is_a_startup_error(rabbit: Rabbit) -> None:
    with pytest.raises(StartupError, match="no exchange 'no-such-exchange'"):
        async with RabbitMQBroker(AMQP_URL, exchange="no-such-exchange"):
            pass


async def test_a_consumer_cancelled_by_the_broker_is_a_transient_error(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    source = rabbit.queue_name("source")
    await broker.ensure_queue(source)
    broker.queue = source
    consuming = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        consuming.set()
        return []

    serving = asyncio.create_task(broker.serve(handler, asyncio.Event()))
    await rabbit.publish(source, aio_pika.Message(b"x"))
    await asyncio.wait_for(consuming.wait(), 5)  # the consumer is there
    async with rabbit.connection.channel() as admin:
        await admin.queue_delete(source)  # the broker cancels the consumer; the channel stays
    with pytest.raises(TransientError, match="consumer"):
        await asyncio.wait_for(serving, 5)


async def test_batch_wait_fills_a_batch_with_what_arrives_meanwhile(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    source = rabbit.queue_name("source")
    await broker.ensure_queue(source)
    broker.queue, broker.batch_size, broker.batch_wait_ms = source, 5, 10_000
    stop = asyncio.Event()
    batches: list[int] = []

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        batches.append(len(batch))
        stop.set()
        return []

    async def publish_the_rest() -> None:
        # Once the consumer holds the first message (none ready), the others follow.
        async def none_ready() -> bool:
            return await rabbit.count(source) == 0

        await eventually(none_ready, 10, "the first message delivered")
        for i in range(1, 5):
            await rabbit.publish(source, aio_pika.Message(f"{i}".encode(), message_id=f"id-{i}"))

    await rabbit.publish(source, aio_pika.Message(b"0", message_id="id-0"))
    publisher = asyncio.create_task(publish_the_rest())
    await asyncio.wait_for(broker.serve(handler, stop), 10)
    await publisher
    assert batches == [5]  # not [1, ...]: the batch waited to fill, and no longer than that
