"""What the admin operations return and take: pydantic models, so the HTTP API's schema, the
CLI's ``--json`` and the console all read the same shapes.

Bodies are shown as text when they are UTF-8, else base64 (``body_encoding``), cut at a size
cap (``body_truncated``). Headers are *typed*: plain JSON where JSON can say it, and the values
JSON cannot (bytes, date-times, decimals) as one-key objects naming their type
(``{"__bytes__": "<base64>"}``, ``{"__datetime__": "..."}``, ``{"__decimal__": "..."}``) —
the lossless form the spool stores them in (:mod:`payler.codec`).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from payler import codec
from payler.admin.times import iso
from payler.drivers.brokers.base import (
    DEAD_LETTER_DESTINATION,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE,
    DEAD_LETTER_TRUNCATED,
    DEAD_LETTERED_AT,
)
from payler.payload import Payload
from payler.reasons import ReasonClass, reason_class

#: Body bytes shown by default; more on request, up to :data:`MAX_BODY_PREVIEW`.
DEFAULT_BODY_PREVIEW = 64 * 1024
MAX_BODY_PREVIEW = 16 * 1024 * 1024
#: In listings, bodies are cut shorter.
LIST_BODY_PREVIEW = 256

State = Literal["pending", "dead"]


class Properties(BaseModel):
    """The message properties (AMQP's basic properties; other brokers map onto them)."""

    model_config = ConfigDict(strict=True)

    content_type: str | None = None
    content_encoding: str | None = None
    correlation_id: str | None = None
    message_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    priority: int | None = None
    timestamp_ms: int | None = None
    delivery_mode: int | None = None
    expiration: str | None = None
    app_id: str | None = None


class Entry(BaseModel):
    """A spool entry: a message payler holds until it is due."""

    id: str = Field(description="The spool id (derived from the message id or position).")
    state: State
    destination: str
    due_ms: int = Field(description="When it is due, epoch milliseconds (UTC).")
    due_at: str | None = Field(description="The same, ISO 8601 in UTC.")
    created_ms: int
    attempts: int
    last_error: str | None
    reason_class: ReasonClass | None = Field(
        default=None, description="For a dead entry: the class of its last error."
    )
    source: str
    message_id: str | None
    correlation_id: str | None
    body: str
    body_encoding: Literal["utf-8", "base64"]
    body_bytes: int = Field(description="The whole body's size.")
    body_truncated: bool
    headers: dict[str, Any]
    properties: Properties


class EntryPage(BaseModel):
    """One page of entries, in due order; pass ``next_cursor`` back for the next one."""

    items: list[Entry]
    next_cursor: str | None
    scanned: int | None = Field(
        default=None,
        description="With a header filter: how many entries were looked at for this page.",
    )


class Count(BaseModel):
    pending: int
    dead: int
    destination: str | None = None


class NewMessage(BaseModel):
    """A message to schedule (``POST /v1/scheduled``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    destination: str = Field(min_length=1, max_length=255)
    body: str = Field(default="", description="The body as text (UTF-8).")
    body_base64: str | None = Field(default=None, description="Or the body's bytes, base64.")
    headers: dict[str, Any] = Field(default_factory=dict)
    properties: Properties = Field(default_factory=Properties)
    delay_ms: int | None = Field(default=None, ge=0)
    deliver_at: str | int | None = Field(
        default=None, description="ISO 8601 with a UTC offset, or epoch milliseconds."
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The same key twice schedules once (also the Idempotency-Key header).",
    )


class Scheduled(BaseModel):
    """What ``POST /v1/scheduled`` did."""

    id: str
    created: bool = Field(description="False: that idempotency key was used already.")
    due_ms: int
    due_at: str | None


class Reschedule(BaseModel):
    """A new due time (``PATCH /v1/scheduled/{id}``): one of the two."""

    model_config = ConfigDict(extra="forbid", strict=True)

    delay_ms: int | None = Field(default=None, ge=0, description="From now.")
    deliver_at: str | int | None = Field(
        default=None, description="ISO 8601 with a UTC offset, or epoch milliseconds."
    )


class Done(BaseModel):
    id: str
    done: bool


DeadLetterWhere = Literal["spool", "queue"]


class DeadLetter(BaseModel):
    """A dead letter: parked as dead in the spool, or waiting on a dead-letter queue."""

    id: str
    where: DeadLetterWhere
    queue: str | None = Field(description="The dead-letter queue it is on (where = queue).")
    reason: str | None
    reason_class: ReasonClass
    source: str | None
    destination: str | None = Field(description="Where a replay sends it.")
    dead_lettered_ms: int | None
    message_id: str | None
    correlation_id: str | None
    truncated: bool = Field(description="A minimal copy (its body was dropped): not replayable.")
    body: str
    body_encoding: Literal["utf-8", "base64"]
    body_bytes: int
    body_truncated: bool
    headers: dict[str, Any]


class DeadLetterPage(BaseModel):
    items: list[DeadLetter]
    next_cursor: str | None = Field(description="Continues the spool's dead entries.")
    queue_errors: dict[str, str] = Field(
        default_factory=dict, description="Dead-letter queues that could not be looked into."
    )


class ReplayRequest(BaseModel):
    """Which dead letters to re-inject (``POST /v1/dead-letters/replay``); at least one
    selector, or ``all``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] | None = Field(default=None, max_length=10_000)
    reason_class: ReasonClass | None = None
    destination: str | None = None
    all: bool = False
    where: DeadLetterWhere | None = Field(default=None, description="Only the spool or queues.")
    limit: int = Field(default=1000, ge=1, le=100_000)


