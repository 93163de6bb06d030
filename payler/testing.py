"""Helpers for testing your own workflows and handlers without a broker or a storage server.

    from payler.testing import FakeClock, MemoryBroker, MemoryStorage, make_payload, reset
    from payler.testing import TestClient   # run an Application's handlers, no broker at all

Point a workflow's options at ``memory://NAME`` URLs (``broker_url: memory://test``,
``storage_url: memory://test``), publish with :meth:`MemoryBroker.publish`, and read what arrived
with :meth:`MemoryBroker.messages`. Call :func:`reset` between tests. These drivers are for tests:
they keep nothing across restarts.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from payler.clock import FakeClock
from payler.drivers.brokers.memory import MemoryBroker
from payler.drivers.storages.memory import MemoryStorage
from payler.metrics import Metrics
from payler.payload import MessageProperties, Payload
from payler.processing.application import Application, Delivery
from payler.processing.runner import run_all
from payler.processing.serializers import find_serializer

__all__ = [
    "FakeClock",
    "Handled",
    "MemoryBroker",
    "MemoryStorage",
    "Sent",
    "TestClient",
    "make_payload",
    "reset",
]


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


@dataclass(frozen=True, slots=True)
class Sent:
    """An output as it would be published: on output broker ``broker``, to ``destination``,
    due at ``due_ms`` (its publish time, for an immediate one)."""

    broker: str
    destination: str
    payload: Payload
    due_ms: int

    @property
    def body(self) -> bytes:
        return self.payload.body

    @property
    def headers(self) -> dict[str, Any]:
        return self.payload.headers

    @property
    def content_type(self) -> str | None:
        return self.payload.properties.content_type

    def json(self) -> Any:
        """The body decoded as JSON."""
        return orjson.loads(self.payload.body)


@dataclass(slots=True)
class Handled:
    """What one run of a message came to, as the ``handle`` workflow would make it durable."""

    handler: str
    #: Published now.
    outputs: list[Sent] = field(default_factory=list)
    #: Kept in the spool until their due time (``advance`` the clock to see them published).
    delayed: list[Sent] = field(default_factory=list)
    #: When the message runs again (it failed), epoch ms; None if it does not.
    retry_at_ms: int | None = None
    #: Why it was dead-lettered; None if it was not.
    dead_letter: str | None = None
    #: The error of a failed run (retried, or dead-lettered after the last attempt).
    error: str | None = None
    attempt: int = 1


class TestClient:
    """Run an :class:`~payler.processing.Application` without any broker or storage.

        client = TestClient(app)                     # a FakeClock of its own
        handled = await client.send({"id": 7}, headers={"type": "order"})
        assert handled.outputs[0].json() == {"order_id": 7}
        retried = await client.advance(60_000)       # due retries run, due outputs publish

    Messages go through the same routing, decoding, handler call, output encoding and retry
    decisions as in the ``handle`` workflow; what the workflow would publish, store and
    dead-letter is recorded instead: :attr:`published` (every output published so far, delayed
    ones once due), :attr:`scheduled` (delayed outputs and retries waiting in the "spool"),
    :attr:`dead_letters` (``(payload, reason)``).
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        app: Application,
        *,
        clock: FakeClock | None = None,
        default_output: str = "source",
        outputs: Sequence[str] = (),
        source: str = "test",
    ) -> None:
        self.app = app
        self.clock = clock or FakeClock()
        self.default_output = default_output
        self.brokers = frozenset({"source", default_output, *outputs})
        self.source = source
        self.metrics = Metrics()
        self.published: list[Sent] = []
        self.scheduled: list[tuple[int, Sent | Delivery]] = []
        self.dead_letters: list[tuple[Payload, str]] = []

    async def send(
        self,
        body: Any,
        *,
        headers: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        key: bytes | str | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Handled:
        """Run one message through the application, as if it came from the source. ``body``:
        bytes as they are; a str as text; anything else encoded with the application's default
        content type (JSON)."""
        raw, content_type = self._encode(body, content_type)
        now_ms = self.clock.now_ms()
        payload = Payload(
            id=f"test:{self.source}:{message_id or uuid.uuid4().hex}",
            body=raw,
            headers=dict(headers or {}),
            properties=MessageProperties(
                content_type=content_type, message_id=message_id, correlation_id=correlation_id
            ),
            source=self.source,
            destination="",
            due_ms=now_ms,
            created_ms=now_ms,
            key=key.encode() if isinstance(key, str) else key,
        )
        return await self._run(Delivery(payload, payload.id, 1))

    async def advance(self, milliseconds: int) -> list[Handled]:
        """Move the clock; publish the delayed outputs now due, and run the retries now due (in
        due order). Returns what each retry came to."""
        self.clock.advance(milliseconds)
        results: list[Handled] = []
        while True:
            now_ms = self.clock.now_ms()
            due = sorted((e for e in self.scheduled if e[0] <= now_ms), key=lambda e: e[0])
            if not due:
                return results
            entry = due[0]
            self.scheduled.remove(entry)
            if isinstance(entry[1], Sent):
                self.published.append(entry[1])
            else:
                results.append(await self._run(entry[1]))

    @property
    def retries(self) -> list[tuple[int, Delivery]]:
        """The retries waiting, with their due times."""
        return [(due, d) for due, d in self.scheduled if isinstance(d, Delivery)]

    async def _run(self, delivery: Delivery) -> Handled:
        [outcome] = await run_all(
            self.app,
            [delivery],
            concurrency=1,
            order_by=None,
            clock=self.clock,
            metrics=self.metrics,
            brokers=self.brokers,
        )
        handled = Handled(
            outcome.handler, error=outcome.error, dead_letter=outcome.dead, attempt=delivery.attempt
        )
        now_ms = self.clock.now_ms()
        for broker, output in outcome.outputs:
            sent = Sent(broker or self.default_output, output.destination, output, output.due_ms)
            if output.due_ms > now_ms:
                handled.delayed.append(sent)
                self.scheduled.append((output.due_ms, sent))
            else:
                handled.outputs.append(sent)
                self.published.append(sent)
        if outcome.retry_at_ms is not None:
            handled.retry_at_ms = outcome.retry_at_ms
            again = Delivery(
                delivery.payload.model_copy(update={"last_error": outcome.error}),
                delivery.origin,
                delivery.attempt + 1,
            )
            self.scheduled.append((outcome.retry_at_ms, again))
        if outcome.dead is not None:
            self.dead_letters.append((delivery.payload, outcome.dead))
        return handled

    def _encode(self, body: Any, content_type: str | None) -> tuple[bytes, str | None]:
        if isinstance(body, bytes):
            return body, content_type
        if isinstance(body, str) and content_type is None:
            return body.encode(), "text/plain; charset=utf-8"
        serializer = find_serializer(content_type) if content_type else self.app.default_serializer
        if serializer is None:
            raise ValueError(f"no serializer for content type {content_type!r}")
        return serializer.encode(body), content_type or serializer.content_type
