"""A Redis Cluster master killed (kill -9) under the spool while entries flow.

A writer stores batches (as ``process_queue`` does: a batch counts as acknowledged to its source
once ``store`` returned) and a claimer claims and acks them (as ``watch_storage`` does), both
retrying outages with backoff, as the runtime does. The master of one shard is killed; its
replica is promoted after ``cluster-node-timeout`` (1 s); the killed node is started again and
rejoins as the new master's replica. Then both go on, and what was acknowledged but never
claimed — written to the old master, not yet to its replica — is counted: *lost*.

Without ``wait_replicas`` replication is asynchronous and the count is reported, not asserted
(on loopback the replica usually has everything within a millisecond; it may miss the last
writes). With ``wait_replicas=1`` a store returns only once the replica has it, so nothing
acknowledged may be lost; while the promoted master has no replica yet its stores are refused
as an outage (WAIT: 0 replicas) and retried until the restarted node has caught up.

The cluster is this test's own (:class:`tests.redis_cluster.LocalCluster`), not the session's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from redis.crc import key_slot

from payler.backoff import Backoff
from payler.drivers.storages.redis import RedisStorage
from payler.errors import TransientError
from payler.payload import Payload
from tests.conftest import eventually
from tests.redis_cluster import LocalCluster

pytestmark = [pytest.mark.redis, pytest.mark.redis_cluster]

#: Entries per store, and how many must be acknowledged before the kill and after the recovery.
BATCH, BEFORE, AFTER = 20, 400, 400
#: Retries of one call before the test gives up (with backoff capped at 0.2 s: a minute).
MAX_ATTEMPTS = 300
BACKOFF = Backoff(base_s=0.01, max_s=0.2)
TIMEOUT_S = 60.0
LEASE_MS = 2000
T = TypeVar("T")


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Flow:
    """What the writer and the claimer did."""

    acknowledged: set[str] = field(default_factory=set)
    delivered: set[str] = field(default_factory=set)
    duplicates: int = 0
    outages: int = 0
    wait_refusals: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def with_retries(flow: Flow, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` until it does not fail with an outage: backoff, and a bound."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return await call()
        except TransientError as exc:
            flow.outages += 1
            flow.wait_refusals += "replicas acknowledged" in str(exc)
            await asyncio.sleep(BACKOFF.delay_s(attempt))  # backoff, as the runtime's
    pytest.fail(f"still failing after {MAX_ATTEMPTS} attempts")


async def write(storage: RedisStorage, flow: Flow) -> None:
    batch_number = 0
    while not flow.stop.is_set():
        now_ms = storage.clock.now_ms()
        batch = [
            Payload(
                id=f"e-{batch_number}-{i}",
                body=b"x",
                destination="out",
                due_ms=now_ms,
                created_ms=now_ms,
            )
            for i in range(BATCH)
        ]
        await with_retries(flow, lambda batch=batch: storage.store(batch))
        flow.acknowledged.update(p.id for p in batch)
        batch_number += 1


async def claim_once(storage: RedisStorage, flow: Flow) -> int:
    """Claim what is due and ack it (a delivery); how many were claimed."""
    now_ms = storage.clock.now_ms()
    claims = await with_retries(flow, lambda: storage.claim_due(now_ms, 100, LEASE_MS))
    for c in claims:
        flow.duplicates += c.payload.id in flow.delivered
        flow.delivered.add(c.payload.id)
    await with_retries(flow, lambda: storage.ack(claims))
    return len(claims)


async def claim(storage: RedisStorage, flow: Flow) -> None:
    while not flow.stop.is_set():
        if not await claim_once(storage, flow):
            await asyncio.sleep(0.01)  # an idle poll, as the watcher's (bounded) sleep


async def drained(storage: RedisStorage, flow: Flow) -> bool:
    """One more round of claims; whether the spool is empty (leases lost in the failover
    expire, and their entries come round again)."""
    await claim_once(storage, flow)
    return await with_retries(flow, storage.count) == 0


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["async-replication", "wait-1-replica"])
async def test_a_killed_master_s_replica_takes_over_and_the_spool_goes_on(
    own_cluster: LocalCluster, wait_replicas: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = own_cluster.url(prefix="failover:", shards=16, wait_replicas=wait_replicas)
    url += "&wait_timeout_ms=500"
    flow = Flow()
    async with RedisStorage(url) as storage:
        tasks = [
            asyncio.create_task(write(storage, flow)),
            asyncio.create_task(claim(storage, flow)),
        ]
        try:
            await eventually(lambda: len(flow.acknowledged) >= BEFORE, TIMEOUT_S, "entries flow")
            victim = own_cluster.master_of_slot(key_slot(storage.shards[0].visible.encode()))
            replica = own_cluster.replica_of(victim)
            before = len(flow.acknowledged)
            killed_at = time.monotonic()
            victim.kill()
            await eventually(
                lambda: replica.info("replication").get("role") == "master",
                TIMEOUT_S,
                f"the replica {replica.address} is promoted",
            )
            promoted_s = time.monotonic() - killed_at
            victim.start()  # it rejoins as the new master's replica
            await asyncio.to_thread(own_cluster.wait_until_ready)
            recovered = len(flow.acknowledged)
            await eventually(
                lambda: len(flow.acknowledged) >= recovered + AFTER,
                TIMEOUT_S,
                "stores go on after the failover",
            )
        finally:
            flow.stop.set()
            await asyncio.gather(*tasks)
        await eventually(lambda: drained(storage, flow), TIMEOUT_S, "the spool is drained")

    lost = flow.acknowledged - flow.delivered
    with capsys.disabled():
        print(
            f"\n[redis cluster failover, wait_replicas={wait_replicas}] acknowledged "
            f"{len(flow.acknowledged)} (before the kill {before}), lost {len(lost)}, "
            f"replica promoted after {promoted_s:.1f} s, outages retried {flow.outages} "
            f"(WAIT refusals {flow.wait_refusals}), duplicate claims {flow.duplicates}"
        )
    assert flow.delivered <= flow.acknowledged  # nothing invented, nothing half-stored
    if wait_replicas:
        assert not lost, f"acknowledged after WAIT, yet lost: {sorted(lost)[:10]}"
