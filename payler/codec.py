"""Lossless JSON for message headers: the values an AMQP field table can hold.

JSON has no bytes, datetimes or decimals, and AMQP headers can carry all three, nested in tables
and arrays. Each such value is written as a one-key object whose key names its type; plain JSON
values are written as they are. ``decode(encode(v)) == v`` for every value AMQP can carry.

orjson does the work where it gives exactly what the standard library's :mod:`json` gives, and
that module everything else, so the text and the values never depend on which one ran:

- writing: orjson, unless a float is in the value (orjson writes ``1e-05`` as ``0.00001`` and
  NaN as ``null``: the content digests of :mod:`payler.identity` would change, and NaN would be
  lost) or an integer beyond 64 bits, a lone surrogate (orjson refuses both: the standard path
  then writes the integer, or raises the error that names the surrogate);
- reading: orjson, unless it refuses the text (NaN or Infinity, which :mod:`json` wrote, a lone
  surrogate, anything malformed: the standard path reads it or raises the error that says why)
  or what it read holds a float (an integer beyond 64 bits comes back from orjson as a float:
  the standard path reads it exactly).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

_BYTES = "__bytes__"
_DATETIME = "__datetime__"
_DECIMAL = "__decimal__"
#: Wraps a table that itself has one key named like a tag, so it is not read as a tagged value.
_TABLE = "__table__"
_TAGS = frozenset({_BYTES, _DATETIME, _DECIMAL, _TABLE})
#: How deeply header values may nest (tables in lists in tables...): deeper input is refused
#: with a clear error, never a RecursionError.
MAX_DEPTH = 64


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """Turn a header value into plain JSON types, tagging the ones JSON lacks."""
    if _depth > MAX_DEPTH:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return {_DATETIME: value.isoformat()}
    if isinstance(value, Decimal):
        return {_DECIMAL: str(value)}
    if isinstance(value, dict):
        table = {str(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
        return {_TABLE: table} if len(table) == 1 and next(iter(table)) in _TAGS else table
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v, _depth + 1) for v in value]
    raise TypeError(f"a header value of type {type(value).__name__} cannot be stored")


def from_jsonable(value: Any, _depth: int = 0) -> Any:
    """Inverse of :func:`to_jsonable`; ``ValueError`` on a value it did not make (a tag holding
    the wrong type, a nesting deeper than :data:`MAX_DEPTH`), never another exception."""
    if _depth > MAX_DEPTH:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, list):
        return [from_jsonable(v, _depth + 1) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, inner),) = value.items()
            if tag in _TAGS:
                return _untag(tag, inner, _depth)
        return {k: from_jsonable(v, _depth + 1) for k, v in value.items()}
    return value


def _untag(tag: str, inner: Any, depth: int) -> Any:
    if tag == _TABLE:
        if not isinstance(inner, dict):
            raise ValueError(f"a header value tagged {tag!r} holds {type(inner).__name__}")
        return {k: from_jsonable(v, depth + 1) for k, v in inner.items()}
    if not isinstance(inner, str):
        raise ValueError(f"a header value tagged {tag!r} holds {type(inner).__name__}, not text")
    try:
        if tag == _BYTES:
            return base64.b64decode(inner, validate=True)
        if tag == _DATETIME:
            return datetime.fromisoformat(inner)
        if tag == _DECIMAL:
            return Decimal(inner)
    except (ValueError, ArithmeticError) as exc:  # binascii.Error is a ValueError
        raise ValueError(f"a header value tagged {tag!r} is malformed ({inner[:40]!r})") from exc
    raise AssertionError(f"unknown tag {tag!r}")  # _TAGS and this function list the same tags


class _Slow(Exception):
    """The value holds what only the standard library's :mod:`json` handles exactly."""


def _fast_from_jsonable(value: Any, depth: int = 0) -> Any:
    """:func:`from_jsonable` that raises :class:`_Slow` on a float (see the module docstring)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep")
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:  # most header values
        return value
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, inner),) = value.items()
            if tag in _TAGS:
                if tag == _TABLE and isinstance(inner, dict):
                    return {k: _fast_from_jsonable(v, depth + 1) for k, v in inner.items()}
                return _untag(tag, inner, depth)
        return {k: _fast_from_jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_fast_from_jsonable(v, depth + 1) for v in value]
    if isinstance(value, float):
        raise _Slow
    return value


def _fast_to_jsonable(value: Any, depth: int = 0) -> Any:
    """:func:`to_jsonable` that raises :class:`_Slow` on a float (see the module docstring)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep")
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:  # most header values
        return value
    if isinstance(value, dict):
        table = {str(k): _fast_to_jsonable(v, depth + 1) for k, v in value.items()}
        return {_TABLE: table} if len(table) == 1 and next(iter(table)) in _TAGS else table
    if isinstance(value, list | tuple | set | frozenset):
        return [_fast_to_jsonable(v, depth + 1) for v in value]
    if isinstance(value, float):
        raise _Slow
    return to_jsonable(value, depth)  # a scalar: as it is, or tagged


def dumps(value: Any) -> str:
    """Compact, lossless JSON text of ``value``; ``ValueError`` if it cannot be stored.

    The text is always valid UTF-8: a string holding a lone surrogate (what a JSON producer
    writes for a string cut inside an emoji, ``"\\ud83d"``) is refused here, not by a storage
    or a broker later.
    """
    try:
        return orjson.dumps(_fast_to_jsonable(value)).decode("utf-8")
    except (_Slow, orjson.JSONEncodeError):
        pass  # the standard library's path below: exact, or the error that says why
    except RecursionError:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep") from None
    try:
        text = json.dumps(to_jsonable(value), separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep") from None
    _check_utf8(text)
    return text


def loads(text: str | bytes) -> Any:
    """Inverse of :func:`dumps`; ``ValueError`` on anything it did not make."""
    try:
        # orjson refuses lone surrogates (raw or escaped), so what it reads needs no check.
        return _fast_from_jsonable(orjson.loads(text))
    except (_Slow, orjson.JSONDecodeError):
        pass  # the standard library's path below: exact, or the error that says why
    except RecursionError:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep") from None
    try:
        value = json.loads(text)
        if isinstance(text, str):
            _check_utf8(text)  # a lone surrogate in the text itself (bytes would not decode)
        # One written as an escape (JSON's hex digits may be either case): the costly check
        # runs only when such an escape is there.
        marks = (b"\\ud", b"\\uD") if isinstance(text, bytes) else ("\\ud", "\\uD")
        if any(mark in text for mark in marks):  # type: ignore[operator]
            _check_utf8(json.dumps(value, ensure_ascii=False))
        return from_jsonable(value)
    except RecursionError:
        raise ValueError(f"headers nested more than {MAX_DEPTH} levels deep") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: {exc.reason}") from None


def safe_text(text: str) -> str:
    """``text`` with any lone surrogate written as its escape (``\\ud83d``): text that every
    storage and broker can hold, for what payler writes itself (reasons, ids in dead letters)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = text[max(0, exc.start - 20) : exc.start].encode("utf-8", "replace").decode()
        raise ValueError(
            f"a header holds a lone UTF-16 surrogate ({text[exc.start]!r} after {where!r}), "
            "which is not text: it cannot be stored or sent"
        ) from None
