"""When a message is due and where it goes: the scheduling headers and their rules.

The conventions are the original Payler's, extended:

- ``x-delay``: delay in milliseconds, an integer or a numeric string (many clients can only send
  string headers). Counted from the message's publish time when it carries one and the rule is
  ``delay_from="published"`` (the default), so a backlog in the input queue does not lengthen the
  delay; otherwise from when payler received it.
- ``x-deliver-at``: an absolute due time, epoch milliseconds or ISO 8601 with a UTC offset. It wins
  over ``x-delay`` when both are present.
- ``x-destination``: the routing key (queue, topic) to deliver to; the workflow's default otherwise.

Text may come as bytes: AMQP clients (pika, aio-pika) send a Python ``bytes`` value as a byte
array, which arrives as ``bytes`` or ``bytearray``; it is read as UTF-8 text, like a string.

Bad input raises :class:`~payler.errors.InvalidSchedule` with a reason for the dead-letter record.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from payler.errors import InvalidSchedule

DELAY_HEADER = "x-delay"
DELIVER_AT_HEADER = "x-deliver-at"
DESTINATION_HEADER = "x-destination"
#: Removed on re-injection, so that a message routed back into payler is not delayed twice.
SCHEDULING_HEADERS = frozenset({DELAY_HEADER, DELIVER_AT_HEADER, DESTINATION_HEADER})

#: A destination is a routing key, queue, topic or stream name: AMQP allows 255 bytes.
MAX_DESTINATION_BYTES = 255
#: AMQP timestamps have a resolution of one second: the true publish time lies within the second
#: after the stamp. Counting from the end of that second never delivers before the due time.
#: (Kafka records and stream entries are stamped to the millisecond: no slack for them.)
TIMESTAMP_RESOLUTION_MS = 999
#: An epoch-milliseconds due time before 2001-09-09 is almost surely seconds sent by mistake.
_SMALLEST_EPOCH_MS = 1_000_000_000_000
_NUMBER = re.compile(r"^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*$")  # ASCII digits only

DelayFrom = Literal["published", "received"]


@dataclass(frozen=True, slots=True)
class SchedulingRules:
    """A workflow's scheduling settings.

    ``default_delay_ms`` applies to messages without scheduling headers; when it is ``None`` such a
    message is invalid (dead-lettered). ``max_delay_ms`` bounds how far ahead a message may be due.
    """

    default_destination: str = "payler-out"
    default_delay_ms: int | None = None
    max_delay_ms: int = 366 * 24 * 3600 * 1000
    delay_from: DelayFrom = "published"


@dataclass(frozen=True, slots=True)
class Schedule:
    """Where and when one message goes.

    ``publish_time_ignored``: the message's publish time was implausible (see
    :func:`plausible_publish_time`), so its delay counts from its receipt; worth a warning.
    """

    due_ms: int
    destination: str
    publish_time_ignored: bool = False


def schedule(
    headers: Mapping[str, Any],
    *,
    received_ms: int,
    published_ms: int | None,
    rules: SchedulingRules,
    timestamp_slack_ms: int = TIMESTAMP_RESOLUTION_MS,
) -> Schedule:
    """Read a message's scheduling headers; raise :class:`InvalidSchedule` with the reason.

    ``timestamp_slack_ms`` is how much later than its stamp the message may have been published
    (the source's timestamp resolution: 999 ms for AMQP's seconds, 0 for milliseconds).
    """
    ignored = published_ms is not None and not plausible_publish_time(
        published_ms, received_ms, rules
    )
    return Schedule(
        due_ms=due_time(
            headers,
            received_ms=received_ms,
            published_ms=None if ignored else published_ms,
            rules=rules,
            timestamp_slack_ms=timestamp_slack_ms,
        ),
        destination=destination(headers, rules),
        publish_time_ignored=ignored,
    )


def plausible_publish_time(published_ms: int, received_ms: int, rules: SchedulingRules) -> bool:
    """Whether a delay may count from ``published_ms``.

    A publish time more than ``max_delay_ms`` before the receipt cannot be true for a message
    still waiting to be delayed (every allowed delay would be over already), and one before 2001
    is a wrong clock or a wrong unit: counted from, it would make the message early. Such a
    time is ignored: the delay counts from the receipt. A publish time in the future does no harm
    (the delay never starts after the receipt).
    """
    return published_ms >= _SMALLEST_EPOCH_MS and received_ms - published_ms <= rules.max_delay_ms


def due_time(
    headers: Mapping[str, Any],
    *,
    received_ms: int,
    published_ms: int | None,
    rules: SchedulingRules,
    timestamp_slack_ms: int = TIMESTAMP_RESOLUTION_MS,
) -> int:
    """The message's due time, epoch milliseconds."""
    if DELIVER_AT_HEADER in headers:
        due_ms = parse_deliver_at(headers[DELIVER_AT_HEADER])
        if due_ms - received_ms > rules.max_delay_ms:
            raise InvalidSchedule(
                f"{DELIVER_AT_HEADER} is {due_ms - received_ms} ms ahead, "
                f"over the maximum delay of {rules.max_delay_ms} ms"
            )
        return due_ms
    if DELAY_HEADER in headers:
        delay_ms = parse_delay(headers[DELAY_HEADER])
    elif rules.default_delay_ms is not None:
        delay_ms = rules.default_delay_ms
    else:
        raise InvalidSchedule(
            f"missing {DELAY_HEADER} (milliseconds) or {DELIVER_AT_HEADER} header, "
            "and the workflow has no default_delay_ms"
        )
    if delay_ms > rules.max_delay_ms:
        raise InvalidSchedule(
            f"{DELAY_HEADER} of {delay_ms} ms is over the maximum delay of {rules.max_delay_ms} ms"
        )
    start_ms = received_ms
    if rules.delay_from == "published" and published_ms is not None:
        start_ms = min(received_ms, published_ms + timestamp_slack_ms)
    return start_ms + delay_ms


