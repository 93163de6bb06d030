"""``client.handle`` on the real brokers: RabbitMQ → handler → RabbitMQ and Kafka, Kafka →
handler → RabbitMQ with a delayed output, a Redis stream source; the dead-letter breaker on a
poison stream; backpressure with a slow handler; a kill -9 between output publish and source
acknowledgement; and the example application, run as it is."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from redis.asyncio import Redis

from payler import codec, config
from payler.drivers.brokers.base import DEAD_LETTER_REASON
from payler.faults import FAULT_EXIT_STATUS
from payler.runtime import Runtime
from tests.conftest import AMQP_URL, REDIS_URL, Kafka, Rabbit, eventually
from tests.integration.conftest import Payler

EXAMPLES = Path(__file__).parents[2] / "examples"

#: A test application, written beside each test's configuration (its values baked in).
APP = """
import asyncio
from pydantic import BaseModel
from payler.processing import Application, Context, Output, RetryPolicy

class Event(BaseModel):
    n: int

app = Application("relay", retry=RetryPolicy(max_attempts=3, base_ms=100, max_ms=200, jitter=0))
SETTINGS = {settings!r}

@app.handler()
async def on_event(event: Event, ctx: Context) -> list[Output]:
    if event.n in SETTINGS.get("fail_first", ()) and ctx.attempt == 1:
        raise ConnectionError("flaky dependency")
    if SETTINGS.get("slow_ms"):
        await asyncio.sleep(SETTINGS["slow_ms"] / 1000)  # the handler's work, not a wait
    outputs = [Output(SETTINGS["out"], {{"n": event.n, "attempt": ctx.attempt}})]
    if "audit" in SETTINGS:
        outputs.append(Output(SETTINGS["audit"], {{"n": event.n}}, broker="audit"))
    if "later" in SETTINGS:
        outputs.append(Output(SETTINGS["later"], {{"n": event.n}}, delay_ms=SETTINGS["delay_ms"]))
    return outputs
