"""The built-in workflows when one message is bad or its dead letter is refused (issue 7, defects
1, 2 and 13): it is dead-lettered alone, or parked, and the rest of its batch flows, once.

On the in-memory broker and the embedded SQLite spool (a real storage that refuses what SQLite
cannot hold, and needs no server).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from payler import client, config
from payler.drivers.base import Rejection
from payler.drivers.brokers.base import (
    DEAD_LETTER_ID,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE,
    DEAD_LETTER_TRUNCATED,
)
from payler.drivers.storages.base import SpoolStorage, Stored, WatchSettings
from payler.drivers.storages.sqlite import SQLiteStorage
from payler.errors import TransientError
from payler.options import ProcessQueueOptions, WatchStorageOptions
from payler.payload import STORED_META, Payload
from payler.runtime import Runtime
from payler.testing import FakeClock, MemoryBroker, MemoryStorage, make_payload, reset
from payler.workflow import WorkflowContext

START_MS = 1_700_000_000_000
DLQ = "payler-dead-letter"
INGEST = ProcessQueueOptions(broker_url="memory://bad", storage_url="memory://bad")
WATCH = WatchStorageOptions(broker_url="memory://bad", storage_url="memory://bad")


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START_MS)


@pytest.fixture
async def spool(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SQLiteStorage]:
    async with SQLiteStorage(f"sqlite:///{tmp_path}/spool.db", clock=clock) as storage:
        yield storage


@pytest.fixture
async def broker(clock: FakeClock) -> AsyncIterator[MemoryBroker]:
    reset()
    async with MemoryBroker("memory://bad", queue="payler-jobs", clock=clock) as memory:
        for queue in ("payler-jobs", "payler-out", DLQ):
            await memory.ensure_queue(queue)
        yield memory
    reset()


def received(body: bytes, payload_id: str, headers: dict[str, Any] | None = None) -> Payload:
    """A message as a broker's serve() hands it over: just received, not yet scheduled."""
    payload = make_payload(
        body, headers={"x-delay": 1000, **(headers or {})}, payload_id=payload_id
    )
    return payload.model_copy(update={"source": "payler-jobs", "created_ms": START_MS})


def due(body: bytes, payload_id: str, destination: str = "payler-out") -> Payload:
    return make_payload(body, payload_id=payload_id, destination=destination, due_ms=START_MS)


async def watch_once(
    storage: SpoolStorage,
    broker: MemoryBroker,
    options: WatchStorageOptions,
    ctx: WorkflowContext,
    settings: WatchSettings | None = None,
) -> list[Rejection]:
    """Run the watch loop with ``client.deliver`` for one batch; return its rejections once the
    storage settled them (the loop finishes the batch in hand before it stops)."""
    handled, stop = asyncio.Event(), asyncio.Event()
    outcomes: list[list[Rejection]] = []

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        outcomes.append(await client.deliver(batch, broker, options, ctx))
        stop.set()
        handled.set()
        return outcomes[-1]

    task = asyncio.create_task(storage.serve(handler, stop, settings=settings))
    try:
        async with asyncio.timeout(5):
            await handled.wait()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    return outcomes[0]


