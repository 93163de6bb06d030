"""The payload: one message on its way through payler, stored as it is in the spool."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from payler import codec

#: On a spool entry whose metadata cannot be read: that metadata, raw, for the dead letter.
STORED_META = "x-payler-stored-meta"


class MessageProperties(BaseModel):
    """The broker-independent message properties that payler carries through the spool.

    They mirror AMQP 0-9-1's basic properties; other brokers map onto them (see README).
    ``timestamp_ms`` is the publish time the producer stamped, epoch milliseconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

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


class Payload(BaseModel):
    """A message held by payler until ``due_ms``, then delivered to ``destination``.

    ``id`` derives from the message (see :mod:`payler.identity`), so storing the same source
    message twice keeps one entry. ``headers`` are kept as the source sent them, scheduling
    headers included; they are stripped only when the message is re-injected.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    body: bytes
    headers: dict[str, Any] = Field(default_factory=dict)
    properties: MessageProperties = Field(default_factory=MessageProperties)
    source: str = ""
    destination: str
    due_ms: int
    created_ms: int
    attempts: int = 0
    last_error: str | None = None
    #: The message key where the broker has one (Kafka's record key, kept for per-key ordering).
    key: bytes | None = None
    #: Set by a source when the message could not be decoded or validated: why. Such a payload
    #: carries what could be read of the message (its raw body, always) and is only ever
    #: dead-lettered, never stored or delivered. Not stored: a spool entry never has one.
    defect: str | None = Field(default=None, exclude=True)

    def meta_json(self) -> str:
        """Headers, properties, source and key as one lossless JSON text (for storages)."""
        meta: dict[str, object] = {
            "headers": self.headers,
            "properties": self.properties.model_dump(exclude_none=True),
            "source": self.source,
        }
        if self.key is not None:
            meta["key"] = self.key
        return codec.dumps(meta)

    @classmethod
    def from_stored(
        cls,
        *,
        id: str,
        body: bytes,
        meta_json: str | bytes,
        destination: str,
        due_ms: int,
        created_ms: int,
        attempts: int,
        last_error: str | None,
    ) -> Payload:
        """Rebuild a payload from the columns a storage keeps.

        Never raises for what the metadata holds: an entry whose metadata cannot be read (written
        by hand, or by a payler with a bug) comes back with a ``defect`` and its raw metadata in
        the header :data:`STORED_META`, so that it is dead-lettered instead of failing every claim.
        """
        columns: dict[str, Any] = {
            "id": id,
            "body": bytes(body),
            "destination": destination,
            "due_ms": due_ms,
            "created_ms": created_ms,
            "attempts": attempts,
            "last_error": last_error,
        }
        try:
            meta = codec.loads(meta_json)
            return cls(
                **columns,
                headers=meta.get("headers", {}),
                properties=MessageProperties(**meta.get("properties", {})),
                source=meta.get("source", ""),
                key=meta.get("key"),
            )
        except (ValueError, TypeError, AttributeError) as exc:  # pydantic's errors are ValueErrors
            raw = meta_json if isinstance(meta_json, str) else meta_json.decode("utf-8", "replace")
            reason = " ".join(str(exc).split())[:300]
            return cls(
                **columns,
                headers={STORED_META: raw.encode("utf-8", "replace")[:65_536]},
                defect=f"the spool entry's metadata cannot be read: {reason}",
            )
