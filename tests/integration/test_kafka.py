"""End to end with Kafka, as a user runs it: ``payler --config-file`` with ``kafka://`` broker
URLs in the built-in workflows, the embedded (SQLite) spool, and a tansu broker (Kafka-compatible)
that a fixture starts; records are published and read with an ordinary Kafka client.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from payler.drivers.brokers.base import DEAD_LETTER_REASON, DEAD_LETTER_TRUNCATED
from payler.drivers.brokers.kafka import KafkaBroker
from payler.drivers.brokers.mapping import from_kafka_headers, to_kafka_headers
from payler.drivers.storages import storage_from_url
from payler.faults import FAULT_EXIT_STATUS
from payler.testing import make_payload
from tests.conftest import AMQP_URL, Kafka, Rabbit
from tests.integration.conftest import Payler

pytestmark = pytest.mark.kafka


def configure(
    tmp_path: Path, source_url: str, queue: str, kafka: Kafka, batch_size: int = 100
) -> tuple[Path, dict[str, str], str, str]:
    """Spool what arrives on ``queue`` at ``source_url``; deliver it to a Kafka topic."""
    out, dead = kafka.topic("out"), kafka.topic("dlq")
    storage_url = f"sqlite:///{tmp_path}/spool.db"
    config = tmp_path / "configuration.yaml"
    config.write_text(
        f"""
workflows:
  - name: "Spool {queue}"
    callable: client.process_queue
    options: {{broker_url: "{source_url}", queue: "{queue}", default_destination: "{out}",
               dead_letter_queue: "{dead}", batch_size: {batch_size}}}
  - name: "Deliver to Kafka"
    callable: client.watch_storage
    options: {{broker_url: "{kafka.url()}", declare_queues: ["{out}"],
               dead_letter_queue: "{dead}", max_poll_interval_ms: 500, lease_ms: 1000}}
stats_interval_seconds: 1
"""
    )
    return config, {"PAYLER_STORAGE_URL": storage_url}, out, dead


async def test_kafka_topics_in_and_out_delay_every_record_and_keep_it_intact(
    kafka: Kafka, tmp_path: Path
) -> None:
    jobs = kafka.topic("jobs")
    config, env, out, dead = configure(tmp_path, kafka.url(), jobs, kafka)
    n, delays = 120, [0, 50, 300, 700, 1200, 1800]
    published_ms = round(time.time() * 1000)
    records = []
    for i in range(n):
        headers: dict[str, Any] = {"x-delay": f"{delays[i % len(delays)]}", "n": f"{i}"}
        if i % 2:  # with typed headers and properties, as payler itself publishes (mapping.py)
            headers |= {"count": i, "price": Decimal("12.50"), "raw": b"\x00\xff"}
            payload = make_payload(
                b"",
                content_type="application/json",
                correlation_id=f"c-{i}",
                timestamp_ms=published_ms,
            )
            wire = to_kafka_headers(payload, headers)
        else:  # as a plain Kafka client sends them: text headers, properties by their usual names
            wire = [(k, v.encode()) for k, v in headers.items()]
            wire += [("content-type", b"application/json"), ("correlation-id", f"c-{i}".encode())]
        records.append((f"key-{i % 7}".encode(), f"{i}".encode(), wire))
    bad = [(b"bad", b"bad-1", [("x-delay", b"soon")]), (None, b"bad-2", [("x-delay", b"-5")])]

    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await kafka.produce(jobs, records + bad, timestamp_ms=published_ms)
        arrived = await kafka.collect(out, n, timeout_s=30, settle_s=1.0)
        dead_letters = await kafka.collect(dead, len(bad), timeout_s=10)
    finally:
        code = await payler.stop()

    assert code == 0, payler.log
    values = [record.value for _, record in arrived]
    assert len(values) == len(set(values)) == n, (len(values), len(set(values)))
    for arrival, record in arrived:
        i = int(record.value)
        _, _, sent_headers = records[i]
        early_ms = published_ms + delays[i % len(delays)] - arrival * 1000
        assert early_ms <= 0, f"record {i} arrived {early_ms:.0f} ms before it was due"
        assert record.key == f"key-{i % 7}".encode()
        headers, properties = from_kafka_headers(record.headers, None)
        expected, _ = from_kafka_headers(sent_headers, None)
        del expected["x-delay"]  # not delayed twice
        assert headers == expected
        assert (properties.content_type, properties.correlation_id) == (
            "application/json",
            f"c-{i}",
        )
        # The publish time is kept, in a header; the record itself is stamped when payler sent it.
        assert from_kafka_headers(record.headers, record.timestamp)[1].timestamp_ms == published_ms
        assert record.timestamp >= published_ms + delays[i % len(delays)]
    reasons = {r.value: dict(r.headers)[DEAD_LETTER_REASON].decode() for _, r in dead_letters}
    assert set(reasons) == {b"bad-1", b"bad-2"}, payler.log
    assert "not a number" in reasons[b"bad-1"] and "negative" in reasons[b"bad-2"]


def duplicates(log: str) -> int:
    """How many stored records the summary lines counted as already spooled."""
    return sum(int(n) for n in re.findall(r"duplicates=(\d+)", log))


async def until_logged(payler: Payler, done: Callable[[str], bool], timeout_s: float = 20) -> None:
    """Wait until payler's log satisfies ``done`` (its summary lines come every second)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not done(payler.log):
                payler._changed.clear()
                await payler._changed.wait()
    except TimeoutError:
        pytest.fail(f"payler's log never showed it; its output:\n{payler.log}")


