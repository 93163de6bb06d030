"""What every fault scenario uses: payler as a daemon, traffic, probes, and the exact count.

A scenario publishes messages with unique message ids to a source queue, runs ``payler`` (the
CLI, in a subprocess, as users run it), does something unkind to it or to a server, lets it
recover, stops it, and then counts every id where it ended up:

- delivered: on the destination queue (each copy: duplicates are counted, not hidden);
- dead-lettered: on the dead-letter queue;
- left: still in the source queue, or in the spool (pending or parked as dead);
- lost: sent, and found nowhere. Must be 0.

The row of each scenario is kept (:class:`Row`) for the suite's table (``benchmarks/soak.py``,
the README's "Reliability" section).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from payler.drivers.storages import storage_from_url
from payler.drivers.storages.base import EntryState
from tests.integration.conftest import Payler

#: How long a scenario may take to deliver everything once the fault is over.
RECOVERY_TIMEOUT_S = 90.0
#: How long nothing may move (queue depths, spool size) before a scenario stops waiting.
STALL_S = 10.0
#: How often a probe looks at queue depths and the spool while waiting for a condition.
POLL_S = 0.05


# -- the table ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One scenario's outcome, counted by message id."""

    scenario: str
    sent: int
    delivered: int
    dead_lettered: int
    left: int
    lost: int
    duplicated: int
    daemon: str
    #: What the scenario did, and anything its numbers need to be read with.
    notes: str = ""

    def as_json(self) -> str:
        return json.dumps(asdict(self))


COLUMNS = (
    "scenario", "sent", "delivered", "dead-lettered", "left in source / spool", "lost",
    "duplicated", "daemon state",
)  # fmt: skip


