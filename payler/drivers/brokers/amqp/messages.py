"""AMQP messages to payloads, and payloads to AMQP publishes.

Reading (:func:`to_payload`) never raises: a message payler cannot read — a property that is not
UTF-8, a timestamp beyond the year 9999, a header table pamqp could not parse (see
:mod:`.tolerant`), or anything else, a bug included — comes out as a payload with a ``defect``
that says why, its raw body and what could be read of the rest, so that the workflow dead-letters
it alone. The properties are read as pamqp decoded them (exact strings, whole-second timestamps),
not through aio-pika's conversions, which can raise or round.

Writing (:func:`to_outgoing`) builds the exact properties that go on the wire and checks, per
payload, what would otherwise fail the whole batch or the connection: a value AMQP cannot carry
(:class:`ValueError` and friends) and a content header larger than the connection's
``frame_max`` (:class:`FrameTooLarge`; RabbitMQ answers one with FRAME_ERROR, closing the
connection). Messages are published persistent unless the payload says ``delivery_mode`` 1: a
message from Kafka or a stream has no delivery mode, and must not be downgraded to transient.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from payler import codec
from payler.drivers.brokers.amqp.tolerant import (
    UnreadableTable,
    UnreadableTimestamp,
    is_utf8,
    raw_bytes,
)
from payler.identity import spool_id
from payler.isolation import describe
from payler.payload import MessageProperties, Payload

log = logging.getLogger("payler.rabbitmq")

#: On a message whose header table could not be parsed: the table's raw bytes.
UNDECODABLE_HEADERS = "x-payler-undecodable-headers"
#: On a dead-lettered message whose headers AMQP cannot carry: the headers as JSON text.
ORIGINAL_HEADERS = "x-payler-original-headers"
#: AMQP routing keys are short strings: at most 255 bytes.
MAX_ROUTING_KEY_BYTES = 255
#: AMQP field names: at most 128 bytes (pamqp cuts longer ones, with only a log warning).
MAX_HEADER_NAME_BYTES = 128
#: A frame's bytes around its payload: type (1), channel (2), size (4), frame-end octet (1).
FRAME_OVERHEAD = 8
#: aiormq gives a message without a message id a random one (32 hex digits, plus the length
#: octet) as it publishes: the content header grows by this much.
_RANDOM_MESSAGE_ID_BYTES = 1 + 32
#: The errors that say "AMQP cannot carry this value".
ENCODING_ERRORS = (TypeError, ValueError, OverflowError, struct.error)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


class FrameTooLarge(ValueError):
    """A message's content header (properties and headers) does not fit in one frame."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One AMQP publish: the body and the exact properties sent with it."""

    body: bytes
    properties: Basic.Properties


def to_payload(message: DeliveredMessage, queue: str, received_ms: int) -> Payload:
    """The payload of a message delivered from ``queue``; never raises (module docstring)."""
    try:
        return _read(message, queue, received_ms)
    except Exception as exc:  # a bug in payler, for this message alone
        log.exception("reading a message of %r failed (a bug in payler)", queue)
        body = _raw_body(message)
        return Payload(
            id=spool_id("amqp", queue, None, body, ""),
            body=body,
            source=queue,
            destination="",
            due_ms=received_ms,
            created_ms=received_ms,
            defect=f"payler could not read the message (a bug in payler): {describe(exc)}",
        )


def _read(message: DeliveredMessage, queue: str, received_ms: int) -> Payload:
    props = message.header.properties
    problems: list[str] = []
    properties = MessageProperties(
        content_type=_text(props.content_type, "content_type", problems),
        content_encoding=_text(props.content_encoding, "content_encoding", problems),
        correlation_id=_text(props.correlation_id, "correlation_id", problems),
        message_id=_text(props.message_id, "message_id", problems),
        reply_to=_text(props.reply_to, "reply_to", problems),
        type=_text(props.message_type, "type", problems),
        priority=props.priority,
        timestamp_ms=_timestamp_ms(props.timestamp, problems),
        delivery_mode=props.delivery_mode or None,
        expiration=_text(props.expiration, "expiration", problems),
        app_id=_text(props.app_id, "app_id", problems),
    )
    payload = Payload(
        id="",
        body=_raw_body(message),
        headers=_headers(props.headers, problems),
        properties=properties,
        source=queue,
        destination="",
        due_ms=received_ms,
        created_ms=received_ms,
        defect=f"the AMQP message cannot be read: {'; '.join(problems)}" if problems else None,
    )
    meta = ""
    # The digest (and so the metadata's JSON) is needed only without a message id. Headers the
    # spool cannot hold leave it out: the spool refuses them, and the message is dead-lettered.
    if not properties.message_id:
        with contextlib.suppress(ValueError):
            meta = payload.meta_json()
    payload.id = spool_id("amqp", queue, properties.message_id, payload.body, meta)
    return payload


def _raw_body(message: DeliveredMessage) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else bytes(body or b"")


def _text(value: object, name: str, problems: list[str]) -> str | None:
    """A short-string property; one that is not UTF-8 is a problem (and left out)."""
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"its {name} property is not text ({type(value).__name__})")
        return None
    if not is_utf8(value):
        problems.append(f"its {name} property is not UTF-8 ({raw_bytes(value)[:64]!r})")
        return None
    return value


