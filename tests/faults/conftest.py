"""Fixtures of the fault suite: its own servers, the size of a run, and the table of outcomes.

Sizes: bounded by default (what CI runs within its budget); ``--full-faults`` for the full run
(``python benchmarks/soak.py --full`` runs it and prints the table). ``--faults-table PATH``
writes each scenario's row to PATH (JSON lines) for ``benchmarks/soak.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from tests.faults.harness import Broker, Row, table
from tests.faults.servers import START_TIMES, RabbitNode, rabbit_node


@dataclass(frozen=True)
class Size:
    """How big a fault run is."""

    full: bool
    #: kill -9 cycles (>= 20 in the full run).
    cycles: int
    #: Messages per scenario (per cycle, for the kill -9 ones): always >= 500 in flight.
    messages: int
    #: How long the Redis storage stays stopped (the issue's 20 s in the full run).
    outage_s: float
    #: Broker restarts, broker-side closes, Redis failovers in one scenario.
    repeats: int
    #: Messages the fuzzer generates for each source (>= 10,000 over all sources when full).
    fuzz_messages: int
    #: Records through the Kafka consumer group of three instances (the issue's 10,000 when
    #: full), produced at ``kafka_rate`` per second, and how many kill -9 it takes.
    kafka_records: int
    kafka_rate: float
    kafka_kills: int


BOUNDED = Size(
    full=False, cycles=3, messages=500, outage_s=6.0, repeats=1, fuzz_messages=200,
    kafka_records=2000, kafka_rate=150.0, kafka_kills=1,
)  # fmt: skip
FULL = Size(
    full=True, cycles=20, messages=1000, outage_s=20.0, repeats=3, fuzz_messages=3400,
    kafka_records=10_000, kafka_rate=300.0, kafka_kills=3,
)  # fmt: skip


@pytest.fixture(scope="session")
def size(request: pytest.FixtureRequest) -> Size:
    return FULL if request.config.getoption("--full-faults") else BOUNDED


# -- the table -----------------------------------------------------------------------------------

_ROWS: list[Row] = []


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[list[Row]]:
    """Rows a test appends here go into the suite's table (and ``--faults-table``)."""
    rows: list[Row] = []
    yield rows
    _ROWS.extend(rows)
    path = request.config.getoption("--faults-table")
    if path:
        with Path(path).open("a") as out:
            for row in rows:
                out.write(row.as_json() + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _ROWS:
        terminalreporter.section("fault scenarios")
        terminalreporter.write_line(table(_ROWS))
        for row in _ROWS:
            if row.notes:
                terminalreporter.write_line(f"- {row.scenario}: {row.notes}")
    if START_TIMES:
        starts = ", ".join(
            f"{kind} {min(times):.1f}-{max(times):.1f} s ({len(times)}x)"
            for kind, times in START_TIMES.items()
        )
        terminalreporter.write_line(f"fault servers started: {starts}")


# -- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node of the suite's own, started once (about 10 s); scenarios may restart it."""
    with rabbit_node(tmp_path_factory.mktemp("rabbit-node")) as started:
        yield started


@dataclass
class Queues:
    """Queue names of one scenario on the fault node."""

    jobs: str
    out: str
    dead: str


@pytest.fixture
async def broker(node: RabbitNode) -> AsyncIterator[Broker]:
    """The test's client of the fault node (which is started again if a test left it down)."""
    if not node.running:
        node.start()
    client = Broker(node.url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def queues(broker: Broker, node: RabbitNode) -> AsyncIterator[Queues]:
    """Source, destination and dead-letter queues of this test's own (deleted after it)."""
    prefix = f"f-{uuid.uuid4().hex[:8]}"
    names = Queues(f"{prefix}-jobs", f"{prefix}-out", f"{prefix}-dlq")
    await broker.declare(names.jobs, names.out, names.dead)
    yield names
    if not node.running:
        return
    connection = await aio_pika.connect(node.url)
    try:
        for name in (names.jobs, names.out, names.dead):
            async with connection.channel() as channel:
                await channel.queue_delete(name)
    except aio_pika.exceptions.AMQPError:
        pass
    finally:
        await connection.close()
