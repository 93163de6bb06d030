"""Helpers for testing your own workflows without a broker or a storage server.

    from payler.testing import FakeClock, MemoryBroker, MemoryStorage, make_payload, reset

Point a workflow's options at ``memory://NAME`` URLs (``broker_url: memory://test``,
``storage_url: memory://test``), publish with :meth:`MemoryBroker.publish`, and read what arrived
with :meth:`MemoryBroker.messages`. Call :func:`reset` between tests. These drivers are for tests:
they keep nothing across restarts.
"""

from __future__ import annotations

import uuid
from typing import Any

from payler.clock import FakeClock
from payler.drivers.brokers.memory import MemoryBroker
from payler.drivers.storages.memory import MemoryStorage
from payler.payload import MessageProperties, Payload

__all__ = ["FakeClock", "MemoryBroker", "MemoryStorage", "make_payload", "reset"]


def reset() -> None:
    """Forget every in-memory broker and storage of this process."""
    MemoryBroker.forget_all()
    MemoryStorage.forget_all()


def make_payload(
    body: bytes = b"{}",
    *,
    headers: dict[str, Any] | None = None,
    destination: str = "",
    due_ms: int = 0,
    payload_id: str | None = None,
    **properties: Any,
) -> Payload:
    """A payload as a producer would publish it: ``properties`` are message properties."""
    return Payload(
        id=payload_id or f"test:{uuid.uuid4().hex}",
        body=body,
        headers=headers or {},
        properties=MessageProperties(**properties),
        destination=destination,
        due_ms=due_ms,
        created_ms=due_ms,
    )
