"""The dead-letter breaker's limits, on a fake clock."""

from __future__ import annotations

from payler.processing.breaker import Breaker, BreakerLimits
from payler.testing import FakeClock


def test_consecutive_dead_letters_trip_it_and_a_good_message_resets_the_run() -> None:
    breaker = Breaker(BreakerLimits(max_consecutive_invalid=3), FakeClock())
    assert not any(breaker.record(invalid) for invalid in (True, True, False, True, True))
    assert breaker.record(invalid=True)
    assert breaker.tripped == "3 messages in a row were dead-lettered (max_consecutive_invalid: 3)"
    assert breaker.record(invalid=False)  # stays tripped


def test_the_ratio_counts_over_the_window_once_there_are_enough_messages() -> None:
    clock = FakeClock()
    breaker = Breaker(BreakerLimits(max_invalid_ratio=0.5, window_s=10, min_messages=4), clock)
    assert not breaker.record(invalid=True)  # 1 of 1: too few messages to judge
    assert not breaker.record(invalid=True)
    for _ in range(4):
        assert not breaker.record(invalid=False)
    assert not breaker.record(invalid=True)  # 3 of 7
    clock.advance(10_000)  # the first seven leave the window
    assert not breaker.record(invalid=False)
    for _ in range(3):
        assert not breaker.record(invalid=True) or breaker.tripped
    assert breaker.tripped is not None
    assert breaker.tripped.startswith("3 of the last 4 messages were dead-lettered within 10 s")


def test_without_limits_it_never_trips() -> None:
    breaker = Breaker(BreakerLimits(), FakeClock())
    assert not any(breaker.record(invalid=True) for _ in range(1000))
