"""The scheduling headers and their rules (``payler/scheduling.py``).

Times are explicit epoch milliseconds: nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payler.errors import InvalidSchedule
from payler.scheduling import (
    DELAY_HEADER,
    DELIVER_AT_HEADER,
    DESTINATION_HEADER,
    Schedule,
    SchedulingRules,
    destination,
    due_time,
    parse_delay,
    parse_deliver_at,
    schedule,
    without_scheduling_headers,
)

#: 2030-01-01T00:00:00Z, epoch milliseconds.
Y2030_MS = 1_893_456_000_000
#: A receipt time (2023-11-14T22:13:20Z) with whole seconds, like an AMQP timestamp.
RECEIVED = 1_700_000_000_000
RULES = SchedulingRules()


def reason_of(call: Callable[[], Any]) -> str:
    """The reason of the :class:`InvalidSchedule` that ``call`` raises; fails if it returns."""
    with pytest.raises(InvalidSchedule) as caught:
        call()
    reason = caught.value.reason
    assert isinstance(reason, str)
    assert reason.strip(), "an InvalidSchedule must say why"
    assert str(caught.value) == reason
    return reason


# -- x-delay ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1500, 1500),
        (0, 0),
        ("1500", 1500),
        (" 1500 ", 1500),
        ("\t1500\n", 1500),
        ("+1500", 1500),
        ("1500.2", 1501),
        ("1500.", 1500),
        (".5", 1),
        ("-0", 0),
        (b"1500", 1500),
        (b" 1500.2 ", 1501),
        (bytearray(b"1500"), 1500),  # an AMQP byte array, as pamqp decodes it
        (memoryview(b"1500"), 1500),
        (Decimal("1500"), 1500),
        (Decimal("1500.2"), 1501),
        (1500.0, 1500),
        (1500.2, 1501),
        (0.001, 1),
    ],
)
def test_parse_delay_accepts_numbers_and_numeric_strings(value: Any, expected: int) -> None:
    result = parse_delay(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        None,
        "abc",
        "",
        "   ",
        "1e3",  # exponents are not in the accepted grammar: digits, one optional dot
        "1_000",
        "1,5",
        "0x10",
        "1500ms",
        "NaN",
        "nan",
        "inf",
        "-inf",
        "Infinity",
        b"NaN",
        b"\xff\xfe",
        float("nan"),
        float("inf"),
        Decimal("NaN"),
        Decimal("Infinity"),
        "9" * 400,  # parses as a float, but to infinity
        [1500],
        {"ms": 1500},
        bytearray(b"abc"),
        datetime(2030, 1, 1, tzinfo=UTC),
    ],
)
def test_parse_delay_rejects_what_is_not_a_finite_number(value: Any) -> None:
    assert DELAY_HEADER in reason_of(lambda: parse_delay(value))


@pytest.mark.parametrize("value", [-1, "-1", " -1500 ", -0.5, "-0.5", Decimal("-1"), b"-3"])
def test_parse_delay_rejects_negative_delays(value: Any) -> None:
    assert "negative" in reason_of(lambda: parse_delay(value))


def test_parse_delay_rejects_a_signalling_nan_decimal() -> None:
    reason_of(lambda: parse_delay(Decimal("sNaN")))


def test_parse_delay_reason_shows_the_value_shortened() -> None:
    reason = reason_of(lambda: parse_delay("x" * 500))
    assert "xxxx" in reason
    assert len(reason) < 200


# -- x-deliver-at -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Y2030_MS, Y2030_MS),
        (Y2030_MS + 123, Y2030_MS + 123),
        (str(Y2030_MS), Y2030_MS),
        (f" {Y2030_MS} ", Y2030_MS),
        (str(Y2030_MS).encode(), Y2030_MS),
        (float(Y2030_MS) + 0.5, Y2030_MS + 1),  # fractions round up: never early
        (Decimal(Y2030_MS), Y2030_MS),
        (1_000_000_000_000, 1_000_000_000_000),  # the smallest accepted: 2001-09-09
        ("2030-01-01T00:00:00+00:00", Y2030_MS),
        ("2030-01-01T00:00:00Z", Y2030_MS),
        ("2030-01-01T00:00:00.123Z", Y2030_MS + 123),
        ("2030-01-01T00:00:00.1234Z", Y2030_MS + 124),
        ("2030-01-01T02:00:00+02:00", Y2030_MS),
        ("2029-12-31T19:00:00-05:00", Y2030_MS),
        ("2030-01-01 00:00:00+00:00", Y2030_MS),
        (" 2030-01-01T00:00:00Z ", Y2030_MS),
        (b"2030-01-01T00:00:00Z", Y2030_MS),
        (bytearray(b"2030-01-01T00:00:00Z"), Y2030_MS),
        (bytearray(str(Y2030_MS).encode()), Y2030_MS),
    ],
)
def test_parse_deliver_at_accepts_epoch_ms_and_iso_8601_with_offset(
    value: Any, expected: int
) -> None:
    result = parse_deliver_at(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value", ["2030-01-01T00:00:00", "2030-01-01", "2030-01-01 00:00:00.5", b"2030-01-01T00:00:00"]
)
def test_parse_deliver_at_rejects_iso_without_offset_and_says_to_add_one(value: Any) -> None:
    reason = reason_of(lambda: parse_deliver_at(value))
    assert DELIVER_AT_HEADER in reason
    assert "offset" in reason
    assert "+00:00" in reason


@pytest.mark.parametrize(
    "value", [1_700_000_000, "1700000000", b"1700000000", 999_999_999_999, 0, -5, "-1"]
)
def test_parse_deliver_at_rejects_seconds_and_early_epochs(value: Any) -> None:
    reason = reason_of(lambda: parse_deliver_at(value))
    assert "milliseconds" in reason
    assert "seconds" in reason


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "",
        "1e12",
        "tomorrow",
        "2030-13-01T00:00:00Z",
        None,
        True,
        [Y2030_MS],
        float("nan"),
        float("inf"),
        "NaN",
    ],
)
def test_parse_deliver_at_rejects_other_values(value: Any) -> None:
    assert DELIVER_AT_HEADER in reason_of(lambda: parse_deliver_at(value))


def test_parse_deliver_at_takes_aware_datetimes_at_their_offset() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert parse_deliver_at(datetime(2030, 1, 1, 2, 0, tzinfo=plus_two)) == Y2030_MS
    assert parse_deliver_at(datetime(2030, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)) == Y2030_MS + 123
    # sub-millisecond parts round up: never early
    assert parse_deliver_at(datetime(2030, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == Y2030_MS + 1


def test_parse_deliver_at_takes_naive_datetimes_as_utc() -> None:
    # AMQP timestamps in headers decode to datetimes: a naive one is UTC (unlike a naive string,
    # which a person wrote and which is rejected).
    assert parse_deliver_at(datetime(2030, 1, 1)) == Y2030_MS
    assert parse_deliver_at(datetime(2030, 1, 1, 0, 0, 0, 123_000)) == Y2030_MS + 123


def at_epoch_ms(epoch_ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=epoch_ms)


# 2004-02 to 2036: the due times payler meets in practice (the test below covers the others).
@given(st.integers(min_value=1_100_000_000_000, max_value=2_100_000_000_000))
def test_parse_deliver_at_is_exact_for_whole_milliseconds(epoch_ms: int) -> None:
    assert parse_deliver_at(at_epoch_ms(epoch_ms)) == epoch_ms
    assert parse_deliver_at(at_epoch_ms(epoch_ms).isoformat()) == epoch_ms
    assert parse_deliver_at(str(epoch_ms)) == epoch_ms


@pytest.mark.parametrize("epoch_ms", [1_075_885_718_035, 2_192_921_898_543])
def test_parse_deliver_at_is_exact_outside_the_usual_years(epoch_ms: int) -> None:
    assert parse_deliver_at(at_epoch_ms(epoch_ms).isoformat()) == epoch_ms


# -- due_time -----------------------------------------------------------------------------------


def due(
    headers: dict[str, Any],
    *,
    received_ms: int = RECEIVED,
    published_ms: int | None = None,
    rules: SchedulingRules = RULES,
) -> int:
    return due_time(headers, received_ms=received_ms, published_ms=published_ms, rules=rules)


def test_x_delay_counts_from_receipt_without_a_publish_time() -> None:
    assert due({DELAY_HEADER: 1500}) == RECEIVED + 1500
    assert due({DELAY_HEADER: "1500.2"}) == RECEIVED + 1501


def test_x_deliver_at_wins_over_x_delay() -> None:
    headers = {DELIVER_AT_HEADER: Y2030_MS, DELAY_HEADER: 5}
    assert due(headers, received_ms=Y2030_MS - 60_000, published_ms=Y2030_MS - 61_000) == Y2030_MS
    iso = {DELIVER_AT_HEADER: "2030-01-01T00:00:00Z", DELAY_HEADER: "5"}
    assert due(iso, received_ms=Y2030_MS - 60_000) == Y2030_MS


def test_x_deliver_at_ignores_delay_from_and_the_publish_time() -> None:
    received = Y2030_MS - 60_000
    for delay_from in ("published", "received"):
        rules = SchedulingRules(delay_from=delay_from, default_delay_ms=7)
        got = due(
            {DELIVER_AT_HEADER: Y2030_MS},
            received_ms=received,
            published_ms=received - 30_000,
            rules=rules,
        )
        assert got == Y2030_MS


def test_x_deliver_at_in_the_past_is_due_at_once_not_rejected() -> None:
    assert due({DELIVER_AT_HEADER: RECEIVED - 5_000}) == RECEIVED - 5_000


def test_default_delay_applies_only_without_scheduling_headers() -> None:
    rules = SchedulingRules(default_delay_ms=5_000)
    assert due({}, rules=rules) == RECEIVED + 5_000
    assert due({"other": "header"}, rules=rules) == RECEIVED + 5_000
    assert due({DELAY_HEADER: 10}, rules=rules) == RECEIVED + 10
    assert due({DELIVER_AT_HEADER: RECEIVED + 60_000}, rules=rules) == RECEIVED + 60_000
    assert due({}, rules=SchedulingRules(default_delay_ms=0)) == RECEIVED


def test_default_delay_also_counts_from_the_publish_time() -> None:
    rules = SchedulingRules(default_delay_ms=5_000)
    assert due({}, published_ms=RECEIVED - 60_000, rules=rules) == RECEIVED - 60_000 + 999 + 5_000


def test_missing_headers_without_a_default_delay_are_invalid() -> None:
    reason = reason_of(lambda: due({"other": 1}))
    assert DELAY_HEADER in reason
    assert DELIVER_AT_HEADER in reason
    assert "default_delay_ms" in reason


def test_max_delay_bounds_x_delay() -> None:
    rules = SchedulingRules(max_delay_ms=10_000)
    assert due({DELAY_HEADER: 10_000}, rules=rules) == RECEIVED + 10_000
    reason = reason_of(lambda: due({DELAY_HEADER: 10_001}, rules=rules))
    assert DELAY_HEADER in reason
    assert "10001" in reason
    assert "maximum" in reason


def test_max_delay_bounds_the_default_delay() -> None:
    rules = SchedulingRules(max_delay_ms=10_000, default_delay_ms=10_001)
    assert "maximum" in reason_of(lambda: due({}, rules=rules))


def test_max_delay_bounds_x_deliver_at_from_receipt() -> None:
    rules = SchedulingRules(max_delay_ms=10_000)
    assert due({DELIVER_AT_HEADER: RECEIVED + 10_000}, rules=rules) == RECEIVED + 10_000
    reason = reason_of(lambda: due({DELIVER_AT_HEADER: RECEIVED + 10_001}, rules=rules))
    assert DELIVER_AT_HEADER in reason
    assert "maximum" in reason


def test_the_default_max_delay_is_a_leap_year() -> None:
    year_ms = 366 * 24 * 3600 * 1000
    assert due({DELAY_HEADER: year_ms}) == RECEIVED + year_ms
    reason_of(lambda: due({DELAY_HEADER: year_ms + 1}))
    reason_of(lambda: due({DELAY_HEADER: 10**30}))


def test_bad_header_values_are_invalid_in_due_time() -> None:
    assert DELAY_HEADER in reason_of(lambda: due({DELAY_HEADER: "soon"}))
    assert DELIVER_AT_HEADER in reason_of(lambda: due({DELIVER_AT_HEADER: "soon"}))


def test_delay_from_published_counts_from_the_end_of_the_stamped_second() -> None:
    published = RECEIVED - 60_000  # a minute of backlog in the input queue
    got = due({DELAY_HEADER: 120_000}, published_ms=published)
    assert got == published + 999 + 120_000


def test_delay_from_published_never_starts_after_receipt() -> None:
    # received within the stamped second: start at receipt, not at the end of the second
    assert due({DELAY_HEADER: 1_000}, published_ms=RECEIVED - 200) == RECEIVED + 1_000
    # a producer whose clock runs ahead: the publish time is after the receipt
    assert due({DELAY_HEADER: 1_000}, published_ms=RECEIVED + 60_000) == RECEIVED + 1_000


def test_delay_from_received_ignores_the_publish_time() -> None:
    rules = SchedulingRules(delay_from="received")
    got = due({DELAY_HEADER: 1_000}, published_ms=RECEIVED - 60_000, rules=rules)
    assert got == RECEIVED + 1_000


@given(
    stamp_s=st.integers(min_value=1_000_000_000, max_value=4_000_000_000),
    within_ms=st.integers(min_value=0, max_value=999),
    backlog_ms=st.integers(min_value=0, max_value=7 * 24 * 3600 * 1000),
    delay_ms=st.integers(min_value=0, max_value=366 * 24 * 3600 * 1000),
)
def test_delay_from_published_is_never_early_and_not_lengthened_by_a_backlog(
    stamp_s: int, within_ms: int, backlog_ms: int, delay_ms: int
) -> None:
    true_publish_ms = stamp_s * 1000 + within_ms  # the stamp truncates to the second
    received_ms = true_publish_ms + backlog_ms
    got = due({DELAY_HEADER: delay_ms}, received_ms=received_ms, published_ms=stamp_s * 1000)
    assert got >= true_publish_ms + delay_ms  # never before the true due time
    assert got <= received_ms + delay_ms  # a backlog never lengthens the delay
    assert got - (true_publish_ms + delay_ms) <= 999  # late by less than the stamp's resolution


def test_millisecond_timestamps_get_no_slack() -> None:
    # Kafka records and stream entries are stamped to the millisecond: a backlog of 40 ms is
    # not stretched to the end of a second.
    got = schedule(
        {DELAY_HEADER: 1_000},
        received_ms=RECEIVED,
        published_ms=RECEIVED - 40,
        rules=SchedulingRules(),
        timestamp_slack_ms=0,
    )
    assert got.due_ms == RECEIVED - 40 + 1_000


@pytest.mark.parametrize(
    "published_ms",
    [
        7_258_118,  # an AMQP timestamp of 2200 read back as milliseconds: 1970
        0,
        RECEIVED - 367 * 24 * 3600 * 1000,  # longer ago than any allowed delay
    ],
)
def test_an_implausible_publish_time_never_makes_a_message_early(published_ms: int) -> None:
    got = schedule(
        {DELAY_HEADER: 60_000},
        received_ms=RECEIVED,
        published_ms=published_ms,
        rules=SchedulingRules(),
    )
    assert got.due_ms == RECEIVED + 60_000  # counted from the receipt instead
    assert got.publish_time_ignored


def test_schedule_combines_due_time_and_destination() -> None:
    rules = SchedulingRules(default_destination="fallback")
    got = schedule(
        {DELAY_HEADER: 10, DESTINATION_HEADER: "there"},
        received_ms=RECEIVED,
        published_ms=None,
        rules=rules,
    )
    assert got == Schedule(due_ms=RECEIVED + 10, destination="there")
    got = schedule({DELAY_HEADER: 10}, received_ms=RECEIVED, published_ms=None, rules=rules)
    assert got == Schedule(due_ms=RECEIVED + 10, destination="fallback")
    reason_of(
        lambda: schedule(
            {DELAY_HEADER: 10, DESTINATION_HEADER: ""},
            received_ms=RECEIVED,
            published_ms=None,
            rules=rules,
        )
    )


# -- x-destination ------------------------------------------------------------------------------


def test_destination_defaults_to_the_workflow_default() -> None:
    assert destination({}, RULES) == "payler-out"
    assert destination({DELAY_HEADER: 5}, SchedulingRules(default_destination="elsewhere")) == (
        "elsewhere"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("orders", "orders"),
        (b"orders", "orders"),
        (bytearray(b"orders"), "orders"),
        ("caf\u00e9", "caf\u00e9"),
        ("é".encode(), "é"),
    ],
)
def test_destination_header_names_the_destination(value: Any, expected: str) -> None:
    got = destination({DESTINATION_HEADER: value}, RULES)
    assert got == expected
    assert type(got) is str


@pytest.mark.parametrize(
    "value", ["", "   ", "\t\n", b"", b"  ", bytearray(b" "), None, 5, True, ["q"], {"q": 1}]
)
def test_destination_header_rejects_what_is_not_a_name(value: Any) -> None:
    assert DESTINATION_HEADER in reason_of(lambda: destination({DESTINATION_HEADER: value}, RULES))


def test_without_scheduling_headers_strips_exactly_the_three() -> None:
    headers = {
        DELAY_HEADER: 5,
        DELIVER_AT_HEADER: Y2030_MS,
        DESTINATION_HEADER: "q",
        "x-delay-reason": "kept",
        "X-Delay": "kept: header names are case-sensitive",
        "x-trace": b"\x00",
        "nested": {DELAY_HEADER: 1},
    }
    got = without_scheduling_headers(headers)
    assert got == {
        "x-delay-reason": "kept",
        "X-Delay": "kept: header names are case-sensitive",
        "x-trace": b"\x00",
        "nested": {DELAY_HEADER: 1},
    }
    assert DELAY_HEADER in headers  # the input is left alone
    assert without_scheduling_headers({}) == {}


def test_parse_delay_takes_ascii_digits_only() -> None:
    # "١٥٠٠" is 1500 in Arabic-Indic digits: float() would read it, a broker header never means it.
    with pytest.raises(InvalidSchedule, match="not a number"):
        parse_delay("١٥٠٠")


def test_a_destination_longer_than_a_routing_key_is_invalid() -> None:
    with pytest.raises(InvalidSchedule, match="longer than 255 bytes"):
        destination({"x-destination": "q" * 256}, SchedulingRules())
    assert destination({"x-destination": "q" * 255}, SchedulingRules()) == "q" * 255
