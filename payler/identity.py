"""Spool ids: how a payload's id derives from its source message.

The id is what makes spooling idempotent: storing the same source message twice (redelivered
after a crash between the store and the acknowledgement) keeps one entry.

- An AMQP message with a ``message_id`` gets ``amqp:<queue>:<message_id>``: the same message
  redelivered gets the same id. Producers that want exactly-once spooling set message ids; two
  *different* messages sent with one message id to one queue are taken as one.
- A message without a ``message_id`` gets a random id. A redelivery then spools it again, so a
  crash between store and ack can deliver it twice — at least once, never lost. (Deriving an id
  from the content instead would merge two legitimately identical messages into one: a loss.)
"""

from __future__ import annotations

import uuid


def amqp_spool_id(queue: str, message_id: str | None) -> str:
    """The spool id of a message taken from RabbitMQ queue ``queue``."""
    if message_id:
        return f"amqp:{queue}:{message_id}"
    return f"amqp:{queue}:~{uuid.uuid4().hex}"