def table(rows: Iterable[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- |" + " --: |" * 6 + " --- |"]
    for r in rows:
        cells = [r.scenario, r.sent, r.delivered, r.dead_lettered, r.left, r.lost, r.duplicated]
        lines.append("| " + " | ".join(f"{c:,}" if isinstance(c, int) else c for c in cells))
        lines[-1] += f" | {r.daemon} |"
    return "\n".join(lines)


@dataclass
class Tally:
    """Where each sent id ended up (lists: a copy found twice is in a list twice)."""

    sent: Sequence[str]
    delivered: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    @property
    def lost(self) -> set[str]:
        return set(self.sent) - set(self.delivered) - set(self.dead) - set(self.left)

    @property
    def duplicated(self) -> int:
        """Copies beyond the first of each id, wherever they are (delivered twice; delivered
        and also dead-lettered; delivered and still in the spool, to be delivered again)."""
        copies = Counter(self.delivered) + Counter(self.dead) + Counter(self.left)
        return sum(n - 1 for n in copies.values())

    @property
    def foreign(self) -> set[str]:
        """Ids found that were never sent (payler invented or mangled them)."""
        return (set(self.delivered) | set(self.dead) | set(self.left)) - set(self.sent)

    def row(self, scenario: str, daemon: str, notes: str = "") -> Row:
        foreign = self.foreign
        if foreign:
            notes += f"; {len(foreign)} unknown ids found, e.g. {sorted(foreign)[:3]}"
        return Row(
            scenario=scenario,
            sent=len(self.sent),
            delivered=len(set(self.delivered) & set(self.sent)),
            dead_lettered=len(set(self.dead) & set(self.sent) - set(self.delivered)),
            left=len(set(self.left) & set(self.sent) - set(self.delivered) - set(self.dead)),
            lost=len(self.lost),
            duplicated=self.duplicated,
            daemon=daemon,
            notes=notes.strip("; "),
        )


# -- payler as a daemon --------------------------------------------------------------------------


def describe_exit(code: int | None) -> str:
    """An exit status as a person reads it: ``exit 0``, ``exit 1``, ``killed by SIGBUS``."""
    if code is None:
        return "alive"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


class Daemon:
    """One ``payler`` configuration, run (and run again) as a daemon.

    Every run's end is recorded: :attr:`exits` holds ``(how it was ended, exit status)`` —
    ``"killed"`` by the test (kill -9), ``"signal"`` (SIGTERM/SIGINT by the test), or
    ``"itself"`` (payler exited on its own: a crash, unless the test expected it).
    """

    def __init__(self, config: Path, env: dict[str, str], cwd: Path) -> None:
        self.config, self.env, self.cwd = config, env, cwd
        self.payler: Payler | None = None
        self.exits: list[tuple[str, int]] = []
        self.logs: list[str] = []

    async def start(self) -> Payler:
        """Start payler and wait until it says it runs."""
        await self.reap()
        self.payler = await Payler.start(self.config, self.env, self.cwd)
        await self.payler.running()
        return self.payler

    @property
    def alive(self) -> bool:
        return self.payler is not None and self.payler.process.returncode is None

    async def reap(self) -> None:
        """Record how the last run ended, if it ended by itself."""
        if self.payler is not None and self.payler.process.returncode is not None:
            await self.payler.wait()
            self._ended("itself", self.payler.process.returncode)

    def _ended(self, how: str, code: int) -> None:
        assert self.payler is not None
        self.exits.append((how, code))
        self.logs.append(self.payler.log)
        self.payler = None

    async def kill(self) -> None:
        """kill -9."""
        await self.reap()
        if self.payler is not None:
            await self.payler.kill()
            self._ended("killed", self.payler.process.returncode or -9)

    async def stop(
        self, *signals: int, second_at: str | None = None, timeout_s: float = 60.0
    ) -> int:
        """Send ``signals`` (SIGTERM by default), wait for the exit: its status.

        With ``second_at``, the signals after the first are sent once payler logs a line
        containing that text (the first stop has reached that point) — the last of them again
        and again, every millisecond, until payler has exited: a signal at the very end of a
        stop, whenever that end is. A run that already ended by itself is recorded as such.
        """
        await self.reap()
        if self.payler is None:
            return self.exits[-1][1] if self.exits else 0
        payler = self.payler
        signals = signals or (signal.SIGTERM,)
        # Through a pidfd, not Process.send_signal: that polls (reaps) the child under asyncio's
        # own child watcher, which then reports a made-up status 255 (seen once in ~10 runs).
        pidfd = os.pidfd_open(payler.process.pid)

        def send(sig: int) -> None:
            with contextlib.suppress(ProcessLookupError):  # it exited
                signal.pidfd_send_signal(pidfd, sig)

        try:
            send(signals[0])
            if second_at is not None and len(signals) > 1:
                await payler.wait_for_line(second_at, timeout_s)
                for sig in signals[1:-1]:
                    send(sig)
                deadline = time.monotonic() + timeout_s
                while payler.process.returncode is None and time.monotonic() < deadline:
                    send(signals[-1])
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(payler.process.wait()), 0.001)
            else:
                for sig in signals[1:]:
                    send(sig)
        finally:
            os.close(pidfd)
        code = await payler.wait(timeout_s)
        self._ended("signal", code)
        return code

    @property
    def crashes(self) -> list[int]:
        """Exit statuses of the runs that ended by themselves."""
        return [code for how, code in self.exits if how == "itself"]

    def state(self) -> str:
        """The daemon column: ``alive`` when no run ended by itself and every stop exited 0."""
        bad = [describe_exit(code) for how, code in self.exits if how != "killed" and code != 0]
        if not bad:
            return "alive; stops exit 0"
        return ", ".join(dict.fromkeys(bad))

    @property
    def log(self) -> str:
        return "\n----- next run -----\n".join([*self.logs, self.payler.log if self.payler else ""])


def spool_config(
    path: Path,
    *,
    jobs: str,
    out: str,
    dead: str,
    prefetch: int = 100,
    ingest_batch: int = 50,
    deliver_batch: int = 50,
    lease_ms: int = 1000,
    watch: str = "",
) -> Path:
    """A configuration of ``process_queue`` and ``watch_storage`` (``watch``: more of its
    options, as YAML flow-mapping items)."""
    extra = f", {watch}" if watch else ""
    path.write_text(
        f"""
workflows:
  - name: ingest
    callable: client.process_queue
    options: {{queue: "{jobs}", default_destination: "{out}", dead_letter_queue: "{dead}",
               prefetch: {prefetch}, batch_size: {ingest_batch}}}
  - name: deliver
    callable: client.watch_storage
    options: {{declare_queues: ["{out}"], dead_letter_queue: "{dead}",
               batch_size: {deliver_batch}, lease_ms: {lease_ms}, max_poll_interval_ms: 200,
               retry_base_ms: 200, retry_max_ms: 2000{extra}}}
shutdown_grace_seconds: 10
stats_interval_seconds: 5
"""
    )
    return path


# -- the broker side -----------------------------------------------------------------------------


class Broker:
    """The test's own client of a RabbitMQ node: publishes, probes queue depths, drains.

    It reconnects by itself on its next call after the broker went away (a restart scenario).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: AbstractConnection | None = None

    async def connection(self) -> AbstractConnection:
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self.url, timeout=10)
        return self._connection

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    async def declare(self, *queues: str) -> None:
        async with (await self.connection()).channel() as channel:
            for queue in queues:
                await channel.declare_queue(queue, durable=True)

    async def publish(
        self,
        queue: str,
        ids: Sequence[str],
        headers: Callable[[int], dict[str, object]] = lambda _: {"x-delay": 0},
        chunk: int = 100,
    ) -> None:
        """Publish one persistent message per id (its message id, and its body), confirmed;
        ``headers(i)`` gives the i-th one's headers. Pipelined by ``chunk``."""
        async with (await self.connection()).channel(publisher_confirms=True) as channel:
            exchange = channel.default_exchange
            for start in range(0, len(ids), chunk):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                message_id.encode(),
                                message_id=message_id,
                                headers=headers(start + i),
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=queue,
                        )
                        for i, message_id in enumerate(ids[start : start + chunk])
                    )
                )

    async def depth(self, queue: str) -> int:
        """Messages ready on ``queue`` (not those delivered and unacknowledged); 0 if there is
        no such queue."""
        async with (await self.connection()).channel() as channel:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return 0
            return declared.declaration_result.message_count or 0

    async def depths(self, *queues: str) -> list[int]:
        """:meth:`depth` of each, or -1 for all while the broker cannot be reached."""
        try:
            return [await self.depth(q) for q in queues]
        except (aiormq.exceptions.AMQPError, OSError, ConnectionError, RuntimeError):
            await self.close()
            return [-1] * len(queues)

    async def take(self, queue: str, timeout_s: float = 60.0) -> list[AbstractIncomingMessage]:
        """Every message on ``queue`` now, taken off it."""
        expected = await self.depth(queue)
        got: list[AbstractIncomingMessage] = []
        if expected == 0:
            return got
        done = asyncio.Event()
        async with (await self.connection()).channel() as channel:
            await channel.set_qos(prefetch_count=1000)
            declared = await channel.declare_queue(queue, passive=True)

            async def on_message(message: AbstractIncomingMessage) -> None:
                got.append(message)
                await message.ack()
                if len(got) >= expected:
                    done.set()

            tag = await declared.consume(on_message)
            async with asyncio.timeout(timeout_s):
                await done.wait()
            await declared.cancel(tag)
        return got

    async def drain(self, queue: str, timeout_s: float = 60.0) -> list[str]:
        """Every message on ``queue`` now, taken off it: their message ids (or bodies)."""
        return [
            m.message_id or m.body.decode("utf-8", "replace")
            for m in await self.take(queue, timeout_s)
        ]


