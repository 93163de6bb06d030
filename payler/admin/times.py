"""Durations and due times as operators write them, validated like the scheduling headers."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from payler.errors import InvalidSchedule
from payler.scheduling import parse_delay, parse_deliver_at

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """``500ms``, ``5s``, ``1.5s``, ``10m``, ``2h``, ``1d`` (a bare number: milliseconds) as
    whole milliseconds, rounded up; raise ``ValueError`` naming the accepted forms."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"not a duration: {text!r} (write 500ms, 5s, 10m, 2h or 1d; a bare number is ms)"
        )
    number, unit = match.groups()
    return math.ceil(float(number) * _UNIT_MS[unit or "ms"])


def show_duration(ms: int) -> str:
    """Milliseconds as an operator reads them: ``750ms``, ``5s``, ``1h``, ``1h 30m``, ``2d 3h``
    (the two largest units; the inverse of :func:`parse_duration_ms` for whole values)."""
    if ms < 1000:
        return f"{ms}ms"
    parts = []
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_MS[unit]
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return " ".join(parts[:2])


def due_ms_of(
    *,
    now_ms: int,
    delay_ms: int | float | str | None = None,
    deliver_at: str | int | None = None,
    max_delay_ms: int,
) -> int:
    """The due time that ``delay_ms`` (from now) or ``deliver_at`` (ISO 8601 with an offset,
    or epoch ms) names; raise :class:`~payler.errors.InvalidSchedule` as the headers would."""
    if (delay_ms is None) == (deliver_at is None):
        raise InvalidSchedule("give either delay_ms or deliver_at (one of them)")
    if deliver_at is not None:
        due_ms = parse_deliver_at(deliver_at)
        if due_ms - now_ms > max_delay_ms:
            raise InvalidSchedule(
                f"deliver_at is {due_ms - now_ms} ms ahead, over the maximum delay of "
                f"{max_delay_ms} ms"
            )
        return due_ms
    delay = parse_delay(delay_ms)
    if delay > max_delay_ms:
        raise InvalidSchedule(
            f"delay_ms of {delay} ms is over the maximum delay of {max_delay_ms} ms"
        )
    return now_ms + delay


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 in UTC (``2026-11-22T18:00:00.000Z``)."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = ["due_ms_of", "iso", "parse_duration_ms"]
