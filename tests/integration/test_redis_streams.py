"""A Redis stream as payler's source, end to end: ``payler --config-file`` spools the stream's
entries (``client.process_queue`` with a ``redis://`` broker) in the embedded SQLite storage and
delivers them to RabbitMQ when due (``client.watch_storage``); and a crash between the spool
write and the XACK loses nothing and spools nothing twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from payler import client, codec
from payler.drivers.brokers.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, DEAD_LETTERED_AT
from payler.drivers.brokers.mapping import from_stream_fields
from payler.drivers.brokers.redis_streams import UNDECODABLE_FIELDS
from payler.drivers.storages import storage_from_url
from payler.faults import FAULT_EXIT_STATUS
from payler.options import ProcessQueueOptions
from payler.workflow import WorkflowContext
from tests.conftest import AMQP_URL, REDIS_URL, Rabbit, RedisServers, eventually
from tests.drivers.brokers.test_redis_streams import BAD_ENTRIES
from tests.integration.conftest import Payler

pytestmark = pytest.mark.redis


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def stream(redis: Redis) -> AsyncIterator[str]:
    """A source stream name of this test's own (its dead-letter stream is ``<name>-dead``)."""
    name = f"test-{uuid.uuid4().hex[:10]}-jobs"
    try:
        yield name
    finally:
        await redis.delete(name, f"{name}-dead")


def configure(tmp_path: Path, rabbit: Rabbit, stream: str, **params: object) -> tuple[Path, str]:
    """process_queue on the Redis ``stream``, watch_storage to RabbitMQ; returns the config and
    the RabbitMQ destination queue."""
    out, dead = rabbit.queue_name("out"), rabbit.queue_name("dlq")
    query = "&".join(f"{name}={value}" for name, value in {"block_ms": 100, **params}.items())
    broker_url = f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}{query}"
    storage_url = f"sqlite:///{tmp_path}/spool.db"
    config = tmp_path / "configuration.yaml"
    config.write_text(
        f"""
workflows:
  - name: "Spool the Redis stream"
    callable: client.process_queue
    options:
      broker_url: "{broker_url}"
      storage_url: "{storage_url}"
      queue: "{stream}"
      default_destination: "{out}"
      dead_letter_queue: "{stream}-dead"
      default_delay_ms: 500
      batch_size: 20
  - name: "Deliver to RabbitMQ"
    callable: client.watch_storage
    options:
      broker_url: "{AMQP_URL}"
      storage_url: "{storage_url}"
      declare_queues: ["{out}"]
      dead_letter_queue: "{dead}"
      max_poll_interval_ms: 200
"""
    )
    return config, out


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


