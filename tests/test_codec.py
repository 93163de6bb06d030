"""Lossless JSON for header values (``payler/codec.py``) and the stored payload (``payload.py``)."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payler import codec
from payler.payload import STORED_META, MessageProperties, Payload
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


# -- strict: what the codec refuses, always with a ValueError ---------------------------------


def deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"n": [value]}
    return value


@pytest.mark.parametrize(
    "text",
    [
        '{"x": "\\ud83d"}',  # what JSON.stringify writes for a string cut inside an emoji
        '{"x": "\\uD83D"}',  # the same, upper-case hex digits
        '{"x": "ok \\udc80 then"}',  # a lone low surrogate
        '["\\ude00\\ud83d"]',  # a pair in the wrong order
        '{"x": "raw \udc80"}',  # a lone surrogate in the text itself, not escaped
    ],
)
def test_loads_refuses_lone_surrogates(text: str) -> None:
    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        codec.loads(text)


def test_loads_accepts_escaped_surrogate_pairs() -> None:
    assert codec.loads('{"x": "\\ud83d\\ude00"}') == {"x": "\U0001f600"}


@pytest.mark.parametrize(
    "text",
    [
        '{"__table__": 1}',
        '{"h": {"__table__": [1]}}',
        '{"__datetime__": 5}',
        '{"__bytes__": 5}',
        '{"__bytes__": "not base64!"}',
        '{"__decimal__": "one"}',
        '{"__decimal__": null}',
        '{"__datetime__": "yesterday"}',
        "[" * 5000 + "]" * 5000,  # RecursionError in the JSON parser
        json.dumps(deep(65)),  # deeper than MAX_DEPTH
        b"\xff\xfe not utf-8",
        "not json",
    ],
    ids=lambda t: repr(t)[:40],
)
def test_loads_raises_value_error_on_what_it_did_not_make(text: str | bytes) -> None:
    # Any ValueError, and never another exception: callers count on its type.
    with pytest.raises(ValueError):  # noqa: PT011 - the type is the contract, not the message
        codec.loads(text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"x": "cut \ud83d"}, "lone UTF-16 surrogate"),
        (["\udc80"], "lone UTF-16 surrogate"),
        (deep(40), "nested more than 64 levels deep"),
    ],
)
def test_dumps_refuses_what_no_storage_can_hold(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        codec.dumps(value)


def test_nesting_up_to_the_limit_round_trips() -> None:
    assert codec.loads(codec.dumps(deep(30))) == deep(30)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["__table__", "__bytes__", "__datetime__", "__decimal__", "k"])
            | st.text(max_size=5),
            inner,
            max_size=2,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(json_values)
def test_loads_of_any_json_returns_or_raises_value_error(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        with contextlib.suppress(ValueError):
            codec.loads(text)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.binary(max_size=60) | st.text(max_size=60))
def test_loads_of_any_text_returns_or_raises_value_error(text: str | bytes) -> None:
    with contextlib.suppress(ValueError):
        codec.loads(text)


# -- a stored entry whose metadata cannot be read ------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [
        '{"headers": {"__table__": 1}}',
        '{"headers": {"a": "\\ud83d"}}',
        '{"properties": {"priority": "high"}}',
        '{"properties": ["not", "a", "table"]}',
        '{"key": 5}',
        "null",
        "[]",
        "{not json",
        json.dumps({"headers": deep(80)}),
    ],
)
def test_from_stored_never_raises_for_its_metadata(meta: str) -> None:
    payload = Payload.from_stored(
        id="p", body=b"raw", meta_json=meta, destination="out", due_ms=1, created_ms=0,
        attempts=2, last_error=None,
    )  # fmt: skip
    assert payload.defect is not None
    assert payload.defect.startswith("the spool entry's metadata cannot be read")
    assert (payload.id, payload.body, payload.attempts) == ("p", b"raw", 2)  # the columns kept
    assert payload.headers == {STORED_META: meta.encode()}  # for the dead letter to show


# -- orjson where it is exact, the standard library everywhere else -------------------------------

#: Header-like values of every kind the codec takes (floats included: they take the slow path).
header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)  # every code point but lone surrogates: those are refused
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["__table__", "__bytes__", "k", "\x00", "é"]) | st.text(max_size=4),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


def standard_dumps(value: Any) -> str:
    """What the codec wrote before orjson: the standard library's text."""
    return json.dumps(codec.to_jsonable(value), separators=(",", ":"), ensure_ascii=False)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(header_values)
def test_the_text_is_the_standard_librarys_whichever_path_wrote_it(value: Any) -> None:
    # The same text: content digests (payler.identity) and stored entries do not change.
    text = codec.dumps(value)
    assert text == standard_dumps(value)
    back = codec.loads(text)
    assert codec.dumps(back) == text  # NaN != NaN: compared through its text
    assert codec.dumps(codec.loads(text.encode())) == text  # bytes read the same


@pytest.mark.parametrize(
    "value",
    [
        2**64,  # beyond orjson's integers: written and read by the standard library
        -(2**63) - 1,
        2**64 - 1,
        -(2**63),
        10**30,
        [1, 2**100, "x"],
        {"n": -(10**25)},
    ],
    ids=repr,
)
def test_integers_of_any_size_come_back_exactly(value: Any) -> None:
    back = round_trip(value)
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, list):
        assert all(type(a) is type(b) for a, b in zip(back, value, strict=True))


@pytest.mark.parametrize("text", ["1e-05", "[0.1,1e+16]", "NaN", "-Infinity", "1E400"])
def test_floats_are_read_as_the_standard_library_reads_them(text: str) -> None:
    assert codec.dumps(codec.loads(text)) == json.dumps(json.loads(text), separators=(",", ":"))


def test_nan_and_infinity_round_trip() -> None:
    for value in (float("nan"), float("inf"), float("-inf"), [float("nan")]):
        text = codec.dumps(value)
        assert text == standard_dumps(value)
        assert codec.dumps(codec.loads(text)) == text


def test_nul_and_control_characters_round_trip_escaped() -> None:
    value = {"a\x00b": "\x00\x01\x1f\x7f\n\u2028"}
    text = codec.dumps(value)
    assert "\x00" not in text and "\\u0000" in text
    assert text == standard_dumps(value)
    assert codec.loads(text) == value
