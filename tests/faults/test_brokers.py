"""The broker misbehaves under load: it closes payler's connections, restarts, loses a queue.

All on the fault suite's own RabbitMQ node (:class:`~tests.faults.servers.RabbitNode`): the
shared one is never restarted, and payler connects as a user of its own so that the broker can
close its connections and no others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.faults.conftest import Queues, Size
from tests.faults.harness import (
    Broker,
    Daemon,
    Row,
    count,
    delivered_all,
    message_ids,
    spool_config,
    spread_delays,
    wait_until,
)
from tests.faults.servers import RabbitNode

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq]

DELIVER_BATCH = 50
#: How long the destination queue stays deleted when payler retries unroutable payloads.
QUEUE_ABSENT_S = 2.0


def daemon_for(node: RabbitNode, queues: Queues, tmp_path: Path, watch: str = "") -> Daemon:
    storage = f"sqlite:///{tmp_path}/spool/spool.db"
    config = spool_config(
        tmp_path / "configuration.yaml",
        jobs=queues.jobs,
        out=queues.out,
        dead=queues.dead,
        deliver_batch=DELIVER_BATCH,
        watch=watch,
    )
    return Daemon(config, {"BROKER_URL": node.payler_url, "PAYLER_STORAGE_URL": storage}, tmp_path)


async def delivered_at_least(broker: Broker, queue: str, n: int) -> bool:
    return (await broker.depths(queue))[0] >= n


@pytest.mark.parametrize("fault", ["connections closed by the broker", "broker restarted"])
async def test_broker_faults_under_load(
    fault: str,
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # Messages due over 3 s; the fault strikes each time another share has been delivered,
    # while payler ingests and delivers. It must reconnect by itself: nothing lost, and
    # duplicates only from publishes whose confirm the fault cut off (at most a batch each).
    daemon = daemon_for(node, queues, tmp_path)
    storage = daemon.env["PAYLER_STORAGE_URL"]
    ids = message_ids("broker", size.messages * 2)
    await daemon.start()
    await broker.publish(queues.jobs, ids, spread_delays(3000))
    for i in range(size.repeats):
        share = len(ids) * (i + 1) // (size.repeats + 2)
        await wait_until(lambda s=share: delivered_at_least(broker, queues.out, s), 60, "share")
        if fault == "broker restarted":
            await broker.close()
            await asyncio.to_thread(node.restart)
        else:
            await asyncio.to_thread(node.close_payler_connections)
    await delivered_all(broker, daemon, len(ids), queues.jobs, queues.out, queues.dead, storage)
    await daemon.stop()
    tally = await count(broker, ids, queues.jobs, queues.out, queues.dead, storage)
    row = tally.row(fault + " under load", daemon.state(), f"{size.repeats} time(s)")
    record.append(row)
    assert row.lost == 0, (row, daemon.log)
    assert row.left == 0, (row, daemon.log)
    assert row.dead_lettered == 0, (row, daemon.log)
    assert row.duplicated <= size.repeats * DELIVER_BATCH, row
    assert daemon.crashes == [], daemon.log


class LiveConsumer:
    """Takes every message off a queue as it arrives (no acknowledgements: the queue stays
    empty), so that deleting the queue destroys nothing."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.ids.append(message.message_id or "")


async def delete_when_empty(url: str, queue: str, timeout_s: float = 30.0) -> None:
    """Delete ``queue`` at a moment it holds no message (``if-empty``: it fails otherwise)."""
    connection = await aio_pika.connect(url)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                channel = await connection.channel()
                try:
                    await channel.queue_delete(queue, if_empty=True)
                    return
                except aiormq.exceptions.PreconditionFailed:
                    continue  # a message was in it at that instant: try again at once
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
    finally:
        await connection.close()


@pytest.mark.parametrize("retry_unroutable", [False, True], ids=["dead-lettered", "retried"])
async def test_destination_queue_deleted_while_entries_are_due(
    retry_unroutable: bool,
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # The destination queue goes away while entries are due: each one due meanwhile is
    # dead-lettered with the reason (retry_unroutable: false) or retried with backoff until the
    # queue is back (true). Nothing is dropped either way.
    watch = f"retry_unroutable: {str(retry_unroutable).lower()}, max_attempts: 50"
    daemon = daemon_for(node, queues, tmp_path, watch=watch)
    storage = daemon.env["PAYLER_STORAGE_URL"]
    ids = message_ids("gone", size.messages)
    consumer = LiveConsumer()
    connection = await aio_pika.connect(node.url)
    channel = await connection.channel()
    out = await channel.declare_queue(queues.out, passive=True)
    await out.consume(consumer.on_message, no_ack=True)
    await daemon.start()
    await broker.publish(queues.jobs, ids, spread_delays(3000))

    async def a_fourth_delivered() -> bool:
        return len(consumer.ids) >= len(ids) // 4

    await wait_until(a_fourth_delivered, 30, "a fourth delivered")
    # payler paused while the queue goes. A publish routed to the queue in the very instant it
    # is deleted can be confirmed and go with it: the operator's deletion destroys it, not
    # payler. That is our reading (not proven) of the one "lost 1" seen in ~10 runs of this
    # scenario; paused, payler has no publish in that instant, and resumed it finds the queue
    # gone, which is what this scenario tests. Its leases (30 s) outlast the pause.
    assert daemon.payler is not None
    os.kill(daemon.payler.process.pid, signal.SIGSTOP)
    try:
        await delete_when_empty(node.url, queues.out)
    finally:
        os.kill(daemon.payler.process.pid, signal.SIGCONT)
    # Deliveries the broker pushed before the delete may still be on their way: a round trip
    # on the consumer's channel comes back after them (a channel's frames keep their order).
    await channel.declare_queue(queues.jobs, passive=True)
    deleted_at = len(consumer.ids)
    await connection.close()
    if retry_unroutable:
        # Back after a while: what was due meanwhile waited in the spool, retried.
        await asyncio.sleep(QUEUE_ABSENT_S)  # the fault's duration, not a wait for work
        await broker.declare(queues.out)
    await delivered_all(broker, daemon, len(ids) - deleted_at, queues.jobs, queues.out,
                        queues.dead, storage)  # fmt: skip
    await daemon.stop()
    tally = await count(broker, ids, queues.jobs, queues.out, queues.dead, storage)
    tally.delivered += consumer.ids
    scenario = "destination queue deleted while due: " + (
        "retried until it is back" if retry_unroutable else "dead-lettered"
    )
    row = tally.row(scenario, daemon.state(), f"deleted after {deleted_at} deliveries")
    record.append(row)
    assert row.lost == 0, (row, daemon.log)
    assert row.left == 0, (row, daemon.log)
    assert row.duplicated == 0, row
    if retry_unroutable:
        assert row.dead_lettered == 0, row
    else:
        assert row.dead_lettered > 0, row
    assert daemon.crashes == [], daemon.log
