"""An in-memory spool storage: for users' own tests and fast unit tests of the core.

It keeps nothing across restarts, so it is never a production storage. ``memory://NAME`` opens the
spool named NAME in this process: two workflows of one runtime that name the same spool share it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from payler.drivers.storages.base import (
    Claim,
    EntryState,
    LookupField,
    Page,
    SpoolStorage,
    decode_cursor,
    encode_cursor,
    new_token,
)
from payler.drivers.storages.dedupe import Stored, candidate_ids, plan_store
from payler.payload import Payload


@dataclass(slots=True)
class _Entry:
    payload: Payload
    visible_ms: int
    token: str | None = None
    state: EntryState | Literal["delivered"] = "pending"
    #: The content digest (kept by tombstones too); None for an entry written without one.
    digest: str | None = None


class _Spool:
    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}


_spools: dict[str, _Spool] = {}


class MemoryStorage(SpoolStorage):
    """The spool in a dict; see :class:`~payler.drivers.storages.base.SpoolStorage`."""

    schemes = ("memory",)

    async def connect(self) -> None:
        name = self.url.partition("://")[2] or "default"
        self._spool = _spools.setdefault(name, _Spool())

    async def close(self) -> None:
        pass

    @classmethod
    def forget_all(cls) -> None:
        """Drop every in-memory spool of this process (between tests)."""
        _spools.clear()

    @property
    def _entries(self) -> dict[str, _Entry]:
        return self._spool.entries

    def _held(self, claim: Claim) -> _Entry | None:
        entry = self._entries.get(claim.payload.id)
        if entry is None or entry.token != claim.token or entry.state != "pending":
            return None
        return entry

    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        entries = self._entries
        taken = {i: entries[i].digest for i in candidate_ids(batch, digests) if i in entries}
        inserts, stored = plan_store(batch, digests, taken)
        for payload, digest in inserts:
            entries[payload.id] = _Entry(payload, payload.due_ms, state=state, digest=digest)
        return stored

    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        due = sorted(
            (e for e in self._entries.values() if e.state == "pending" and e.visible_ms <= now_ms),
            key=lambda e: (e.payload.due_ms, e.payload.id),
        )[:limit]
        claims = []
        for entry in due:
            entry.token = new_token()
            entry.visible_ms = now_ms + lease_ms
            claims.append(Claim(entry.payload, entry.token))
        return claims

    async def _ack(self, claims: Sequence[Claim], tombstone_until_ms: int) -> int:
        settled = 0
        for claim in claims:
            entry = self._held(claim)
            if entry is not None:
                entry.state, entry.token, entry.visible_ms = "delivered", None, tombstone_until_ms
                settled += 1
        return settled

    async def _purge_tombstones(self, now_ms: int) -> None:
        expired = [
            key
            for key, e in self._entries.items()
            if e.state == "delivered" and e.visible_ms <= now_ms
        ]
        for key in expired:
            del self._entries[key]

    async def _retry(self, claim: Claim, due_ms: int, reason: str, attempts: int) -> bool:
        entry = self._held(claim)
        if entry is None:
            return False
        entry.payload = entry.payload.model_copy(
            update={"due_ms": due_ms, "attempts": attempts, "last_error": reason}
        )
        entry.visible_ms, entry.token = due_ms, None
        return True

    async def _dead_letter(self, claim: Claim, reason: str) -> bool:
        entry = self._held(claim)
        if entry is None:
            return False
        entry.payload = entry.payload.model_copy(update={"last_error": reason})
        entry.state, entry.token = "dead", None
        return True

    async def _next_visible_ms(self) -> int | None:
        return min(
            (e.visible_ms for e in self._entries.values() if e.state == "pending"), default=None
        )

    def _visible(self, payload_id: str) -> _Entry | None:
        """The entry with this id, unless it is only a delivered entry's tombstone."""
        entry = self._entries.get(payload_id)
        return None if entry is None or entry.state == "delivered" else entry

    async def _get(self, payload_id: str) -> Payload | None:
        entry = self._visible(payload_id)
        return None if entry is None else entry.payload

    async def _state_of(self, payload_id: str) -> EntryState | None:
        entry = self._visible(payload_id)
        return None if entry is None or entry.state == "delivered" else entry.state

    async def _list(
        self,
        destination: str | None,
        due_from_ms: int | None,
        due_to_ms: int | None,
        state: EntryState,
        limit: int,
        cursor: str | None,
    ) -> Page:
        matching = sorted(
            (e.payload.due_ms, e.payload.id)
            for e in self._entries.values()
            if e.state == state
            and (destination is None or e.payload.destination == destination)
            and (due_from_ms is None or e.payload.due_ms >= due_from_ms)
            and (due_to_ms is None or e.payload.due_ms <= due_to_ms)
        )
        start = bisect.bisect_right(matching, decode_cursor(cursor)) if cursor else 0
        keys = matching[start : start + limit]
        items = [self._entries[payload_id].payload for _, payload_id in keys]
        more = start + limit < len(matching)
        return Page(items, encode_cursor(*keys[-1]) if more and keys else None)

    async def _count(self, destination: str | None, state: EntryState) -> int:
        return sum(
            1
            for e in self._entries.values()
            if e.state == state and (destination is None or e.payload.destination == destination)
        )

    async def _count_due(
        self, destination: str | None, state: EntryState, start_ms: int | None, end_ms: int | None
    ) -> int:
        return sum(
            1
            for e in self._entries.values()
            if e.state == state
            and (destination is None or e.payload.destination == destination)
            and (start_ms is None or e.payload.due_ms >= start_ms)
            and (end_ms is None or e.payload.due_ms < end_ms)
        )

    async def _lookup(
        self, field: LookupField, value: str, state: EntryState, limit: int
    ) -> list[Payload]:
        # A scan: this storage holds a test's few entries (the others use an index).
        found = [
            e.payload
            for e in self._entries.values()
            if e.state == state and getattr(e.payload.properties, field) == value
        ]
        return found[:limit]

    async def _cancel(self, payload_id: str) -> bool:
        return self._visible(payload_id) is not None and bool(self._entries.pop(payload_id))

    async def _reschedule(self, payload_id: str, due_ms: int) -> bool:
        entry = self._visible(payload_id)
        if entry is None:
            return False
        entry.payload = entry.payload.model_copy(update={"due_ms": due_ms})
        entry.visible_ms, entry.token, entry.state = due_ms, None, "pending"
        return True
