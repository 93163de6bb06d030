"""The spool storage fails under load: Redis stopped and started again, a Redis failover, the
SQLite spool's directory removed or made read-only.

Redis servers here are the test's own (:class:`~tests.faults.servers.RedisServer`, append-only
file with fsync on every write); the shared Redis is never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import Queues, Size
from tests.faults.harness import (
    Broker,
    Daemon,
    Row,
    count,
    delivered_all,
    message_ids,
    spool_config,
    spool_count,
    spread_delays,
    wait_until,
)
from tests.faults.servers import RabbitNode, RedisServer, redis_servers

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq]

DELIVER_BATCH = 50
#: How long a Redis failover lasts before the roles are switched back.
FAILOVER_HOLD_S = 3.0


def daemon_for(node: RabbitNode, queues: Queues, tmp_path: Path, storage: str) -> Daemon:
    config = spool_config(
        tmp_path / "configuration.yaml",
        jobs=queues.jobs,
        out=queues.out,
        dead=queues.dead,
        deliver_batch=DELIVER_BATCH,
    )
    return Daemon(config, {"BROKER_URL": node.payler_url, "PAYLER_STORAGE_URL": storage}, tmp_path)


async def finish(
    daemon: Daemon, broker: Broker, queues: Queues, ids: list[str], scenario: str, notes: str
) -> Row:
    """Run payler (again, if it died) until everything is delivered; stop it; count."""
    storage = daemon.env["PAYLER_STORAGE_URL"]
    await daemon.reap()
    if not daemon.alive:
        await daemon.start()
    await delivered_all(broker, daemon, len(ids), queues.jobs, queues.out, queues.dead, storage)
    await daemon.stop()
    tally = await count(broker, ids, queues.jobs, queues.out, queues.dead, storage)
    return tally.row(scenario, daemon.state(), notes)


async def delivered_at_least(broker: Broker, queue: str, n: int) -> bool:
    return (await broker.depths(queue))[0] >= n


# -- Redis -----------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_storage_stopped_and_started_again(
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # The spool's Redis goes away for `outage_s` while payler ingests and delivers: payler
    # waits it out (messages wait in the source meanwhile) and goes on, nothing lost.
    with redis_servers(tmp_path, 1) as [redis]:
        daemon = daemon_for(node, queues, tmp_path, f"{redis.url}?prefix=faults:")
        ids = message_ids("redis-stop", size.messages * 2)
        await daemon.start()
        await broker.publish(queues.jobs, ids, spread_delays(4000))
        await wait_until(lambda: delivered_at_least(broker, queues.out, len(ids) // 4), 60, "")
        redis.stop()
        await asyncio.sleep(size.outage_s)  # the outage's length, not a wait for work
        await daemon.reap()
        alive_through = daemon.alive
        redis.start()
        notes = f"Redis stopped for {size.outage_s:.0f} s at a fourth delivered"
        row = await finish(daemon, broker, queues, ids, "Redis storage stopped, started", notes)
    record.append(row)
    assert row.lost == 0, (row, daemon.log)
    assert row.left == 0, (row, daemon.log)
    assert row.duplicated <= DELIVER_BATCH, row
    assert alive_through, daemon.log
    assert daemon.crashes == [], daemon.log


def replication_up(replica: RedisServer) -> bool:
    return "master_link_status:up" in replica.cli("INFO", "replication")


def role(server: RedisServer) -> str:
    return server.cli("ROLE").splitlines()[0]


@pytest.mark.redis
async def test_redis_failover_under_load(
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # Two servers: payler's (master) and its replica. A coordinated FAILOVER demotes payler's
    # server to a replica (its writes now fail with READONLY) for a few seconds, then back. A
    # failover is an outage: payler waits it out, and loses nothing.
    with redis_servers(tmp_path, 2) as [primary, replica]:
        replica.cli("REPLICAOF", "127.0.0.1", str(primary.port))

        async def synced(server: RedisServer) -> bool:
            return await asyncio.to_thread(replication_up, server)

        assert await wait_until(lambda: synced(replica), 20, "replica in sync")
        daemon = daemon_for(node, queues, tmp_path, f"{primary.url}?prefix=faults:")
        ids = message_ids("failover", size.messages * 2)
        await daemon.start()
        await broker.publish(queues.jobs, ids, spread_delays(4000))
        for _ in range(size.repeats):
            await wait_until(lambda: delivered_at_least(broker, queues.out, len(ids) // 4), 60, "")
            primary.cli("FAILOVER", "TIMEOUT", "10000")
            assert await wait_until(lambda: synced(primary), 20, "failed over")
            assert role(primary) == "slave", primary.cli("ROLE")
            await asyncio.sleep(FAILOVER_HOLD_S)  # the failover's length, not a wait for work
            replica.cli("FAILOVER", "TIMEOUT", "10000")
            assert await wait_until(lambda: synced(replica), 20, "failed back")
            assert role(primary) == "master", primary.cli("ROLE")
        await daemon.reap()
        alive_through = daemon.alive
        notes = f"{size.repeats} failover(s) of {FAILOVER_HOLD_S:.0f} s (FAILOVER, then back)"
        row = await finish(daemon, broker, queues, ids, "Redis failover (FAILOVER)", notes)
    record.append(row)
    assert row.lost == 0, (row, daemon.log)
    assert row.left == 0, (row, daemon.log)
    # Each cycle switches the storage twice (fail over, fail back): each switch may catch one
    # delivery batch published and not yet deleted, which is delivered again.
    assert row.duplicated <= size.repeats * 2 * DELIVER_BATCH, row
    assert alive_through, daemon.log
    assert daemon.crashes == [], daemon.log


# -- SQLite ---------------------------------------------------------------------------------------


async def spooled_and_delivered(
    broker: Broker, daemon: Daemon, queues: Queues, ids: list[str]
) -> None:
    """Send ``ids`` (due at once) through payler and wait until all are delivered: the spool
    is in use, and empty."""
    storage = daemon.env["PAYLER_STORAGE_URL"]
    await broker.publish(queues.jobs, ids)

    async def delivered() -> bool:
        return await delivered_at_least(broker, queues.out, len(ids)) and (
            await spool_count(storage) == 0
        )

    assert await wait_until(delivered, 60, "phase 1 delivered"), daemon.log


async def test_sqlite_spool_directory_removed(
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # The spool's directory is removed while payler runs (an operator's mistake, a cleanup
    # job), at a moment its spool is empty; more messages come, delayed 3 s; payler is
    # restarted before they are due. Whatever payler acknowledged must still be delivered: it
    # must not acknowledge into a file nobody can open again.
    spool_dir = tmp_path / "spool"
    daemon = daemon_for(node, queues, tmp_path, f"sqlite:///{spool_dir}/spool.db")
    first = message_ids("rm-before", size.messages // 2)
    then = message_ids("rm-after", size.messages)
    await daemon.start()
    await spooled_and_delivered(broker, daemon, queues, first)
    shutil.rmtree(spool_dir)
    await broker.publish(queues.jobs, then, lambda _: {"x-delay": 3000})

    async def taken() -> bool:
        return await broker.depth(queues.jobs) == 0

    await wait_until(taken, 20, "the source drained")
    await daemon.stop()
    row = await finish(
        daemon, broker, queues, first + then, "SQLite spool directory removed",
        f"removed after {len(first)} delivered; {len(then)} more sent (x-delay 3 s); payler "
        "restarted before they were due",
    )  # fmt: skip
    record.append(row)
    assert row.lost == 0, (row, daemon.log)
    assert row.left == 0, (row, daemon.log)
    assert daemon.crashes == [], daemon.log


@contextlib.contextmanager
def immutable(paths: list[Path]) -> Iterator[None]:
    """``chattr +i`` on ``paths`` (even root cannot write them), undone afterwards."""
    subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


@pytest.mark.parametrize(
    "what",
    [
        pytest.param("directory", id="directory-read-only"),
        pytest.param("files", id="files-immutable"),
    ],
)
async def test_sqlite_spool_made_read_only(
    what: str,
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # The spool's directory (and, in the second case, its files) become unwritable for a few
    # seconds while messages come (due at once). As root, only `chattr +i` does that. payler
    # must say what is wrong, keep running, and go on once the spool is writable again.
    spool_dir = tmp_path / "spool"
    daemon = daemon_for(node, queues, tmp_path, f"sqlite:///{spool_dir}/spool.db")
    first = message_ids(f"ro-{what}-before", size.messages // 2)
    then = message_ids(f"ro-{what}-during", size.messages)
    await daemon.start()
    await spooled_and_delivered(broker, daemon, queues, first)
    paths = [spool_dir] + (sorted(spool_dir.iterdir()) if what == "files" else [])
    with immutable(paths):
        await broker.publish(queues.jobs, then)
        await asyncio.sleep(FAILOVER_HOLD_S)  # the fault's length, not a wait for work
        await daemon.reap()
        alive_through = daemon.alive
    row = await finish(
        daemon, broker, queues, first + then, f"SQLite spool {what} made read-only",
        f"read-only for {FAILOVER_HOLD_S:.0f} s after {len(first)} delivered, while "
        f"{len(then)} more came",
    )  # fmt: skip
    record.append(row)
    assert row.lost == 0, (row, daemon.log)
    assert row.left == 0, (row, daemon.log)
    assert alive_through, daemon.log
    assert daemon.crashes == [], daemon.log
