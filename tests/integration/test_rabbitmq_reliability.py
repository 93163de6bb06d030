"""The RabbitMQ driver under the faults of issue 7, through the built-in workflows, on the real
RabbitMQ: a destination that refuses for now, a dead letter too large for a frame, messages
payler cannot read, and large bodies."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aio_pika
import pika
import pytest

from payler import client, config
from payler.drivers.base import Rejection
from payler.drivers.brokers.base import DEAD_LETTER_REASON, DEAD_LETTER_TRUNCATED, Broker
from payler.drivers.storages import storage_from_url
from payler.payload import Payload
from payler.runtime import Runtime
from tests import pika_client
from tests.conftest import AMQP_URL, Rabbit
from tests.integration.conftest import Payler
from tests.pika_client import WireSeconds

pytestmark = pytest.mark.rabbitmq


@contextlib.asynccontextmanager
async def running(config_file: Path) -> AsyncIterator[Runtime]:
    """payler's runtime on ``config_file``, in this process, until the block ends."""
    runtime = Runtime(config.load(config_file))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        await asyncio.wait_for(runtime.started.wait(), 20)
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_message_refused_for_now_comes_back_after_a_growing_backoff(
    rabbit: Rabbit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The destination queue is full and refuses publishes (x-overflow: reject-publish): the
    # broker nacks them, the forward workflow hands the message back to its source for now.
    # A nack with requeue comes back at once: 4,595 redeliveries in 7.5 s before.
    source, full, open_ = (rabbit.queue_name(r) for r in ("source", "full", "open"))
    dead = rabbit.queue_name("dead")
    limits = {"x-max-length": 1, "x-overflow": "reject-publish"}
    await rabbit.channel.declare_queue(full, durable=True, arguments=limits)
    await rabbit.publish(full, aio_pika.Message(b"filler"))
    await rabbit.channel.declare_queue(open_, durable=True)
    refused = asyncio.Queue[float]()  # when the source handed the refused message over
    original = client.relay

    async def spy(
        batch: Sequence[Payload], destination: Broker, *args: object, **kwargs: object
    ) -> list[Rejection]:
        for payload in batch:
            if payload.body == b"refused":
                refused.put_nowait(time.monotonic())
        return await original(batch, destination, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client, "relay", spy)
    config_file = tmp_path / "forward.yaml"
    config_file.write_text(
        f"""
workflows:
  - callable: client.forward
    options: {{source_url: "{AMQP_URL}", destination_url: "{AMQP_URL}", queue: "{source}",
               default_destination: "{full}", dead_letter_queue: "{dead}"}}
"""
    )
    async with running(config_file):
        await rabbit.publish(source, aio_pika.Message(b"refused", message_id="refused"))
        times = [await asyncio.wait_for(refused.get(), 5)]
        for round_ in range(3):
            # Meanwhile the others flow: one published now arrives long before the retry.
            body = f"flows-{round_}".encode()
            headers = {"x-destination": open_}
            await rabbit.publish(source, aio_pika.Message(body, headers=headers))
            [(_, arrived)] = await rabbit.collect(open_, 1, timeout_s=5)
            assert arrived.body == body
            times.append(await asyncio.wait_for(refused.get(), 10))
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Backoff 0.5 s doubling, ±20 % jitter: about 0.5, 1, 2 s — each longer than the last.
    assert gaps[0] >= 0.35, gaps
    assert gaps[1] > gaps[0] and gaps[2] > gaps[1], gaps
    assert refused.qsize() == 0  # no redelivery in between
    assert await rabbit.count(source) == 1  # still in the source: nothing lost
    assert await rabbit.count(dead) == 0


async def test_a_dead_letter_too_large_for_a_frame_is_sent_minimal_and_the_rest_flows_once(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    # A ~131 kB header and no x-delay: payler's reason headers pushed the dead letter past
    # frame_max → FRAME_ERROR → the connection died with the batch unacknowledged, and its
    # batch-mates (no message id: random spool ids) were spooled again on every cycle.
    jobs, out, dead = rabbit.queue_name("jobs"), rabbit.queue_name("out"), rabbit.queue_name("dead")
    config_file = tmp_path / "configuration.yaml"
    config_file.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{broker_url: "{AMQP_URL}", storage_url: "sqlite:///{tmp_path}/spool.db",
               queue: "{jobs}", default_destination: "{out}", dead_letter_queue: "{dead}"}}
  - callable: client.watch_storage
    options: {{broker_url: "{AMQP_URL}", storage_url: "sqlite:///{tmp_path}/spool.db",
               declare_queues: ["{out}"], dead_letter_queue: "{dead}"}}
"""
    )
    big = "h" * (131_072 - 200)  # the producer's own frame fits; the dead letter's would not
    messages = [(b"big", pika.BasicProperties(headers={"big": big}))]
    messages += [
        (f"good-{i}".encode(), pika.BasicProperties(headers={"x-delay": 0})) for i in range(6)
    ]
    async with running(config_file):
        await rabbit.channel.declare_queue(jobs, durable=True)
        await pika_client.publish(jobs, messages)
        [(_, letter)] = await rabbit.collect(dead, 1, timeout_s=15)
        arrived = await rabbit.collect(out, 6, timeout_s=15)
    assert letter.body == b"" and "frame_max" in str(letter.headers[DEAD_LETTER_TRUNCATED])
    assert "missing x-delay" in str(letter.headers[DEAD_LETTER_REASON])
    bodies = sorted(m.body for _, m in arrived) + sorted(m.body for m in await rabbit.drain(out))
    assert bodies == [f"good-{i}".encode() for i in range(6)]  # each once
    assert await rabbit.count(jobs) == 0 and await rabbit.count(dead) == 0


async def test_messages_payler_cannot_read_are_dead_lettered_and_the_queue_flows_on(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    # A timestamp property of 2**62 killed the connection (pamqp could not decode it): payler
    # restarted for ever and none of the messages behind it was spooled.
    jobs, out, dead = rabbit.queue_name("jobs"), rabbit.queue_name("out"), rabbit.queue_name("dead")
    config_file = tmp_path / "configuration.yaml"
    config_file.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{broker_url: "{AMQP_URL}", storage_url: "sqlite:///{tmp_path}/spool.db",
               queue: "{jobs}", default_destination: "{out}", dead_letter_queue: "{dead}"}}
  - callable: client.watch_storage
    options: {{broker_url: "{AMQP_URL}", storage_url: "sqlite:///{tmp_path}/spool.db",
               declare_queues: ["{out}"], dead_letter_queue: "{dead}"}}
"""
    )
    delay = {"x-delay": 0}
    bad = [
        (b"ts", pika.BasicProperties(timestamp=2**62, headers=delay)),
        (b"id", pika.BasicProperties(message_id=b"\xc3\x28", headers=delay)),
        (b"hts", pika.BasicProperties(headers={**delay, "at": WireSeconds(2**64 - 1)})),
    ]
    good = [(f"good-{i}".encode(), pika.BasicProperties(headers=delay)) for i in range(20)]
    async with running(config_file):
        await rabbit.channel.declare_queue(jobs, durable=True)
        await pika_client.publish(jobs, bad + good)
        letters = await rabbit.collect(dead, 3, timeout_s=15)
        arrived = await rabbit.collect(out, 20, timeout_s=15)
    reasons = {m.body: str(m.headers[DEAD_LETTER_REASON]) for _, m in letters}
    assert reasons.keys() == {b"ts", b"id", b"hts"}
    assert f"timestamp property ({2**62} s) is beyond the year 9999" in reasons[b"ts"]
    assert "message_id property is not UTF-8 (b'\\xc3(')" in reasons[b"id"]
    assert f"header 'at' is a timestamp ({2**64 - 1} s)" in reasons[b"hts"]
    assert sorted(m.body for _, m in arrived) == sorted(body for body, _ in good)
    assert await rabbit.count(jobs) == 0


