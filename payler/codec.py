"""Lossless JSON for message headers: the values an AMQP field table can hold.

JSON has no bytes, datetimes or decimals, and AMQP headers can carry all three, nested in tables
and arrays. Each such value is written as a one-key object whose key names its type; plain JSON
values are written as they are. ``decode(encode(v)) == v`` for every value AMQP can carry.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

_BYTES = "__bytes__"
_DATETIME = "__datetime__"
_DECIMAL = "__decimal__"
#: Wraps a table that itself has one key named like a tag, so it is not read as a tagged value.
_TABLE = "__table__"
_TAGS = frozenset({_BYTES, _DATETIME, _DECIMAL, _TABLE})


def to_jsonable(value: Any) -> Any:
    """Turn a header value into plain JSON types, tagging the ones JSON lacks."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return {_DATETIME: value.isoformat()}
    if isinstance(value, Decimal):
        return {_DECIMAL: str(value)}
    if isinstance(value, dict):
        table = {str(k): to_jsonable(v) for k, v in value.items()}
        return {_TABLE: table} if len(table) == 1 and next(iter(table)) in _TAGS else table
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"a header value of type {type(value).__name__} cannot be stored")


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, inner),) = value.items()
            if tag == _BYTES:
                return base64.b64decode(inner)
            if tag == _DATETIME:
                return datetime.fromisoformat(inner)
            if tag == _DECIMAL:
                return Decimal(inner)
            if tag == _TABLE:
                return {k: from_jsonable(v) for k, v in inner.items()}
        return {k: from_jsonable(v) for k, v in value.items()}
    return value


def dumps(value: Any) -> str:
    """Compact, lossless JSON text of ``value``."""
    return json.dumps(to_jsonable(value), separators=(",", ":"), ensure_ascii=False)


def loads(text: str | bytes) -> Any:
    """Inverse of :func:`dumps`."""
    return from_jsonable(json.loads(text))