"""


def write_config(tmp_path: Path, options: dict[str, Any], **settings: Any) -> Path:
    """A configuration running a ``handle`` workflow with the test application."""
    module = f"handlers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP.format(settings=settings))
    options = {"app": f"{module}:app", "storage_url": f"sqlite:///{tmp_path}/spool.db",
               "max_poll_interval_ms": 100, **options}  # fmt: skip
    path = tmp_path / "configuration.yaml"
    path.write_text(json.dumps({"workflows": [{"name": "relay", "callable": "client.handle",
                                               "options": options}]}))  # fmt: skip
    return path


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[Runtime]:
    """payler, in this process, running the configuration at ``path`` until the block ends."""
    runtime = Runtime(config.load(path, environ={}))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait([task, started], timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up failure
    assert runtime.started.is_set(), "payler did not start in time"
    try:
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def events(count: int) -> list[aio_pika.Message]:
    return [
        aio_pika.Message(
            json.dumps({"n": n}).encode(), message_id=f"e{n}", content_type="application/json"
        )
        for n in range(count)
    ]


@pytest.mark.rabbitmq
@pytest.mark.kafka
async def test_rabbitmq_to_rabbitmq_and_kafka_with_retries(
    rabbit: Rabbit, kafka: Kafka, tmp_path: Path
) -> None:
    source, out, dead = (rabbit.queue_name(r) for r in ("events", "out", "dead"))
    audit = kafka.topic("audit")
    path = write_config(
        tmp_path,
        {"source_url": AMQP_URL, "queue": source, "dead_letter_queue": dead,
         "outputs": {"audit": kafka.url()}, "declare_queues": {"source": [out], "audit": [audit]}},
        out=out, audit=audit, fail_first=[3, 7],
    )  # fmt: skip
    async with running(path) as runtime:
        for message in events(20):
            await rabbit.publish(source, message)
        arrived = await rabbit.collect(out, 20, timeout_s=30)
        audited = await kafka.collect(audit, 20, timeout_s=30)
        assert await rabbit.count(source) == 0
    bodies = {json.loads(m.body)["n"]: json.loads(m.body) for _, m in arrived}
    assert sorted(bodies) == list(range(20))
    assert {n for n, b in bodies.items() if b["attempt"] == 2} == {3, 7}  # retried via the spool
    assert {m.message_id for _, m in arrived} == {f"amqp:{source}:e{n}#0" for n in range(20)}
    assert sorted(json.loads(r.value)["n"] for _, r in audited) == list(range(20))  # type: ignore[attr-defined]
    headers = [dict(r.headers) for _, r in audited]  # type: ignore[attr-defined]
    assert all(h["payler-content-type"] == b"application/json" for h in headers)
    metrics = runtime.contexts[0].metrics
    assert metrics.handler_counts[("on_event", "handled")] == 20
    assert metrics.handler_counts[("on_event", "retried")] == 2
    assert await rabbit.count(dead) == 0


@pytest.mark.kafka
@pytest.mark.rabbitmq
async def test_kafka_to_rabbitmq_with_a_delayed_output(
    rabbit: Rabbit, kafka: Kafka, tmp_path: Path
) -> None:
    topic = kafka.topic("events")
    out, later, dead = (rabbit.queue_name(r) for r in ("out", "later", "dead"))
    path = write_config(
        tmp_path,
        {"source_url": kafka.url(), "queue": topic, "dead_letter_queue": kafka.topic("dead"),
         "outputs": {"rabbit": AMQP_URL}, "default_output": "rabbit",
         "declare_queues": {"rabbit": [out, later, dead]}, "order_by": "key"},
        out=out, later=later, delay_ms=700,
    )  # fmt: skip
    async with running(path):
        sent_at = time.time()
        await kafka.produce(topic, [(b"k", json.dumps({"n": n}).encode(), []) for n in range(10)])
        now = await rabbit.collect(out, 10, timeout_s=30)
        delayed = await rabbit.collect(later, 10, timeout_s=30)
    assert [json.loads(m.body)["n"] for _, m in now] == list(range(10))  # one key: in order
    assert len(delayed) == 10
    assert min(at for at, _ in delayed) - sent_at >= 0.7
    now_ids = {m.message_id for _, m in now}
    # Kafka spool ids: kafka:<cluster id>:<topic>@<topic id>:<partition>:<offset>.
    assert all(i is not None and i.startswith("kafka:") and f":{topic}@" in i for i in now_ids)
    assert {m.message_id for _, m in delayed} == {
        i.replace("#0", "#1") for i in now_ids if i is not None
    }  # output 1 of each source record


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    names: list[str] = []
    client.test_names = names  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        if names:
            await client.delete(*names)
        await client.aclose()


def stream_url(group: str) -> str:
    return f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}group={group}&block_ms=100"


@pytest.mark.redis
async def test_a_redis_stream_source_to_a_stream(redis: Redis, tmp_path: Path) -> None:
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    source, out, dead = f"{prefix}-in", f"{prefix}-out", f"{prefix}-dead"
    redis.test_names += [source, out, dead]  # type: ignore[attr-defined]
    path = write_config(
        tmp_path, {"source_url": stream_url(prefix), "queue": source, "dead_letter_queue": dead},
        out=out,
    )  # fmt: skip
    async with running(path):
        for n in range(10):
            await redis.xadd(source, {"body": json.dumps({"n": n}), "properties": codec.dumps(
                {"content_type": "application/json"})})  # fmt: skip
        await redis.xadd(source, {"body": b"not json"})
        await eventually(async_equal(lambda: redis.xlen(out), 10), 20, "ten outputs")
        await eventually(async_equal(lambda: redis.xlen(dead), 1), 20, "one dead letter")
    entries = await redis.xrange(out)
    assert sorted(json.loads(fields[b"body"])["n"] for _, fields in entries) == list(range(10))
    [(_, dead_letter)] = await redis.xrange(dead)
    assert dead_letter[b"body"] == b"not json"
    reason = codec.loads(dead_letter[b"headers"])[DEAD_LETTER_REASON]
    assert reason.startswith("cannot be decoded as JSON")
    pending = await redis.xpending(source, prefix)
    assert pending["pending"] == 0  # every entry acknowledged


def async_equal(read: Callable[[], Awaitable[Any]], expected: Any) -> Callable[[], Any]:
    """A condition for :func:`eventually`: ``await read() == expected``."""

    async def check() -> bool:
        return bool(await read() == expected)

    return check


@pytest.mark.redis
async def test_the_breaker_trips_on_a_poison_stream(
    redis: Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    source, out, dead = f"{prefix}-in", f"{prefix}-out", f"{prefix}-dead"
    redis.test_names += [source, out, dead]  # type: ignore[attr-defined]
    for n in range(5):
        await redis.xadd(source, {"body": json.dumps({"n": n})})
    for _ in range(40):  # a bad deploy upstream: nothing validates any more
        await redis.xadd(source, {"body": json.dumps({"n": "not a number"})})
    path = write_config(
        tmp_path,
        {"source_url": stream_url(prefix), "queue": source, "dead_letter_queue": dead,
         "breaker": {"max_consecutive_invalid": 5}, "batch_size": 10},
        out=out,
    )  # fmt: skip
    async with running(path) as runtime:
        ctx = runtime.contexts[0]
        await eventually(lambda: ctx.state == "tripped", 20, "the breaker tripped")
        assert ctx.problem is not None and "5 messages in a row were dead-lettered" in ctx.problem
    assert await redis.xlen(out) == 5
    assert await redis.xlen(dead) == 4  # not the whole stream
    info = {g["name"]: g for g in await redis.xinfo_groups(source)}[prefix.encode()]
    unsettled = info["pending"] + (info["lag"] or 0)
    assert unsettled == 36  # the poison stays in the source, for after the fix
    assert "dead-letter breaker tripped: 5 messages in a row" in caplog.text
    assert any(r.levelname == "ERROR" and "breaker tripped" in r.getMessage()
               for r in caplog.records)  # fmt: skip


@pytest.mark.rabbitmq
async def test_a_slow_handler_slows_consumption_and_memory_stays_flat(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    source, out = rabbit.queue_name("events"), rabbit.queue_name("out")
    count, concurrency = 400, 4
    path = write_config(
        tmp_path,
        {"source_url": AMQP_URL, "queue": source, "concurrency": concurrency,
         "declare_queues": {"source": [out]}, "dead_letter_queue": rabbit.queue_name("dead")},
        out=out, slow_ms=10,
    )  # fmt: skip
    await rabbit.channel.declare_queue(source, durable=True)
    padding = "x" * 20_000  # 20 kB a message: 8 MB were the backlog held in payler
    for n in range(count):
        body = json.dumps({"n": n, "pad": padding}).encode()
        await rabbit.publish(source, aio_pika.Message(body, message_id=f"e{n}"))
    async with running(path) as runtime:
        ctx = runtime.contexts[0]
        peak = [0]

        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], ctx.metrics.in_flight)
                await asyncio.sleep(0.005)  # sampling a gauge, not waiting for work

        watcher = asyncio.create_task(watch())
        handled = lambda: ctx.metrics.handler_counts[("on_event", "handled")]  # noqa: E731
        await eventually(lambda: handled() >= 40, 30, "40 handled")
        waiting = await rabbit.count(source)
        rss_early = _rss_kb()
        await eventually(lambda: handled() >= 200, 60, "200 handled")
        rss_late = _rss_kb()
        watcher.cancel()
    assert peak[0] <= concurrency  # one batch of `concurrency` in hand at a time
    assert waiting >= count - 40 - 2 * concurrency - 20  # the backlog waits in the broker
    assert rss_late - rss_early < 4_000, (rss_early, rss_late)  # kB: no backlog in memory


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.rabbitmq
async def test_a_crash_between_output_publish_and_source_ack_loses_nothing(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    source, out, later = (rabbit.queue_name(r) for r in ("events", "out", "later"))
    count = 30
    path = write_config(
        tmp_path,
        {"source_url": AMQP_URL, "queue": source, "dead_letter_queue": rabbit.queue_name("dead"),
         "declare_queues": {"source": [out, later]}, "batch_size": 10, "prefetch": 10},
        out=out, later=later, delay_ms=1_500,
    )  # fmt: skip
    await rabbit.channel.declare_queue(source, durable=True)
    for message in events(count):
        await rabbit.publish(source, message)
    env = {"PAYLER_FAULT": "after-outputs"}
    crashing = await Payler.start(path, env, tmp_path)
    assert await crashing.wait(timeout_s=30) == FAULT_EXIT_STATUS, crashing.log
    first_batch = await rabbit.count(out)  # its outputs confirmed, its sources not acked
    assert 0 < first_batch <= 10
    payler = await (await Payler.start(path, {}, tmp_path)).running()
    try:
        arrived = await rabbit.collect(out, count + first_batch, timeout_s=30)
        delayed = await rabbit.collect(later, count, timeout_s=30)
        extra = await rabbit.drain(later, settle_s=1.0)  # a second copy would land by now
    finally:
        assert await payler.stop() == 0, payler.log
    ids = Counter(m.message_id for _, m in arrived)
    assert set(ids) == {f"amqp:{source}:e{n}#0" for n in range(count)}, "lost"
    # The first batch ran again: duplicates, with the ids of the first copies.
    assert sorted(ids.values()) == [1] * (count - first_batch) + [2] * first_batch
    assert len(delayed) == count and extra == []  # the spool took the re-stored ones once
    assert await rabbit.count(source) == 0


async def take(
    channel: aio_pika.abc.AbstractChannel, queue: str, count: int, timeout_s: float = 20.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Consume ``count`` messages of ``queue`` (acknowledged), or fail after ``timeout_s``."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    enough = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        got.append(message)
        await message.ack()
        if len(got) >= count:
            enough.set()

    declared = await channel.declare_queue(queue, passive=True)
    tag = await declared.consume(on_message)
    try:
        async with asyncio.timeout(timeout_s):
            await enough.wait()
    finally:
        await declared.cancel(tag)
    return got[:count]


@pytest.fixture
def example_env(vhost: str, tmp_path: Path) -> dict[str, str]:
    return {
        "BROKER_URL": vhost,
        "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/shop.db",
        "TAX_RATES_FILE": str(tmp_path / "rates.json"),
        "REMINDER_DELAY_MS": "1000",
        "RETRY_BASE_MS": "200",
    }


@pytest.mark.rabbitmq
async def test_the_shop_example_as_it_is(example_env: dict[str, str], tmp_path: Path) -> None:
    payler = await (await Payler.start(EXAMPLES / "shop.yaml", example_env, tmp_path)).running()
    connection = await aio_pika.connect(example_env["BROKER_URL"])
    try:
        channel = await connection.channel()

        async def send(body: dict[str, Any], kind: str) -> None:
            message = aio_pika.Message(json.dumps(body).encode(), headers={"type": kind},
                                       content_type="application/json")  # fmt: skip
            await channel.default_exchange.publish(message, "shop-events")

        order = {"id": "o-1", "customer": "ada", "country": "FR", "amount": "80.00"}
        await send(order, "order.created")  # the tax rates are missing: retried
        await send({"order_id": "o-1", "amount": "-3"}, "payment.received")
        await send({"hello": 1}, "greeting")
        dead = await take(channel, "shop-dead-letter", 2)
        (tmp_path / "rates.json").write_text(json.dumps({"FR": 20}))
        sent_at = time.time()
        [invoice] = await take(channel, "invoices", 1)
        [reminder] = await take(channel, "payment-reminders", 1)
        reminded_at = time.time()
    finally:
        await connection.close()
        assert await payler.stop() == 0, payler.log
    assert json.loads(invoice.body)["total"] == "96.00"
    assert json.loads(reminder.body) == {"order_id": "o-1", "customer": "ada", "total": "96.00"}
    assert reminded_at - sent_at >= 0.5
    reasons = sorted(str(m.headers[DEAD_LETTER_REASON]) for m in dead)
    assert reasons == ["no handler matched",
                       "rejected by handler 'receipt': a payment of -3 makes no sense"]  # fmt: skip
    assert "invoiced (attempt" in payler.log  # the handler's own line, naming the message
    assert "invoiced (attempt 1)" not in payler.log  # the rates were missing: retried
    assert "[message amqp:shop-events:" in payler.log


@pytest.mark.rabbitmq
async def test_the_python_first_entry_runs_the_example(
    example_env: dict[str, str], tmp_path: Path
) -> None:
    """``python examples/shop.py``: no configuration file; stops cleanly on SIGTERM."""
    (tmp_path / "rates.json").write_text(json.dumps({"FR": 0}))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "shop.py"), cwd=tmp_path,
        env={**os.environ, **example_env, "ORDERS_QUEUE": "shop-events"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    payler = Payler(process)
    payler._reader = asyncio.create_task(payler._read())
    try:
        await payler.running()
        connection = await aio_pika.connect(example_env["BROKER_URL"])
        async with connection:
            channel = await connection.channel()
            order = {"id": "o-9", "customer": "bo", "country": "FR", "amount": "10"}
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps(order).encode(), headers={"type": "order.created"}),
                "shop-events",
            )
            [message] = await take(channel, "invoices", 1)
        assert json.loads(message.body)["total"] == "10.00"
    finally:
        assert await payler.stop() == 0, payler.log