@pytest.mark.parametrize(
    "delay_ms",
    [
        # Delivered (a tombstone left behind) before the restarted consumer consumes it again.
        pytest.param(0, id="delivered-then-consumed-again"),
        # Still in the spool when consumed again.
        pytest.param(2000, id="pending-then-consumed-again"),
    ],
)
async def test_a_crash_between_store_and_commit_spools_nothing_twice(
    kafka: Kafka, tmp_path: Path, delay_ms: int
) -> None:
    n, jobs = 60, kafka.topic("jobs")
    config, env, out, _ = configure(tmp_path, kafka.url(), jobs, kafka, batch_size=n)
    async with storage_from_url(env["PAYLER_STORAGE_URL"]):
        pass  # the spool file exists before the crash, so it can be counted after it
    # All of them first, so that the first batch is a large one.
    records = [(None, f"m{i}".encode(), [("x-delay", f"{delay_ms}".encode())]) for i in range(n)]
    await kafka.produce(jobs, records)

    crashing = await Payler.start(config, {**env, "PAYLER_FAULT": "after-store"}, tmp_path)
    code = await crashing.wait(timeout_s=30)
    assert code == FAULT_EXIT_STATUS, crashing.log
    assert "injected fault at 'after-store'" in crashing.log
    async with storage_from_url(env["PAYLER_STORAGE_URL"]) as storage:
        stored_before_crash = await storage.count()
    assert stored_before_crash > 0, "the crash came after a store"

    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        # The stored batch is consumed again (its offsets were never committed): recognised.
        await until_logged(payler, lambda log: duplicates(log) >= stored_before_crash)
        arrived = await kafka.collect(out, n, timeout_s=30, settle_s=1.0)
    finally:
        code = await payler.stop()
    assert code == 0, payler.log
    delivered = Counter(record.value for _, record in arrived)
    assert set(delivered) == {f"m{i}".encode() for i in range(n)}, "lost"
    assert max(delivered.values()) == 1, f"spooled twice: {delivered.most_common(3)}"


