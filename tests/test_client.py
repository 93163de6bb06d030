"""The built-in workflows' rules, on the in-memory drivers (fast; no services)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from payler import client, config
from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.base import DEAD_LETTER_REASON
from payler.drivers.storages.base import WatchSettings
from payler.errors import TransientError
from payler.identity import content_digest
from payler.options import ProcessQueueOptions, WatchStorageOptions
from payler.payload import Payload
from payler.runtime import Runtime
from payler.testing import FakeClock, MemoryBroker, MemoryStorage, make_payload, reset
from payler.workflow import WorkflowContext

START_MS = 1_700_000_000_000
INGEST = ProcessQueueOptions(broker_url="memory://test", storage_url="memory://test")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START_MS)


@pytest.fixture
async def storage(clock: FakeClock) -> AsyncIterator[MemoryStorage]:
    reset()
    async with MemoryStorage("memory://test", clock=clock) as spool:
        yield spool
    reset()


@pytest.fixture
async def broker(clock: FakeClock) -> AsyncIterator[MemoryBroker]:
    async with MemoryBroker("memory://test", queue="payler-jobs", clock=clock) as memory:
        for queue in ("payler-jobs", "payler-out", "payler-dead-letter"):
            await memory.ensure_queue(queue)
        yield memory


def received(payload: Payload, now_ms: int = START_MS) -> Payload:
    """``payload`` as a broker's serve() hands it over: just received, not yet scheduled."""
    return payload.model_copy(update={"source": "payler-jobs", "created_ms": now_ms})


