"""The spool storage contract, and the watch loop every storage shares.

A spool entry is a :class:`~payler.payload.Payload` plus its bookkeeping: a *visibility* time
(when it may next be claimed), a lease *token*, and a state (``pending`` or ``dead``).

Contract (every backend passes ``tests/contracts/test_storage_contract.py``):

- ``store(batch)``: durably stores the payloads, idempotently by ``id`` *and content*. Every
  entry keeps a digest of its content (:func:`~payler.identity.content_digest`: body, headers,
  properties), pending, dead and tombstone alike. A payload whose id is already stored with the
  same digest (or with none: an entry written before digests were kept) is a redelivery, left
  as it is; one with a different digest is another message that reuses the id, stored under
  :func:`~payler.identity.derived_id` (``<id>~<digest prefix>``). Returns how many were new;
  :meth:`SpoolStorage.store_batch` says which, and what was renamed. Returns only once the write
  is durable (that is what lets a source be acknowledged).
- ``admission(incoming_bytes)``: whether the spool can take that much more now (``None``), or
  why not (a file system below its free-space watermark). Ingest waits while it says why,
  holding its batch unacknowledged; delivering goes on, and frees space.
- ``max_body_bytes``: the largest body the storage takes (configurable, below the backend's
  own hard limit); ingest dead-letters a larger message instead of storing it.
- ``claim_due(now_ms, limit, lease_ms)``: atomically leases up to ``limit`` pending entries whose
  visibility time is ``<= now_ms``, earliest due first. A leased entry is invisible to other
  claimants until ``now_ms + lease_ms``; each claim carries a fresh fencing ``token``. Two
  claimants never hold the same entry at once; a crashed claimant's entries come back when the
  lease expires. It may return fewer than ``limit`` (even none) while due entries remain, when a
  concurrent claimant took them first.
- ``ack(claims)``: settles each entry as delivered **only if** its token is still the claim's
  (a stale holder, whose lease expired and was re-claimed, settles nothing). Returns how many.
  A delivered entry leaves a *tombstone* (its id, no body) for at least ``dedupe_window_ms``:
  ``store`` ignores its id meanwhile, so a source message redelivered after a crash between the
  store and the source's acknowledgement is not spooled (and delivered) again even when its
  first copy was already delivered. Tombstones are invisible to every other operation and are
  purged once expired (``claim_due`` purges them now and then).
- ``retry(claim, due_ms, reason)``: under the same token check, makes the entry pending again at
  ``due_ms`` (its new due time) with ``attempts + 1`` and ``last_error = reason``.
- ``dead_letter(claim, reason)``: under the same token check, parks the entry as ``dead`` with the
  reason: kept for inspection, never claimed again.
- ``park(items)``: durably stores messages directly as ``dead``, each with its reason: what the
  dead-letter destination refused even in its minimal form is kept here, never dropped. An id
  already taken is parked under that id plus a suffix (``!dead-<random>``).
- ``next_visible_ms()``: the earliest time any pending entry may be claimed, ``None`` if none.
- Wake-ups (optional): a backend whose server can tell it that *another* process stored an entry
  (PostgreSQL's ``LISTEN``/``NOTIFY``) implements ``_start_wakeups`` and ``_stop_wakeups`` and
  calls :meth:`SpoolStorage._stored_elsewhere` with the earliest due time it heard of: this
  process's watchers then wake at once instead of at their poll bound. Without it (the default)
  entries stored elsewhere are seen within ``max_poll_interval_s``.
- Admin: ``get``, ``state_of``, ``list`` (filters: destination, due range, state, message id,
  correlation id; cursor pagination in due order), ``count``, ``count_due`` (entries due in a
  half-open range ``[start, end)``, through the due-time index: the console's chart of what is
  due per time bucket), ``cancel`` (delete),
  ``reschedule`` (new due time, lease dropped: a delivery in progress of that entry can then no
  longer settle it, and it is delivered again when due). Leased entries count as ``pending``.
- Lookups by message id and correlation id (``properties.message_id``/``correlation_id``) go
  through an index of each backend (``_lookup``), never a scan of the spool; one value matches
  at most :data:`LOOKUP_LIMIT` entries (more are not returned). A spool written before these
  indexes existed is indexed when it is first opened.

Backends implement the ``_``-prefixed hooks; the public methods here validate arguments and keep
the shared bookkeeping (the local wake-up of watchers when a sooner entry is stored).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from payler.clock import Clock, SystemClock
from payler.drivers.base import BaseDriver, Handler, Rejection
from payler.drivers.storages.dedupe import Stored
from payler.errors import ConfigError
from payler.identity import content_digest
from payler.metrics import Metrics, lateness_ms
from payler.payload import Payload

log = logging.getLogger("payler.storage")

EntryState = Literal["pending", "dead"]
#: The message properties the spool indexes, for lookups.
LookupField = Literal["message_id", "correlation_id"]
LOOKUP_FIELDS: tuple[LookupField, ...] = get_args(LookupField)
#: The most entries one message id or correlation id lookup returns.
LOOKUP_LIMIT = 10_000
#: How long a delivered entry's id keeps a redelivered copy of its source message out.
DEFAULT_DEDUPE_WINDOW_MS = 600_000
#: How long a cancelled watch loop still waits for a batch it was settling.
SETTLE_TIMEOUT_S = 10.0
#: How often ``claim_due`` purges expired tombstones.
PURGE_INTERVAL_MS = 60_000
#: The default body-size limit of every storage (a backend with a lower hard limit lowers it).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: The default free-space watermark of file-based storages: below it, ingest pauses.
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Claim:
    """A leased spool entry: the payload and the fencing token that proves the lease."""

    payload: Payload
    token: str


@dataclass(frozen=True, slots=True)
class Page:
    """One page of an admin listing; pass ``next_cursor`` back to get the next one."""

    items: list[Payload]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """How a storage's watch loop (:meth:`SpoolStorage.serve`) claims and waits.

    The loop sleeps until the earliest visible entry, but never longer than
    ``max_poll_interval_s`` (entries stored by *other* processes wake no one here, unless the
    storage has wake-ups of its own: PostgreSQL's ``NOTIFY``) and never less than
    ``min_poll_interval_s`` (so a storage error or a clock skew cannot make it spin).
    A transient rejection is retried after ``retry_base_s * 2**attempts`` seconds (with jitter),
    capped at ``retry_max_s``.
    """

    batch_size: int = 100
    lease_ms: int = 30_000
    max_poll_interval_s: float = 1.0
    min_poll_interval_s: float = 0.001
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, kept in sets
class _Watcher:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    wake_at_ms: int | None = None


class _DueBoard:
    """Wakes this process's watchers of a storage when a sooner entry is stored locally."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[_Watcher]] = {}

    def add(self, key: str, watcher: _Watcher) -> None:
        self._watchers.setdefault(key, set()).add(watcher)

    def remove(self, key: str, watcher: _Watcher) -> None:
        self._watchers.get(key, set()).discard(watcher)

    def stored(self, key: str, earliest_due_ms: int) -> None:
        for watcher in self._watchers.get(key, ()):
            if watcher.wake_at_ms is None or earliest_due_ms < watcher.wake_at_ms:
                watcher.wake.set()


_board = _DueBoard()


async def _finish(settling: asyncio.Future[None]) -> None:
    """Wait for a batch's settling (ack, retries, dead letters) to end; its error is raised.

    A cancellation does not stop it (nor the storage's close under it: that would cost a
    duplicate of every entry of the batch): it is waited for, at most :data:`SETTLE_TIMEOUT_S`,
    then the cancellation goes on.
    """
    try:
        await asyncio.shield(settling)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(settling, SETTLE_TIMEOUT_S)
        raise


class SpoolStorage(BaseDriver):
    """A spool storage; see the module docstring for the contract."""

    #: URL schemes this backend serves (``sqlite``, ``mongodb``, ...).
    schemes: tuple[str, ...] = ()
    #: The largest body this storage takes (None: no limit below the broker's own); the
    #: ``max_body_bytes`` argument overrides it. A larger message is dead-lettered at ingest,
    #: with the reason, instead of failing its whole batch for ever.
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    #: The largest body the backend can hold at all: ``max_body_bytes`` may not be set above.
    hard_max_body_bytes: int | None = None
    #: A file-based storage pauses ingest below this many free bytes (see :meth:`admission`).
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        dedupe_window_ms: int = DEFAULT_DEDUPE_WINDOW_MS,
        max_body_bytes: int | None = None,
        min_free_bytes: int | None = None,
    ) -> None:
        self.url = url
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.dedupe_window_ms = dedupe_window_ms
        if max_body_bytes is not None:
            hard = self.hard_max_body_bytes
            if max_body_bytes <= 0 or (hard is not None and max_body_bytes > hard):
                most = "" if hard is None else f", at most {hard} ({type(self).__name__}'s limit)"
                raise ConfigError(
                    f"max_body_bytes {max_body_bytes}: expected a positive number of bytes{most}"
                )
            self.max_body_bytes = max_body_bytes
        if min_free_bytes is not None:
            if min_free_bytes < 0:
                raise ConfigError(f"min_free_bytes {min_free_bytes}: expected 0 or more")
            self.min_free_bytes = min_free_bytes
        self._next_purge_ms = 0

    # -- the contract ------------------------------------------------------------------------

    async def store(self, batch: Sequence[Payload]) -> int:
        """Durably store ``batch``, idempotently by id and content; return how many were new."""
        return len((await self.store_batch(batch)).new)

    async def store_batch(
        self, batch: Sequence[Payload], *, digests: Sequence[str] | None = None
    ) -> Stored:
        """Durably store ``batch``, idempotently by id and content; say what became of each.

        ``digests`` (one per payload) tell a redelivery from a reused id: by default each
        payload's :func:`~payler.identity.content_digest`. A caller whose ids are idempotency
        keys (the same key is the same operation, whatever it carries) passes a digest of the
        key instead. Raises ``ValueError``/``TypeError`` when a payload's headers cannot be
        stored at all.
        """
        if not batch:
            return Stored()
        if digests is None:
            digests = [content_digest(p) for p in batch]
        elif len(digests) != len(batch):
            raise ValueError("one digest per payload")
        with self.metrics.timer("store_batch_seconds"):
            stored = await self._store(batch, digests)
        _board.stored(self.url, min(p.due_ms for p in batch))
        return stored

    async def admission(self, incoming_bytes: int = 0) -> str | None:
        """``None`` if the spool can take ``incoming_bytes`` more now, else why not.

        A file-based storage watches the free space of its file system (counting the room
        freed inside the spool by delivered entries): below :attr:`min_free_bytes` it says so,
        and ingest waits, its batch unacknowledged, while delivering goes on. Storages on a
        server leave that to the server (a refused write is an outage, retried).
        """
        return None

    async def claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        """Lease up to ``limit`` entries visible at ``now_ms``, earliest due first."""
        if limit <= 0 or lease_ms <= 0:
            raise ValueError("limit and lease_ms must be positive")
        if now_ms >= self._next_purge_ms:
            self._next_purge_ms = now_ms + PURGE_INTERVAL_MS
            await self._purge_tombstones(now_ms)
        return await self._claim_due(now_ms, limit, lease_ms)

    async def ack(self, claims: Sequence[Claim]) -> int:
        """Settle the claimed entries whose lease is still held as delivered; return how many."""
        if not claims:
            return 0
        return await self._ack(claims, self.clock.now_ms() + self.dedupe_window_ms)

    async def retry(self, claim: Claim, due_ms: int, reason: str, *, counted: bool = True) -> bool:
        """Make a claimed entry pending again at ``due_ms`` with ``reason`` as its last error;
        False if the lease was lost.

        ``counted`` (the default) adds one to its attempts: the destination refused *this*
        payload. ``counted=False`` is for an outage, when the delivery of the whole batch failed
        and nothing is known of this payload: a long outage must not use up its attempts and
        have it dead-lettered once the broker is back."""
        attempts = claim.payload.attempts + (1 if counted else 0)
        done = await self._retry(claim, due_ms, reason, attempts)
        if done:
            _board.stored(self.url, due_ms)
        return done

    async def dead_letter(self, claim: Claim, reason: str) -> bool:
        """Park a claimed entry as dead with ``reason``; False if the lease was lost."""
        return await self._dead_letter(claim, reason)

    async def park(self, items: Sequence[tuple[Payload, str]]) -> builtins.list[str]:
        """Store each payload directly as dead with its reason; return the ids it got."""
        ids = []
        for payload, reason in items:
            entry = payload.model_copy(update={"last_error": reason})
            digests = [content_digest(entry)]
            stored = await self._store([entry], digests, "dead")
            if not stored.new:  # the id is taken by this very message: park it beside
                entry.id = f"{payload.id}!dead-{new_token()[:12]}"
                stored = await self._store([entry], digests, "dead")
            ids += stored.new
        return ids

    async def next_visible_ms(self) -> int | None:
        """The earliest time a pending entry may be claimed; ``None`` when there is none."""
        return await self._next_visible_ms()

    async def get(self, payload_id: str) -> Payload | None:
        """The entry with this id (pending or dead), or ``None``."""
        return await self._get(payload_id)

    async def state_of(self, payload_id: str) -> EntryState | None:
        """The state of the entry with this id (``pending`` or ``dead``), or ``None``."""
        return await self._state_of(payload_id)

    async def list(
        self,
        *,
        destination: str | None = None,
        due_from_ms: int | None = None,
        due_to_ms: int | None = None,
        state: EntryState = "pending",
        limit: int = 100,
        cursor: str | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Page:
        """Entries in due order, filtered; ``cursor`` from the previous page continues it.

        With ``message_id`` or ``correlation_id``, the entries come from that index (at most
        :data:`LOOKUP_LIMIT` of them), the other filters applied to them.
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        if message_id is None and correlation_id is None:
            return await self._list(destination, due_from_ms, due_to_ms, state, limit, cursor)
        field: LookupField = "message_id" if message_id is not None else "correlation_id"
        found = await self._lookup(field, message_id or correlation_id or "", state, LOOKUP_LIMIT)
        after = decode_cursor(cursor) if cursor else None
        matching = sorted(
            (p for p in found
             if (message_id is None or p.properties.message_id == message_id)
             and (correlation_id is None or p.properties.correlation_id == correlation_id)
             and (destination is None or p.destination == destination)
             and (due_from_ms is None or p.due_ms >= due_from_ms)
             and (due_to_ms is None or p.due_ms <= due_to_ms)
             and (after is None or (p.due_ms, p.id) > after)),
            key=lambda p: (p.due_ms, p.id),
        )  # fmt: skip
        items = matching[:limit]
        more = len(matching) > limit
        return Page(items, encode_cursor(items[-1].due_ms, items[-1].id) if more else None)

    async def count(self, *, destination: str | None = None, state: EntryState = "pending") -> int:
        """How many entries, filtered."""
        return await self._count(destination, state)

    async def count_due(
        self,
        start_ms: int | None,
        end_ms: int | None,
        *,
        destination: str | None = None,
        state: EntryState = "pending",
    ) -> int:
        """How many entries are due in ``[start_ms, end_ms)`` (``None``: unbounded on that side),
        counted through the backend's due-time index (no entry is read)."""
        if start_ms is not None and end_ms is not None and end_ms < start_ms:
            raise ValueError("end_ms is before start_ms")
        return await self._count_due(destination, state, start_ms, end_ms)

    async def cancel(self, payload_id: str) -> bool:
        """Delete an entry whatever its state; False if there was none."""
        return await self._cancel(payload_id)

    async def reschedule(self, payload_id: str, due_ms: int) -> bool:
        """Give a pending or dead entry a new due time (it becomes pending, unleased)."""
        done = await self._reschedule(payload_id, due_ms)
        if done:
            _board.stored(self.url, due_ms)
        return done

    # -- the driver side -----------------------------------------------------------------------

    async def process(self, batch: Sequence[Payload]) -> builtins.list[Rejection]:
        """As a destination, a storage stores: every payload is taken once this returns."""
        await self.store(batch)
        return []

    async def serve(
        self, handler: Handler, stop: asyncio.Event, *, settings: WatchSettings | None = None
    ) -> None:
        """The watch loop: claim due entries, hand them to ``handler``, settle each.

        Entries the handler did not reject are deleted (their lease permitting); a transient
        rejection is retried with backoff, a permanent one is parked as dead.
        """
        settings = settings or WatchSettings()
        watcher = _Watcher()
        # The settling (ack) of the batch handed over last runs while the next batch is claimed:
        # a storage that commits writes together (SQLite) then commits that ack and the claim in
        # one transaction. It is finished before the next batch is handed over (so a kill costs
        # at most one batch published and not deleted, as before), before the loop sleeps and
        # before it returns.
        settling: asyncio.Future[None] | None = None
        try:
            # Before the first query: a store that commits while it runs must still wake us.
            await self._start_wakeups()
            _board.add(self.url, watcher)
            while not stop.is_set():
                now_ms = self.clock.now_ms()
                claims = await self.claim_due(now_ms, settings.batch_size, settings.lease_ms)
                if claims:
                    self.metrics.observe_lateness(
                        lateness_ms(now_ms, c.payload.due_ms, c.payload.created_ms) for c in claims
                    )
                    if settling is not None:
                        last, settling = settling, None
                        await _finish(last)
                    settling = await self._hand_over(handler, claims, settings)
                    continue
                if settling is not None:
                    last, settling = settling, None
                    await _finish(last)
                await self._wait_for_due(watcher, stop, settings)
            if settling is not None:  # stopped: the last batch's settling, its error raised
                last, settling = settling, None
                await _finish(last)
        finally:
            try:
                if settling is None:
                    pass
                elif not settling.done():  # the loop failed: finish it all the same
                    with contextlib.suppress(Exception):
                        await _finish(settling)
                elif not settling.cancelled():
                    settling.exception()  # retrieved: the loop's own error is the one raised
            finally:
                _board.remove(self.url, watcher)
                await asyncio.shield(self._stop_wakeups())

    def _stored_elsewhere(self, earliest_due_ms: int) -> None:
        """For backends: another process stored (or rescheduled) entries, the earliest due at
        ``earliest_due_ms``; wake this process's watchers of this spool that sleep past it."""
        _board.stored(self.url, earliest_due_ms)

    async def _hand_over(
        self,
        handler: Handler,
        claims: Sequence[Claim],
        settings: WatchSettings,
    ) -> asyncio.Future[None]:
        """Hand ``claims`` to ``handler``; start their settling (returned: the caller finishes
        it with :func:`_finish`)."""
        try:
            handed = await handler([c.payload for c in claims])
        except Exception as exc:
            # The destination failed as a whole (a lost connection): the outcome of each publish
            # is unknown. Give the entries back now, with backoff, instead of leaving them leased
            # until the lease expires; then let the error restart the workflow.
            reason = f"delivery failed: {type(exc).__name__}: {exc}"
            failed = {c.payload.id: Rejection(c.payload.id, reason) for c in claims}
            # Not counted as attempts: an outage says nothing about these payloads, and a long one
            # must not dead-letter them. The workflow's restart backoff bounds the cycles.
            with contextlib.suppress(Exception):  # the storage may be down too: leases expire
                await asyncio.shield(self._settle([], claims, failed, settings, counted=False))
            raise
        rejections = {r.payload_id: r for r in handed}
        done = [c for c in claims if c.payload.id not in rejections]
        confirmed_ms = self.clock.now_ms()
        self.metrics.observe(
            "lateness_seconds", [(confirmed_ms - c.payload.due_ms) / 1000 for c in done]
        )
        # Settling runs to its end: once the destination has the payloads, a cancellation (the
        # grace period running out) must not stop us between the publish and the delete, nor
        # let the storage be closed under it; that would cost a duplicate of every entry.
        return asyncio.ensure_future(self._settle(done, claims, rejections, settings))

    async def _settle(
        self,
        done: Sequence[Claim],
        claims: Sequence[Claim],
        rejections: dict[str, Rejection],
        settings: WatchSettings,
        *,
        counted: bool = True,
    ) -> None:
        deleted = await self.ack(done)
        if deleted < len(done):
            log.warning(
                "%d delivered entries had lost their lease (another instance re-claimed them); "
                "they may be delivered twice",
                len(done) - deleted,
            )
        for claim in claims:
            rejection = rejections.get(claim.payload.id)
            if rejection is None:
                continue
            if rejection.permanent:
                await self.dead_letter(claim, rejection.reason)
            else:
                delay_s = min(
                    settings.retry_max_s, settings.retry_base_s * 2**claim.payload.attempts
                )
                delay_s *= random.uniform(0.8, 1.2)
                await self.retry(
                    claim,
                    self.clock.now_ms() + round(delay_s * 1000),
                    rejection.reason,
                    counted=counted,
                )

    async def _wait_for_due(
        self, watcher: _Watcher, stop: asyncio.Event, settings: WatchSettings
    ) -> None:
        now_ms = self.clock.now_ms()
        horizon_ms = now_ms + round(settings.max_poll_interval_s * 1000)
        # Listen before asking: a store committed while the query runs must still wake us.
        watcher.wake.clear()
        watcher.wake_at_ms = None  # any store wakes us until we know when to wake
        next_ms = await self.next_visible_ms()
        wake_at_ms = horizon_ms if next_ms is None else min(next_ms, horizon_ms)
        if watcher.wake.is_set():
            watcher.wake_at_ms = None
            return
        watcher.wake_at_ms = wake_at_ms
        delay_s = max(settings.min_poll_interval_s, (wake_at_ms - now_ms) / 1000)
        sleeper = asyncio.ensure_future(self.clock.sleep(delay_s))
        waiters = [sleeper, asyncio.ensure_future(watcher.wake.wait())]
        waiters.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            watcher.wake_at_ms = None

    # -- backend hooks ---------------------------------------------------------------------------

    async def _start_wakeups(self) -> None:
        """Start hearing of stores made by other processes (a watch loop begins); call
        :meth:`_stored_elsewhere` for each. Called once per watch loop, and followed by one
        :meth:`_stop_wakeups` even if it raised (a cancellation); must not raise for a missing
        feature (the loop then polls). Default: nothing to hear, the loop polls."""

    async def _stop_wakeups(self) -> None:
        """Undo one :meth:`_start_wakeups` (a watch loop ends). Default: nothing."""

    @abstractmethod
    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        """Insert the entries that are new, in ``state`` (``dead``: with the payload's
        ``last_error`` as reason, never claimed), each with its content digest (``digests[i]``
        is ``batch[i]``'s); an id taken by other content goes under its derived id
        (:func:`plan_store` is the rule)."""

    @abstractmethod
    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> builtins.list[Claim]: ...

    @abstractmethod
    async def _ack(self, claims: Sequence[Claim], tombstone_until_ms: int) -> int: ...

    @abstractmethod
    async def _purge_tombstones(self, now_ms: int) -> None: ...

    @abstractmethod
    async def _retry(self, claim: Claim, due_ms: int, reason: str, attempts: int) -> bool:
        """Under the claim's lease: pending again at ``due_ms``, ``attempts`` (the new count,
        set, not added: the lease makes the claim's count the entry's), ``last_error = reason``."""

    @abstractmethod
    async def _dead_letter(self, claim: Claim, reason: str) -> bool: ...

    @abstractmethod
    async def _next_visible_ms(self) -> int | None: ...

    @abstractmethod
    async def _get(self, payload_id: str) -> Payload | None: ...

    @abstractmethod
    async def _state_of(self, payload_id: str) -> EntryState | None: ...

    @abstractmethod
    async def _list(
        self,
        destination: str | None,
        due_from_ms: int | None,
        due_to_ms: int | None,
        state: EntryState,
        limit: int,
        cursor: str | None,
    ) -> Page: ...

    @abstractmethod
    async def _count(self, destination: str | None, state: EntryState) -> int: ...

    @abstractmethod
    async def _count_due(
        self, destination: str | None, state: EntryState, start_ms: int | None, end_ms: int | None
    ) -> int:
        """Entries in ``state`` (going to ``destination``) with ``start_ms <= due_ms < end_ms``."""

    @abstractmethod
    async def _lookup(
        self, field: LookupField, value: str, state: EntryState, limit: int
    ) -> builtins.list[Payload]:
        """Up to ``limit`` entries in ``state`` whose property ``field`` is ``value``, found
        through an index (in any order)."""

    @abstractmethod
    async def _cancel(self, payload_id: str) -> bool: ...

    @abstractmethod
    async def _reschedule(self, payload_id: str, due_ms: int) -> bool: ...


def new_token() -> str:
    """A fresh fencing token: unique across processes and restarts."""
    return f"{random.getrandbits(128):032x}"


def encode_cursor(due_ms: int, payload_id: str) -> str:
    """A listing cursor: the (due, id) position after which the next page starts."""
    return f"{due_ms}:{payload_id}"


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Inverse of :func:`encode_cursor`; raise ``ValueError`` on a cursor we did not make."""
    due, sep, payload_id = cursor.partition(":")
    if not sep or not due.lstrip("-").isdigit():
        raise ValueError(f"not a listing cursor: {cursor!r}")
    return int(due), payload_id


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MIN_FREE_BYTES",
    "LOOKUP_FIELDS",
    "LOOKUP_LIMIT",
    "Claim",
    "EntryState",
    "LookupField",
    "Page",
    "SpoolStorage",
    "Stored",
    "WatchSettings",
    "decode_cursor",
    "encode_cursor",
    "new_token",
]
