"""The embedded default storage: one SQLite file, no server to run.

``sqlite:///payler-spool.db`` is a path relative to the working directory,
``sqlite:////var/lib/payler/spool.db`` an absolute one. The file is opened in WAL mode with
``synchronous=FULL``: a store returns only once the commit is on disk, which is what lets the
source be acknowledged. Several payler processes on one host may share the file: every claim is a
single ``UPDATE ... RETURNING`` statement, which SQLite runs under its write lock, so two
claimants never lease the same entry. (Not on a network file system: SQLite's locks need a local
disk.)
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from payler.drivers.storages import HARD_MAX_BODY_BYTES
from payler.drivers.storages.base import (
    Claim,
    EntryState,
    Page,
    SpoolStorage,
    decode_cursor,
    encode_cursor,
    new_token,
)
from payler.drivers.storages.dedupe import Stored, candidate_ids, plan_store
from payler.errors import ConfigError, StartupError, TransientError
from payler.payload import Payload

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id          TEXT PRIMARY KEY,
    due_ms      INTEGER NOT NULL,
    visible_ms  INTEGER NOT NULL,
    token       TEXT,
    state       TEXT NOT NULL DEFAULT 'pending',
    destination TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    created_ms  INTEGER NOT NULL,
    body        BLOB NOT NULL,
    meta        TEXT NOT NULL,
    digest      TEXT
);
CREATE INDEX IF NOT EXISTS spool_visible ON spool (state, visible_ms);
CREATE INDEX IF NOT EXISTS spool_due ON spool (state, due_ms, id);
CREATE INDEX IF NOT EXISTS spool_destination ON spool (state, destination, due_ms, id);
"""
_PAYLOAD_COLUMNS = "id, body, meta, destination, due_ms, created_ms, attempts, last_error"
#: Columns added since the first schema, each with its definition: added to an older file when
#: it is opened (older entries have NULL there).
_ADDED_COLUMNS = {"digest": "TEXT"}
#: Ids looked up per statement (well below SQLite's limit on bound parameters).
_LOOKUP_CHUNK = 500
#: How long a writer waits for another process's write lock before giving up (a transient error).
_BUSY_TIMEOUT_MS = 10_000


def path_of(url: str) -> Path:
    """The file a ``sqlite://`` URL names."""
    rest = url.partition("://")[2]
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            f"storage URL {url!r}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(rest[1:])