async def test_spool_schedules_stores_and_dead_letters(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    batch = [
        received(make_payload(b"a", headers={"x-delay": 1500}, payload_id="a")),
        received(
            make_payload(b"b", headers={"x-delay": "250", "x-destination": "q2"}, payload_id="b")
        ),
        received(make_payload(b"c", headers={"x-delay": "soon"}, payload_id="c")),
        received(make_payload(b"d", headers={}, payload_id="d")),
    ]

    rejected = await client.spool(batch, storage, broker, INGEST, ctx)

    assert rejected == []
    a, b = await storage.get("a"), await storage.get("b")
    assert a is not None and (a.due_ms, a.destination) == (START_MS + 1500, "payler-out")
    assert b is not None and (b.due_ms, b.destination) == (START_MS + 250, "q2")
    assert await storage.get("c") is None and await storage.get("d") is None
    dead = {p.body: p.headers[DEAD_LETTER_REASON] for p in broker.messages("payler-dead-letter")}
    assert set(dead) == {b"c", b"d"}
    assert "not a number" in dead[b"c"]
    assert "missing x-delay" in dead[b"d"]
    assert ctx.metrics.totals["spooled"] == 2
    assert ctx.metrics.totals["dead_lettered"] == 0  # counted by the broker's own metrics
    assert broker.metrics.totals["dead_lettered"] == 2


async def test_spool_is_idempotent_by_id(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    first = received(make_payload(b"v1", headers={"x-delay": 10}, payload_id="same"))
    clock.advance(5_000)  # redelivered later: scheduled anew, still the same message
    again = received(first, clock.now_ms())

    await client.spool([first], storage, broker, INGEST, ctx)
    await client.spool([again], storage, broker, INGEST, ctx)

    assert await storage.count() == 1
    stored = await storage.get("same")
    assert stored is not None and (stored.body, stored.due_ms) == (b"v1", START_MS + 10)
    assert ctx.metrics.totals["duplicates"] == 1
    [warning] = [r.getMessage() for r in caplog.records if "not spooled again" in r.getMessage()]
    assert warning.endswith(": same")  # the id, named


async def test_a_reused_id_never_suppresses_a_different_message(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Defect 17: a dead-lettered entry's id blocked a later, different message with that id: it
    # was acknowledged and never delivered nor dead-lettered, and no warning named the id.
    ctx = WorkflowContext("ingest", clock=clock)
    first = received(make_payload(b"v1", headers={"x-delay": 10}, payload_id="amqp:q:7"))
    await client.spool([first], storage, broker, INGEST, ctx)
    [claim] = await storage.claim_due(START_MS + 10, 10, 1_000)
    assert await storage.dead_letter(claim, "unroutable")
    reuse = received(make_payload(b"v2", headers={"x-delay": 10}, payload_id="amqp:q:7"))

    assert await client.spool([reuse], storage, broker, INGEST, ctx) == []

    [claim] = await storage.claim_due(START_MS + 10, 10, 1_000)
    assert claim.payload.body == b"v2" and claim.payload.id.startswith("amqp:q:7~")
    assert ctx.metrics.totals["spooled"] == 2 and "duplicates" not in ctx.metrics.totals
    [warning] = [r.getMessage() for r in caplog.records if "derived ids" in r.getMessage()]
    assert f"amqp:q:7 as {claim.payload.id}" in warning


class CrampedStorage(MemoryStorage):
    """A spool whose file system is too full until a test makes room (``room.set()``)."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.room = asyncio.Event()
        self.asked: list[int] = []
        self.asked_again = asyncio.Event()  # ingest is waiting: it asked, was told no, asks again

    async def admission(self, incoming_bytes: int = 0) -> str | None:
        self.asked.append(incoming_bytes)
        if len(self.asked) > 2:
            self.asked_again.set()
        return None if self.room.is_set() else "4096 bytes free, below the watermark"


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_ingest_waits_while_the_spool_is_too_full_then_resumes(
    broker: MemoryBroker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    caplog.set_level(logging.INFO)
    async with CrampedStorage(f"memory://cramped-{uuid.uuid4().hex}", clock=clock) as cramped:
        batch = [received(make_payload(b"x" * 10, headers={"x-delay": 5}, payload_id="m"))]
        batch.append(received(make_payload(b"bad", headers={"x-delay": "soon"}, payload_id="d")))
        spooling = asyncio.create_task(client.spool(batch, cramped, broker, INGEST, ctx))
        await asyncio.wait_for(cramped.asked_again.wait(), 5)
        assert not spooling.done() and await cramped.count() == 0  # held, not acknowledged
        assert cramped.asked[0] == 10  # the bytes to store (the invalid message stores none)
        cramped.room.set()
        assert await asyncio.wait_for(spooling, 5) == []
        assert await cramped.count() == 1
    [paused] = messages(caplog, "consuming paused")
    assert paused.levelno == logging.WARNING and "below the watermark" in paused.getMessage()
    [resumed] = messages(caplog, "consuming resumed")
    assert resumed.levelno == logging.INFO


async def test_stopping_while_the_spool_is_too_full_hands_the_batch_back(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    async with CrampedStorage(f"memory://cramped-{uuid.uuid4().hex}", clock=clock) as cramped:
        batch = [received(make_payload(b"x", headers={"x-delay": 5}, payload_id=i)) for i in "ab"]
        spooling = asyncio.create_task(client.spool(batch, cramped, broker, INGEST, ctx))
        await asyncio.wait_for(cramped.asked_again.wait(), 5)
        ctx.stop.set()
        rejected = await asyncio.wait_for(spooling, 5)
        assert [(r.payload_id, r.permanent) for r in rejected] == [("a", False), ("b", False)]
        assert await cramped.count() == 0


async def _watch_until(
    storage: MemoryStorage,
    handler: Handler,
    done: asyncio.Event,
    settings: WatchSettings | None = None,
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(storage.serve(handler, stop, settings=settings))
    try:
        async with asyncio.timeout(5):
            await done.wait()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_watch_never_delivers_before_due(storage: MemoryStorage, clock: FakeClock) -> None:
    dues = [START_MS + d for d in (5_000, 10, 0, 99_999, 1_000, 30_000)]
    await storage.store(
        [
            make_payload(payload_id=f"p{i}", destination="out", due_ms=due)
            for i, due in enumerate(dues)
        ]
    )
    seen: dict[str, int] = {}
    done = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        for payload in batch:
            seen[payload.id] = clock.now_ms()
        if len(seen) == len(dues):
            done.set()
        return []

    await _watch_until(storage, handler, done)

    for i, due in enumerate(dues):
        assert seen[f"p{i}"] >= due, f"p{i} delivered {due - seen[f'p{i}']} ms early"
        # The watcher sleeps until the earliest due entry, not a fixed poll: with the fake clock,
        # it wakes exactly at the due time (or at the bounded poll interval before it).
        assert seen[f"p{i}"] - due < 1_000
    assert await storage.count() == 0


async def test_watch_wakes_early_for_a_sooner_entry(storage: MemoryStorage) -> None:
    # Real clock: the watcher sleeps up to 60 s for the far entry; a sooner one stored locally
    # must wake it (the test would time out otherwise).
    real = MemoryStorage("memory://test")
    await real.connect()
    await real.store([make_payload(payload_id="far", destination="out", due_ms=2**62)])
    done = asyncio.Event()
    got: list[str] = []

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        got.extend(p.id for p in batch)
        done.set()
        return []

    stop = asyncio.Event()
    task = asyncio.create_task(
        real.serve(handler, stop, settings=WatchSettings(max_poll_interval_s=60))
    )
    await asyncio.sleep(0)  # let the watcher go to sleep on the far entry
    await real.store([make_payload(payload_id="soon", destination="out", due_ms=0)])
    async with asyncio.timeout(2):
        await done.wait()
    stop.set()
    await asyncio.wait_for(task, 2)
    assert got == ["soon"]


class _HeardElsewhere(MemoryStorage):
    """A backend with storage-driven wake-ups, as PostgreSQL's LISTEN gives: counts the hooks."""

    started = stopped = 0

    async def _start_wakeups(self) -> None:
        self.started += 1

    async def _stop_wakeups(self) -> None:
        self.stopped += 1


async def test_a_backend_wake_up_wakes_the_watcher_at_once() -> None:
    # Real clock, a 60 s poll bound: an entry that only the backend hears of (stored by another
    # process: written here past store(), which would wake the watcher locally) must wake it.
    storage = _HeardElsewhere("memory://heard")
    await storage.connect()
    got = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        got.set()
        return []

    stop = asyncio.Event()
    task = asyncio.create_task(
        storage.serve(handler, stop, settings=WatchSettings(max_poll_interval_s=60))
    )
    for _ in range(100):  # bounded: until the watcher listens
        if storage.started:
            break
        await asyncio.sleep(0)
    assert (storage.started, storage.stopped) == (1, 0)
    await asyncio.sleep(0)  # the watcher found nothing and sleeps
    elsewhere = make_payload(payload_id="elsewhere", destination="out", due_ms=0)
    await storage._store([elsewhere], [content_digest(elsewhere)])
    storage._stored_elsewhere(0)
    async with asyncio.timeout(2):
        await got.wait()
    stop.set()
    await asyncio.wait_for(task, 2)
    assert (storage.started, storage.stopped) == (1, 1)


async def test_unroutable_payloads_are_dead_lettered_with_the_reason(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    options = WatchStorageOptions(storage_url="memory://test", broker_url="memory://test")
    await storage.store(
        [
            make_payload(
                b"ok", headers={"x-delay": 5, "k": "v"}, payload_id="ok", destination="payler-out"
            ),
            make_payload(b"lost", payload_id="lost", destination="no-such-queue"),
        ]
    )
    done = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        rejections = await client.deliver(batch, broker, options, ctx)
        done.set()
        return rejections

    await _watch_until(storage, handler, done)

    [delivered] = broker.messages("payler-out")
    assert delivered.body == b"ok" and delivered.headers == {"k": "v"}  # scheduling header gone
    [dead] = broker.messages("payler-dead-letter")
    assert dead.body == b"lost"
    assert "unroutable" in dead.headers[DEAD_LETTER_REASON]
    assert "no-such-queue" in dead.headers[DEAD_LETTER_REASON]
    assert await storage.count() == 0 and await storage.count(state="dead") == 0


class FlakyBroker(MemoryBroker):
    """Refuses every publish, transiently (a broker nack)."""

    attempts = 0

    async def process(self, batch: Sequence[Payload]) -> list[Rejection]:
        self.attempts += len(batch)
        return [Rejection(p.id, "nacked by the broker") for p in batch]


async def test_transient_failures_retry_with_backoff_then_dead_letter(
    storage: MemoryStorage, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    options = WatchStorageOptions(
        storage_url="memory://test", broker_url="memory://test", max_attempts=4
    )
    async with FlakyBroker("memory://test", clock=clock) as broker:
        await broker.ensure_queue("payler-dead-letter")
        await storage.store(
            [make_payload(b"x", payload_id="x", destination="out", due_ms=START_MS)]
        )
        done = asyncio.Event()
        retried_at: list[int] = []

        async def handler(batch: Sequence[Payload]) -> list[Rejection]:
            retried_at.append(clock.now_ms())
            rejections = await client.deliver(batch, broker, options, ctx)
            if broker.messages("payler-dead-letter"):
                done.set()
            return rejections

        await _watch_until(storage, handler, done, WatchSettings(retry_base_s=1, retry_max_s=60))

    assert broker.attempts == 4
    gaps = [b - a for a, b in itertools.pairwise(retried_at)]
    # Exponential backoff with ±20 % jitter: about 1 s, 2 s, 4 s.
    for gap, expected in zip(gaps, (1_000, 2_000, 4_000), strict=True):
        assert 0.8 * expected <= gap <= 1.2 * expected + 1
    [dead] = broker.messages("payler-dead-letter")
    assert "gave up after 4 attempts" in dead.headers[DEAD_LETTER_REASON]
    assert await storage.count() == 0
    assert ctx.metrics.totals["retried"] == 3


async def test_options_reject_a_batch_larger_than_the_prefetch() -> None:
    with pytest.raises(ValueError, match="cannot exceed prefetch"):
        ProcessQueueOptions(prefetch=10, batch_size=50)


class DeadBroker(MemoryBroker):
    """A broker whose connection is gone: every publish fails as a whole."""

    async def process(self, batch: Sequence[Payload]) -> list[Rejection]:
        raise TransientError("connection to the broker lost")


async def test_a_failed_batch_is_given_back_with_backoff_not_left_leased(
    storage: MemoryStorage, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    options = WatchStorageOptions(storage_url="memory://test", broker_url="memory://test")
    await storage.store([make_payload(payload_id="x", destination="out", due_ms=START_MS)])
    async with DeadBroker("memory://test", clock=clock) as broker:
        with pytest.raises(TransientError):
            await storage.serve(
                lambda batch: client.deliver(batch, broker, options, ctx),
                asyncio.Event(),
                settings=WatchSettings(lease_ms=60_000, retry_base_s=2, retry_max_s=2),
            )
    entry = await storage.get("x")
    assert entry is not None
    assert entry.attempts == 0  # an outage is not the payload's failure
    assert entry.last_error is not None and "connection to the broker lost" in entry.last_error
    # Claimable again after the backoff (about 2 s), not after the 60 s lease.
    assert await storage.next_visible_ms() is not None
    assert (await storage.next_visible_ms() or 0) - START_MS <= 2_400


async def test_a_long_outage_does_not_use_up_the_attempts(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    """More failed cycles than ``max_attempts`` while the broker is down: once it is back, the
    payload is delivered, not dead-lettered as "gave up after N attempts"."""
    ctx = WorkflowContext("watch", clock=clock)
    options = WatchStorageOptions(
        storage_url="memory://test", broker_url="memory://test", max_attempts=3
    )
    settings = WatchSettings(lease_ms=60_000, retry_base_s=2, retry_max_s=2)
    await storage.store([make_payload(payload_id="x", destination="payler-out", due_ms=START_MS)])
    async with DeadBroker("memory://test", clock=clock) as down:
        for _ in range(options.max_attempts + 2):
            with pytest.raises(TransientError):
                await storage.serve(
                    lambda batch: client.deliver(batch, down, options, ctx),
                    asyncio.Event(),
                    settings=settings,
                )
            clock.advance(3_000)
    stop = asyncio.Event()

    async def deliver_then_stop(batch: Sequence[Payload]) -> list[Rejection]:
        rejections = await client.deliver(batch, broker, options, ctx)
        stop.set()
        return rejections

    await asyncio.wait_for(storage.serve(deliver_then_stop, stop, settings=settings), 5)
    assert [m.id for m in broker.messages("payler-out")] == ["x"]
    assert broker.messages("payler-dead-letter") == []
    assert await storage.get("x") is None


async def test_a_payload_out_of_attempts_is_dead_lettered_without_another_publish(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    options = WatchStorageOptions(
        storage_url="memory://test", broker_url="memory://test", max_attempts=3
    )
    tired = make_payload(b"t", payload_id="t", destination="payler-out").model_copy(
        update={"attempts": 3, "last_error": "delivery failed: connection lost"}
    )

    assert await client.deliver([tired], broker, options, ctx) == []

    assert broker.messages("payler-out") == []
    [dead] = broker.messages("payler-dead-letter")
    assert dead.headers[DEAD_LETTER_REASON] == (
        "gave up after 3 attempts: delivery failed: connection lost"
    )


async def test_unroutable_payloads_can_be_retried_instead(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    options = WatchStorageOptions(
        storage_url="memory://test", broker_url="memory://test", retry_unroutable=True
    )
    lost = make_payload(b"l", payload_id="l", destination="not-yet-declared")

    [retry] = await client.deliver([lost], broker, options, ctx)

    assert retry.payload_id == "l"
    assert not retry.permanent
    assert "unroutable" in retry.reason
    assert broker.messages("payler-dead-letter") == []


async def test_random_spool_ids_keep_identical_messages_apart(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    twins = [
        received(make_payload(b"same", headers={"x-delay": 5}, payload_id="amqp:q:#digest"))
        for _ in range(2)
    ]
    content_ids = INGEST.model_copy(update={"spool_id": "content"})
    await client.spool(twins, storage, broker, content_ids, ctx)
    assert await storage.count() == 1  # "content": one entry for byte-identical messages

    await client.spool(twins, storage, broker, INGEST, ctx)  # the default: random
    assert await storage.count() == 3
    # Ids that are not digests (a message id, a Kafka offset) are never replaced.
    kept = received(make_payload(b"k", headers={"x-delay": 5}, payload_id="kafka:t:0:7"))
    await client.spool([kept], storage, broker, INGEST, ctx)
    assert await storage.get("kafka:t:0:7") is not None


async def test_misfires_are_delivered_unless_later_than_max_lateness(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("watch", clock=clock)
    late = make_payload(
        b"late", payload_id="late", destination="payler-out", due_ms=START_MS - 90_000
    )
    recent = make_payload(b"ok", payload_id="ok", destination="payler-out", due_ms=START_MS - 10)
    default = WatchStorageOptions(storage_url="memory://test", broker_url="memory://test")
    strict = default.model_copy(update={"max_lateness_ms": 60_000})

    assert await client.deliver([late], broker, default, ctx) == []
    assert [p.body for p in broker.messages("payler-out")] == [b"late"]  # the default: deliver

    assert await client.deliver([late, recent], broker, strict, ctx) == []
    assert [p.body for p in broker.messages("payler-out")] == [b"late", b"ok"]
    [dead] = broker.messages("payler-dead-letter")
    assert dead.body == b"late"
    assert "missed its due time by 90000 ms" in dead.headers[DEAD_LETTER_REASON]


async def test_forward_takes_messages_from_one_broker_to_another(tmp_path: Path) -> None:
    reset()
    config_file = tmp_path / "forward.yaml"
    config_file.write_text(
        """
workflows:
  - callable: client.forward
    options:
      source_url: memory://source
      destination_url: memory://destination
      queue: in
      default_destination: out
"""
    )
    loaded = config.load(config_file)
    async with (
        MemoryBroker("memory://source") as source,
        MemoryBroker("memory://destination") as destination,
    ):
        await destination.ensure_queue("elsewhere")
        source.publish("in", make_payload(b"1", headers={"k": "v", "x-delay": 5}))
        source.publish("in", make_payload(b"2", headers={"x-destination": "elsewhere"}))
        source.publish("in", make_payload(b"3", headers={"x-destination": "nowhere"}))
        stop = asyncio.Event()
        runtime = asyncio.create_task(Runtime(loaded).run(stop))
        [dead] = await destination.wait_for("payler-dead-letter", 1)
        [out] = await destination.wait_for("out", 1)
        [elsewhere] = await destination.wait_for("elsewhere", 1)
        stop.set()
        await asyncio.wait_for(runtime, 5)
    assert (out.body, out.headers) == (b"1", {"k": "v"})  # no delay: forwarded as it came
    assert elsewhere.body == b"2"
    assert dead.body == b"3"
    assert "nowhere" in dead.headers[DEAD_LETTER_REASON]
    assert source.messages("in") == []
    reset()


class SmallStorage(MemoryStorage):
    max_body_bytes = 10


async def test_max_body_bytes_sets_the_spool_limit_of_process_queue(
    storage: MemoryStorage, broker: MemoryBroker, clock: FakeClock
) -> None:
    options = INGEST.model_copy(update={"max_body_bytes": 10})
    ctx = WorkflowContext("ingest", options=options, clock=clock)
    broker.publish("payler-jobs", make_payload(b"x" * 11, headers={"x-delay": 5}))
    broker.publish("payler-jobs", make_payload(b"x" * 10, headers={"x-delay": 5}))
    workflow = asyncio.create_task(client.process_queue(ctx))
    try:
        [dead] = await broker.wait_for("payler-dead-letter", 1)
    finally:
        ctx.stop.set()
        await asyncio.wait_for(workflow, 5)
    assert "over the spool's limit of 10 bytes" in dead.headers[DEAD_LETTER_REASON]
    assert await storage.count() == 1


def test_a_body_limit_above_what_the_storage_holds_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "payler.yaml"
    path.write_text(
        "workflows:\n  - callable: client.process_queue\n    options:\n"
        "      storage_url: mongodb://db/payler\n      max_body_bytes: 20000000\n"
    )
    with pytest.raises(config.ConfigError) as raised:
        config.load(path)
    assert str(path) in str(raised.value) and "max_body_bytes" in str(raised.value)
    assert "more than a mongodb:// storage can hold (16777216 bytes)" in str(raised.value)


async def test_a_body_too_large_for_the_spool_is_dead_lettered_at_ingest(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    ctx = WorkflowContext("ingest", clock=clock)
    async with SmallStorage("memory://small", clock=clock) as small:
        batch = [
            received(make_payload(b"x" * 11, headers={"x-delay": 5}, payload_id="big")),
            received(make_payload(b"x" * 10, headers={"x-delay": 5}, payload_id="fits")),
        ]
        assert await client.spool(batch, small, broker, INGEST, ctx) == []
        assert await small.get("fits") is not None
        assert await small.get("big") is None
    [dead] = broker.messages("payler-dead-letter")
    assert "11 bytes is over the spool's limit of 10 bytes" in dead.headers[DEAD_LETTER_REASON]