@pytest.mark.rabbitmq
async def test_rabbitmq_in_kafka_out_keeps_properties_and_typed_headers(
    kafka: Kafka, rabbit: Rabbit, tmp_path: Path
) -> None:
    jobs = rabbit.queue_name("jobs")
    config, env, out, _ = configure(tmp_path, AMQP_URL, jobs, kafka)
    headers = {
        "n": 1,
        "flag": True,
        "raw": bytearray(b"\x00\xff"),
        "price": Decimal("12.50"),
        "nested": {"list": [1, "two", True]},
        "text": "plain",
    }
    sent_at = datetime.now(UTC)
    messages = [
        aio_pika.Message(
            f"{i}".encode(),
            headers={"x-delay": 200, **headers},
            content_type="application/json",
            correlation_id=f"c-{i}",
            message_id=f"m-{i}",
            priority=3,
            timestamp=sent_at,
            app_id="payler-tests",
        )
        for i in range(20)
    ]
    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        for message in messages:
            await rabbit.publish(jobs, message)
        arrived = await kafka.collect(out, len(messages), timeout_s=30, settle_s=0.5)
    finally:
        code = await payler.stop()
    assert code == 0, payler.log
    assert sorted(int(r.value) for _, r in arrived) == list(range(len(messages)))
    for _, record in arrived:
        got_headers, properties = from_kafka_headers(record.headers, record.timestamp)
        assert got_headers == {**headers, "raw": b"\x00\xff"}
        assert properties.correlation_id == f"c-{int(record.value)}"
        assert properties.message_id == f"m-{int(record.value)}"
        assert (properties.content_type, properties.priority, properties.app_id) == (
            "application/json",
            3,
            "payler-tests",
        )
        # AMQP timestamps are whole seconds: the record carries that publish time.
        assert properties.timestamp_ms == int(sent_at.timestamp()) * 1000
        assert record.key is None


def write_config(tmp_path: Path, workflows: str) -> Path:
    config = tmp_path / "configuration.yaml"
    config.write_text(f"workflows:\n{workflows}\nstats_interval_seconds: 1\n")
    return config


@pytest.mark.parametrize("workflow", ["forward", "watch_storage"])
async def test_a_record_too_large_is_dead_lettered_once_and_its_batch_mates_delivered_once(
    kafka: Kafka, tmp_path: Path, workflow: str
) -> None:
    """The issue's headline: the destination refuses one record for good (too large), and its
    dead-letter copy is larger still. It must be dead-lettered once (a minimal copy), its
    batch-mates delivered once, and payler must go on — no restart loop, no redelivery."""
    jobs, out, dead = kafka.topic("jobs"), kafka.topic("out"), kafka.topic("dlq")
    # The destination takes records of at most 2,000 bytes (the producer checks it).
    small = kafka.url() + "&max_request_size=2000"
    if workflow == "forward":
        workflows = f"""
  - name: forward
    callable: client.forward
    options: {{source_url: "{kafka.url()}", queue: "{jobs}", destination_url: "{small}",
               default_destination: "{out}", dead_letter_queue: "{dead}"}}"""
    else:
        workflows = f"""
  - name: spool
    callable: client.process_queue
    options: {{broker_url: "{kafka.url()}", queue: "{jobs}", default_destination: "{out}",
               dead_letter_queue: "{dead}", default_delay_ms: 0}}
  - name: deliver
    callable: client.watch_storage
    options: {{broker_url: "{small}", declare_queues: ["{out}"], dead_letter_queue: "{dead}",
               max_attempts: 3, retry_base_ms: 100, max_poll_interval_ms: 200}}"""
    config = write_config(tmp_path, workflows)
    env = {"PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"}
    async with KafkaBroker(kafka.url() + "&partitions=1") as admin:
        await admin.ensure_queue(jobs)  # one partition: one batch, in order
    records = [(b"k", f"small-{i}".encode(), [("n", f"{i}".encode())]) for i in range(4)]
    records.insert(2, (b"k", b"L" * 5000, [("n", b"large")]))

    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await kafka.produce(jobs, records)
        arrived = await kafka.collect(out, 4, timeout_s=30, settle_s=3.0)
        dead_letters = await kafka.collect(dead, 1, timeout_s=10, settle_s=1.0)
    finally:
        code = await payler.stop()

    assert code == 0, payler.log
    delivered = Counter(record.value for _, record in arrived)
    assert delivered == Counter(f"small-{i}".encode() for i in range(4)), payler.log
    [(_, letter)] = dead_letters
    headers = dict(letter.headers)
    assert letter.value == b""  # the minimal copy: the full one was refused too
    assert b"MessageSizeTooLargeError" in headers[DEAD_LETTER_REASON]
    assert b"body of 5000 bytes" in headers[DEAD_LETTER_TRUNCATED]
    assert "restarting" not in payler.log.lower(), payler.log