def memory_kb(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of process ``pid``, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


#: Large bodies, 50 MB each as in the issue, all waiting in the queue when payler starts.
BODY_MB = 50
BODIES = 6


async def test_memory_stays_bounded_however_large_the_bodies(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    # Prefetch counts messages, not bytes: with the default window of 200, every large body
    # waiting in the queue was pushed to payler at once (344 MB peak here before the fix; ten
    # bodies and a watcher took it to 1.2 GB).
    jobs, dead = rabbit.queue_name("jobs"), rabbit.queue_name("dead")
    spool_url = f"sqlite:///{tmp_path}/spool.db"
    config_file = tmp_path / "configuration.yaml"
    config_file.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{queue: "{jobs}", dead_letter_queue: "{dead}"}}
"""
    )
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": spool_url}
    await rabbit.channel.declare_queue(jobs, durable=True)
    body = b"x" * (BODY_MB << 20)
    for i in range(BODIES):
        message = aio_pika.Message(body, message_id=f"big-{i}", headers={"x-delay": 3_600_000})
        await rabbit.publish(jobs, message)
    del body
    payler = await Payler.start(config_file, env, tmp_path)
    try:
        await payler.running()
        baseline_mb = memory_kb(payler.process.pid, "VmRSS") / 1024
        async with storage_from_url(spool_url) as spool:
            deadline = time.monotonic() + 120
            # Spooled (or dead-lettered, should the spool refuse bodies this large).
            while await spool.count() + await rabbit.count(dead) < BODIES:
                assert time.monotonic() < deadline, payler.log
                await asyncio.sleep(0.2)  # polling a spool that another process writes
        peak_mb = memory_kb(payler.process.pid, "VmHWM") / 1024
    finally:
        assert await payler.stop() == 0, payler.log
    # The bound: bodies over the 32 MiB budget come one at a time, so the consumer holds one
    # body (its one copy: aiormq assembles it in place); the SQLite spool's write of it costs
    # two more at its peak (the blob it binds, the pages it writes: measured); one more body
    # of slack for the allocator. Before the fix, all six came at once.
    bound_mb = baseline_mb + 4 * BODY_MB
    assert peak_mb < bound_mb, f"peak RSS {peak_mb:.0f} MB, bound {bound_mb:.0f} MB"


async def test_a_wrong_virtual_host_stops_payler_at_start_naming_it(tmp_path: Path) -> None:
    config_file = tmp_path / "configuration.yaml"
    config_file.write_text("workflows:\n  - callable: client.process_queue\n")
    env = {
        "BROKER_URL": f"{AMQP_URL.rstrip('/')}/no-such-vhost",
        "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db",
    }
    payler = await Payler.start(config_file, env, tmp_path)
    assert await payler.wait() == 2, payler.log
    assert "refused to open virtual host 'no-such-vhost'" in payler.log
    assert "InvalidFrameError" not in payler.log
