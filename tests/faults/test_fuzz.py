"""The fuzzer: generated messages through payler, from every source: delivered intact, or
dead-lettered with a reason; the daemon never exits; nothing lost.

One payler daemon per source (``process_queue`` into a SQLite spool, ``watch_storage`` back
to the same broker, every message due at once) takes all the messages of its run; then each one
is looked for on the destination and the dead-letter destination, and compared with what was
sent. The messages come from hypothesis strategies (``tests/faults/fuzzing.py``), seeded: the
same ones every run. Bounded in CI; ``--full-faults`` sends >= 10,000 in all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pika
import pytest
from redis.asyncio import Redis

from payler import codec
from payler.drivers.brokers.base import DEAD_LETTER_ID, DEAD_LETTER_REASON
from payler.drivers.brokers.mapping import from_stream_fields
from payler.drivers.brokers.redis_streams import UNDECODABLE_FIELDS
from tests.conftest import REDIS_URL, Kafka
from tests.faults.conftest import Queues, Size
from tests.faults.fuzzing import (
    AmqpMessage,
    KafkaRecord,
    StreamEntry,
    amqp_messages,
    check_amqp,
    check_kafka,
    check_stream,
    generate,
    kafka_records,
    stream_entries,
)
from tests.faults.harness import (
    STALL_S,
    Broker,
    Daemon,
    Row,
    spool_ids,
    wait_until,
)
from tests.faults.kafka import KafkaCollector
from tests.faults.servers import RabbitNode

pytestmark = pytest.mark.faults

#: The largest body generated: bounded in CI, larger in the full run.
LARGE_BODY = {False: 256 * 1024, True: 4 * 1024 * 1024}
FUZZ_ID = "fuzz-id"
#: How long the fuzzer waits for all its messages to come out.
FUZZ_TIMEOUT_S = 180.0


def write_config(path: Path, source: str, destination: str, jobs: str, out: str, dead: str) -> Path:
    path.write_text(
        f"""
workflows:
  - name: ingest
    callable: client.process_queue
    options: {{broker_url: "{source}", queue: "{jobs}", default_destination: "{out}",
               dead_letter_queue: "{dead}", default_delay_ms: 0}}
  - name: deliver
    callable: client.watch_storage
    options: {{broker_url: "{destination}", declare_queues: ["{out}"],
               dead_letter_queue: "{dead}", max_poll_interval_ms: 100}}
