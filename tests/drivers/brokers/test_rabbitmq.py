"""The RabbitMQ driver against the real RabbitMQ on 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pika
import pytest
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from payler.drivers.base import Rejection
from payler.drivers.brokers.rabbitmq import RabbitMQBroker
from payler.errors import StartupError, TransientError
from payler.payload import Payload
from payler.scheduling import SchedulingRules, schedule
from payler.testing import make_payload
from tests import pika_client
from tests.assertions import assert_same
from tests.conftest import AMQP_URL, Rabbit
from tests.pika_client import WireSeconds
from tests.tcp_proxy import StallingProxy

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


async def test_a_payload_without_a_delivery_mode_goes_out_persistent(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    # A Kafka record or a stream entry has no delivery mode: payler deletes its spool entry on
    # the confirm, so a transient copy would be lost by a broker restart.
    out = rabbit.queue_name("out")
    await broker.ensure_queue(out)
    unset = make_payload(b"unset", destination=out)
    transient = make_payload(b"transient", destination=out, delivery_mode=1)
    persistent = make_payload(b"persistent", destination=out, delivery_mode=2)

    assert await broker.process([unset, transient, persistent]) == []

    modes = {m.body: m.delivery_mode for m in await rabbit.drain(out)}
    assert modes == {
        b"unset": aio_pika.DeliveryMode.PERSISTENT,
        b"transient": aio_pika.DeliveryMode.NOT_PERSISTENT,
        b"persistent": aio_pika.DeliveryMode.PERSISTENT,
    }


async def serve_until(
    broker: RabbitMQBroker, queue: str, count: int, timeout_s: float = 10
) -> list[Payload]:
    """Serve ``queue`` until ``count`` payloads were handed over (all accepted); return them."""
    broker.queue = queue
    stop = asyncio.Event()
    taken: list[Payload] = []

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        taken.extend(batch)
        if len(taken) >= count:
            stop.set()
        return []

    await asyncio.wait_for(broker.serve(handler, stop), timeout_s)
    return taken


async def test_a_message_payler_cannot_read_is_a_defect_and_the_queue_flows_on(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    # Each of these used to kill the connection inside pamqp's frame reader: the message came
    # back on the next connection and killed it too, and nothing behind it was consumed.
    source = rabbit.queue_name("source")
    await broker.ensure_queue(source)
    await pika_client.publish(
        source,
        [
            (b"first", pika.BasicProperties(message_id="ok-1")),
            (b"ts", pika.BasicProperties(message_id="bad-ts", timestamp=2**62)),
            (b"id", pika.BasicProperties(message_id=b"\xff\xfe-id")),
            (b"key", pika.BasicProperties(message_id="bad-key", headers={b"\xff": "v"})),
            (b"hts", pika.BasicProperties(message_id="bad-hts", headers={"t": WireSeconds(2**62)})),
            (b"last", pika.BasicProperties(message_id="ok-2", headers={"k": "v"})),
        ],
    )

    taken = {p.body: p for p in await serve_until(broker, source, 6)}

    assert taken[b"first"].defect is None and taken[b"last"].defect is None
    assert taken[b"last"].headers == {"k": "v"}
    ts = taken[b"ts"]
    assert ts.defect is not None and f"timestamp property ({2**62} s)" in ts.defect
    assert (ts.id, ts.properties.timestamp_ms) == (f"amqp:{source}:bad-ts", None)
    bad_id = taken[b"id"]
    assert bad_id.defect is not None and "message_id property is not UTF-8" in bad_id.defect
    assert "\\xff\\xfe-id" in bad_id.defect and bad_id.properties.message_id is None
    assert bad_id.id.startswith(f"amqp:{source}:#")  # a digest: the message id is unreadable
    key = taken[b"key"]
    assert key.defect is not None and "headers cannot be parsed" in key.defect
    assert key.headers["x-payler-undecodable-headers"].startswith(b"\x01\xff")  # raw, kept
    hts = taken[b"hts"]
    assert hts.defect is not None and f"header 't' is a timestamp ({2**62} s)" in hts.defect
    assert hts.headers == {"t": 2**62}
    await broker.close()  # the acknowledgements are flushed before the connection closes
    assert await rabbit.count(source) == 0


async def test_timestamps_after_2106_round_trip_unchanged(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    # AMQP timestamps are 64-bit seconds; pamqp read those above 0xFFFFFFFF as milliseconds.
    source, out = rabbit.queue_name("source"), rabbit.queue_name("out")
    await broker.ensure_queue(source)
    await broker.ensure_queue(out)
    in_2200 = datetime(2200, 1, 1, tzinfo=UTC)
    await pika_client.publish(
        source,
        [(b"t", pika.BasicProperties(timestamp=7_258_118_400, headers={"when": in_2200}))],
    )

    [payload] = await serve_until(broker, source, 1)

    assert payload.properties.timestamp_ms == 7_258_118_400_000
    assert payload.headers == {"when": in_2200}
    assert await broker.process([payload.model_copy(update={"destination": out})]) == []
    [(properties, body)] = await pika_client.get_all(out)
    assert (body, properties.timestamp) == (b"t", 7_258_118_400)
    assert properties.headers == {"when": in_2200}


async def test_scheduling_headers_sent_as_byte_arrays_are_read(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    # pika and aio-pika send ``bytes`` as AMQP byte arrays.
    source = rabbit.queue_name("source")
    await broker.ensure_queue(source)
    headers = {"x-delay": b"1500", "x-destination": b"elsewhere", "blob": b"\x00\x01"}
    await pika_client.publish(source, [(b"b", pika.BasicProperties(headers=headers))])

    [payload] = await serve_until(broker, source, 1)

    assert_same(payload.headers, headers)  # bytes, not pamqp's bytearrays
    when = schedule(payload.headers, received_ms=1_000, published_ms=None, rules=SchedulingRules())
    assert (when.due_ms, when.destination) == (2_500, "elsewhere")


async def test_a_wrong_virtual_host_is_a_startup_error_naming_it() -> None:
    url = f"{AMQP_URL.rstrip('/')}/no-such-vhost"
    with pytest.raises(StartupError, match="virtual host 'no-such-vhost'") as caught:
        async with RabbitMQBroker(url):
            pass
    assert "guest" in str(caught.value) and "InvalidFrameError" not in str(caught.value)


def header_fitting(frame_max: int, name: str, message_id: str) -> dict[str, object]:
    """A header ``name`` as large as fits in a content header frame of ``frame_max`` bytes,
    with ``message_id`` and no other property."""
    probe = Basic.Properties(headers={name: ""}, message_id=message_id, delivery_mode=2)
    size = 8 + len(ContentHeader(0, 0, probe).marshal())
    return {name: "h" * (frame_max - size)}


async def test_a_content_header_larger_than_a_frame_is_refused_alone(
    broker: RabbitMQBroker, rabbit: Rabbit
) -> None:
    # RabbitMQ answers such a publish with FRAME_ERROR, closing the connection.
    out, dead = rabbit.queue_name("out"), rabbit.queue_name("dead")
    await broker.ensure_queue(out)
    await broker.ensure_queue(dead)
    frame_max = 131_072  # RabbitMQ's default, and the shared test broker's
    fits = header_fitting(frame_max, "big", "m1")
    too_big = make_payload(b"x", headers={**fits, "more": "!"}, destination=out, message_id="m1")
    fine = make_payload(b"fine", destination=out)

    rejections = await broker.process([too_big, fine])

    assert [(r.payload_id, r.permanent) for r in rejections] == [(too_big.id, True)]
    assert f"over the connection's frame_max of {frame_max} bytes" in rejections[0].reason
    # Its dead letter is larger still: the minimal copy goes instead. The connection lives on.
    assert await broker.dead_letter([(too_big, "too large")], dead) == []
    edge = make_payload(b"edge", headers=fits, destination=out, message_id="m2")
    assert await broker.process([edge]) == []  # exactly a frame: still fits
    assert sorted(m.body for m in await rabbit.drain(out)) == [b"edge", b"fine"]
    [minimal] = await rabbit.drain(dead)
    assert minimal.body == b"" and minimal.message_id == "m1"
    assert "frame_max" in str(minimal.headers["x-payler-dead-letter-truncated"])


async def test_a_publish_not_confirmed_in_time_is_an_outage(rabbit: Rabbit) -> None:
    # A publish with no bound stalls the workflow for ever while the leases of its entries
    # expire and another instance delivers them too.
    out = rabbit.queue_name("out")
    target = urlsplit(AMQP_URL)
    async with StallingProxy(
        target.hostname or "127.0.0.1", target.port or 5672
    ).running() as proxy:
        url = urlunsplit(target._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}"))
        broker = RabbitMQBroker(url, publish_timeout_s=0.5)
        async with broker:
            await broker.ensure_queue(out)
            assert await broker.process([make_payload(b"before", destination=out)]) == []
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(TransientError, match="did not confirm 1 publish"):
                await asyncio.wait_for(
                    broker.process([make_payload(b"in the air", destination=out)]), 10
                )
            assert time.monotonic() - started < 2
        assert time.monotonic() - started < 10  # closing a stalled connection is bounded too
    assert [m.body for m in await rabbit.drain(out)] == [b"before"]