# -- defect 1: a message that cannot be decoded, scheduled or stored -------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"cut-emoji": "ab\ud83d"}, "lone UTF-16 surrogate"),  # JSON.stringify of a cut string
        ({"deep": nested(100)}, "nested more than 64 levels deep"),
    ],
    ids=["lone-surrogate", "deep-nesting"],
)
async def test_a_header_the_spool_cannot_store_dead_letters_that_message_alone(
    spool: SQLiteStorage,
    broker: MemoryBroker,
    clock: FakeClock,
    headers: dict[str, Any],
    reason: str,
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    batch = [
        received(b"first", "a"),
        received(b"\xff raw bytes \x00", "bad", headers),
        received(b"second", "b"),
    ]

    assert await client.spool(batch, spool, broker, INGEST, ctx) == []  # all acknowledged

    assert {p.id for p in (await spool.list()).items} == {"a", "b"}
    [dead] = broker.messages(DLQ)
    assert dead.body == b"\xff raw bytes \x00"  # the raw bytes
    assert "the spool cannot store it" in dead.headers[DEAD_LETTER_REASON]
    assert reason in dead.headers[DEAD_LETTER_REASON]
    assert ctx.metrics.totals["spooled"] == 2
    assert ctx.metrics.totals["bugs"] == 0  # bad input, not a bug


async def test_a_message_its_source_could_not_decode_is_dead_lettered_alone(
    spool: SQLiteStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    undecodable = received(b'{"raw": true}', "bad").model_copy(
        update={"headers": {}, "defect": "field 'headers' is not valid JSON: {\"__table__\": 1}"}
    )

    rejected = await client.spool([received(b"ok", "a"), undecodable], spool, broker, INGEST, ctx)

    assert rejected == []
    assert await spool.get("a") is not None and await spool.get("bad") is None
    [dead] = broker.messages(DLQ)
    assert dead.body == b'{"raw": true}'
    assert dead.headers[DEAD_LETTER_REASON] == undecodable.defect


class BuggyStorage(SQLiteStorage):
    """A storage with a bug for payloads whose body says so (a batch holding one fails)."""

    async def store_batch(self, batch: Sequence[Payload]) -> Stored:  # what ingest calls
        if any(p.body == b"bug" for p in batch):
            raise AttributeError("'NoneType' object has no attribute 'encode'")
        return await super().store_batch(batch)


async def test_a_store_that_raises_for_one_payload_dead_letters_that_payload_alone(
    tmp_path: Path, broker: MemoryBroker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    batch = [received(b"ok", f"ok{i}") for i in range(7)]
    batch.insert(3, received(b"bug", "bad"))
    async with BuggyStorage(f"sqlite:///{tmp_path}/spool.db", clock=clock) as storage:
        assert await client.spool(batch, storage, broker, INGEST, ctx) == []
        assert await storage.count() == 7
    [dead] = broker.messages(DLQ)
    assert dead.id == "bad"
    assert "a bug in payler" in dead.headers[DEAD_LETTER_REASON]
    assert "AttributeError" in dead.headers[DEAD_LETTER_REASON]
    assert ctx.metrics.totals["bugs"] == 1
    [logged] = [r for r in caplog.records if "fails alone" in r.getMessage()]
    assert logged.levelname == "ERROR" and logged.exc_info  # with its traceback


class BrokenStorage(SQLiteStorage):
    """A storage with a bug on every path: not one message's fault."""

    async def store_batch(self, batch: Sequence[Payload]) -> Stored:
        raise TypeError("a bug for every payload")


async def test_a_store_failing_for_every_payload_fails_the_batch_instead_of_dead_lettering_it(
    tmp_path: Path, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    batch = [received(b"ok", f"ok{i}") for i in range(5)]
    async with BrokenStorage(f"sqlite:///{tmp_path}/spool.db", clock=clock) as storage:
        with pytest.raises(TypeError, match="a bug for every payload"):
            await client.spool(batch, storage, broker, INGEST, ctx)
    # Nothing acknowledged, nothing dead-lettered: the workflow restarts with backoff and the
    # source hands the batch over again.
    assert broker.messages(DLQ) == []


async def test_the_daemon_stays_up_and_the_rest_flows_when_one_message_cannot_be_stored(
    tmp_path: Path,
) -> None:
    reset()
    path = tmp_path / "configuration.yaml"
    path.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{broker_url: "memory://daemon", storage_url: "sqlite:///{tmp_path}/spool.db"}}
"""
    )
    async with (
        MemoryBroker("memory://daemon") as producer,
        SQLiteStorage(f"sqlite:///{tmp_path}/spool.db") as storage,
    ):
        for i in range(3):
            producer.publish("payler-jobs", make_payload(b"ok", headers={"x-delay": 60_000}))
            producer.publish(
                "payler-jobs", make_payload(b"cut", headers={"x-delay": 5, "h": f"{i}\udc80"})
            )
        stop = asyncio.Event()
        runtime = Runtime(config.load(path))
        task = asyncio.create_task(runtime.run(stop))
        dead = await producer.wait_for(DLQ, 3)
        stop.set()
        await asyncio.wait_for(task, 5)  # a clean stop: no error raised, never a crash
        assert await storage.count() == 3
    assert [p.body for p in dead] == [b"cut"] * 3
    assert runtime.contexts[0].metrics.totals["restarts"] == 0
    reset()


# -- defects 2 and 13: dead letters that are refused --------------------------------------------


async def test_a_dead_letter_refused_in_full_goes_as_a_minimal_copy(
    spool: SQLiteStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    broker.refuse[DLQ] = lambda p: "frame too large (FRAME_ERROR)" if p.body else None
    big = received(b"x" * 200_000, "big", {"x-delay": "soon", "huge": "h" * 131_000})
    big = big.model_copy(update={"properties": big.properties.model_copy(
        update={"message_id": "m-1", "correlation_id": "c-1"})})  # fmt: skip

    assert await client.spool([big, received(b"ok", "ok")], spool, broker, INGEST, ctx) == []

    [minimal] = broker.messages(DLQ)
    assert minimal.body == b""
    assert "huge" not in minimal.headers
    assert "not a number" in minimal.headers[DEAD_LETTER_REASON]  # why it is dead
    assert minimal.headers[DEAD_LETTER_SOURCE] == "payler-jobs"
    assert minimal.headers[DEAD_LETTER_ID] == "big"
    truncated = minimal.headers[DEAD_LETTER_TRUNCATED]
    assert "body of 200000 bytes" in truncated and "FRAME_ERROR" in truncated
    assert (minimal.properties.message_id, minimal.properties.correlation_id) == ("m-1", "c-1")
    assert await spool.get("ok") is not None
    assert await spool.count(state="dead") == 0
    assert broker.metrics.totals["dead_lettered"] == 1


async def test_ingest_parks_in_the_spool_what_the_dead_letter_destination_refuses_even_minimal(
    spool: SQLiteStorage, broker: MemoryBroker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    broker.refuse[DLQ] = lambda p: "queue full (reject-publish)"
    batch = [
        received(b"ok1", "ok1"),
        received(b"bad", "bad", {"x-delay": -5}),
        received(b"2", "ok2"),
    ]

    assert await client.spool(batch, spool, broker, INGEST, ctx) == []  # acknowledged, all

    assert await spool.count() == 2
    [parked] = (await spool.list(state="dead")).items
    assert (parked.id, parked.body) == ("bad", b"bad")
    assert parked.last_error is not None
    assert "negative" in parked.last_error and "queue full" in parked.last_error
    assert ctx.metrics.totals["parked"] == 1
    assert any(r.levelname == "ERROR" and "parked" in r.getMessage() for r in caplog.records)


async def test_parking_keeps_at_least_the_ids_when_the_spool_cannot_hold_the_message(
    spool: SQLiteStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    broker.refuse[DLQ] = lambda p: "refused"
    bad = received(b"body", "bad\ud800id", {"h": "\udc80"})

    assert await client.spool([bad], spool, broker, INGEST, ctx) == []

    [parked] = (await spool.list(state="dead")).items
    assert parked.id == "bad\\ud800id"  # the id, escaped: what SQLite can hold
    assert parked.body == b"" and parked.headers == {}
    assert parked.last_error is not None and "body of 4 bytes" in parked.last_error
    assert ctx.metrics.totals["parked"] == 1


async def test_delivery_parks_what_the_dead_letter_destination_refuses_and_settles_the_rest(
    spool: SQLiteStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    options = WATCH.model_copy(update={"max_attempts": 3})
    broker.refuse[DLQ] = lambda p: "record too large"
    await spool.store(
        [due(b"1", "ok1"), due(b"lost", "lost", destination="no-such-queue"), due(b"2", "ok2")]
    )

    [parking] = await watch_once(spool, broker, options, ctx)

    assert (parking.payload_id, parking.permanent) == ("lost", True)
    assert sorted(p.body for p in broker.messages("payler-out")) == [b"1", b"2"]  # once each
    assert await spool.count() == 0
    [parked] = (await spool.list(state="dead")).items
    assert parked.id == "lost"
    assert parked.last_error is not None
    assert "unroutable" in parked.last_error and "record too large" in parked.last_error
    assert ctx.metrics.totals["parked"] == 1
    assert ctx.metrics.totals["delivered"] == 2


class DeadLettersDown(MemoryBroker):
    """Dead-letter publishes fail as a whole (the outcome unknown) while ``down`` is set."""

    down = True

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        if dead_letters and self.down:
            raise TransientError("publish timed out")
        return await super()._publish(items, dead_letters=dead_letters)


async def test_a_dead_letter_failing_for_now_settles_the_published_and_retries_it_with_backoff(
    spool: SQLiteStorage, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    options = WATCH.model_copy(update={"max_attempts": 3})
    settings = WatchSettings(retry_base_s=1, retry_max_s=60)
    await spool.store(
        [due(b"1", "ok1"), due(b"lost", "lost", destination="no-such-queue"), due(b"2", "ok2")]
    )
    async with DeadLettersDown("memory://bad", clock=clock) as broker:
        for queue in ("payler-out", DLQ):
            await broker.ensure_queue(queue)
        [retry] = await watch_once(spool, broker, options, ctx, settings)

        assert (retry.payload_id, retry.permanent) == ("lost", False)
        assert sorted(p.body for p in broker.messages("payler-out")) == [b"1", b"2"]
        assert {p.id for p in (await spool.list()).items} == {"lost"}  # the others settled
        entry = await spool.get("lost")
        assert entry is not None and entry.attempts == 1
        assert "unroutable" in (entry.last_error or "")
        # Retried after a backoff (about 1 s, with jitter), not at once.
        assert 800 <= (await spool.next_visible_ms() or 0) - START_MS <= 1_200

        broker.down = False
        clock.advance(1_200)
        assert await watch_once(spool, broker, options, ctx, settings) == []

    [dead] = broker.messages(DLQ)
    assert dead.id == "lost" and "unroutable" in dead.headers[DEAD_LETTER_REASON]
    assert sorted(p.body for p in broker.messages("payler-out")) == [b"1", b"2"]  # still once
    assert await spool.count() == 0 and await spool.count(state="dead") == 0


async def test_ingest_acknowledges_the_stored_messages_when_a_dead_letter_fails_for_now(
    spool: SQLiteStorage, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    async with DeadLettersDown("memory://bad", clock=clock) as broker:
        batch = [received(b"1", "ok1"), received(b"bad", "bad", {"x-delay": "x"})]
        [back] = await client.spool(batch, spool, broker, INGEST, ctx)
    assert (back.payload_id, back.permanent) == ("bad", False)  # handed back to the source
    assert await spool.get("ok1") is not None


async def test_a_spool_entry_whose_metadata_cannot_be_read_is_dead_lettered_not_claimed_forever(
    spool: SQLiteStorage, broker: MemoryBroker, clock: FakeClock, tmp_path: Path
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    await spool.store([due(b"1", "ok1"), due(b"odd", "odd"), due(b"2", "ok2")])
    with sqlite3.connect(tmp_path / "spool.db") as db:  # written by hand, or by a buggy payler
        db.execute("UPDATE spool SET meta = ? WHERE id = 'odd'", ('{"headers": {"__table__": 1}}',))

    assert await watch_once(spool, broker, WATCH, ctx) == []

    assert sorted(p.body for p in broker.messages("payler-out")) == [b"1", b"2"]
    [dead] = broker.messages(DLQ)
    assert dead.body == b"odd"
    assert "metadata cannot be read" in dead.headers[DEAD_LETTER_REASON]
    assert dead.headers[STORED_META] == b'{"headers": {"__table__": 1}}'
    assert await spool.count() == 0 and await spool.count(state="dead") == 0


# -- forward: no spool, so the source keeps what the dead-letter destination refuses ---------------


async def test_forward_keeps_at_the_source_what_the_dead_letter_destination_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reset()
    path = tmp_path / "forward.yaml"
    path.write_text(
        """
workflows:
  - callable: client.forward
    options:
      source_url: memory://fwd-source
      destination_url: memory://fwd-destination
      queue: in
      default_destination: out
"""
    )
    refusals = 0
    rounds = asyncio.Event()

    def refuse(payload: Payload) -> str:
        nonlocal refusals
        refusals += 1
        if refusals == 2 * 3:  # a full and a minimal copy per round: three rounds
            rounds.set()
        return "message too large"

    async with (
        MemoryBroker("memory://fwd-source") as source,
        MemoryBroker("memory://fwd-destination") as destination,
    ):
        destination.refuse[DLQ] = refuse
        source.publish("in", make_payload(b"1"))
        source.publish("in", make_payload(b"lost", headers={"x-destination": "nowhere"}))
        source.publish("in", make_payload(b"2"))
        stop = asyncio.Event()
        # The fake clock: the source's backoff between rounds takes no real time.
        task = asyncio.create_task(Runtime(config.load(path), clock=FakeClock()).run(stop))
        await destination.wait_for("out", 2)
        await asyncio.wait_for(rounds.wait(), 5)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert [p.body for p in destination.messages("out")] == [b"1", b"2"]  # once each
        assert [p.body for p in source.messages("in")] == [b"lost"]  # kept at the source
    assert any(
        r.levelname == "ERROR" and "stays in the source" in r.getMessage() for r in caplog.records
    )
    reset()


async def test_memory_spool_parks_too(clock: FakeClock, broker: MemoryBroker) -> None:
    """The in-memory spool users test with parks as the real ones do."""
    ctx = WorkflowContext("ingest", clock=clock)
    broker.refuse[DLQ] = lambda p: "refused"
    async with MemoryStorage("memory://bad", clock=clock) as storage:
        assert await client.spool([received(b"b", "b", {"x-delay": "?"})], storage, broker,
                                  INGEST, ctx) == []  # fmt: skip
        assert await storage.count(state="dead") == 1