@pytest.mark.rabbitmq
async def test_stream_entries_are_delivered_to_rabbitmq_when_due_and_intact(
    tmp_path: Path, rabbit: Rabbit, redis: Redis, stream: str
) -> None:
    config, out = configure(tmp_path, rabbit, stream)
    payler = await (await Payler.start(config, {}, tmp_path)).running()
    try:
        headers = {"x-delay": 1500, "kept": "yes", "n": 7, "blob": b"\x00\x01"}
        properties = {"content_type": "application/json", "correlation_id": "c-1"}
        properties |= {"message_id": "m-1", "app_id": "tests"}
        rich = await redis.xadd(
            stream,
            {
                "body": b'{"n": 1}',
                "headers": codec.dumps(headers),
                "properties": codec.dumps(properties),
            },
        )
        plain = await redis.xadd(stream, {"body": b"plain"})  # default_delay_ms: 500
        bad = await redis.xadd(stream, {"body": b"bad", "headers": '{"x-delay": "soon"}'})

        arrived = {m.body: (at, m) for at, m in await rabbit.collect(out, 2, timeout_s=15)}
        # The invalid one went to the dead-letter stream (on the source broker), with the reason.
        reply = await redis.xread({f"{stream}-dead": "0"}, block=10_000)
        assert await payler.stop() == 0, payler.log
    except BaseException:
        await payler.kill()
        raise
    assert set(arrived) == {b'{"n": 1}', b"plain"}, payler.log

    at, message = arrived[b'{"n": 1}']
    assert at * 1000 >= entry_ms(rich) + 1500  # never before due (counted from the entry's time)
    assert at * 1000 < entry_ms(rich) + 1500 + 5000
    assert message.headers == {"kept": "yes", "n": 7, "blob": b"\x00\x01"}
    assert (message.content_type, message.correlation_id) == ("application/json", "c-1")
    assert (message.message_id, message.app_id) == ("m-1", "tests")
    assert message.timestamp is not None  # the publish time: the entry id's, to the second
    assert abs(message.timestamp.timestamp() * 1000 - entry_ms(rich)) < 1000

    at, message = arrived[b"plain"]
    assert entry_ms(plain) + 500 <= at * 1000 < entry_ms(plain) + 500 + 5000
    assert not message.headers

    [(_, [(_, fields)])] = reply
    dead_headers = codec.loads(fields[b"headers"])
    assert fields[b"body"] == b"bad" and dead_headers["x-delay"] == "soon"
    assert "x-delay" in dead_headers["x-payler-dead-letter-reason"]
    assert dead_headers["x-payler-dead-letter-source"] == stream
    assert bad  # acknowledged like the others:
    assert (await redis.xpending(stream, "payler"))["pending"] == 0


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    "params",
    [{"consumer": "payler-test"}, {"min_idle_ms": 100}],
    ids=["same-consumer-rereads-its-pending", "new-consumer-claims-the-dead-ones"],
)
async def test_a_crash_between_store_and_xack_loses_nothing_and_spools_nothing_twice(
    tmp_path: Path, rabbit: Rabbit, redis: Redis, stream: str, params: dict[str, object]
) -> None:
    n = 60
    config, out = configure(tmp_path, rabbit, stream, **params)
    await redis.xgroup_create(stream, "payler", id="0", mkstream=True)
    for i in range(n):
        await redis.xadd(stream, {"body": f"m{i}", "headers": '{"x-delay": 300}'})

    crashing = await Payler.start(config, {"PAYLER_FAULT": "after-store"}, tmp_path)
    assert await crashing.wait(timeout_s=30) == FAULT_EXIT_STATUS, crashing.log
    assert "injected fault at 'after-store'" in crashing.log
    # The first batch is in the spool, and still pending in the group: not acknowledged.
    async with storage_from_url(f"sqlite:///{tmp_path}/spool.db") as storage:
        assert await storage.count() == 20
    assert (await redis.xpending(stream, "payler"))["pending"] == 20

    payler = await (await Payler.start(config, {}, tmp_path)).running()
    try:
        delivered = Counter(m.body for _, m in await rabbit.collect(out, n, timeout_s=30))
        delivered.update(m.body for m in await rabbit.drain(out, settle_s=1.0))  # any extra
        assert await payler.stop() == 0, payler.log
    except BaseException:
        await payler.kill()
        raise
    assert set(delivered) == {f"m{i}".encode() for i in range(n)}, ("lost", payler.log)
    assert max(delivered.values()) == 1, f"spooled twice: {delivered.most_common(3)}"
    assert (await redis.xpending(stream, "payler"))["pending"] == 0
    # The first batch was read twice and recognised the second time; nothing else came twice.
    assert "Spool the Redis stream: duplicates=20 received=60 spooled=40" in payler.log
    assert "Deliver to RabbitMQ: delivered=60 " in payler.log