stats_interval_seconds: 10
"""
    )
    return path


@dataclass
class Outcome:
    """What came out for each fuzz id."""

    delivered: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    dead: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unknown: int = 0

    def row(
        self,
        scenario: str,
        sent: dict[str, Any],
        check: Callable[[Any, Any], list[str]],
        must_deliver: Callable[[Any], bool],
        left: int,
        daemon: Daemon,
    ) -> tuple[Row, list[str]]:
        """The row, and every problem found (a message altered, lost, wrongly refused)."""
        problems = []
        for fuzz_id, message in sent.items():
            for got in self.delivered.get(fuzz_id, [])[:1]:
                problems += [f"{fuzz_id} delivered altered: {p}" for p in check(message, got)]
            reasons = self.dead.get(fuzz_id, [])
            if reasons and fuzz_id not in self.delivered and must_deliver(message):
                problems.append(f"{fuzz_id} dead-lettered, not delivered: {reasons[0][:200]}")
            if any(not r for r in reasons):
                problems.append(f"{fuzz_id} dead-lettered without a reason")
        if self.unknown:
            problems.append(f"{self.unknown} messages came out that cannot be told apart")
        found = set(self.delivered) | set(self.dead)
        lost = max(0, len(sent) - len(found & set(sent)) - left)
        if lost:
            problems.append(f"{lost} lost, e.g. {sorted(set(sent) - found)[:3]}")
        if left:
            problems.append(f"{left} never came out: still in the source or the spool")
        copies = sum(len(v) for v in self.delivered.values()) + sum(
            len(v) for v in self.dead.values()
        )
        altered = sum(1 for p in problems if " delivered altered" in p)
        notes = f"{altered} problems with delivered messages" if altered else ""
        row = Row(
            scenario=scenario,
            sent=len(sent),
            delivered=len(set(self.delivered) & set(sent)),
            dead_lettered=len((set(self.dead) - set(self.delivered)) & set(sent)),
            left=left,
            lost=lost,
            duplicated=copies - len(found),
            daemon="alive" if not daemon.crashes else daemon.state(),
            notes=notes,
        )
        return row, problems


async def run_until_out(daemon: Daemon, outputs: Callable[[], Awaitable[int]], sent: int) -> None:
    """Wait until ``outputs()`` (messages on the destination and dead-letter destination)
    reaches ``sent``, or stops moving for :data:`STALL_S`, or payler exits."""
    last = [-1, time.monotonic()]

    async def done() -> bool:
        await daemon.reap()
        if not daemon.alive:
            return True
        now = await outputs()
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return now >= sent or time.monotonic() - last[1] > STALL_S

    await wait_until(done, FUZZ_TIMEOUT_S, "all out")


def report(row: Row, problems: list[str], record: list[Row], daemon: Daemon) -> None:
    if problems:
        row.notes = "; ".join(filter(None, [row.notes, *problems[:3]]))
    record.append(row)
    shown = "\n".join(problems[:15])
    assert not problems, f"{len(problems)} problems:\n{shown}\n{daemon.log[-3000:]}"
    assert daemon.crashes == [], daemon.log


# -- AMQP ------------------------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_fuzz_amqp(
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    messages: list[AmqpMessage] = await asyncio.to_thread(
        generate, amqp_messages(LARGE_BODY[size.full]), size.fuzz_messages, 1
    )
    storage = f"sqlite:///{tmp_path}/spool.db"
    config = write_config(
        tmp_path / "configuration.yaml", node.payler_url, node.payler_url,
        queues.jobs, queues.out, queues.dead,
    )  # fmt: skip
    daemon = Daemon(config, {"PAYLER_STORAGE_URL": storage}, tmp_path)
    await daemon.start()
    sent = {f"amqp-{i:05d}": m for i, m in enumerate(messages)}
    connection = await broker.connection()
    async with connection.channel(publisher_confirms=True) as channel:
        for fuzz_id, m in sent.items():
            await channel.default_exchange.publish(
                aio_pika.Message(
                    m.body, headers={**m.headers, **m.schedule}, message_id=fuzz_id,
                    **m.properties,
                ),
                routing_key=queues.jobs,
            )  # fmt: skip

    async def outputs() -> int:
        return sum(await broker.depths(queues.out, queues.dead))

    await run_until_out(daemon, outputs, len(sent))
    await daemon.stop()
    outcome = Outcome()
    for message in await broker.take(queues.out):
        outcome.delivered[message.message_id or "?"].append(message)
    for message in await broker.take(queues.dead):
        reason = (message.headers or {}).get(DEAD_LETTER_REASON, "")
        outcome.dead[message.message_id or "?"].append(str(reason))
    left = len(await broker.drain(queues.jobs)) + len(await spool_ids(storage))
    row, problems = outcome.row(
        f"fuzz: AMQP ({len(sent)} messages)", sent, check_amqp, lambda m: m.valid, left, daemon
    )
    report(row, problems, record, daemon)


# -- Kafka -----------------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_fuzz_kafka(kafka: Kafka, tmp_path: Path, size: Size, record: list[Row]) -> None:
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415 - only Kafka tests need it

    records: list[KafkaRecord] = await asyncio.to_thread(
        generate, kafka_records(LARGE_BODY[size.full]), size.fuzz_messages, 2
    )
    jobs, out, dead = kafka.topic("jobs"), kafka.topic("out"), kafka.topic("dlq")
    storage = f"sqlite:///{tmp_path}/spool.db"
    # Records as large as the test's producer sends: payler's producer takes them too.
    url = f"{kafka.url('payler')}&max_request_size={16 * 1024 * 1024}"
    config = write_config(tmp_path / "configuration.yaml", url, url, jobs, out, dead)
    daemon = Daemon(config, {"PAYLER_STORAGE_URL": storage}, tmp_path)
    await daemon.start()
    sent = {f"kafka-{i:05d}": r for i, r in enumerate(records)}
    positions: dict[tuple[int, int], str] = {}  # (partition, offset) → fuzz id
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    try:
        for fuzz_id, r in sent.items():
            headers = [(FUZZ_ID, fuzz_id.encode()), *r.headers]
            written = await (await producer.send(jobs, r.value, r.key, headers=headers))
            positions[written.partition, written.offset] = fuzz_id
    finally:
        await producer.stop()
    async with KafkaCollector(kafka.bootstrap, [out, dead]) as collector:

        async def outputs() -> int:
            return len(collector.records[out]) + len(collector.records[dead])

        await run_until_out(daemon, outputs, len(sent))
        await daemon.stop()
    outcome = Outcome()
    for got in collector.records[out]:
        fuzz_id = dict(got.headers).get(FUZZ_ID)
        if fuzz_id is None:
            outcome.unknown += 1
            continue
        outcome.delivered[fuzz_id.decode()].append(got)
    for got in collector.records[dead]:
        headers = dict(got.headers)
        ident = (
            headers.get(FUZZ_ID)
            or positions.get(
                position_of((headers.get(DEAD_LETTER_ID) or b"").decode()), ""
            ).encode()
        )
        reason = (headers.get(DEAD_LETTER_REASON) or b"").decode(errors="replace")
        outcome.dead[ident.decode() or "?"].append(reason)
    left = len(await spool_ids(storage))
    row, problems = outcome.row(
        f"fuzz: Kafka ({len(sent)} records)", sent,
        lambda r, got: check_kafka(r, got, FUZZ_ID), lambda _: True, left, daemon,
    )  # fmt: skip
    report(row, problems, record, daemon)


def position_of(spool_id: str) -> tuple[int, int]:
    """The (partition, offset) a Kafka spool id ends with (``...:<partition>:<offset>``)."""
    _, partition, offset = spool_id.rsplit(":", 2) if spool_id.count(":") >= 2 else ("", "-1", "-1")
    return int(partition), int(offset)


# -- Redis streams ---------------------------------------------------------------------------------


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_fuzz_redis_streams(
    redis_client: Redis, tmp_path: Path, size: Size, record: list[Row]
) -> None:
    entries: list[StreamEntry] = await asyncio.to_thread(
        generate, stream_entries(LARGE_BODY[size.full]), size.fuzz_messages, 3
    )
    prefix = f"fuzz-{uuid.uuid4().hex[:8]}"
    jobs, out, dead = f"{prefix}-jobs", f"{prefix}-out", f"{prefix}-dlq"
    storage = f"sqlite:///{tmp_path}/spool.db"
    url = f"{REDIS_URL}?group={prefix}&block_ms=200"
    config = write_config(tmp_path / "configuration.yaml", url, url, jobs, out, dead)
    daemon = Daemon(config, {"PAYLER_STORAGE_URL": storage}, tmp_path)
    fuzz_field = FUZZ_ID.encode()
    try:
        await daemon.start()
        sent = {f"stream-{i:05d}": e for i, e in enumerate(entries)}
        positions: dict[str, str] = {}
        for fuzz_id, e in sent.items():
            entry_id = await redis_client.xadd(jobs, e.fields(fuzz_field, fuzz_id))  # type: ignore[arg-type]
            positions[f"redis:{jobs}:{entry_id.decode()}"] = fuzz_id

        async def outputs() -> int:
            return int(await redis_client.xlen(out)) + int(await redis_client.xlen(dead))

        await run_until_out(daemon, outputs, len(sent))
        await daemon.stop()
        outcome = Outcome()
        anonymous = []
        for _, fields in await redis_client.xrange(out):
            fuzz_id = _fuzz_id_of(fields, fuzz_field, positions)
            if fuzz_id is None:
                anonymous.append(fields)
            else:
                outcome.delivered[fuzz_id].append(fields)
        for _, fields in await redis_client.xrange(dead):
            headers = _headers_of(fields)
            fuzz_id = _fuzz_id_of(fields, fuzz_field, positions) or "?"
            outcome.dead[fuzz_id].append(str(headers.get(DEAD_LETTER_REASON, "")))
        # Delivered without the fuzz id (every field of the producer's own dropped): told
        # apart by body and key among the entries not found otherwise.
        for fields in anonymous:
            candidates = [
                fuzz_id for fuzz_id, e in sent.items()
                if fuzz_id not in outcome.delivered and fuzz_id not in outcome.dead
                and (e.body or b"", e.key) == (fields.get(b"body", b""), fields.get(b"key"))
            ]  # fmt: skip
            if candidates:
                outcome.delivered[candidates[0]].append(fields)
            else:
                outcome.unknown += 1
        left = len(await spool_ids(storage))
    finally:
        await redis_client.delete(jobs, out, dead)
    row, problems = outcome.row(
        f"fuzz: Redis streams ({len(sent)} entries)", sent,
        lambda e, got: check_stream(e, got, fuzz_field, from_stream_fields),
        lambda e: e.valid, left, daemon,
    )  # fmt: skip
    report(row, problems, record, daemon)


def _headers_of(fields: dict[bytes, bytes]) -> dict[str, Any]:
    try:
        headers = codec.loads(fields.get(b"headers", b"{}"))
    except ValueError:
        return {}
    return headers if isinstance(headers, dict) else {}


def _fuzz_id_of(
    fields: dict[bytes, bytes], fuzz_field: bytes, positions: dict[str, str]
) -> str | None:
    """The fuzz id of a delivered or dead-lettered entry: its own field (a header now), in the
    raw fields of an undecodable one, or its spool id (on a minimal dead letter)."""
    headers = _headers_of(fields)
    name = fuzz_field.decode()
    for where in (headers, headers.get(UNDECODABLE_FIELDS) or {}):
        if isinstance(where, dict) and isinstance(where.get(name), str):
            return str(where[name])
    return positions.get(str(headers.get(DEAD_LETTER_ID, "")))


# -- AMQP edge cases: one odd message among good ones ----------------------------------------------


@dataclass
class Edge:
    """One odd AMQP message (sent by pika, as a client other than payler's would) and what
    must become of it: ``delivered`` (then ``expect`` checks the delivered copy) or
    ``dead-lettered``."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    outcome: str
    expect: Callable[[Any, dict[str, Any]], list[str]] = lambda _props, _headers: []


def _after_2106(props: Any, headers: dict[str, Any]) -> list[str]:
    problems = []
    if props.timestamp != 7_258_118_400:
        problems.append(f"timestamp property {props.timestamp}, not 7258118400")
    when = headers.get("when")
    expected = datetime(2200, 1, 1, tzinfo=UTC)
    if not isinstance(when, datetime) or when.replace(tzinfo=UTC) != expected:
        problems.append(f"header 'when' {when!r}, not 2200-01-01")
    return problems


EDGES = {
    "dead letter of a 126 kB header": Edge({"big": "h" * 126_000, "x-delay": "soon"}, {}, "dead"),
    "timestamp 2**62": Edge({"x-delay": 0}, {"timestamp": 2**62}, "either"),
    "timestamps after 2106": Edge(
        {"x-delay": 0, "when": datetime(2200, 1, 1)},
        {"timestamp": 7_258_118_400},
        "delivered",
        _after_2106,
    ),
    "x-delay as a byte array": Edge({"x-delay": b"100"}, {}, "delivered"),
}


PikaMessage = tuple[bytes, dict[str, Any], dict[str, Any]]  # body, headers, properties


def _pika_publish(url: str, queue: str, messages: list[PikaMessage]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, headers, properties in messages:
            channel.basic_publish(
                "", queue, body, pika.BasicProperties(headers=headers, **properties)
            )
    finally:
        connection.close()


def _pika_take(url: str, queue: str) -> list[tuple[Any, bytes]]:
    """Every message on ``queue`` (properties and body), as pika decodes them."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    got = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((properties, body))
    finally:
        connection.close()


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    "edge",
    [
        pytest.param("dead letter of a 126 kB header", id="big-header-dead-letter"),
        pytest.param("timestamp 2**62", id="timestamp-2**62"),
        pytest.param("timestamps after 2106", id="after-2106"),
        pytest.param("x-delay as a byte array", id="x-delay-bytes"),
    ],
)
async def test_amqp_edge_message_among_good_ones(
    edge: str,
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    record: list[Row],
) -> None:
    # The odd message first, then 100 good ones: the good ones must flow whatever the odd one
    # does, and the odd one must come out as its case says.
    case = EDGES[edge]
    storage = f"sqlite:///{tmp_path}/spool.db"
    config = write_config(
        tmp_path / "configuration.yaml", node.payler_url, node.payler_url,
        queues.jobs, queues.out, queues.dead,
    )  # fmt: skip
    daemon = Daemon(config, {"PAYLER_STORAGE_URL": storage}, tmp_path)
    await daemon.start()
    good = [(f"good-{i}".encode(), {"x-delay": 0}, {"message_id": f"good-{i}"}) for i in range(100)]
    odd = (b"odd", case.headers, {"message_id": "odd", **case.properties})
    await asyncio.to_thread(_pika_publish, node.url, queues.jobs, [odd, *good])

    async def outputs() -> int:
        return sum(await broker.depths(queues.out, queues.dead))

    await run_until_out(daemon, outputs, 101)
    await daemon.stop()
    delivered = await asyncio.to_thread(_pika_take, node.url, queues.out)
    dead = await asyncio.to_thread(_pika_take, node.url, queues.dead)
    # pika reads what aio-pika may not (the odd message may still be in the source)
    in_source = await asyncio.to_thread(_pika_take, node.url, queues.jobs)
    left = len(in_source) + len(await spool_ids(storage))
    outcome = Outcome()
    for props, body in delivered:
        outcome.delivered[props.message_id or body.decode(errors="replace")].append(props)
    for props, _ in dead:
        reason = (props.headers or {}).get(DEAD_LETTER_REASON, b"")
        outcome.dead[props.message_id or "?"].append(
            reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        )
    sent = {"odd": case, **{f"good-{i}": None for i in range(100)}}

    def check(message: Edge | None, props: Any) -> list[str]:
        if message is None:
            return []
        return message.expect(props, dict(props.headers or {}))

    def must_deliver(message: Edge | None) -> bool:
        return message is None or message.outcome == "delivered"

    row, problems = outcome.row(f"AMQP edge: {edge}", sent, check, must_deliver, left, daemon)
    if case.outcome == "dead" and "odd" not in outcome.dead:
        problems.append("the odd message was not dead-lettered")
    report(row, problems, record, daemon)