def sqlite_gone(storage_url: str) -> bool:
    """Whether ``storage_url`` is a SQLite spool whose file does not exist (opening it would
    create it, and a scenario that removed it must not have it back by looking)."""
    return storage_url.startswith("sqlite:///") and not Path(storage_url[10:]).exists()


async def spool_ids(storage_url: str) -> list[str]:
    """The message ids of every entry in the spool (pending or dead); [] if it is gone."""
    if sqlite_gone(storage_url):
        return []
    ids: list[str] = []
    async with storage_from_url(storage_url) as storage:
        states: tuple[EntryState, ...] = ("pending", "dead")
        for state in states:
            cursor: str | None = None
            while True:
                page = await storage.list(state=state, limit=500, cursor=cursor)
                ids += [
                    p.properties.message_id or p.body.decode("utf-8", "replace") for p in page.items
                ]
                cursor = page.next_cursor
                if cursor is None:
                    break
    return ids


async def spool_count(storage_url: str) -> int:
    """Pending entries in the spool (0 if its file is gone); -1 while it cannot be read."""
    if sqlite_gone(storage_url):
        return 0
    try:
        async with storage_from_url(storage_url) as storage:
            return await storage.count()
    except Exception:  # the storage is down (a fault scenario): not known now
        return -1


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(POLL_S)  # polling a condition with a deadline
    return await condition()


async def delivered_all(
    broker: Broker, daemon: Daemon, sent: int, source: str, out: str, dead: str, storage: str
) -> bool:
    """Wait until the source and the spool are empty and the destination and dead-letter
    queues hold at least ``sent`` messages; False if that does not come within
    :data:`RECOVERY_TIMEOUT_S`, or nothing moved for :data:`STALL_S` (what is missing then
    is not coming: the count says where everything is)."""
    seen: list[object] = []
    moved = [time.monotonic()]

    async def done() -> bool:
        await daemon.reap()
        if not daemon.alive:
            return True  # nothing more will move: count what is where
        depths = await broker.depths(source, out, dead)
        spooled = await spool_count(storage)
        if seen != [*depths, spooled]:
            seen[:] = [*depths, spooled]
            moved[0] = time.monotonic()
        elif time.monotonic() - moved[0] > STALL_S:
            return True
        in_source, in_out, in_dead = depths
        return in_source == 0 and in_out + in_dead >= sent and spooled == 0

    return await wait_until(done, RECOVERY_TIMEOUT_S, "everything delivered")


async def count(
    broker: Broker, ids: Sequence[str], source: str, out: str, dead: str, storage: str
) -> Tally:
    """Where every id is, once payler stopped: drains the queues, reads the spool."""
    tally = Tally(ids)
    tally.delivered = await broker.drain(out)
    tally.dead = await broker.drain(dead)
    tally.left = await broker.drain(source) + await spool_ids(storage)
    return tally


def message_ids(prefix: str, count: int, start: int = 0) -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(start, start + count)]


def spread_delays(max_ms: int, seed: int = 7) -> Callable[[int], dict[str, object]]:
    """Headers giving the i-th message an ``x-delay`` drawn from [0, max_ms] (seeded)."""
    rng = random.Random(seed)
    delays: dict[int, int] = {}

    def headers(i: int) -> dict[str, object]:
        if i not in delays:
            delays[i] = rng.randint(0, max_ms)
        return {"x-delay": delays[i]}

    return headers
