"""Lossless JSON for header values (``payler/codec.py``) and the stored payload (``payload.py``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from payler import codec
from payler.payload import MessageProperties, Payload
from tests.assertions import assert_same


def round_trip(value: Any) -> Any:
    text = codec.dumps(value)
    assert isinstance(text, str)
    json.loads(text)  # plain JSON, readable by any tool
    return codec.loads(text)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -7,
        2**70,
        1.5,
        -0.25,
        "",
        "plain",
        "h\u00e9llo \u2603 \U0001f600",
        b"",
        b"\x00\xff binary \n",
        Decimal("1.10"),
        Decimal("-0.001"),
        Decimal("12345678901234567890.123456789"),
        datetime(2030, 1, 1, tzinfo=UTC),
        datetime(2030, 1, 1, 2, 30, 0, 123_456, tzinfo=timezone(timedelta(hours=2, minutes=30))),
        datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=-5))),
        [],
        {},
        [1, "two", b"three", None, [Decimal("4.0"), {"five": True}]],
        {"x-trace": {"span": b"\x01\x02", "at": datetime(2030, 1, 1, tzinfo=UTC), "n": [1.0]}},
        {"x": 1},  # one key that is not a tag: stays a dict
        {"bytes": "not a tag", "__bytes__x": "nor this"},
    ],
    ids=repr,
)
def test_round_trip_keeps_value_and_type(value: Any) -> None:
    assert_same(round_trip(value), value)


def test_round_trip_of_a_whole_header_table() -> None:
    headers = {
        "x-delay": "1500",
        "x-deliver-at": datetime(2030, 1, 1, tzinfo=UTC),
        "x-destination": b"orders",
        "price": Decimal("19.99"),
        "retry": 3,
        "ratio": 0.5,
        "urgent": False,
        "note": None,
        "path": ["a", {"b": [b"c", Decimal("1E+2")]}],
        "\u00e9t\u00e9": "\u2603",
    }
    assert_same(round_trip(headers), headers)


def test_bytes_like_values_come_back_as_bytes() -> None:
    assert_same(round_trip(bytearray(b"\x00ab")), b"\x00ab")
    assert_same(round_trip(memoryview(b"xyz")), b"xyz")
    assert_same(round_trip({"k": [bytearray(b"1")]}), {"k": [b"1"]})


def test_tuples_come_back_as_lists() -> None:
    assert_same(round_trip((1, b"2")), [1, b"2"])


def test_dumps_is_compact() -> None:
    assert codec.dumps({"a": [1, 2]}) == '{"a":[1,2]}'


def test_loads_takes_bytes() -> None:
    assert_same(codec.loads(codec.dumps({"b": b"\x00"}).encode()), {"b": b"\x00"})


@pytest.mark.parametrize(
    "value",
    [object(), 1j, {"k": object()}, [1, {"deep": 1j}], Exception("no")],
    ids=["object", "complex", "in-dict", "nested", "exception"],
)
def test_unsupported_types_raise_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot be stored"):
        codec.dumps(value)


@pytest.mark.parametrize(
    "value",
    [{"__bytes__": "hello"}, {"__decimal__": "1"}, {"__datetime__": "soon"}],
    ids=["bytes", "decimal", "datetime"],
)
def test_a_table_whose_one_key_is_a_tag_name_round_trips(value: Any) -> None:
    assert_same(round_trip(value), value)


# -- Payload ------------------------------------------------------------------------------------


def stored_again(payload: Payload, body: Any = None, meta: str | bytes | None = None) -> Payload:
    return Payload.from_stored(
        id=payload.id,
        body=payload.body if body is None else body,
        meta_json=payload.meta_json() if meta is None else meta,
        destination=payload.destination,
        due_ms=payload.due_ms,
        created_ms=payload.created_ms,
        attempts=payload.attempts,
        last_error=payload.last_error,
    )


def full_payload() -> Payload:
    return Payload(
        id="amqp:payler-jobs:m-1",
        body=b"\x00{json?}\xff",
        headers={
            "x-delay": 1500,
            "x-deliver-at": datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=1))),
            "trace": {"id": b"\x01\x02", "amount": Decimal("10.50"), "tags": ["a", None, True]},
            "\u00e9": "\u2603",
        },
        properties=MessageProperties(
            content_type="application/json",
            content_encoding="utf-8",
            correlation_id="c-1",
            message_id="m-1",
            reply_to="replies",
            type="order.created",
            priority=5,
            timestamp_ms=1_700_000_000_000,
            delivery_mode=2,
            expiration="60000",
            app_id="shop",
        ),
        source="amqp:payler-jobs",
        destination="orders",
        due_ms=1_700_000_001_500,
        created_ms=1_700_000_000_100,
        attempts=2,
        last_error="connection reset",
    )


def test_payload_round_trips_through_its_stored_columns() -> None:
    payload = full_payload()
    again = stored_again(payload)
    assert again == payload
    assert_same(again.headers, payload.headers)
    assert again.properties == payload.properties


def test_payload_with_defaults_round_trips() -> None:
    payload = Payload(id="p", body=b"", destination="out", due_ms=1, created_ms=0)
    assert stored_again(payload) == payload


@pytest.mark.parametrize("body", [bytearray(b"\x00body"), memoryview(b"\x00body")])
def test_from_stored_takes_bytes_like_bodies(body: Any) -> None:
    payload = full_payload().model_copy(update={"body": b"\x00body"})
    again = stored_again(payload, body=body)
    assert type(again.body) is bytes
    assert again == payload


def test_from_stored_takes_meta_json_as_bytes() -> None:
    payload = full_payload()
    assert stored_again(payload, meta=payload.meta_json().encode()) == payload


def test_from_stored_with_empty_meta_gives_the_defaults() -> None:
    payload = Payload(id="p", body=b"x", destination="out", due_ms=1, created_ms=0)
    again = stored_again(payload, meta="{}")
    assert again.headers == {}
    assert again.properties == MessageProperties()
    assert again.source == ""
