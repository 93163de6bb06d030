"""The Kafka half of ``payler/drivers/brokers/mapping.py``: payload ↔ Kafka record headers.

These are the mapping's own round trips, without a broker; the same cases travel through tansu
and RabbitMQ in ``tests/integration/test_kafka_round_trips.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from payler.drivers.brokers.mapping import (
    TIMESTAMP_HEADER,
    TYPED_HEADERS,
    from_kafka_headers,
    to_kafka_headers,
)
from payler.payload import MessageProperties
from payler.testing import make_payload
from tests.assertions import assert_same

ALL_PROPERTIES = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "correlation_id": "c-1",
    "message_id": "m-1",
    "reply_to": "replies",
    "type": "order.created",
    "priority": 7,
    "timestamp_ms": 1_700_000_000_123,
    "delivery_mode": 2,
    "expiration": "60000",
    "app_id": "shop",
}


def round_trip(
    headers: dict[str, Any], record_timestamp_ms: int | None = 1_800_000_000_000, **props: Any
) -> tuple[dict[str, Any], MessageProperties, list[tuple[str, bytes | None]]]:
    payload = make_payload(b"body", headers=headers, **props)
    wire = to_kafka_headers(payload, headers)
    got, properties = from_kafka_headers(wire, record_timestamp_ms)
    return got, properties, wire


def test_binary_values_stay_bytes_and_are_sent_as_they_are() -> None:
    correlation = bytes(range(240, 256))  # a 16-byte binary id: not UTF-8
    got, _, wire = round_trip({"x-correlation": correlation, "utf8-bytes": b"abc"})
    assert ("x-correlation", correlation) in wire  # raw, for other consumers
    assert_same(got, {"x-correlation": correlation, "utf8-bytes": b"abc"})
    assert "\ufffd" not in repr(got)


def test_repeated_header_keys_are_kept_as_a_list_and_sent_repeated() -> None:
    records = [("trace", b"a"), ("trace", b"\xff"), ("trace", None), ("other", b"x")]
    headers, _ = from_kafka_headers(records, None)
    assert_same(headers, {"trace": ["a", b"\xff", None], "other": "x"})
    wire = to_kafka_headers(make_payload(b""), headers)
    assert [(n, v) for n, v in wire if n in ("trace", "other")] == records
    # A list of one, or of values that are not plain, is one typed header: it reads back as it was.
    for value in (["only"], [1, "two"], [b"utf8", "x"], []):
        assert_same(round_trip({"h": value})[0], {"h": value})


def test_a_null_header_value_stays_null() -> None:
    got, _, wire = round_trip({"nothing": None, "empty": ""})
    assert ("nothing", None) in wire and ("empty", b"") in wire
    assert_same(got, {"nothing": None, "empty": ""})


def test_custom_headers_named_like_properties_never_overwrite_them() -> None:
    headers = {
        "priority": "urgent",
        "app-id": 99,
        "content-type": "text/csv",
        "message-id": None,
        "correlation-id": b"\x00\xff",
    }
    got, properties, _ = round_trip(headers, **ALL_PROPERTIES)
    assert_same(got, headers)
    assert properties == MessageProperties(**ALL_PROPERTIES)
    # Without any property set, such a header is still a header, not a property.
    got, properties, _ = round_trip({"priority": "5", "app-id": "x"}, record_timestamp_ms=None)
    assert_same(got, {"priority": "5", "app-id": "x"})
    assert properties == MessageProperties()


def test_header_names_with_commas_and_payler_names_round_trip() -> None:
    headers = {
        "a,b": 1,
        "c, d": [True, None],
        "payler-typed": "mine",  # a custom header named like payler's own
        "payler-priority": 3,
        "payler-timestamp": "not payler's",
        "payler-typed-headers": "x,y",
    }
    got, properties, wire = round_trip(headers, priority=1)
    assert_same(got, headers)
    assert properties.priority == 1
    assert ("payler-header-payler-priority", b"3") in wire  # escaped on the wire


def test_every_amqp_value_type_round_trips() -> None:
    headers = {
        "s": "text é",
        "n": 7,
        "big": 2**63 - 1,
        "f": 1.5,
        "flag": False,
        "d": Decimal("12.50"),
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "table": {"a": [1, "b", None], "__bytes__": "not a tag"},
        "list": ["a", "b"],
        "x-delay": "5",
    }
    assert_same(round_trip(headers)[0], headers)


def test_the_original_publish_time_travels_in_a_header() -> None:
    _, properties, wire = round_trip({}, timestamp_ms=1_700_000_000_123)
    assert (TIMESTAMP_HEADER, b"1700000000123") in wire
    assert properties.timestamp_ms == 1_700_000_000_123  # not the record's own timestamp
    # A message without a publish time comes back without one, whatever the record's timestamp.
    _, properties, wire = round_trip({})
    assert (TIMESTAMP_HEADER, None) in wire
    assert properties.timestamp_ms is None
    # A record of another producer: its timestamp is the publish time.
    assert from_kafka_headers([], 1_700_000_000_999)[1].timestamp_ms == 1_700_000_000_999


def test_records_of_other_producers_and_older_paylers_are_read() -> None:
    foreign = [
        ("content-type", b"application/json"),
        ("correlation-id", b"c-7"),
        ("priority", b"4"),
        ("delivery-mode", b"9"),  # not an AMQP delivery mode: a header only
        ("message-id", b"\xff\xfe"),  # not text: a header only
        ("app-id", b"a"),
        ("app-id", b"b"),  # twice: ambiguous, a header only
        ("payler-typed-headers", b"n,t"),  # an older payler's typed list
        ("n", b"5"),
        ("t", b'{"__bytes__":"AAE="}'),
    ]
    headers, properties = from_kafka_headers(foreign, 1_700_000_000_000)
    assert properties == MessageProperties(
        content_type="application/json",
        correlation_id="c-7",
        priority=4,
        timestamp_ms=1_700_000_000_000,
    )
    # The plain names stay headers too: forwarded Kafka → Kafka, the record keeps them.
    assert_same(
        headers,
        {
            "content-type": "application/json",
            "correlation-id": "c-7",
            "priority": "4",
            "delivery-mode": "9",
            "message-id": b"\xff\xfe",
            "app-id": ["a", "b"],
            "n": 5,
            "t": b"\x00\x01",
        },
    )


def test_malformed_headers_are_kept_as_they_came_and_reported() -> None:
    records = [
        (TYPED_HEADERS, b'["j", "deep", "surrogate", "tagged"]'),
        ("j", b"{oops"),
        ("deep", b"[" * 10_000 + b"]" * 10_000),
        ("surrogate", b'"\\ud83d"'),
        ("tagged", b'{"__datetime__": 5}'),
        ("payler-priority", b"high"),
        (TIMESTAMP_HEADER, b"yesterday"),
    ]
    problems: list[str] = []
    headers, properties = from_kafka_headers(records, 1_700_000_000_000, problems)
    assert headers["j"] == "{oops" and headers["tagged"] == '{"__datetime__": 5}'
    assert headers["surrogate"] == '"\\ud83d"' and len(headers["deep"]) == 20_000
    assert headers["payler-priority"] == "high" and headers[TIMESTAMP_HEADER] == "yesterday"
    assert properties == MessageProperties(timestamp_ms=1_700_000_000_000)
    assert len(problems) == 6
    problems.clear()
    from_kafka_headers([(TYPED_HEADERS, b"not a list")], None, problems)
    assert problems


# A header value AMQP can carry (what a payload may hold), as hypothesis draws them.
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=20)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(
    headers=st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["priority", "payler-x", "a,b", "app-id"]),
        _VALUES,
        max_size=6,
    )
)
def test_any_header_table_round_trips(headers: dict[str, Any]) -> None:
    headers = {k: v for k, v in headers.items() if _no_surrogates(k) and _no_surrogates(v)}
    got, properties, _ = round_trip(headers, **ALL_PROPERTIES)
    assert_same(got, headers)
    assert properties == MessageProperties(**ALL_PROPERTIES)


def _no_surrogates(value: Any) -> bool:
    # A lone surrogate is not text: payler refuses such a header (tests/test_codec.py).
    try:
        repr(value).encode("utf-8")
        str(value).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
