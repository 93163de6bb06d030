"""Serializers: bytes ↔ values, chosen by content type.

A :class:`Serializer` turns a message body into a value (``decode``) and a value into a body
(``encode``), and names the content type it writes. payler ships four:

=========================  ==============================================  =====================
content types              serializer                                      values
=========================  ==============================================  =====================
``application/json``,      JSON through orjson (pydantic models through    dict, list, str, ...
``*/*+json``, ``text/json`` pydantic-core's own JSON)
``application/msgpack``,   MessagePack (msgpack)                           dict, list, bytes, ...
``application/x-msgpack``,
``application/vnd.msgpack``
``text/*``                 UTF-8 text (strict: invalid UTF-8 is an error)   str
``application/octet-stream`` the body as it is                             bytes
=========================  ==============================================  =====================

Third-party serializers are registered by content type: :func:`register_serializer` in code,
a dotted path in the configuration's ``plugins: {serializers: {...}}``, or a Python entry point
in the group ``payler.serializers`` (its name is the content type, its object a serializer or
a class of one), loaded the first time its content type is looked up.

``decode`` raises ``ValueError`` (only) on a body it cannot read: the message is then
dead-lettered with the reason, never retried.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, Protocol, runtime_checkable

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type hints
import orjson
from pydantic import BaseModel

log = logging.getLogger("payler.processing")

ENTRY_POINT_GROUP = "payler.serializers"


@runtime_checkable
class Serializer(Protocol):
    """What payler needs of a serializer."""

    #: The content type outputs encoded by it get.
    content_type: str

    def decode(self, body: bytes) -> Any:
        """The value ``body`` holds; ``ValueError`` if it cannot be read."""
        ...

    def encode(self, value: Any) -> bytes:
        """``value`` as a body; ``TypeError`` or ``ValueError`` if it cannot be written."""
        ...


class JsonSerializer:
    """JSON through orjson; pydantic models are dumped in JSON mode."""

    content_type = "application/json"

    def decode(self, body: bytes) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None

    def encode(self, value: Any) -> bytes:
        if isinstance(value, BaseModel):
            return value.model_dump_json().encode()
        return orjson.dumps(value, default=_jsonable)


class MsgpackSerializer:
    """MessagePack; pydantic models are dumped as their JSON-mode values."""

    content_type = "application/msgpack"

    def decode(self, body: bytes) -> Any:
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated classes on bad input
            raise ValueError(f"not valid MessagePack: {type(exc).__name__}: {exc}") from None

    def encode(self, value: Any) -> bytes:
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        packed: bytes = msgpack.packb(value, use_bin_type=True, default=_jsonable)
        return packed


class TextSerializer:
    """UTF-8 text."""

    content_type = "text/plain; charset=utf-8"

    def decode(self, body: bytes) -> Any:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not valid UTF-8 text: {exc}") from None

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise TypeError(f"text/plain takes a str, not {type(value).__name__}")
        return value.encode("utf-8")


class BytesSerializer:
    """The body as it is."""

    content_type = "application/octet-stream"

    def decode(self, body: bytes) -> Any:
        return body

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"application/octet-stream takes bytes, not {type(value).__name__}")
        return bytes(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot serialize a {type(value).__name__}")


JSON = JsonSerializer()
MSGPACK = MsgpackSerializer()
TEXT = TextSerializer()
BYTES = BytesSerializer()

_registry: dict[str, Serializer] = {
    "application/json": JSON,
    "text/json": JSON,
    "application/msgpack": MSGPACK,
    "application/x-msgpack": MSGPACK,
    "application/vnd.msgpack": MSGPACK,
    "text/plain": TEXT,
    "application/octet-stream": BYTES,
}
#: Short names for the configuration (``content_type: json``).
ALIASES = {
    "json": "application/json",
    "msgpack": "application/msgpack",
    "text": "text/plain",
    "bytes": "application/octet-stream",
}
#: Content types looked up in the entry points in vain (each is looked up once).
_not_plugins: set[str] = set()


def media_type(content_type: str) -> str:
    """``content_type`` without its parameters, lower case: ``application/json``."""
    return content_type.partition(";")[0].strip().lower()


def register_serializer(serializer: Serializer, *content_types: str) -> None:
    """Use ``serializer`` for ``content_types`` (default: its own ``content_type``)."""
    if not isinstance(serializer, Serializer):
        raise TypeError(f"{serializer!r} is not a serializer (content_type, decode, encode)")
    for content_type in content_types or (serializer.content_type,):
        _registry[media_type(content_type)] = serializer


def find_serializer(content_type: str) -> Serializer | None:
    """The serializer registered for ``content_type`` (parameters ignored; ``+json`` suffixes
    and ``text/*`` fall back to JSON and text), or ``None``."""
    name = media_type(ALIASES.get(content_type, content_type))
    found = _registry.get(name)
    if found is None and name not in _not_plugins:
        _load_entry_point(name)
        found = _registry.get(name)
    if found is None and name.endswith("+json"):
        return JSON
    if found is None and name.startswith("text/"):
        return TEXT
    return found


def _load_entry_point(name: str) -> None:
    """Register the entry point's serializer for content type ``name``, if one declares it."""
    _not_plugins.add(name)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if media_type(entry.name) != name:
            continue
        try:
            loaded = entry.load()
            register_serializer(loaded() if isinstance(loaded, type) else loaded, entry.name)
            return
        except Exception:  # a broken plugin: its content type stays unknown (dead letters)
            log.exception("serializer plugin %r (%s) could not be loaded", entry.name, entry.value)


__all__ = [
    "BYTES",
    "JSON",
    "MSGPACK",
    "TEXT",
    "BytesSerializer",
    "JsonSerializer",
    "MsgpackSerializer",
    "Serializer",
    "TextSerializer",
    "find_serializer",
    "media_type",
    "register_serializer",
]