async def run_until(
    workflows: list[tuple[str, ProcessQueueOptions]],
    done: Callable[[list[WorkflowContext]], Awaitable[bool]],
) -> list[WorkflowContext]:
    """Run ``client.process_queue`` workflows in this process until ``done(contexts)``, then
    stop them as SIGTERM does; a workflow that fails (or never gets there) fails the test."""
    contexts = [WorkflowContext(name, options=options) for name, options in workflows]
    tasks = [asyncio.create_task(client.process_queue(ctx)) for ctx in contexts]

    async def finished() -> bool:
        for task in tasks:
            if task.done():
                task.result()  # raises what ended the workflow
                pytest.fail("a workflow returned before it was stopped")
        return await done(contexts)

    try:
        await eventually(finished, 30, "the workflows' outcome")
    finally:
        for ctx in contexts:
            ctx.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)  # a clean stop: no exception
    return contexts


async def test_bad_entries_are_dead_lettered_alone_with_their_raw_fields(
    tmp_path: Path, redis: Redis, stream: str
) -> None:
    for i, fields in enumerate(BAD_ENTRIES.values()):
        await redis.xadd(stream, {"body": f"good {i}", "headers": '{"x-delay": 60000}'})
        await redis.xadd(stream, fields)  # type: ignore[arg-type]
    storage_url = f"sqlite:///{tmp_path}/spool.db"
    options = ProcessQueueOptions(
        broker_url=f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}block_ms=50",
        storage_url=storage_url,
        queue=stream,
        default_destination="out",
        dead_letter_queue=f"{stream}-dead",
        default_delay_ms=0,
        batch_size=5,  # bad and good entries share batches
    )
    async with storage_from_url(storage_url) as storage:

        async def all_settled(_: list[WorkflowContext]) -> bool:
            dead = await redis.xlen(f"{stream}-dead")
            return dead == len(BAD_ENTRIES) and await storage.count() == len(BAD_ENTRIES)

        [ctx] = await run_until([("ingest", options)], all_settled)
        spooled = sorted(p.body for p in (await storage.list(limit=100)).items)
    assert spooled == sorted(f"good {i}".encode() for i in range(len(BAD_ENTRIES)))
    assert (await redis.xpending(stream, "payler"))["pending"] == 0  # all acked
    assert (ctx.metrics.totals["received"], ctx.metrics.totals["restarts"]) == (16, 0)

    dead_letters = [fields for _, fields in await redis.xrange(f"{stream}-dead")]
    for fields, (what, sent) in zip(dead_letters, BAD_ENTRIES.items(), strict=True):
        body, _, headers, _ = from_stream_fields(fields)
        assert body == sent[b"body"], what
        reason = headers.pop(DEAD_LETTER_REASON)
        assert reason.startswith("the stream entry cannot be decoded: "), what
        assert headers.pop(DEAD_LETTER_SOURCE) == stream
        headers.pop(DEAD_LETTERED_AT)
        raw = headers.pop(UNDECODABLE_FIELDS)
        assert headers == {}, what
        assert raw == {
            k.decode("utf-8", "backslashreplace"): v if v == b"\xff" else v.decode()
            for k, v in sent.items()
            if k != b"body"
        }, what


async def test_two_servers_feeding_one_spool_never_collide(
    tmp_path: Path, redis_servers: RedisServers
) -> None:
    servers = [redis_servers.start(), redis_servers.start()]
    for server in servers:  # the same stream name and entry ids on both: different messages
        async with Redis.from_url(server) as raw:
            for i in range(1, 4):
                await raw.xadd("jobs", {"body": f"{server} {i}"}, id=f"1-{i}")
    storage_url = f"sqlite:///{tmp_path}/spool.db"
    workflows = [
        (
            f"ingest {server}",
            ProcessQueueOptions(
                broker_url=f"{server}?block_ms=50",
                storage_url=storage_url,
                queue="jobs",
                dead_letter_queue="dead",
                default_delay_ms=60_000,
            ),
        )
        for server in servers
    ]

    async def all_received(contexts: list[WorkflowContext]) -> bool:
        return all(c.metrics.totals["received"] == 3 for c in contexts)

    contexts = await run_until(workflows, all_received)
    async with storage_from_url(storage_url) as storage:
        assert await storage.count() == 6
    assert [c.metrics.totals["duplicates"] for c in contexts] == [0, 0]
