"""How a payload travels on brokers without AMQP's typed headers and properties.

AMQP messages have typed headers (strings, numbers, booleans, tables, byte arrays, dates, void)
and named properties. Kafka records have a key, a value (or none: a tombstone), a timestamp and
headers whose values are bytes or null, where a name may repeat; Redis stream entries are flat
maps of byte strings. payler maps between them so that body, key, properties and custom headers
survive any A → B → A trip:

Kafka headers
    Names starting with ``payler-`` are payler's own (:data:`KAFKA_PREFIX`):

    - ``payler-content-type``, ``payler-content-encoding``, ``payler-correlation-id``,
      ``payler-message-id``, ``payler-reply-to``, ``payler-type``, ``payler-priority``,
      ``payler-delivery-mode``, ``payler-expiration``, ``payler-app-id``: the AMQP properties,
      UTF-8 text (:data:`PROPERTY_HEADERS`).
    - ``payler-timestamp``: the message's original publish time, epoch milliseconds as text
      (null: it had none). payler produces each record with the current time as its timestamp —
      an old timestamp could make the record fall out of the topic's retention at once, or be
      refused (``log.message.timestamp.before.max.ms``) — and reads the publish time back from
      this header; from a record without it, the record's own timestamp is the publish time.
    - ``payler-typed``: the names of the custom headers written as payler's lossless JSON
      (a JSON list, so a name may hold a comma).
    - ``payler-header-<name>``: a custom header whose own name starts with ``payler-``.

    Every other header is a custom header under its own name: a string as its UTF-8 bytes;
    bytes that are not UTF-8 as they are; a null as a null value; a list of two or more of
    those as the header repeated, once per item; anything else (numbers, booleans, tables,
    dates, UTF-8 bytes, other lists) as JSON, its name listed in ``payler-typed``. Read back,
    an untyped value is text when it is UTF-8, else bytes, and null stays null (``None``); a
    repeated name is a list of its values in order. So a custom header named like a property
    (``priority``, ``app-id``) stays a custom header.

    A record without payler's headers (from another producer, or an older payler) has its
    properties read from the plain names ``content-type``, ``content-encoding``,
    ``correlation-id``, ``message-id``, ``reply-to``, ``message-type``, ``priority``,
    ``delivery-mode``, ``expiration`` and ``app-id`` where that is unambiguous (the name is
    there once, with a valid value); those headers also stay custom headers, so a record
    forwarded Kafka → Kafka keeps them as they were. Its typed headers are listed in the older
    ``payler-typed-headers`` (comma-separated). A malformed typed value is kept as it came.

    A record with a null value (a tombstone) becomes a payload with an empty body and the header
    :data:`NULL_VALUE`; published to Kafka, such a payload is a tombstone again (when it has a
    key: Kafka clients refuse a tombstone without one). The record key is the payload's key.

Redis stream fields
    ``body`` (raw bytes), ``key`` (raw bytes, when there is one), ``headers`` (lossless JSON of
    the custom headers), ``properties`` (JSON of the AMQP properties, publish time as
    ``timestamp_ms``). A producer may send just ``body``; any other field it sends becomes a
    header of that name (a string, or bytes when its value is not UTF-8). Fields that cannot be
    read as that (``headers`` that are no JSON object...) are an error, never dropped: the
    source dead-letters the entry with its raw fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from payler import codec
from payler.payload import MessageProperties, Payload

#: The prefix of payler's own Kafka headers.
KAFKA_PREFIX = "payler-"
#: Kafka header name of each AMQP property carried as a header.
PROPERTY_HEADERS: dict[str, str] = {
    "content_type": "payler-content-type",
    "content_encoding": "payler-content-encoding",
    "correlation_id": "payler-correlation-id",
    "message_id": "payler-message-id",
    "reply_to": "payler-reply-to",
    "type": "payler-type",
    "priority": "payler-priority",
    "delivery_mode": "payler-delivery-mode",
    "expiration": "payler-expiration",
    "app_id": "payler-app-id",
}
#: The original publish time (epoch ms), or null when the message had none.
TIMESTAMP_HEADER = "payler-timestamp"
#: The names of the custom headers written as JSON, as a JSON list.
TYPED_HEADERS = "payler-typed"
#: A custom header whose own name starts with :data:`KAFKA_PREFIX` travels as this + its name.
ESCAPED_PREFIX = "payler-header-"
#: On a payload from a Kafka record with a null value (a tombstone): ``True``.
NULL_VALUE = "x-payler-null-value"
#: Where older paylers and other producers put the properties (read, never written).
LEGACY_PROPERTY_HEADERS: dict[str, str] = {
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
#: Older paylers listed the typed headers here, comma-separated (read, never written).
LEGACY_TYPED_HEADERS = "payler-typed-headers"
_INT_PROPERTIES = frozenset({"priority", "delivery_mode"})
#: The values AMQP allows for the integer properties: read from a foreign producer's plain
#: headers only when they fit (anything else stays a custom header, nothing is dropped).
_LEGACY_RANGES = {"priority": range(256), "delivery_mode": range(1, 3)}
_PROPERTY_OF_HEADER = {header: name for name, header in PROPERTY_HEADERS.items()}
#: A record with any of these was written by this payler (it writes ``payler-timestamp`` always).
_OWN_HEADERS = frozenset({*PROPERTY_HEADERS.values(), TIMESTAMP_HEADER, TYPED_HEADERS})
_INTEGER = re.compile(r"^-?[0-9]{1,19}$")
_STREAM_FIELDS = frozenset({b"body", b"key", b"headers", b"properties"})


def to_kafka_headers(
    payload: Payload, headers: Mapping[str, Any]
) -> list[tuple[str, bytes | None]]:
    """Kafka record headers for ``payload`` carrying ``headers`` (already filtered).

    Raises ``ValueError`` or ``TypeError`` for a value Kafka cannot carry (a lone surrogate).
    """
    out: list[tuple[str, bytes | None]] = []
    props = payload.properties.model_dump(exclude_none=True)
    for name, header in PROPERTY_HEADERS.items():
        if name in props:
            out.append((header, str(props[name]).encode()))
    stamp = payload.properties.timestamp_ms
    out.append((TIMESTAMP_HEADER, None if stamp is None else str(stamp).encode()))
    typed = []
    for name, value in headers.items():
        wire = ESCAPED_PREFIX + name if name.startswith(KAFKA_PREFIX) else name
        plain, raw = _plain(value)
        if plain:
            out.append((wire, raw))
        elif _repeatable(value):
            out += [(wire, _plain(item)[1]) for item in value]
        else:
            out.append((wire, codec.dumps(value).encode()))
            typed.append(wire)
    if typed:
        out.append((TYPED_HEADERS, json.dumps(typed, ensure_ascii=False).encode()))
    return out


def from_kafka_headers(
    records: Iterable[tuple[str, bytes | None]],
    timestamp_ms: int | None,
    problems: list[str] | None = None,
) -> tuple[dict[str, Any], MessageProperties]:
    """Custom headers and properties from Kafka record headers (the inverse of the above).

    ``timestamp_ms`` is the record's timestamp: the publish time when :data:`TIMESTAMP_HEADER`
    is absent. Never raises for what the headers hold: what cannot be read as payler wrote it
    is kept as it came, and said in ``problems`` (when given).
    """
    problems = [] if problems is None else problems
    pairs = list(records)
    ours = any(n in _OWN_HEADERS or n.startswith(ESCAPED_PREFIX) for n, _ in pairs)
    typed = _typed_names(pairs, ours, problems)
    props: dict[str, Any] = {"timestamp_ms": timestamp_ms}
    grouped: dict[str, list[Any]] = {}
    for name, raw in pairs:
        if name in (TYPED_HEADERS, LEGACY_TYPED_HEADERS) and (ours == (name == TYPED_HEADERS)):
            continue
        if ours and _read_own(name, raw, props, problems):
            continue
        value = _value(name, raw, typed, problems)
        custom = name.removeprefix(ESCAPED_PREFIX) if ours else name
        grouped.setdefault(custom, []).append(value)
    if not ours:
        _read_legacy_properties(grouped, props)
    headers = {name: values[0] if len(values) == 1 else values for name, values in grouped.items()}
    return headers, MessageProperties(**props)


def _plain(value: Any) -> tuple[bool, bytes | None]:
    """``(True, raw)`` when ``raw`` reads back untyped as ``value``; else ``(False, None)``."""
    if value is None:
        return True, None
    if isinstance(value, str):
        return True, value.encode()  # a lone surrogate raises here: the payload is refused
    if isinstance(value, bytes | bytearray):
        try:
            bytes(value).decode()
        except UnicodeDecodeError:
            return True, bytes(value)  # not text: it reads back as bytes
    return False, None  # UTF-8 bytes would read back as text, other types as text: typed


def _repeatable(value: Any) -> bool:
    """Whether ``value`` travels as a repeated header: a list of two or more plain values (a
    single one would read back as a value, not a list)."""
    return isinstance(value, list) and len(value) >= 2 and all(_plain(v)[0] for v in value)


def _typed_names(
    pairs: list[tuple[str, bytes | None]], ours: bool, problems: list[str]
) -> set[str]:
    listed = [
        raw for name, raw in pairs if name == (TYPED_HEADERS if ours else LEGACY_TYPED_HEADERS)
    ]
    names: set[str] = set()
    for raw in listed:
        if raw is None:
            continue
        if not ours:
            names |= set(raw.decode("utf-8", "replace").split(",")) - {""}
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(n, str) for n in value):
            names |= set(value)
        else:
            problems.append(f"header {TYPED_HEADERS!r} is not a JSON list of names: {raw[:60]!r}")
    return names


def _read_own(name: str, raw: bytes | None, props: dict[str, Any], problems: list[str]) -> bool:
    """Read one of payler's own headers into ``props``; ``False``: it is a custom header."""
    if name == TIMESTAMP_HEADER:
        prop, number = "timestamp_ms", True
    elif name in _PROPERTY_OF_HEADER:
        prop = _PROPERTY_OF_HEADER[name]
        number = prop in _INT_PROPERTIES
    else:
        return False
    if raw is None:  # the message had no such property (a null publish time: none)
        props[prop] = None
        return True
    text = _text(raw)
    if text is not None and (not number or _INTEGER.match(text)):
        props[prop] = int(text) if number else text
        return True
    problems.append(f"header {name!r} is malformed ({raw[:60]!r}): kept as a custom header")
    return False


def _read_legacy_properties(grouped: dict[str, list[Any]], props: dict[str, Any]) -> None:
    """Properties from the plain names other producers use, where unambiguous: the name is
    there once, as text, with a value AMQP can carry."""
    for prop, name in LEGACY_PROPERTY_HEADERS.items():
        values = grouped.get(name, [])
        if len(values) != 1 or not isinstance(values[0], str):
            continue
        text = values[0]
        if prop in _INT_PROPERTIES:
            if text.isascii() and text.isdigit() and int(text) in _LEGACY_RANGES[prop]:
                props[prop] = int(text)
        elif prop != "expiration" or (text.isascii() and text.isdigit()):
            props[prop] = text


def _value(name: str, raw: bytes | None, typed: set[str], problems: list[str]) -> Any:
    if raw is None:
        return None
    if name in typed:
        try:
            return codec.loads(raw)
        except ValueError as exc:
            problems.append(f"typed header {name!r} is not payler's JSON ({exc}): kept as it came")
    text = _text(raw)
    return raw if text is None else text


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


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