class SQLiteStorage(SpoolStorage):
    """The spool in a SQLite file; see :class:`~payler.drivers.storages.base.SpoolStorage`."""

    schemes = ("sqlite",)
    hard_max_body_bytes = HARD_MAX_BODY_BYTES["sqlite"]
    _db: aiosqlite.Connection | None = None

    async def connect(self) -> None:
        path = path_of(self.url)
        deadline = asyncio.get_running_loop().time() + _BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                # Prepared with plain sqlite3 in a thread first: a file that cannot be opened then
                # fails here, before aiosqlite starts a thread of its own that could outlive us.
                await asyncio.to_thread(_prepare, path)
                break
            except (OSError, sqlite3.Error) as exc:
                # Switching a new file to WAL takes an exclusive lock that SQLite's busy handler
                # does not wait for: two workflows opening one new spool together collide here.
                locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                if not locked or asyncio.get_running_loop().time() > deadline:
                    raise StartupError(
                        f"cannot open the SQLite spool {str(path)!r}: {exc}"
                    ) from exc
                await asyncio.sleep(0.01 + random.random() * 0.05)
        try:
            # isolation_level=None: we open transactions ourselves, so each one is explicit.
            self._db = await aiosqlite.connect(path, isolation_level=None)
            await self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            await self._db.execute("PRAGMA synchronous = FULL")
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StartupError(f"cannot open the SQLite spool {str(path)!r}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite storage is not connected (use it as `async with`)")
        return self._db

    async def _changes(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run ``sql`` for each row in one durable transaction; return the rows it changed."""
        db = self.db
        try:
            await db.execute("BEGIN IMMEDIATE")
            before = db.total_changes
            await db.executemany(sql, rows)
            changed = db.total_changes - before
            await db.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise TransientError(f"SQLite spool: {exc}") from exc
        return changed

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run one statement (atomic on its own) and fetch what it returns."""
        try:
            async with self.db.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.OperationalError as exc:
            raise TransientError(f"SQLite spool: {exc}") from exc

    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        db = self.db
        candidates = candidate_ids(batch, digests)
        try:
            await db.execute("BEGIN IMMEDIATE")
            taken: dict[str, str | None] = {}
            for start in range(0, len(candidates), _LOOKUP_CHUNK):
                chunk = candidates[start : start + _LOOKUP_CHUNK]
                marks = ", ".join("?" * len(chunk))
                async with db.execute(
                    f"SELECT id, digest FROM spool WHERE id IN ({marks})", chunk
                ) as cursor:
                    taken.update({row[0]: row[1] async for row in cursor})
            inserts, stored = plan_store(batch, digests, taken)
            await db.executemany(
                "INSERT INTO spool (id, state, due_ms, visible_ms, destination, attempts,"
                " last_error, created_ms, body, meta, digest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        p.id,
                        state,
                        p.due_ms,
                        p.due_ms,
                        p.destination,
                        p.attempts,
                        p.last_error,
                        p.created_ms,
                        p.body,
                        p.meta_json(),
                        digest,
                    )
                    for p, digest in inserts
                ],
            )
            await db.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise TransientError(f"SQLite spool: {exc}") from exc
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise
        return stored

    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        token = new_token()
        rows = await self._one(
            f"UPDATE spool SET token = ?, visible_ms = ? WHERE id IN ("
            "  SELECT id FROM spool WHERE state = 'pending' AND visible_ms <= ?"
            "  ORDER BY visible_ms LIMIT ?"
            f") RETURNING {_PAYLOAD_COLUMNS}",
            (token, now_ms + lease_ms, now_ms, limit),
        )
        payloads = sorted((_payload(row) for row in rows), key=lambda p: (p.due_ms, p.id))
        return [Claim(p, token) for p in payloads]

    async def _ack(self, claims: Sequence[Claim], tombstone_until_ms: int) -> int:
        # The row stays, emptied, as the tombstone that keeps a redelivered copy out.
        return await self._changes(
            "UPDATE spool SET state = 'delivered', visible_ms = ?, token = NULL, body = x'',"
            " meta = '{}' WHERE id = ? AND token = ? AND state = 'pending'",
            [(tombstone_until_ms, c.payload.id, c.token) for c in claims],
        )

    async def _purge_tombstones(self, now_ms: int) -> None:
        await self._changes(
            "DELETE FROM spool WHERE state = 'delivered' AND visible_ms <= ?", [(now_ms,)]
        )

    async def _retry(self, claim: Claim, due_ms: int, reason: str) -> bool:
        return bool(
            await self._changes(
                "UPDATE spool SET due_ms = ?, visible_ms = ?, token = NULL,"
                " attempts = attempts + 1, last_error = ?"
                " WHERE id = ? AND token = ? AND state = 'pending'",
                [(due_ms, due_ms, reason, claim.payload.id, claim.token)],
            )
        )

    async def _dead_letter(self, claim: Claim, reason: str) -> bool:
        return bool(
            await self._changes(
                "UPDATE spool SET state = 'dead', token = NULL, last_error = ?"
                " WHERE id = ? AND token = ? AND state = 'pending'",
                [(reason, claim.payload.id, claim.token)],
            )
        )

    async def _next_visible_ms(self) -> int | None:
        rows = await self._one("SELECT MIN(visible_ms) FROM spool WHERE state = 'pending'")
        value = rows[0][0] if rows else None
        return None if value is None else int(value)

    async def _get(self, payload_id: str) -> Payload | None:
        rows = await self._one(
            f"SELECT {_PAYLOAD_COLUMNS} FROM spool WHERE id = ? AND state != 'delivered'",
            (payload_id,),
        )
        return _payload(rows[0]) if rows else None

    async def _list(
        self,
        destination: str | None,
        due_from_ms: int | None,
        due_to_ms: int | None,
        state: EntryState,
        limit: int,
        cursor: str | None,
    ) -> Page:
        where: list[str] = ["state = ?"]
        params: list[object] = [state]
        if destination is not None:
            where.append("destination = ?")
            params.append(destination)
        if due_from_ms is not None:
            where.append("due_ms >= ?")
            params.append(due_from_ms)
        if due_to_ms is not None:
            where.append("due_ms <= ?")
            params.append(due_to_ms)
        if cursor is not None:
            after_due, after_id = decode_cursor(cursor)
            where.append("(due_ms, id) > (?, ?)")
            params.extend([after_due, after_id])
        rows = await self._one(
            f"SELECT {_PAYLOAD_COLUMNS} FROM spool WHERE {' AND '.join(where)}"
            " ORDER BY due_ms, id LIMIT ?",
            [*params, limit + 1],
        )
        items = [_payload(row) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].due_ms, items[-1].id) if more else None)

    async def _count(self, destination: str | None, state: EntryState) -> int:
        if destination is None:
            rows = await self._one("SELECT COUNT(*) FROM spool WHERE state = ?", (state,))
        else:
            rows = await self._one(
                "SELECT COUNT(*) FROM spool WHERE state = ? AND destination = ?",
                (state, destination),
            )
        return int(rows[0][0])

    async def _cancel(self, payload_id: str) -> bool:
        return bool(
            await self._changes(
                "DELETE FROM spool WHERE id = ? AND state != 'delivered'", [(payload_id,)]
            )
        )

    async def _reschedule(self, payload_id: str, due_ms: int) -> bool:
        return bool(
            await self._changes(
                "UPDATE spool SET due_ms = ?, visible_ms = ?, token = NULL, state = 'pending'"
                " WHERE id = ? AND state != 'delivered'",
                [(due_ms, due_ms, payload_id)],
            )
        )


def _prepare(path: Path) -> None:
    """Create the folder, the file and the schema, and switch the file to WAL (persistent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(spool)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in columns:  # a spool written by an older payler: still readable
                db.execute(f"ALTER TABLE spool ADD COLUMN {name} {definition}")
    finally:
        db.close()


def _payload(row: sqlite3.Row | tuple[Any, ...]) -> Payload:
    payload_id, body, meta, destination, due_ms, created_ms, attempts, last_error = row
    return Payload.from_stored(
        id=payload_id,
        body=body,
        meta_json=meta,
        destination=destination,
        due_ms=due_ms,
        created_ms=created_ms,
        attempts=attempts,
        last_error=last_error,
    )
