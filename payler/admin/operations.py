"""The admin operations (see :mod:`payler.admin`): scheduled entries and dead letters.

Every change is logged (logger ``payler.admin``, INFO) with what it changed and who asked:
the API token's name, ``loopback`` for an unauthenticated local caller, ``cli:<user>`` for the
CLI working directly on a storage. Message bodies are never logged.

Connections are opened on first use and dropped after an outage, so that the next call opens
them again: the HTTP server keeps one :class:`Admin` for its whole life, whatever the storage
and the broker do meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Literal

from payler import codec
from payler.admin import insights
from payler.admin.scan import HEADER_SCAN_LIMIT, header_matches, scan
from payler.admin.target import AdminTarget
from payler.admin.times import due_ms_of, iso
from payler.admin.views import (
    DEFAULT_BODY_PREVIEW,
    LIST_BODY_PREVIEW,
    Count,
    DeadLetter,
    DeadLetterPage,
    DeadLetterWhere,
    DiscardRequest,
    DiscardResult,
    DueHistogram,
    Entry,
    EntryPage,
    NewMessage,
    ReasonGroups,
    ReplayFailure,
    ReplayRequest,
    ReplayResult,
    Scheduled,
    State,
    dead_letter_view,
    entry_view,
)
from payler.clock import Clock, SystemClock
from payler.drivers.base import Rejection
from payler.drivers.brokers import broker_from_url
from payler.drivers.brokers.base import (
    DEAD_LETTER_DESTINATION,
    DEAD_LETTER_ID,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE,
    DEAD_LETTER_TRUNCATED,
    DEAD_LETTERED_AT,
    Broker,
)
from payler.drivers.storages import storage_from_url
from payler.drivers.storages.base import SpoolStorage
from payler.errors import is_transient
from payler.payload import MessageProperties, Payload
from payler.reasons import ReasonClass, reason_class

log = logging.getLogger("payler.admin")

#: The most messages a dead-letter queue is looked into per call.
QUEUE_SCAN_LIMIT = 10_000
#: The headers payler adds to a dead letter: removed when it is replayed.
DEAD_LETTER_HEADERS = frozenset(
    {
        DEAD_LETTER_REASON,
        DEAD_LETTER_SOURCE,
        DEAD_LETTERED_AT,
        DEAD_LETTER_TRUNCATED,
        DEAD_LETTER_ID,
        DEAD_LETTER_DESTINATION,
        "x-payler-original-headers",
    }
)
#: Ids of messages scheduled over the API start with this (then the idempotency key).
API_ID_PREFIX = "api:"
_REPLAY_BATCH = 100
#: What is done with selected dead letters.
_Action = Literal["replay", "discard"]


class Admin:
    """The operations on one spool and broker (see the module docstring)."""

    def __init__(self, target: AdminTarget, *, clock: Clock | None = None) -> None:
        self.target = target
        self.clock: Clock = clock or SystemClock()
        self._storage: SpoolStorage | None = None
        self._broker: Broker | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Admin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        storage, broker, self._storage, self._broker = self._storage, self._broker, None, None
        for driver in (broker, storage):
            if driver is not None:
                await driver.close()

    # -- connections ---------------------------------------------------------------------------

    @asynccontextmanager
    async def storage(self) -> AsyncIterator[SpoolStorage]:
        """The spool, connected; dropped (to be opened again) after an outage."""
        async with self._lock:
            if self._storage is None:
                storage = storage_from_url(self.target.storage_url, clock=self.clock)
                await storage.connect()
                self._storage = storage
        try:
            yield self._storage
        except Exception as exc:
            if is_transient(exc):
                await self._drop("storage")
            raise

    @asynccontextmanager
    async def broker(self) -> AsyncIterator[Broker]:
        """The broker, connected; dropped (to be opened again) after an outage."""
        async with self._lock:
            if self._broker is None:
                broker = broker_from_url(
                    self.target.broker_url, exchange=self.target.exchange, clock=self.clock
                )
                await broker.connect()
                self._broker = broker
        try:
            yield self._broker
        except Exception as exc:
            if is_transient(exc):
                await self._drop("broker")
            raise

    async def _drop(self, which: str) -> None:
        async with self._lock:
            driver = self._storage if which == "storage" else self._broker
            if which == "storage":
                self._storage = None
            else:
                self._broker = None
        if driver is not None:
            await driver.close()

    # -- scheduled entries -----------------------------------------------------------------------

    async def list_entries(
        self,
        *,
        state: State = "pending",
        destination: str | None = None,
        due_from_ms: int | None = None,
        due_to_ms: int | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        header: tuple[str, str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
        body_cap: int = LIST_BODY_PREVIEW,
    ) -> EntryPage:
        """Entries in due order, filtered (see :meth:`SpoolStorage.list`). A ``header`` filter
        (name, value) has no index: it reads at most :data:`HEADER_SCAN_LIMIT` entries, and the
        page says how many it read (``scanned``) and where to continue."""
        filters: dict[str, Any] = {
            "state": state,
            "destination": destination,
            "due_from_ms": due_from_ms,
            "due_to_ms": due_to_ms,
            "message_id": message_id,
            "correlation_id": correlation_id,
        }
        async with self.storage() as storage:
            if header is None:
                page = await storage.list(**filters, limit=limit, cursor=cursor)
                items = [entry_view(p, state, body_cap) for p in page.items]
                return EntryPage(items=items, next_cursor=page.next_cursor)
            found: list[Entry] = []

            def keep(payload: Payload) -> bool:
                if not header_matches(payload.headers, *header):
                    return False
                found.append(entry_view(payload, state, body_cap))
                return True

            cursor, scanned = await scan(storage, filters, keep, limit, cursor)
            return EntryPage(items=found, next_cursor=cursor, scanned=scanned)

    async def get(self, payload_id: str, body_cap: int = DEFAULT_BODY_PREVIEW) -> Entry | None:
        async with self.storage() as storage:
            payload = await storage.get(payload_id)
            state = await storage.state_of(payload_id) if payload is not None else None
        if payload is None or state is None:
            return None
        return entry_view(payload, state, body_cap)

    async def count(self, destination: str | None = None) -> Count:
        async with self.storage() as storage:
            pending = await storage.count(destination=destination)
            dead = await storage.count(destination=destination, state="dead")
        return Count(pending=pending, dead=dead, destination=destination)

    async def cancel(self, payload_id: str, *, who: str) -> bool:
        async with self.storage() as storage:
            done = await storage.cancel(payload_id)
        if done:
            log.info("admin: %s cancelled entry %r (deleted from the spool)", who, payload_id)
        return done

    async def reschedule(
        self,
        payload_id: str,
        *,
        who: str,
        delay_ms: int | float | str | None = None,
        deliver_at: str | int | None = None,
    ) -> Entry | None:
        """Give an entry a new due time; raise :class:`~payler.errors.InvalidSchedule` for a
        time the scheduling headers would refuse (past the maximum delay, unparseable)."""
        now_ms = self.clock.now_ms()
        due_ms = due_ms_of(
            now_ms=now_ms,
            delay_ms=delay_ms,
            deliver_at=deliver_at,
            max_delay_ms=self.target.max_delay_ms,
        )
        return await self._move(payload_id, due_ms, who, "rescheduled")

    async def deliver_now(self, payload_id: str, *, who: str) -> Entry | None:
        return await self._move(payload_id, self.clock.now_ms(), who, "made due now")

    async def _move(self, payload_id: str, due_ms: int, who: str, what: str) -> Entry | None:
        async with self.storage() as storage:
            before = await storage.get(payload_id)
            if before is None or not await storage.reschedule(payload_id, due_ms):
                return None
        log.info(
            "admin: %s %s entry %r: due %s → %s", who, what, payload_id,
            iso(before.due_ms), iso(due_ms),
        )  # fmt: skip
        return await self.get(payload_id)

    async def schedule(self, message: NewMessage, *, who: str) -> Scheduled:
        """Store a new message in the spool, due at its ``delay_ms`` / ``deliver_at``.

        Its id is ``api:<idempotency key>`` (or ``api:~<random>``): storing is idempotent by
        id, so the same key twice schedules once (and, once delivered, not again within the
        dedupe window). Raises :class:`~payler.errors.InvalidSchedule` for a bad time and
        ``ValueError`` for a body or headers that cannot be stored.
        """
        now_ms = self.clock.now_ms()
        due_ms = due_ms_of(
            now_ms=now_ms,
            delay_ms=message.delay_ms,
            deliver_at=message.deliver_at,
            max_delay_ms=self.target.max_delay_ms,
        )
        if message.body_base64 is not None:
            try:
                body = base64.b64decode(message.body_base64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("body_base64 is not valid base64") from None
        else:
            body = message.body.encode("utf-8", "surrogatepass")
        headers = codec.loads(codec.dumps(message.headers))  # typed values, validated
        key = message.idempotency_key
        payload_id = f"{API_ID_PREFIX}{key}" if key else f"{API_ID_PREFIX}~{uuid.uuid4().hex}"
        payload = Payload(
            id=payload_id,
            body=body,
            headers=headers,
            properties=MessageProperties(**message.properties.model_dump()),
            source="api",
            destination=message.destination,
            due_ms=due_ms,
            created_ms=now_ms,
        )
        # An idempotency key is the client's word that a request is one operation: the same key
        # again schedules nothing, whatever it carries (so the key, not the content, is what the
        # spool compares; without a key, the id is fresh anyway).
        digests = [hashlib.sha256(payload_id.encode()).hexdigest()] if key else None
        async with self.storage() as storage:
            created = bool((await storage.store_batch([payload], digests=digests)).new)
            if not created:
                existing = await storage.get(payload_id)
                due_ms = existing.due_ms if existing is not None else due_ms
        if created:
            log.info(
                "admin: %s scheduled %r to %r, due %s (%d bytes)",
                who, payload_id, message.destination, iso(due_ms), len(body),
            )  # fmt: skip
        return Scheduled(id=payload_id, created=created, due_ms=due_ms, due_at=iso(due_ms))

    async def due_histogram(
        self, start_ms: int, end_ms: int, bucket_ms: int, destination: str | None = None
    ) -> DueHistogram:
        """Pending entries due per time bucket (see :func:`payler.admin.insights.due_histogram`)."""
        return await insights.due_histogram(self, start_ms, end_ms, bucket_ms, destination)

    # -- dead letters ------------------------------------------------------------------------------

    async def dead_letters(
        self,
        *,
        where: DeadLetterWhere | None = None,
        reason: ReasonClass | None = None,
        destination: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        body_cap: int = LIST_BODY_PREVIEW,
    ) -> DeadLetterPage:
        """The spool's dead entries (paged) and, on the first page, what the dead-letter queues
        hold (looked at without being taken), filtered by reason class and destination."""
        items: list[DeadLetter] = []
        next_cursor = None
        if where in (None, "spool"):
            async with self.storage() as storage:

                def keep(payload: Payload) -> bool:
                    if reason is not None and reason_class(payload.last_error) != reason:
                        return False
                    items.append(dead_letter_view(payload, "spool", None, body_cap))
                    return True

                filters = {"state": "dead", "destination": destination}
                next_cursor, _ = await scan(storage, filters, keep, limit, cursor)
        errors: dict[str, str] = {}
        if where in (None, "queue") and next_cursor is None and len(items) < limit:
            for queue in self.target.dead_letter_queues:
                try:
                    async with self.broker() as broker:
                        waiting = await broker.peek(
                            queue, min(limit - len(items), QUEUE_SCAN_LIMIT)
                        )
                except NotImplementedError:
                    errors[queue] = "this broker cannot look into a queue without taking from it"
                    continue
                for payload in waiting:
                    view = dead_letter_view(payload, "queue", queue, body_cap)
                    if (reason is None or view.reason_class == reason) and (
                        destination is None or view.destination == destination
                    ):
                        items.append(view)
        return DeadLetterPage(items=items[:limit], next_cursor=next_cursor, queue_errors=errors)

    async def reason_groups(self, destination: str | None = None) -> ReasonGroups:
        """Dead letters grouped by reason class (:func:`payler.admin.insights.reason_groups`)."""
        return await insights.reason_groups(self, destination)

    async def replay(
        self,
        request: ReplayRequest,
        *,
        who: str,
        progress: Callable[[int], None] | None = None,
    ) -> ReplayResult:
        """Re-inject the dead letters the request selects to where they were going, without
        payler's dead-letter headers; each is removed (from the spool, from its queue) only
        once the broker confirmed its publish, so each is replayed once.

        Where to: the destination it was being delivered to; a message dead-lettered before it
        had one (invalid scheduling headers) goes back to its source queue, scheduling headers
        and all, to be scheduled again. A minimal copy (its body dropped) is not replayed.
        """
        done, failed = await self._settle(request, "replay", progress)
        log.info(
            "admin: %s replayed %d dead letter(s) (%d failed); selection %s",
            who, done, len(failed), request.model_dump(exclude_defaults=True),
        )  # fmt: skip
        return ReplayResult(replayed=done, failed=failed)

    async def discard(
        self,
        request: DiscardRequest,
        *,
        who: str,
        progress: Callable[[int], None] | None = None,
    ) -> DiscardResult:
        """Delete the dead letters the request selects, for good: from the spool, and taken
        off their dead-letter queue (minimal copies too)."""
        done, failed = await self._settle(request, "discard", progress)
        log.info(
            "admin: %s discarded %d dead letter(s) (%d failed); selection %s",
            who, done, len(failed), request.model_dump(exclude_defaults=True),
        )  # fmt: skip
        return DiscardResult(discarded=done, failed=failed)

    async def _settle(
        self,
        request: ReplayRequest,
        action: _Action,
        progress: Callable[[int], None] | None,
    ) -> tuple[int, list[ReplayFailure]]:
        """Replay or discard the selected dead letters; how many, and the failures."""
        if not (request.ids or request.reason_class or request.destination or request.all):
            raise ValueError(
                f"select the dead letters to {action}: ids, reason_class, destination, or all"
            )
        settled, failed = 0, []
        wanted = set(request.ids or [])

        def selected(payload: Payload, reason: str | None, destination: str | None) -> bool:
            if wanted and payload.id not in wanted and payload.properties.message_id not in wanted:
                return False
            if request.reason_class and reason_class(reason) != request.reason_class:
                return False
            return not (request.destination and destination != request.destination)

        def count(n: int) -> None:
            nonlocal settled
            settled += n
            if progress is not None and n:
                progress(n)

        if request.where in (None, "spool"):
            failed += await self._replay_spool(request, action, selected, count)
        if request.where in (None, "queue") and settled < request.limit:
            failed += await self._replay_queues(request.limit - settled, action, selected, count)
        return settled, failed

    async def _act(
        self, action: _Action, batch: Sequence[Payload], *, from_queue: bool
    ) -> list[Rejection]:
        """What replaying (publishing back) or discarding (nothing to do) ``batch`` refused."""
        if action == "discard":
            return []
        async with self.broker() as broker:
            return await _republish(broker, batch, from_queue=from_queue)

    async def _replay_spool(
        self,
        request: ReplayRequest,
        action: _Action,
        selected: Callable[[Payload, str | None, str | None], bool],
        count: Callable[[int], None],
    ) -> list[ReplayFailure]:
        failed: list[ReplayFailure] = []
        left = request.limit
        cursor: str | None = None
        async with self.storage() as storage:
            while left > 0:
                if request.ids:
                    candidates = [p for i in request.ids if (p := await storage.get(i)) is not None
                                  and await storage.state_of(i) == "dead"]  # fmt: skip
                    cursor = None
                else:
                    page = await storage.list(
                        state="dead", destination=request.destination, limit=500, cursor=cursor
                    )
                    candidates, cursor = page.items, page.next_cursor
                chosen = [p for p in candidates if selected(p, p.last_error, p.destination)]
                for start in range(0, min(len(chosen), left), _REPLAY_BATCH):
                    batch = chosen[start : min(start + _REPLAY_BATCH, left)]
                    rejections = await self._act(action, batch, from_queue=False)
                    refused = {r.payload_id: r.reason for r in rejections}
                    failed += [ReplayFailure(id=i, error=e) for i, e in refused.items()]
                    done = [p for p in batch if p.id not in refused]
                    for payload in done:
                        await storage.cancel(payload.id)
                    count(len(done))
                    left -= len(batch)
                if cursor is None:
                    break
        return failed

    async def _replay_queues(
        self,
        limit: int,
        action: _Action,
        selected: Callable[[Payload, str | None, str | None], bool],
        count: Callable[[int], None],
    ) -> list[ReplayFailure]:
        failed: list[ReplayFailure] = []
        left = limit
        for queue in self.target.dead_letter_queues:
            if left <= 0:
                break
            picked, room = 0, left

            def pick(payload: Payload, room: int = room) -> bool:
                nonlocal picked
                headers = payload.headers
                reason = _str(headers.get(DEAD_LETTER_REASON))
                destination = _str(headers.get(DEAD_LETTER_DESTINATION))
                if picked >= room or not selected(payload, reason, destination):
                    return False
                if DEAD_LETTER_TRUNCATED in headers and action == "replay":
                    failed.append(
                        ReplayFailure(id=payload.id, error="a minimal copy: its body was dropped")
                    )
                    return False
                picked += 1
                return True

            async def handler(batch: Sequence[Payload]) -> list[Rejection]:
                rejections = await self._act(action, batch, from_queue=True)
                failed.extend(ReplayFailure(id=r.payload_id, error=r.reason) for r in rejections)
                return rejections

            try:
                async with self.broker() as broker:
                    taken = await broker.take(queue, QUEUE_SCAN_LIMIT, pick, handler)
            except NotImplementedError:
                failed.append(ReplayFailure(id=queue, error="this broker cannot take from a queue"))
                continue
            count(taken)
            left -= taken
        return failed


async def _republish(
    broker: Broker, batch: Sequence[Payload], *, from_queue: bool
) -> list[Rejection]:
    """Publish dead letters back: to their destination (as a delivery: scheduling headers
    stripped), else to their source (as a producer would: to be scheduled again)."""
    deliveries: list[Payload] = []
    sends: list[tuple[Payload, dict[str, Any]]] = []
    rejections: list[Rejection] = []
    for payload in batch:
        headers = dict(payload.headers)
        if from_queue:
            destination = _str(headers.get(DEAD_LETTER_DESTINATION))
            source = _str(headers.get(DEAD_LETTER_SOURCE))
            original = headers.get("x-payler-original-headers")
            if isinstance(original, str | bytes):
                with suppress(ValueError):
                    headers = {**codec.loads(original), **headers}
        else:
            destination, source = payload.destination or None, payload.source or None
        clean = {k: v for k, v in headers.items() if k not in DEAD_LETTER_HEADERS}
        if destination:
            deliveries.append(
                payload.model_copy(update={"destination": destination, "headers": clean})
            )
        elif source:
            sends.append((payload.model_copy(update={"destination": source}), clean))
        else:
            rejections.append(Rejection(payload.id, "no destination or source to replay to"))
    rejections += await broker.process(deliveries)
    rejections += await broker.send(sends)
    return rejections


def _str(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


__all__ = ["HEADER_SCAN_LIMIT", "Admin", "header_matches"]