class DiscardRequest(ReplayRequest):
    """Which dead letters to delete for good (``POST /v1/dead-letters/discard``): the same
    selectors as a replay; at least one, or ``all``."""


class ReplayFailure(BaseModel):
    id: str
    error: str


class ReplayResult(BaseModel):
    replayed: int
    failed: list[ReplayFailure]


class DiscardResult(BaseModel):
    discarded: int
    failed: list[ReplayFailure]


class ReasonGroup(BaseModel):
    """The dead letters of one reason class."""

    reason_class: ReasonClass
    count: int = Field(description="In the spool and on the dead-letter queues.")
    spool: int
    queue: int
    example: str | None = Field(description="The most frequent reason text of the class.")


class ReasonGroups(BaseModel):
    """Dead letters grouped by reason class, most first (``GET /v1/dead-letters/reasons``)."""

    groups: list[ReasonGroup]
    total: int = Field(description="Dead letters counted (the sum of the groups).")
    complete: bool = Field(
        description="False when there were more dead letters than were looked at (the spool's "
        "first 10,000 dead entries and each queue's first 1,000 messages are)."
    )
    queue_errors: dict[str, str] = Field(default_factory=dict)


class DueBucket(BaseModel):
    start_ms: int
    start_at: str | None
    count: int


class DueHistogram(BaseModel):
    """How many pending entries are due per time bucket (``GET /v1/scheduled/histogram``),
    counted through the due-time index: no entry is read, whatever the backlog."""

    start_ms: int
    end_ms: int
    bucket_ms: int
    buckets: list[DueBucket]
    overdue: int = Field(description="Due before start_ms (overdue, when start is now).")
    later: int = Field(description="Due at end_ms or after.")


def body_view(body: bytes, cap: int) -> dict[str, Any]:
    """The body fields of a view: text if UTF-8, else base64; cut at ``cap`` bytes."""
    shown = body[:cap]
    try:
        text, encoding = shown.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        if len(body) > cap and exc.start >= len(shown) - 3:  # a character cut by the cap
            text, encoding = shown[: exc.start].decode("utf-8"), "utf-8"
        else:
            text, encoding = base64.b64encode(shown).decode("ascii"), "base64"
    return {
        "body": text,
        "body_encoding": encoding,
        "body_bytes": len(body),
        "body_truncated": len(body) > cap,
    }


def typed_headers(headers: dict[str, Any]) -> dict[str, Any]:
    converted: dict[str, Any] = codec.to_jsonable(headers)
    return converted


def entry_view(payload: Payload, state: State, body_cap: int = DEFAULT_BODY_PREVIEW) -> Entry:
    props = payload.properties
    return Entry(
        id=payload.id,
        state=state,
        destination=payload.destination,
        due_ms=payload.due_ms,
        due_at=iso(payload.due_ms),
        created_ms=payload.created_ms,
        attempts=payload.attempts,
        last_error=payload.last_error,
        reason_class=reason_class(payload.last_error) if state == "dead" else None,
        source=payload.source,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        headers=typed_headers(payload.headers),
        properties=Properties(**props.model_dump()),
        **body_view(payload.body, body_cap),
    )


def dead_letter_view(
    payload: Payload, where: DeadLetterWhere, queue: str | None, body_cap: int
) -> DeadLetter:
    """A dead letter of the spool (its reason is ``last_error``) or of a queue (its reason and
    origin are in payler's dead-letter headers)."""
    headers = payload.headers
    props = payload.properties
    reason: str | None
    source: str | None
    if where == "spool":
        reason, source = payload.last_error, payload.source
        destination = payload.destination or None
        at = None
    else:
        reason = _text(headers.get(DEAD_LETTER_REASON))
        source = _text(headers.get(DEAD_LETTER_SOURCE))
        destination = _text(headers.get(DEAD_LETTER_DESTINATION))
        stamp = headers.get(DEAD_LETTERED_AT)
        at = stamp if isinstance(stamp, int) and not isinstance(stamp, bool) else None
    return DeadLetter(
        id=payload.id,
        where=where,
        queue=queue,
        reason=reason,
        reason_class=reason_class(reason),
        source=source,
        destination=destination,
        dead_lettered_ms=at,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        truncated=DEAD_LETTER_TRUNCATED in headers,
        headers=typed_headers(headers),
        **body_view(payload.body, body_cap),
    )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)
