"""Spool ids: how a payload's id derives from its source message.

The id is what makes spooling idempotent: storing the same source message twice (redelivered
after a crash between the store and the acknowledgement) keeps one entry.

- A message with a message id gets ``<scheme>:<source>:<message_id>``: the same message
  redelivered gets the same id. Two *different* messages sent with one message id to one
  source are taken as one: producers must keep message ids unique.
- Kafka records and Redis stream entries are identified by their position (topic, partition
  and offset; stream and entry id): stable and unique.
- An AMQP message without a message id has no stable identity that is also unique: two
  deliveries of identical bytes may be one message redelivered or two messages sent. The
  ``process_queue`` option ``spool_id`` chooses: ``random`` (the default) gives each delivery
  a fresh id — a crash between store and ack can then spool a message twice (at least once,
  never lost); ``content`` uses ``<scheme>:<source>:#<digest>``, a SHA-256 of body, headers and
  properties — redeliveries are recognised, but identical messages arriving within the dedupe
  window (tombstones of delivered entries) are merged into one: only for producers whose
  messages are never identical. (aio-pika and aiormq give every publish a random message id,
  so their messages always take the first rule.)

A message id can be *reused* by a producer for a different message. Every spool entry keeps a
:func:`content_digest`: when a message comes with an id the spool already holds, the same digest
means a redelivery (not spooled again), a different one a new message, spooled under
:func:`derived_id`.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from payler import codec
from payler.payload import Payload


def spool_id(scheme: str, source: str, message_id: str | None, body: bytes, meta_json: str) -> str:
    """The stable spool id of a message taken from ``source`` (see the module docstring)."""
    if message_id:
        return f"{scheme}:{source}:{message_id}"
    digest = hashlib.sha256()
    digest.update(body)
    digest.update(b"\x00")
    digest.update(meta_json.encode())
    return f"{scheme}:{source}:#{digest.hexdigest()[:40]}"


def is_content_id(payload_id: str) -> bool:
    """Whether ``payload_id`` is a content digest (a message that had no message id)."""
    return payload_id.rpartition(":")[2].startswith("#")


def random_spool_id(scheme: str, source: str) -> str:
    """A fresh id, for ``spool_id: random``."""
    return f"{scheme}:{source}:~{uuid.uuid4().hex}"


#: Headers a broker adds or changes when it delivers a message again (RabbitMQ's quorum queues
#: count deliveries): a redelivery is the same message, so they are no part of its content.
REDELIVERY_HEADERS = frozenset({"x-delivery-count", "x-acquired-count"})
#: How many hex digits of the content digest a derived id carries (64 bits).
DERIVED_ID_DIGITS = 16


def content_digest(payload: Payload) -> str:
    """A SHA-256 of what makes a message itself: body, headers, properties and key.

    Not the id, source, destination, due time or attempts (a redelivered message may be
    scheduled differently), nor :data:`REDELIVERY_HEADERS`. Raises ``ValueError`` or
    ``TypeError`` for headers no storage can hold (as :meth:`Payload.meta_json` does).
    """
    content = {
        "headers": {k: v for k, v in payload.headers.items() if k not in REDELIVERY_HEADERS},
        "properties": payload.properties.model_dump(exclude_none=True),
        "key": payload.key,
    }
    # Sorted keys: the digest must not depend on the order a client happened to set headers.
    text = json.dumps(codec.to_jsonable(content), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.body)
    digest.update(b"\x00")
    digest.update(text.encode())  # ensure_ascii (the default): lone surrogates cannot fail here
    return digest.hexdigest()


def derived_id(payload_id: str, digest: str) -> str:
    """The id a message is spooled under when its own id names a *different* message already
    spooled, dead or recently delivered (a producer reusing message ids): ``<id>~<digest>``.

    Stable: the same reused message redelivered gets the same derived id, and is recognised.
    """
    return f"{payload_id}~{digest[:DERIVED_ID_DIGITS]}"