def parse_delay(value: Any) -> int:
    """``x-delay`` as whole milliseconds (fractions round up); raise on anything else."""
    number = _as_number(value, DELAY_HEADER)
    if number < 0:
        raise InvalidSchedule(f"{DELAY_HEADER} is negative ({_show(value)})")
    return math.ceil(number)


def parse_deliver_at(value: Any) -> int:
    """``x-deliver-at`` as epoch milliseconds, from a number, a numeric string or ISO 8601."""
    if isinstance(value, datetime):
        return _datetime_ms(value if value.tzinfo else value.replace(tzinfo=UTC))
    text = _text(value)
    if isinstance(text, str) and not _NUMBER.match(text):
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidSchedule(
                f"{DELIVER_AT_HEADER} is neither epoch milliseconds nor an ISO 8601 date "
                f"({_show(value)})"
            ) from None
        if moment.tzinfo is None:
            raise InvalidSchedule(
                f"{DELIVER_AT_HEADER} has no UTC offset ({_show(value)}): add one, e.g. +00:00"
            )
        return _datetime_ms(moment)
    number = _as_number(value, DELIVER_AT_HEADER)
    if number < _SMALLEST_EPOCH_MS:
        raise InvalidSchedule(
            f"{DELIVER_AT_HEADER} {_show(value)} is before 2001: "
            "expected epoch milliseconds (not seconds)"
        )
    return math.ceil(number)


def destination(headers: Mapping[str, Any], rules: SchedulingRules) -> str:
    """``x-destination`` when present and usable, else the workflow's default destination."""
    if DESTINATION_HEADER not in headers:
        return rules.default_destination
    value = _text(headers[DESTINATION_HEADER])
    if not isinstance(value, str) or not value.strip():
        raise InvalidSchedule(f"{DESTINATION_HEADER} is not a destination name ({_show(value)})")
    if len(value.encode()) > MAX_DESTINATION_BYTES:
        raise InvalidSchedule(
            f"{DESTINATION_HEADER} is longer than {MAX_DESTINATION_BYTES} bytes ({_show(value)})"
        )
    return value


def without_scheduling_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers to re-inject: the same, less the scheduling ones."""
    return {k: v for k, v in headers.items() if k not in SCHEDULING_HEADERS}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _datetime_ms(moment: datetime) -> int:
    """Epoch milliseconds of an aware datetime, rounded up, in exact integer arithmetic."""
    return -((_EPOCH - moment) // _ONE_MS)


def _as_number(value: Any, header: str) -> float:
    if isinstance(value, bool):
        raise InvalidSchedule(f"{header} is not a number ({_show(value)})")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value.is_nan():
        raise InvalidSchedule(f"{header} is not a finite number ({_show(value)})")
    if isinstance(value, float | Decimal):
        number = float(value)
    elif isinstance(value, str | bytes | bytearray | memoryview):
        text = _text(value)
        if not _NUMBER.match(text):
            raise InvalidSchedule(f"{header} is not a number ({_show(value)})")
        number = float(text)
    else:
        raise InvalidSchedule(f"{header} is not a number ({_show(value)})")
    if not math.isfinite(number):
        raise InvalidSchedule(f"{header} is not a finite number ({_show(value)})")
    return number


def _text(value: Any) -> Any:
    """``value`` as text if it is bytes-like (a byte array sent for a string), else as it is."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
