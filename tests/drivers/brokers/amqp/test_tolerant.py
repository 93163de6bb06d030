"""Decoding what pamqp cannot, on frames built byte by byte (no broker needed)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pamqp.decode
import pamqp.frame
import pytest
from pamqp import constants
from pamqp.header import ContentHeader

from payler.drivers.brokers.amqp import tolerant
from payler.drivers.brokers.amqp.tolerant import (
    UnreadableTable,
    UnreadableTimestamp,
    decode_field_table,
    decode_short_str,
    decode_timestamp,
)


@pytest.fixture(autouse=True)
def installed() -> None:
    tolerant.install()


def content_header_frame(properties: bytes, flags: int) -> bytes:
    """A raw content header frame (channel 1, body of 0 bytes) with these encoded properties."""
    payload = struct.pack(">HHQH", 60, 0, 0, flags) + properties
    return struct.pack(">BHI", constants.FRAME_HEADER, 1, len(payload)) + payload + b"\xce"


def nested(depth: int) -> bytes:
    """A field table's content: tables in tables, ``depth`` deep."""
    inner = b""
    for _ in range(depth):
        inner = b"\x01kF" + struct.pack(">I", len(inner)) + inner
    return inner


TIMESTAMP_FLAG = 1 << 6
MESSAGE_ID_FLAG = 1 << 7
HEADERS_FLAG = 1 << 13


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (0xFFFFFFFF, datetime(2106, 2, 7, 6, 28, 15, tzinfo=UTC)),
        (7_258_118_400, datetime(2200, 1, 1, tzinfo=UTC)),  # pamqp said 1970 (milliseconds)
        (253_402_300_799, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_timestamps_are_seconds_whatever_their_size(seconds: int, expected: datetime) -> None:
    assert decode_timestamp(struct.pack(">Q", seconds)) == (8, expected)


@pytest.mark.parametrize("seconds", [253_402_300_800, 2**62, 2**64 - 1])
def test_a_timestamp_beyond_the_year_9999_keeps_its_seconds(seconds: int) -> None:
    consumed, value = decode_timestamp(struct.pack(">Q", seconds))
    assert consumed == 8 and isinstance(value, UnreadableTimestamp) and value.seconds == seconds


def test_a_content_header_with_an_unreadable_timestamp_no_longer_fails_the_frame() -> None:
    frame = content_header_frame(struct.pack(">Q", 2**62), TIMESTAMP_FLAG)
    _, channel, header = pamqp.frame.unmarshal(frame)
    assert isinstance(header, ContentHeader) and channel == 1
    assert isinstance(header.properties.timestamp, UnreadableTimestamp)


def test_a_short_string_that_is_not_utf8_keeps_its_bytes() -> None:
    raw = b"\xff\xfe-id"
    consumed, text = decode_short_str(bytes([len(raw)]) + raw + b"rest")
    assert consumed == 1 + len(raw)
    assert not tolerant.is_utf8(text) and tolerant.raw_bytes(text) == raw
    assert decode_short_str(b"\x03abc") == (4, "abc") and tolerant.is_utf8("abc")
    frame = content_header_frame(bytes([len(raw)]) + raw, MESSAGE_ID_FLAG)
    assert tolerant.raw_bytes(pamqp.frame.unmarshal(frame)[2].properties.message_id) == raw


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        (b"\x01\xffS\x00\x00\x00\x01v", "UnicodeDecodeError"),  # a key that is not UTF-8
        (b"\x01kQ\x00", "Unknown type"),  # a value type AMQP does not have
        (nested(1_200), "RecursionError"),  # past Python's recursion limit
    ],
)
def test_a_header_table_pamqp_cannot_parse_is_kept_raw(table: bytes, reason: str) -> None:
    encoded = struct.pack(">I", len(table)) + table
    consumed, value = decode_field_table(encoded + b"next")
    assert consumed == len(encoded)
    assert isinstance(value, UnreadableTable) and value == {} and value.raw == table
    assert reason in value.reason
    frame = content_header_frame(encoded + struct.pack(">Q", 5), HEADERS_FLAG | TIMESTAMP_FLAG)
    properties = pamqp.frame.unmarshal(frame)[2].properties
    assert isinstance(properties.headers, UnreadableTable)
    assert properties.timestamp == datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)  # read past it


def test_readable_tables_and_header_timestamps_decode_as_before() -> None:
    table = b"\x01tT" + struct.pack(">Q", 7_258_118_400) + b"\x01sS\x00\x00\x00\x02hi"
    consumed, value = decode_field_table(struct.pack(">I", len(table)) + table)
    assert consumed == 4 + len(table)
    assert value == {"t": datetime(2200, 1, 1, tzinfo=UTC), "s": "hi"}


def test_install_registers_the_decoders_with_pamqp() -> None:
    assert pamqp.decode.METHODS["timestamp"] is decode_timestamp
    assert pamqp.decode.TABLE_MAPPING[b"T"] is decode_timestamp
    assert pamqp.decode.METHODS["shortstr"] is decode_short_str
    assert pamqp.decode.METHODS["table"] is decode_field_table
