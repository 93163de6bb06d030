"""What a handler sees and returns: :class:`Message` (matched on), :class:`Context` (given with
the decoded body) and :class:`Output` (returned, zero to many).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from payler.clock import Clock
from payler.payload import MessageProperties, Payload
from payler.processing.serializers import Serializer, find_serializer

#: Headers payler keeps on a retry entry in the spool; never shown to a handler.
ATTEMPT_HEADER = "x-payler-attempt"
#: On a spool entry: the source message's id, from which output ids derive.
ORIGIN_HEADER = "x-payler-origin"
PRIVATE_HEADERS = frozenset({ATTEMPT_HEADER, ORIGIN_HEADER})


class Message:
    """A message as matchers see it: headers, properties, the raw body, and the body decoded
    (lazily, once) by its content type or the application's default."""

    __slots__ = ("_data", "_decoded", "default_serializer", "payload")

    def __init__(self, payload: Payload, default_serializer: Serializer) -> None:
        self.payload = payload
        self.default_serializer = default_serializer
        self._decoded = False
        self._data: Any = None

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.payload.headers

    @property
    def properties(self) -> MessageProperties:
        return self.payload.properties

    @property
    def content_type(self) -> str | None:
        return self.payload.properties.content_type

    @property
    def body(self) -> bytes:
        return self.payload.body

    @property
    def key(self) -> bytes | None:
        return self.payload.key

    @property
    def source(self) -> str:
        return self.payload.source

    @property
    def serializer(self) -> Serializer | None:
        """The serializer of the message's content type (the default without one; ``None``
        for a content type nobody registered)."""
        if self.content_type:
            return find_serializer(self.content_type)
        return self.default_serializer

    @property
    def data(self) -> Any:
        """The decoded body; ``None`` when it cannot be decoded (matchers then do not match)."""
        if not self._decoded:
            self._decoded = True
            serializer = self.serializer
            try:
                self._data = serializer.decode(self.body) if serializer else None
            except ValueError:
                self._data = None
        return self._data


class MessageLog(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic only in typeshed
    """A handler's logger: each line names the message (``[message <id>]`` in text, ``ids`` in
    JSON lines)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = self.extra or {}
        kwargs.setdefault("extra", {})["ids"] = [extra["message_id"]]
        return f"[message {extra['message_id']}] {msg}", kwargs


@dataclass(slots=True)
class Context:
    """What a handler gets beside the message: where it came from, which attempt this is, a
    logger that names the message, and the clock (``ctx.clock.now_ms()``)."""

    message_id: str
    headers: Mapping[str, Any]
    properties: MessageProperties
    source: str
    key: bytes | None
    #: 1 for the first run, 2 for the first retry, ...
    attempt: int
    handler: str
    clock: Clock
    log: logging.LoggerAdapter  # type: ignore[type-arg]
    #: Why the previous attempt failed (on a retry), else None.
    last_error: str | None = None

    def now_ms(self) -> int:
        return self.clock.now_ms()


@dataclass(frozen=True, slots=True)
class Output:
    """One message a handler sends on: ``body`` to ``destination`` (a queue, topic or stream)
    on the output broker named ``broker`` (the workflow's ``default_output`` when None).

    ``body``: a pydantic model, a mapping or list (encoded by ``content_type``, by default the
    handler's output content type), ``str`` (text) or ``bytes`` (as they are). ``delay_ms`` or
    ``due_at`` (a datetime with a timezone, or epoch milliseconds) make it a delayed output:
    kept in the spool until then. ``message_id`` defaults to a deterministic id (the source
    message's id and the output's index), ``correlation_id`` and ``key`` to the source's.
    """

    destination: str
    body: Any
    broker: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    delay_ms: int | None = None
    due_at: datetime | int | None = None
    key: bytes | str | None = None
    content_type: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.destination, str) or not self.destination:
            raise ValueError("an output needs a destination (a queue, topic or stream name)")
        if self.delay_ms is not None and self.due_at is not None:
            raise ValueError("an output takes delay_ms or due_at, not both")
        if self.delay_ms is not None and (
            not isinstance(self.delay_ms, int) or isinstance(self.delay_ms, bool)
        ):
            raise ValueError(f"delay_ms must be an integer, not {self.delay_ms!r}")
        if isinstance(self.due_at, datetime) and self.due_at.tzinfo is None:
            raise ValueError("due_at must carry a timezone (datetime.now(UTC) + ...)")

    def due_ms(self, now_ms: int) -> int:
        """When the output is due: now, or later for a delayed one."""
        if self.delay_ms is not None:
            return now_ms + max(0, self.delay_ms)
        if isinstance(self.due_at, datetime):
            return round(self.due_at.timestamp() * 1000)
        if isinstance(self.due_at, int):
            return self.due_at
        return now_ms


__all__ = ["ATTEMPT_HEADER", "ORIGIN_HEADER", "Context", "Message", "MessageLog", "Output"]
