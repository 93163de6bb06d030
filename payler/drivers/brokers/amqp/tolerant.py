"""Decoding what pamqp cannot: one odd message must never kill a connection.

pamqp decodes every frame before aiormq sees it, and a value it cannot decode raises inside the
connection's frame reader: the connection dies, the message goes back to its queue
unacknowledged, comes again on the next connection and kills that one too — one message stops
the whole queue for good. Three kinds of value are decoded here without raising:

- **Timestamps** (the ``timestamp`` property, ``T`` values in headers). AMQP 0-9-1 timestamps
  are 64-bit POSIX time in *seconds*. pamqp reads one above 0xFFFFFFFF as milliseconds (so
  7258118400, in 2200, comes out as 7258118, in 1970) and raises on one beyond the year 9999.
  Here a timestamp is always seconds; one beyond what :class:`~datetime.datetime` holds comes
  out as an :class:`UnreadableTimestamp`.
- **Short strings** (message id, content type, ...): pamqp raises on one that is not UTF-8. Here
  it is decoded with ``surrogateescape``: a lone surrogate in the text marks it as not UTF-8,
  and ``text.encode("utf-8", "surrogateescape")`` gives back the exact bytes.
- **Field tables** (the ``headers`` property) that pamqp cannot parse (a key that is not UTF-8,
  an unknown value type, nesting deeper than Python's recursion limit): skipped by their length
  prefix, and returned as an empty :class:`UnreadableTable` that holds the raw bytes and why.

The driver turns a message carrying any of these into a payload with a ``defect`` (dead-lettered
with the reason, the queue flowing on); a timestamp after 2106 is simply read right.

:func:`install` registers these decoders in pamqp's own type registries, ``pamqp.decode.METHODS``
(by AMQP type name, for properties and method arguments) and ``pamqp.decode.TABLE_MAPPING`` (by
field-value tag, inside tables and arrays). pamqp looks both up for every value it decodes: they
are the one place to change how a type is read without replacing pamqp's frame parser. The change
is process-wide, so every pamqp user in the process (aio-pika in a user's own workflow) gets the
same decoding — values that used to kill its connection now come out readable or marked.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import pamqp.decode

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
#: What pamqp raises (or lets through) on a value it cannot decode.
_DECODE_ERRORS = (ValueError, TypeError, OverflowError, struct.error, RecursionError)


class UnreadableTimestamp(datetime):
    """An AMQP timestamp beyond the year 9999: the last second of 9999, with the true value in
    :attr:`seconds` (a datetime, so that code expecting one still works)."""

    seconds: int

    def __new__(cls, seconds: int) -> UnreadableTimestamp:
        moment = super().__new__(cls, 9999, 12, 31, 23, 59, 59, tzinfo=UTC)
        moment.seconds = seconds
        return moment

    def __repr__(self) -> str:
        return f"UnreadableTimestamp({self.seconds})"


class UnreadableTable(dict[str, Any]):
    """A field table that could not be parsed: empty, with the table's raw bytes (:attr:`raw`)
    and pamqp's reason (:attr:`reason`)."""

    def __init__(self, raw: bytes, reason: str) -> None:
        super().__init__()
        self.raw = raw
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnreadableTable({len(self.raw)} bytes: {self.reason})"


def decode_timestamp(value: bytes) -> tuple[int, datetime]:
    """A 64-bit timestamp, in seconds (see the module docstring); bytes consumed and value."""
    try:
        (seconds,) = _U64.unpack_from(value)
    except struct.error as exc:
        raise ValueError("Could not unpack timestamp value") from exc
    try:
        return 8, datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return 8, UnreadableTimestamp(seconds)


def decode_short_str(value: bytes) -> tuple[int, str]:
    """A short string; not UTF-8, it keeps its bytes as surrogate escapes."""
    try:
        length = value[0]
    except IndexError as exc:
        raise ValueError("Could not unpack short string value") from exc
    return length + 1, bytes(value[1 : length + 1]).decode("utf-8", "surrogateescape")


_pamqp_field_table = pamqp.decode.field_table


def decode_field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """A field table; one pamqp cannot parse comes out as an :class:`UnreadableTable`."""
    try:
        return _pamqp_field_table(value)
    except _DECODE_ERRORS as exc:
        try:
            (length,) = _U32.unpack_from(value)
        except struct.error:
            raise ValueError("Could not unpack field table length") from exc
        reason = f"{type(exc).__name__}: {exc}"[:300]
        return 4 + length, UnreadableTable(bytes(value[4 : 4 + length]), reason)


def install() -> None:
    """Register the decoders above in pamqp's type registries (idempotent)."""
    pamqp.decode.METHODS["timestamp"] = decode_timestamp
    pamqp.decode.METHODS["shortstr"] = decode_short_str
    pamqp.decode.METHODS["table"] = decode_field_table
    pamqp.decode.TABLE_MAPPING[b"T"] = decode_timestamp


def is_utf8(text: str) -> bool:
    """Whether ``text`` came from valid UTF-8 (it holds no surrogate escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def raw_bytes(text: str) -> bytes:
    """The bytes a short string was decoded from (see :func:`decode_short_str`)."""
    return text.encode("utf-8", "surrogateescape")
