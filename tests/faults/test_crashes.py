"""payler killed (-9) or stopped (SIGTERM, twice; SIGINT) under load: nothing lost.

The README's promise: "A crash at any point costs at worst a duplicate delivery, never a loss",
and duplicates only from a kill between a publish and its spool delete — at most one delivery
batch per kill. Messages carry message ids, so a kill between the spool write and the source's
acknowledgement spools nothing twice (the redelivery has the same spool id).
"""

from __future__ import annotations

import random
import signal
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
    spread_delays,
    wait_until,
)
from tests.faults.servers import RabbitNode

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq]

#: Due entries claimed and published per batch: the most one kill -9 can deliver twice.
DELIVER_BATCH = 50


def daemon_for(node: RabbitNode, queues: Queues, tmp_path: Path, **options: int) -> Daemon:
    storage = f"sqlite:///{tmp_path}/spool/spool.db"
    config = spool_config(
        tmp_path / "configuration.yaml",
        jobs=queues.jobs,
        out=queues.out,
        dead=queues.dead,
        deliver_batch=DELIVER_BATCH,
        **options,
    )
    env = {"BROKER_URL": node.payler_url, "PAYLER_STORAGE_URL": storage}
    return Daemon(config, env, tmp_path)


async def finish(
    daemon: Daemon, broker: Broker, queues: Queues, ids: list[str], scenario: str, notes: str
) -> tuple[Row, str]:
    """Run payler until everything is delivered, stop it, count: the row, and payler's log."""
    storage = daemon.env["PAYLER_STORAGE_URL"]
    if not daemon.alive:
        await daemon.start()
    await delivered_all(broker, daemon, len(ids), queues.jobs, queues.out, queues.dead, storage)
    await daemon.stop()
    tally = await count(broker, ids, queues.jobs, queues.out, queues.dead, storage)
    return tally.row(scenario, daemon.state(), notes), daemon.log


@pytest.mark.parametrize("phase", ["ingest", "re-injection"])
async def test_kill_9_cycles(
    phase: str,
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # Ingest: the source holds a cycle's messages, and payler is killed once it has taken a
    # random share of them (some stored and acknowledged, some stored and not, some in hand).
    # Re-injection: the cycle's messages are spooled, due together, and payler is killed once
    # a random share of them reached the destination.
    rng = random.Random(f"{phase}-{size.cycles}")
    daemon = daemon_for(node, queues, tmp_path, prefetch=50, ingest_batch=25)
    ids: list[str] = []
    mid_flight = 0
    for cycle in range(size.cycles):
        batch = message_ids(f"{phase[:2]}{cycle:02d}", size.messages)
        ids += batch
        if phase == "ingest":
            await broker.publish(queues.jobs, batch, spread_delays(1000, seed=cycle))
            before = await broker.depth(queues.jobs)
            target = int(before * rng.uniform(0.1, 0.9))
            watched = queues.jobs
        else:
            await broker.publish(queues.jobs, batch, lambda _: {"x-delay": 1000})
            before = await broker.depth(queues.out)
            target = before + int(size.messages * rng.uniform(0.1, 0.9))
            watched = queues.out

        async def reached(watched: str = watched, target: int = target) -> bool:
            depth = await broker.depth(watched)
            return depth <= target if phase == "ingest" else depth >= target

        await daemon.start()
        await wait_until(reached, 30, f"cycle {cycle}: the kill point")
        await daemon.kill()
        after = await broker.depth(watched)
        if phase == "ingest" and 0 < after < before:
            mid_flight += 1
        if phase != "ingest" and before < after < before + size.messages:
            mid_flight += 1
    notes = (
        f"{size.cycles} kill -9 cycles of {size.messages} messages; {mid_flight} kills landed "
        f"with the {'source' if phase == 'ingest' else 'cycle'} partly "
        f"{'consumed' if phase == 'ingest' else 'delivered'}"
    )
    row, log = await finish(daemon, broker, queues, ids, f"kill -9 during {phase}", notes)
    record.append(row)
    assert row.lost == 0, (row, log)
    assert row.left == 0, (row, log)
    assert row.dead_lettered == 0, (row, log)
    assert row.duplicated <= size.cycles * DELIVER_BATCH, row  # one batch per kill at most
    assert daemon.crashes == [], log
    assert mid_flight >= 1, row  # the kills did land mid-flight


@pytest.mark.parametrize(
    "signals",
    [
        pytest.param((signal.SIGTERM,), id="SIGTERM"),
        pytest.param((signal.SIGTERM, signal.SIGTERM), id="SIGTERM-twice"),
        pytest.param((signal.SIGINT,), id="SIGINT"),
    ],
)
async def test_signals_under_load(
    signals: tuple[int, ...],
    node: RabbitNode,
    broker: Broker,
    queues: Queues,
    tmp_path: Path,
    size: Size,
    record: list[Row],
) -> None:
    # Stopped while ingesting and delivering: every stop exits 0, then a restart delivers the
    # rest. A single signal drains: no duplicate. A second one (sent as the first one's stop
    # ends) must not change the exit status; one sent earlier stops at once, which may cut a
    # batch between its publish and its delete (at most one batch delivered twice).
    daemon = daemon_for(node, queues, tmp_path)
    names = "+".join(signal.Signals(s).name for s in signals)
    ids = message_ids(f"sig-{names}", size.messages)
    await daemon.start()
    await broker.publish(queues.jobs, ids, spread_delays(1500))

    async def some_delivered() -> bool:
        return await broker.depth(queues.out) >= len(ids) // 3

    await wait_until(some_delivered, 30, "a third delivered")
    # The second signal comes at the very end of the first one's stop.
    code = await daemon.stop(*signals, second_at="payler stopped")
    row, log = await finish(
        daemon, broker, queues, ids, f"{names} under load", "stopped at a third delivered"
    )
    record.append(row)
    assert row.lost == 0, (row, log)
    assert row.left == 0, (row, log)
    assert row.duplicated <= (DELIVER_BATCH if len(signals) > 1 else 0), row
    assert daemon.crashes == [], log
    assert code == 0, log