async def test_records_sent_40_ms_apart_are_delivered_40_ms_apart(
    kafka: Kafka, tmp_path: Path
) -> None:
    """Kafka timestamps have millisecond resolution: a backlog under a second must not make
    records due together (as AMQP's one-second slack would): each is due at its own
    timestamp + its delay."""
    jobs = kafka.topic("jobs")
    config, env, out, _ = configure(tmp_path, kafka.url() + "&partitions=1", jobs, kafka)
    async with KafkaBroker(kafka.url() + "&partitions=1") as admin:
        await admin.ensure_queue(jobs)
    delay_ms, n = 1500, 10
    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        # Sent 40 ms apart, consumed together: a backlog of 360 ms, as behind a slow consumer.
        first_ms = round(time.time() * 1000) - 400
        stamps = [first_ms + 40 * i for i in range(n)]
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
        await producer.start()
        try:
            for i, stamp in enumerate(stamps):
                await producer.send(
                    jobs, f"{i}".encode(), headers=[("x-delay", b"1500")], timestamp_ms=stamp
                )
            await producer.flush()
        finally:
            await producer.stop()
        arrived = await kafka.collect(out, n, timeout_s=30, settle_s=0.5)
    finally:
        code = await payler.stop()

    assert code == 0, payler.log
    # When payler published each one: the out record's own timestamp (payler's clock).
    published = {int(record.value): record.timestamp for _, record in arrived}
    assert sorted(published) == list(range(n)), payler.log
    lateness = [published[i] - (stamps[i] + delay_ms) for i in range(n)]
    assert min(lateness) >= 0, lateness  # never early against its own timestamp
    assert max(lateness) <= 250, lateness  # and on time (a shared machine: some slack)
    spread = published[n - 1] - published[0]
    assert 40 * (n - 1) - 150 <= spread <= 40 * (n - 1) + 250, (spread, lateness)
    # The original publish time travels with each record.
    for _, record in arrived:
        props = from_kafka_headers(record.headers, record.timestamp)[1]
        assert props.timestamp_ms == stamps[int(record.value)]


async def test_a_topic_created_anew_is_not_taken_for_the_old_one(
    kafka: Kafka, tmp_path: Path
) -> None:
    """Its offsets start at 0 again: with spool ids by position alone, the delivered records'
    tombstones would keep the new records out as "redeliveries"."""
    jobs = kafka.topic("jobs")
    source_url = kafka.url() + "&partitions=1&topic_check_ms=300"
    config, env, out, _ = configure(tmp_path, source_url, jobs, kafka)
    async with KafkaBroker(source_url) as admin:
        await admin.ensure_queue(jobs)
    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await kafka.produce(
            jobs, [(None, f"old-{i}".encode(), [("x-delay", b"0")]) for i in range(3)]
        )
        assert len(await kafka.collect(out, 3, timeout_s=30)) == 3, payler.log
        admin_client = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
        await admin_client.start()
        try:
            await admin_client.delete_topics([jobs])
            await admin_client.create_topics([NewTopic(jobs, 1, 1)])
        finally:
            await admin_client.close()
        await kafka.produce(
            jobs, [(None, f"new-{i}".encode(), [("x-delay", b"0")]) for i in range(3)]
        )
        arrived = await kafka.collect(out, 6, timeout_s=30, settle_s=1.0)
    finally:
        code = await payler.stop()
    assert code == 0, payler.log
    assert sorted(record.value for _, record in arrived) == sorted(
        [f"old-{i}".encode() for i in range(3)] + [f"new-{i}".encode() for i in range(3)]
    ), payler.log
    assert duplicates(payler.log) == 0, payler.log
