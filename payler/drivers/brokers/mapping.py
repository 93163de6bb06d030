"""How a payload travels on brokers without AMQP's typed headers and properties.

AMQP messages have typed headers (strings, numbers, booleans, tables, byte arrays, dates) and
named properties. Kafka records have a key, a timestamp and headers whose values are bytes;
Redis stream entries are flat maps of byte strings. payler maps between them so that body,
key, properties and custom headers survive any A → B → A trip:

Kafka headers
    - ``content-type``, ``content-encoding``, ``correlation-id``, ``message-id``, ``reply-to``,
      ``message-type``, ``priority``, ``delivery-mode``, ``expiration``, ``app-id``: the AMQP
      properties, UTF-8 text. The publish time is the record's own timestamp.
    - every custom header under its own name: a string as its UTF-8 bytes; any other value
      (number, boolean, table, list, bytes, date) as payler's lossless JSON, its name listed in
      the header ``payler-typed-headers`` (comma-separated) so it is decoded back to its type.
    - the record key is the payload's key.

Redis stream fields
    ``body`` (raw bytes), ``key`` (raw bytes, when there is one), ``headers`` (lossless JSON of
    the custom headers), ``properties`` (JSON of the AMQP properties, publish time as
    ``timestamp_ms``). A producer may send just ``body``; any other field it sends becomes a
    header of that name (a string, or bytes when its value is not UTF-8). Fields that cannot be
    read as that (``headers`` that are no JSON object...) are an error, never dropped: the
    source dead-letters the entry with its raw fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from payler import codec
from payler.payload import MessageProperties, Payload

#: Kafka header name of each AMQP property carried as a header.
PROPERTY_HEADERS: dict[str, str] = {
    "content_type": "content-type",
    "content_encoding": "content-encoding",
    "correlation_id": "correlation-id",
    "message_id": "message-id",
    "reply_to": "reply-to",
    "type": "message-type",
    "priority": "priority",
    "delivery_mode": "delivery-mode",
    "expiration": "expiration",
    "app_id": "app-id",
}
_INT_PROPERTIES = frozenset({"priority", "delivery_mode"})
_PROPERTY_OF_HEADER = {header: name for name, header in PROPERTY_HEADERS.items()}
TYPED_HEADERS = "payler-typed-headers"
_STREAM_FIELDS = frozenset({b"body", b"key", b"headers", b"properties"})


def to_kafka_headers(payload: Payload, headers: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """Kafka record headers for ``payload`` carrying ``headers`` (already filtered)."""
    out: list[tuple[str, bytes]] = []
    props = payload.properties.model_dump(exclude_none=True)
    for name, header in PROPERTY_HEADERS.items():
        if name in props:
            out.append((header, str(props[name]).encode()))
    typed = []
    for name, value in headers.items():
        if isinstance(value, str):
            out.append((name, value.encode()))
        else:
            out.append((name, codec.dumps(value).encode()))
            typed.append(name)
    if typed:
        out.append((TYPED_HEADERS, ",".join(typed).encode()))
    return out


def from_kafka_headers(
    records: Iterable[tuple[str, bytes | None]], timestamp_ms: int | None
) -> tuple[dict[str, Any], MessageProperties]:
    """Custom headers and properties from Kafka record headers (the inverse of the above)."""
    raw = {name: value or b"" for name, value in records}
    typed = set(raw.pop(TYPED_HEADERS, b"").decode().split(",")) - {""}
    props: dict[str, Any] = {"timestamp_ms": timestamp_ms}
    headers: dict[str, Any] = {}
    for name, value in raw.items():
        prop = _PROPERTY_OF_HEADER.get(name)
        text = value.decode("utf-8", "replace")
        if prop is not None:
            props[prop] = int(text) if prop in _INT_PROPERTIES and text.isdigit() else text
        elif name in typed:
            headers[name] = codec.loads(value)
        else:
            headers[name] = text
    for prop in _INT_PROPERTIES:  # a non-numeric priority from a foreign producer: dropped
        if isinstance(props.get(prop), str):
            del props[prop]
    return headers, MessageProperties(**props)


def to_stream_fields(payload: Payload, headers: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Redis stream entry fields for ``payload`` carrying ``headers``."""
    fields = {
        b"body": payload.body,
        b"headers": codec.dumps(dict(headers)).encode(),
        b"properties": codec.dumps(payload.properties.model_dump(exclude_none=True)).encode(),
    }
    if payload.key is not None:
        fields[b"key"] = payload.key
    return fields


def from_stream_fields(
    fields: Mapping[bytes, bytes],
) -> tuple[bytes, bytes | None, dict[str, Any], MessageProperties]:
    """Body, key, custom headers and properties of a Redis stream entry.

    Raises ``ValueError`` for fields it cannot read without losing something: ``headers`` or
    ``properties`` that are not a JSON object of what payler writes (malformed, a lone
    surrogate, nested too deep, a property unknown or of the wrong type), a field name that is
    not UTF-8. Nothing is dropped or replaced silently.
    """
    headers = _json_object(fields, b"headers")
    props = _json_object(fields, b"properties")
    # A producer's own fields (``type``, ``tenant``...) travel on as headers: text where they
    # are UTF-8, bytes as they are otherwise. The ``headers`` field wins a name they share.
    for name, value in fields.items():
        if name not in _STREAM_FIELDS:
            try:
                text = name.decode()
            except UnicodeDecodeError:
                raise ValueError(f"the field name {name[:100]!r} is not UTF-8 text") from None
            headers.setdefault(text, _text_or_bytes(value))
    return fields.get(b"body", b""), fields.get(b"key"), headers, MessageProperties(**props)


def _json_object(fields: Mapping[bytes, bytes], name: bytes) -> dict[str, Any]:
    """Field ``name`` (payler's lossless JSON of an object), or ``{}`` when it is absent."""
    if name not in fields:
        return {}
    value = codec.loads(fields[name])
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise ValueError(f"the {name.decode()} field is a JSON {kind}, not an object")
    return value


def _text_or_bytes(value: bytes) -> str | bytes:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value
