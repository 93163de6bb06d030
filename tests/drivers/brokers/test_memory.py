"""The in-memory broker (``payler.testing``), and the dead-letter path every broker inherits from
:class:`~payler.drivers.brokers.base.Broker`, exercised through it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import pytest

from payler.drivers.base import Rejection
from payler.drivers.brokers.base import DEAD_LETTER_REASON, DEAD_LETTER_TRUNCATED
from payler.drivers.brokers.memory import HAND_BACK_BACKOFF
from payler.errors import TransientError
from payler.payload import Payload
from payler.testing import FakeClock, MemoryBroker, make_payload, reset

START_MS = 1_700_000_000_000
DLQ = "dlq"


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    reset()
    yield
    reset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START_MS)


@pytest.fixture
async def broker(clock: FakeClock) -> AsyncIterator[MemoryBroker]:
    async with MemoryBroker("memory://m", queue="in", clock=clock) as memory:
        await memory.ensure_queue(DLQ)
        yield memory


async def test_a_message_handed_back_for_now_comes_back_after_a_growing_backoff(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    for body in (b"refused", b"a", b"b"):
        broker.publish("in", make_payload(body, payload_id=body.decode()))
    seen: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        seen.extend((clock.now_ms(), p.id) for p in batch)
        if sum(1 for _, i in seen if i == "refused") == 6:
            stop.set()
        return [Rejection(p.id, "queue full") for p in batch if p.id == "refused"]

    await asyncio.wait_for(broker.serve(handler, stop), 5)

    assert [i for _, i in seen if i != "refused"] == ["a", "b"]  # the others flowed, once
    times = [t for t, i in seen if i == "refused"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for attempt, gap in enumerate(gaps):
        expected = min(HAND_BACK_BACKOFF.max_s, HAND_BACK_BACKOFF.base_s * 2**attempt) * 1000
        assert 0.8 * expected <= gap <= 1.2 * expected + 1, gaps
    # Never acknowledged: once serving stops, the message is on its queue again.
    assert [p.id for p in broker.messages("in")] == ["refused"]


async def test_serve_stamps_the_receipt_time(broker: MemoryBroker, clock: FakeClock) -> None:
    broker.publish("in", make_payload(b"x", due_ms=5))
    got: list[Payload] = []
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        got.extend(batch)
        stop.set()
        return []

    await asyncio.wait_for(broker.serve(handler, stop), 5)
    assert (got[0].created_ms, got[0].due_ms, got[0].source) == (START_MS, START_MS, "in")


class Buggy(MemoryBroker):
    """A driver with a bug for some dead-letter copies: those whose body says so."""

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        if dead_letters and any(p.body == b"bug" or b"bug-all" in p.id.encode() for p, _ in items):
            raise KeyError("a bug")
        return await super()._publish(items, dead_letters=dead_letters)


async def test_a_dead_letter_the_driver_raises_for_alone_goes_as_a_minimal_copy(
    clock: FakeClock,
) -> None:
    async with Buggy("memory://m", clock=clock) as broker:
        items = [(make_payload(b"bug", payload_id="p1"), "why"), (make_payload(b"ok"), "why")]
        assert await broker.dead_letter(items, DLQ) == []
        minimal, full = sorted(broker.messages(DLQ), key=lambda p: p.body)
    assert minimal.body == b"" and "KeyError" in minimal.headers[DEAD_LETTER_TRUNCATED]
    assert minimal.headers[DEAD_LETTER_REASON] == "why"
    assert full.body == b"ok"
    assert broker.metrics.totals["bugs"] == 1
    assert broker.metrics.totals["dead_lettered"] == 2


async def test_a_dead_letter_refused_in_every_form_is_returned_as_permanent(
    clock: FakeClock,
) -> None:
    async with Buggy("memory://m", clock=clock) as broker:
        [refused] = await broker.dead_letter([(make_payload(payload_id="bug-all"), "why")], DLQ)
    assert refused.permanent and refused.payload_id == "bug-all"
    assert "minimal copy" in refused.reason
    assert broker.messages(DLQ) == []


class MinimalTimesOut(MemoryBroker):
    """Refuses full copies for good; the minimal copies' publish times out."""

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        if any(p.body == b"" for p, _ in items):
            raise TransientError("publish timed out")
        big = [p for p, _ in items if p.body == b"big"]
        fine = [(p, h) for p, h in items if p.body != b"big"]
        refused = [Rejection(p.id, "too large", permanent=True) for p in big]
        return refused + await super()._publish(fine, dead_letters=dead_letters)


async def test_a_minimal_copy_failing_for_now_leaves_the_others_dead_lettered(
    clock: FakeClock,
) -> None:
    async with MinimalTimesOut("memory://m", clock=clock) as broker:
        items = [(make_payload(b"big", payload_id="big"), "r"), (make_payload(b"ok"), "r")]
        [later] = await broker.dead_letter(items, DLQ)
        assert (later.payload_id, later.permanent) == ("big", False)  # to retry, not park
        assert [p.body for p in broker.messages(DLQ)] == [b"ok"]
    assert broker.metrics.totals["dead_lettered"] == 1


async def test_reasons_are_text_every_broker_can_carry(broker: MemoryBroker) -> None:
    await broker.dead_letter([(make_payload(payload_id="s"), "bad header 'x\udc80'")], DLQ)
    [dead] = broker.messages(DLQ)
    assert dead.headers[DEAD_LETTER_REASON] == "bad header 'x\\udc80'"