def _timestamp_ms(value: object, problems: list[str]) -> int | None:
    """The ``timestamp`` property (whole seconds) as epoch milliseconds."""
    if value is None:
        return None
    if isinstance(value, UnreadableTimestamp):
        problems.append(f"its timestamp property ({value.seconds} s) is beyond the year 9999")
        return None
    if not isinstance(value, datetime):
        problems.append(f"its timestamp property is not a time ({type(value).__name__})")
        return None
    moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _SECOND * 1000


def _headers(table: object, problems: list[str]) -> dict[str, Any]:
    """The header table as payler keeps it: byte arrays as bytes; values that could not be read
    replaced by what they hold (and listed in ``problems``)."""
    if table is None:
        return {}
    if isinstance(table, UnreadableTable):
        problems.append(f"its headers cannot be parsed ({table.reason})")
        return {UNDECODABLE_HEADERS: table.raw}
    if not isinstance(table, dict):
        problems.append(f"its headers are not a table ({type(table).__name__})")
        return {}
    return {str(k): _value(v, f"header {k!r}", problems, 0) for k, v in table.items()}


def _value(value: Any, where: str, problems: list[str], depth: int) -> Any:
    if depth > codec.MAX_DEPTH:
        problems.append(f"{where} is nested more than {codec.MAX_DEPTH} levels deep")
        return None
    if isinstance(value, UnreadableTimestamp):
        problems.append(f"{where} is a timestamp ({value.seconds} s) beyond the year 9999")
        return value.seconds
    if isinstance(value, UnreadableTable):  # nested: not made by pamqp today, but cheap to keep
        problems.append(f"{where} cannot be parsed ({value.reason})")
        return value.raw
    if isinstance(value, bytearray):  # what pamqp decodes an AMQP byte array into
        return bytes(value)
    if isinstance(value, dict):
        return {str(k): _value(v, f"{where}[{k!r}]", problems, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_value(v, f"{where}[{i}]", problems, depth + 1) for i, v in enumerate(value)]
    return value


def to_outgoing(payload: Payload, headers: Mapping[str, Any], frame_max: int) -> Outgoing:
    """The AMQP publish of ``payload`` with ``headers``.

    Raises :class:`FrameTooLarge` when its content header exceeds ``frame_max`` (0: no limit),
    and an :data:`ENCODING_ERRORS` error when a value cannot be sent (an integer beyond 64 bits,
    a destination longer than a routing key): checked here, per payload, so that neither fails
    the batch or the connection.
    """
    if len(payload.destination.encode()) > MAX_ROUTING_KEY_BYTES:
        raise ValueError(
            f"the destination {payload.destination[:40]!r}... is longer than AMQP's "
            f"{MAX_ROUTING_KEY_BYTES}-byte routing keys"
        )
    props = payload.properties
    properties = Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=_amqp_table(dict(headers)),
        # Persistent unless the source said transient: a Kafka record or a stream entry has no
        # delivery mode, and payler deletes its spool entry once the broker confirms.
        delivery_mode=1 if props.delivery_mode == 1 else 2,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        message_id=props.message_id,
        timestamp=(
            None
            if props.timestamp_ms is None
            else _EPOCH + timedelta(milliseconds=props.timestamp_ms)
        ),
        message_type=props.type,
        app_id=props.app_id,
    )
    # Encoding the header here finds what AMQP cannot carry, and gives its size.
    size = FRAME_OVERHEAD + len(ContentHeader(0, len(payload.body), properties).marshal())
    if not properties.message_id:
        size += _RANDOM_MESSAGE_ID_BYTES
    if frame_max and size > frame_max:
        raise FrameTooLarge(
            f"its properties and headers take {size} bytes, over the connection's frame_max "
            f"of {frame_max} bytes (RabbitMQ would close the connection)"
        )
    return Outgoing(payload.body, properties)


def dead_letter_outgoing(payload: Payload, headers: Mapping[str, Any], frame_max: int) -> Outgoing:
    """A dead-letter publish: headers AMQP cannot carry travel as lossless JSON text instead."""
    try:
        return to_outgoing(payload, headers, frame_max)
    except FrameTooLarge:
        raise  # as JSON text they would be larger still: the caller sends a minimal copy
    except ENCODING_ERRORS:
        kept = {k: v for k, v in headers.items() if k not in payload.headers}
        as_text = {**kept, ORIGINAL_HEADERS: codec.dumps(payload.headers)}
        return to_outgoing(payload, as_text, frame_max)


def _amqp_table(value: Any) -> Any:
    """Header values as pamqp encodes them: byte strings travel as AMQP byte arrays. A name
    too long for AMQP is refused (pamqp would cut it short)."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and len(key.encode("utf-8", "replace")) > MAX_HEADER_NAME_BYTES:
                raise ValueError(
                    f"the header name {key[:40]!r}... is longer than AMQP's "
                    f"{MAX_HEADER_NAME_BYTES} bytes"
                )
        return {k: _amqp_table(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_amqp_table(v) for v in value]
    return value
