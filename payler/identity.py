"""Spool ids: how a payload's id derives from its source message.

The id is what makes spooling idempotent: storing the same source message twice (redelivered
after a crash between the store and the acknowledgement) keeps one entry.

- A message with a message id gets ``<scheme>:<source>:<message_id>``: the same message
  redelivered gets the same id. Two *different* messages sent with one message id to one
  source are taken as one: producers must keep message ids unique.
- A message without one gets ``<scheme>:<source>:#<digest>``, a SHA-256 of its body, headers
  and properties: stable across redeliveries too. The price: two byte-identical messages
  (same body, headers and properties, timestamp included) pending in the spool *at the same
  time* are delivered once. Where that matters, set message ids, or set the workflow option
  ``spool_id: random`` (then a crash between store and ack can spool a message twice: at least
  once, never lost).
"""

from __future__ import annotations

import hashlib
import uuid


def spool_id(scheme: str, source: str, message_id: str | None, body: bytes, meta_json: str) -> str:
    """The stable spool id of a message taken from ``source`` (see the module docstring)."""
    if message_id:
        return f"{scheme}:{source}:{message_id}"
    digest = hashlib.sha256()
    digest.update(body)
    digest.update(b"\x00")
    digest.update(meta_json.encode())
    return f"{scheme}:{source}:#{digest.hexdigest()[:40]}"


def random_spool_id(scheme: str, source: str) -> str:
    """A fresh id, for ``spool_id: random``."""
    return f"{scheme}:{source}:~{uuid.uuid4().hex}"
