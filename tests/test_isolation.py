"""``isolate()``: a batch step that fails finds the payloads it fails on, and only those."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from payler.errors import TransientError
from payler.isolation import describe, isolate
from payler.metrics import Metrics
from payler.payload import Payload
from payler.testing import make_payload


def batch_of(n: int) -> list[Payload]:
    return [make_payload(payload_id=f"p{i}") for i in range(n)]


class Step:
    """A batch step that raises ``error`` for any batch holding one of ``bad``."""

    def __init__(self, bad: set[str], error: Exception) -> None:
        self.bad, self.error = bad, error
        self.calls: list[list[str]] = []
        self.done: list[str] = []

    async def __call__(self, batch: Sequence[Payload]) -> int:
        ids = [p.id for p in batch]
        self.calls.append(ids)
        if self.bad & set(ids):
            raise self.error
        self.done += ids
        return len(ids)


async def test_a_batch_that_works_runs_once() -> None:
    step = Step(set(), ValueError())
    assert await isolate(step, batch_of(5), "store") == ([5], [])
    assert len(step.calls) == 1


@pytest.mark.parametrize("bad", [{"p0"}, {"p6"}, {"p3", "p4"}, {"p1", "p5", "p9"}])
async def test_only_the_payloads_a_refusal_fails_on_are_handed_back(bad: set[str]) -> None:
    step = Step(bad, ValueError("lone surrogate"))
    results, failed = await isolate(step, batch_of(10), "the spool cannot store it")
    assert {p.id for p, _ in failed} == bad
    assert {reason for _, reason in failed} == {
        "the spool cannot store it: ValueError: lone surrogate"
    }
    assert sorted(step.done) == sorted(f"p{i}" for i in range(10) if f"p{i}" not in bad)
    assert sum(results) == 10 - len(bad)
    # Halving: far fewer calls than one per payload.
    assert len(step.calls) <= 1 + 2 * len(bad) * 4


async def test_a_refusal_of_every_payload_hands_every_payload_back() -> None:
    step = Step({"p0", "p1"}, ValueError("nested too deep"))
    results, failed = await isolate(step, batch_of(2), "store")
    assert results == [] and {p.id for p, _ in failed} == {"p0", "p1"}


async def test_a_bug_for_one_payload_hands_it_back_counted_as_a_bug() -> None:
    metrics = Metrics()
    step = Step({"p2"}, AttributeError("no attribute 'x'"))
    _, [(payload, reason)] = await isolate(step, batch_of(4), "store", metrics=metrics)
    assert payload.id == "p2"
    assert reason == "store (a bug in payler): AttributeError: no attribute 'x'"
    assert metrics.totals["bugs"] == 1


@pytest.mark.parametrize("size", [1, 3])
async def test_a_bug_for_every_payload_is_the_steps_not_the_payloads(size: int) -> None:
    step = Step({f"p{i}" for i in range(size)}, TypeError("broken for all"))
    with pytest.raises(TypeError, match="broken for all"):
        await isolate(step, batch_of(size), "store")


async def test_a_step_that_cannot_break_hands_back_even_a_bug_for_every_payload() -> None:
    step = Step({"p0"}, TypeError("bug"))
    _, [(payload, reason)] = await isolate(step, batch_of(1), "publish", step_can_break=False)
    assert payload.id == "p0" and "a bug in payler" in reason


async def test_an_outage_is_never_isolated() -> None:
    step = Step({"p0", "p1", "p2"}, TransientError("connection lost"))
    with pytest.raises(TransientError):
        await isolate(step, batch_of(3), "store")
    assert len(step.calls) == 1


async def test_an_outage_while_isolating_propagates() -> None:
    calls = 0

    async def step(batch: Sequence[Payload]) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad") if calls == 1 else ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        await isolate(step, batch_of(4), "store")


def test_describe_is_one_short_line_of_storable_text() -> None:
    assert describe(ValueError("a\n  b")) == "ValueError: a b"
    assert describe(KeyError("k")) == "KeyError: 'k'"
    assert len(describe(ValueError("x" * 5000))) < 520
    assert describe(ValueError("cut \udc80")) == "ValueError: cut \\udc80"
    assert (
        describe(TransientError("TransientError: already named")) == "TransientError: already named"
    )
