"""Several payler processes watching one spool: no duplicates, and a killed one's claims recovered.

The spool is filled through the storage API (as if ingested earlier: every entry is already due),
then three ``payler`` processes run only ``client.watch_storage`` on it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from aio_pika.abc import AbstractIncomingMessage

from payler.drivers.storages import storage_from_url
from payler.payload import Payload
from tests.conftest import AMQP_URL, Rabbit
from tests.integration.conftest import Payler

pytestmark = pytest.mark.rabbitmq

#: Entries on the local Redis Cluster: bounded in CI (10,000 passed in 30 s on a shared 2-core
#: machine, the cluster's six processes on it too); PAYLER_TEST_CLUSTER_ENTRIES=10000 for the
#: full size.
CLUSTER_ENTRIES = int(os.environ.get("PAYLER_TEST_CLUSTER_ENTRIES", "3000"))
CLUSTER = [pytest.mark.redis, pytest.mark.redis_cluster]


@dataclass
class Spool:
    url: str
    size: int  # how many entries the tests put in it: MongoDB's stand-in is slow


@pytest.fixture(
    params=[
        pytest.param(("sqlite", 10_000), id="sqlite"),
        pytest.param(("redis", 10_000), id="redis", marks=pytest.mark.redis),
        pytest.param(("redis-cluster", CLUSTER_ENTRIES), id="redis-cluster", marks=CLUSTER),
        pytest.param(("mongodb", 300), id="mongodb", marks=pytest.mark.mongodb),
        pytest.param(("postgres", 10_000), id="postgres", marks=pytest.mark.postgres),
    ]
)
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Spool:
    kind, size = request.param
    if kind == "sqlite":
        return Spool(f"sqlite:///{tmp_path}/spool.db", size)
    if kind == "redis":
        return Spool(request.getfixturevalue("redis_spool_url"), size)
    if kind == "redis-cluster":  # a local cluster of three masters, 16 shards
        return Spool(request.getfixturevalue("redis_cluster_url"), size)
    if kind == "postgres":
        return Spool(request.getfixturevalue("postgres_url"), size)
    return Spool(request.getfixturevalue("mongodb_url"), size)


class Deliveries:
    """Every message that reaches the destination, duplicates included."""

    def __init__(self, expected: int) -> None:
        self.bodies: list[bytes] = []
        self.expected = expected
        self.all_arrived = asyncio.Event()
        self.some_arrived = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.bodies.append(message.body)
        await message.ack()
        if len(self.bodies) >= self.expected // 10:
            self.some_arrived.set()
        if len(set(self.bodies)) >= self.expected:
            self.all_arrived.set()


async def fill(spool: Spool, destination: str, count: int) -> set[bytes]:
    async with storage_from_url(spool.url) as storage:
        now_ms = storage.clock.now_ms()
        bodies = [f"entry-{i}-{uuid.uuid4().hex[:6]}".encode() for i in range(count)]
        for start in range(0, count, 1000):
            await storage.store(
                [
                    Payload(
                        id=body.decode(),
                        body=body,
                        destination=destination,
                        due_ms=now_ms - 1000,
                        created_ms=now_ms,
                    )
                    for body in bodies[start : start + 1000]
                ]
            )
    return set(bodies)


@pytest.fixture
async def watchers(
    rabbit: Rabbit, tmp_path: Path, spool: Spool
) -> tuple[Path, str, dict[str, str]]:
    out, dead = rabbit.queue_name("out"), rabbit.queue_name("dlq")
    config = tmp_path / "watch.yaml"
    config.write_text(
        f"""
workflows:
  - callable: client.watch_storage
    options: {{declare_queues: ["{out}"], dead_letter_queue: "{dead}", lease_ms: 3000}}
"""
    )
    await rabbit.channel.declare_queue(out, durable=True)
    return config, out, {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": spool.url}


async def test_three_instances_deliver_everything_exactly_once(
    rabbit: Rabbit, tmp_path: Path, spool: Spool, watchers: tuple[Path, str, dict[str, str]]
) -> None:
    config, out, env = watchers
    # A lease far longer than a batch takes, even on a loaded machine: exactly once holds only
    # while no lease expires under a delivery in progress (at least once is what holds always;
    # the next test shows it with short leases).
    config.write_text(config.read_text().replace("lease_ms: 3000", "lease_ms: 20000"))
    expected = await fill(spool, out, spool.size)
    deliveries = Deliveries(len(expected))
    channel = await rabbit.connection.channel()
    await (await channel.declare_queue(out, passive=True)).consume(deliveries.on_message)

    instances = [await Payler.start(config, env, tmp_path) for _ in range(3)]
    try:
        await asyncio.wait_for(deliveries.all_arrived.wait(), 120)
        await rabbit.drain(out, settle_s=1.0)  # a duplicate would arrive here
    finally:
        codes = [await p.stop() for p in instances]
    assert codes == [0, 0, 0], [p.log for p in instances]
    counts = Counter(deliveries.bodies)
    assert set(counts) == expected
    assert max(counts.values()) == 1, f"duplicates: {counts.most_common(3)}"
    # Entries that came due while no instance ran (misfires) were delivered, lateness reported.
    assert any("lateness ms p50=" in p.log for p in instances)
    if spool.size >= 10_000:  # on a small spool one instance may claim it all before the others
        assert all("delivered=" in p.log for p in instances), [p.log[-300:] for p in instances]


async def test_a_killed_instance_s_claims_are_delivered_by_the_others(
    rabbit: Rabbit, tmp_path: Path, spool: Spool, watchers: tuple[Path, str, dict[str, str]]
) -> None:
    config, out, env = watchers
    expected = await fill(spool, out, min(spool.size, 3000))
    deliveries = Deliveries(len(expected))
    channel = await rabbit.connection.channel()
    await (await channel.declare_queue(out, passive=True)).consume(deliveries.on_message)

    instances = [await Payler.start(config, env, tmp_path) for _ in range(3)]
    try:
        await asyncio.wait_for(deliveries.some_arrived.wait(), 60)
        await instances[0].kill()  # kill -9 while it holds claims
        await asyncio.wait_for(deliveries.all_arrived.wait(), 120)
    finally:
        codes = [await p.stop() for p in instances[1:]]
    assert codes == [0, 0]
    counts = Counter(deliveries.bodies)
    assert set(counts) == expected, f"lost: {len(expected - set(counts))}"
    # At least once: only what the killed instance had published but not yet deleted (one
    # batch at most) may come twice.
    assert sum(n - 1 for n in counts.values()) <= 100
