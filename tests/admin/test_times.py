"""Durations as operators write and read them."""

from __future__ import annotations

import pytest

from payler.admin.commands import _when
from payler.admin.times import parse_duration_ms, show_duration


@pytest.mark.parametrize(
    ("ms", "shown"),
    [
        (0, "0ms"),
        (750, "750ms"),
        (5_000, "5s"),
        (90_000, "1m 30s"),
        (3_600_000, "1h"),
        (5_400_000, "1h 30m"),
        (97_200_000, "1d 3h"),
        (97_200_001, "1d 3h"),  # the two largest units only
    ],
)
def test_durations_are_shown_in_the_units_operators_write(ms: int, shown: str) -> None:
    assert show_duration(ms) == shown


@pytest.mark.parametrize("text", ["500ms", "5s", "10m", "2h", "1d"])
def test_a_whole_duration_reads_back_as_it_was_written(text: str) -> None:
    assert show_duration(parse_duration_ms(text)) == text


def test_send_echoes_a_delay_it_cannot_read_as_given() -> None:
    """``payler send -H x-delay=soon`` is the operator testing the daemon's dead-lettering:
    the CLI must send it and say what it sent, not fail on it."""
    assert _when({"x-delay": "90000"}) == "due in 1m 30s"
    assert _when({"x-delay": 1500}) == "due in 1s"
    assert _when({"x-delay": "soon"}) == "x-delay: 'soon' as given"
    assert _when({}) == "no delay header: the workflow's default_delay_ms applies"
