"""The embedded default storage: one SQLite file, no server to run.

``sqlite:///payler-spool.db`` is a path relative to the working directory,
``sqlite:////var/lib/payler/spool.db`` an absolute one; the query may add ``locking=`` and
``busy_timeout_ms=`` (how long a writer waits for another's lock: 10 s). Every write is one
transaction with ``synchronous=FULL``: a store returns only once the commit is on disk, which is
what lets the source be acknowledged.

Nothing of the spool is memory-mapped, so a file made unwritable under payler is an error that
says so, never a SIGBUS (:mod:`payler.drivers.storages.sqlite_file` says why, and how the file is
watched: a store into a file that was removed or replaced is an outage, never an
acknowledgement). Two ways to run the file:

- ``locking=shared`` (the default): a rollback journal (``PERSIST``). Several payler processes on
  one host may share the file, and other programs may read it meanwhile (the ``sqlite3`` shell,
  payler's own admin commands): every claim is a single ``UPDATE ... RETURNING`` statement under
  SQLite's write lock, so two claimants never lease the same entry.
- ``locking=exclusive``: WAL, with its index in this process's memory. About twice the write
  throughput; the file is this process's alone while it runs.

Not on a network file system: SQLite's locks need a local disk. The workflows of one process
share one connection per file.

Free space: below ``min_free_bytes`` free on the spool's file system (counting the room that
delivered entries freed inside the file), :meth:`SQLiteStorage.admission` tells ingest to wait,
while delivering goes on.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from payler.clock import Clock
from payler.drivers.storages import HARD_MAX_BODY_BYTES
from payler.drivers.storages.base import (
    DEFAULT_DEDUPE_WINDOW_MS,
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
from payler.drivers.storages.sqlite_file import DEFAULT_BUSY_TIMEOUT_MS, SpoolFile, acquire
from payler.errors import ConfigError
from payler.metrics import Metrics
from payler.payload import Payload

log = logging.getLogger("payler.storage.sqlite")

# Each statement on its own (not a script): they run inside the transaction that opens the file.
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS spool (
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
)""",
    "CREATE INDEX IF NOT EXISTS spool_visible ON spool (state, visible_ms)",
    "CREATE INDEX IF NOT EXISTS spool_due ON spool (state, due_ms, id)",
    "CREATE INDEX IF NOT EXISTS spool_destination ON spool (state, destination, due_ms, id)",
]
#: The version of the schema this module writes (``PRAGMA user_version``). Each later version
#: only adds (columns, indexes), so a file stays usable by the payler that made it; a file made
#: before is brought up to it when opened, by whichever process opens it first.
#: 1: the lookup columns (message and correlation ids), filled from each entry's metadata.
#: 2: the content digest (entries stored before have none: the same message, for ``store``).
_SCHEMA_VERSION = 2
_LOOKUP_COLUMNS = ("message_id", "correlation_id")
_LOOKUP_INDEXES = (
    "CREATE INDEX IF NOT EXISTS spool_message_id ON spool (message_id)",
    "CREATE INDEX IF NOT EXISTS spool_correlation_id ON spool (correlation_id)",
)
_PAYLOAD_COLUMNS = "id, body, meta, destination, due_ms, created_ms, attempts, last_error"
#: The token of an unleased entry: as long as a real one (never equal: not hex). A row whose size
#: does not change is updated in place, its overflow pages untouched (SQLite 3.23+); with NULL
#: there, every claim would rewrite the whole body into the WAL: as many bytes written (and
#: free on the disk) as the entries hold, for a claim.
_UNLEASED = "-" * len(new_token())
#: Ids looked up per statement (well below SQLite's limit on bound parameters).
_LOOKUP_CHUNK = 500


@dataclass(frozen=True, slots=True)
class SQLiteURL:
    """What a ``sqlite://`` URL says: the file, and how it is shared."""

    path: Path
    shared: bool = True
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS


def parse_url(url: str) -> SQLiteURL:
    """Read a ``sqlite:///path[?locking=shared|exclusive&busy_timeout_ms=N]`` URL."""
    rest, _, query = url.partition("://")[2].partition("?")
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            f"storage URL {url!r}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"locking", "busy_timeout_ms"}
    locking = options.get("locking", "shared")
    timeout = options.get("busy_timeout_ms", str(DEFAULT_BUSY_TIMEOUT_MS))
    if unknown or locking not in ("exclusive", "shared") or not timeout.isdigit():
        raise ConfigError(
            f"storage URL {url!r}: the query may only say locking=shared (the default) or "
            "locking=exclusive, and busy_timeout_ms=<milliseconds>"
        )
    return SQLiteURL(Path(rest[1:]), locking == "shared", int(timeout))


def path_of(url: str) -> Path:
    """The file a ``sqlite://`` URL names."""
    return parse_url(url).path


class SQLiteStorage(SpoolStorage):
    """The spool in a SQLite file; see :class:`~payler.drivers.storages.base.SpoolStorage`."""

    schemes = ("sqlite",)
    hard_max_body_bytes = HARD_MAX_BODY_BYTES["sqlite"]

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
        super().__init__(
            url,
            clock=clock,
            metrics=metrics,
            dedupe_window_ms=dedupe_window_ms,
            max_body_bytes=max_body_bytes,
            min_free_bytes=min_free_bytes,
        )
        self.location = parse_url(url)
        self._file: SpoolFile | None = None

    async def connect(self) -> None:
        """Open the file (or share this process's open one): creates the folder, the file and
        the schema, upgrades an older schema, and logs which it was: a new, empty spool
        (WARNING) or an existing one with its pending entries (INFO).

        Raises :class:`~payler.errors.StartupError` naming the path and what is wrong.
        """
        where = self.location
        self._file = await acquire(
            where.path,
            shared=where.shared,
            busy_timeout_ms=where.busy_timeout_ms,
            setup=lambda db: _set_up(db, where.path),
        )

    async def close(self) -> None:
        spool_file, self._file = self._file, None
        if spool_file is not None:
            await spool_file.release()

    @property
    def file(self) -> SpoolFile:
        """The open spool file (shared with the other storages of this process that name it)."""
        if self._file is None:
            raise RuntimeError("the SQLite storage is not connected (use it as `async with`)")
        return self._file

    async def _changes(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run ``sql`` for each row in one durable transaction; return the rows it changed."""

        def work(db: sqlite3.Connection) -> int:
            before = db.total_changes
            db.executemany(sql, rows)
            return db.total_changes - before

        return await self.file.write(work)

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement (atomic on its own) and fetch what it returns."""
        return await self.file.read(lambda db: db.execute(sql, params).fetchall())

    async def admission(self, incoming_bytes: int = 0) -> str | None:
        # A batch may take its size twice: in the WAL (or the rollback journal), then in the file.
        need = self.min_free_bytes + 2 * incoming_bytes
        spool_file = self.file

        def measure(db: sqlite3.Connection) -> tuple[int, int]:
            free, reusable = spool_file.free_bytes(), _reusable(db)
            if free + reusable - spool_file.wal_bytes() < need:
                # The next checkpoint copies the WAL's pages into the file, which may grow by
                # as much at once: when that could matter, checkpoint now and measure after.
                with contextlib.suppress(sqlite3.OperationalError):  # full: it says so below
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                free, reusable = spool_file.free_bytes(), _reusable(db)
            return free, reusable

        free, reusable = await spool_file.read(measure)
        if free + reusable >= need:
            return None
        return (
            f"{free} bytes free on the file system of {str(self.location.path)!r} and "
            f"{reusable} reusable inside the spool: storing {incoming_bytes} more bytes (which "
            "may take twice that, journal and file) would leave less than the watermark of "
            f"{self.min_free_bytes} bytes (min_free_bytes)"
        )

    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        return await self.file.write(lambda db: _insert(db, batch, digests, state))

    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        token = new_token()
        claim = (
            f"UPDATE spool SET token = ?, visible_ms = ? WHERE id IN ("
            "  SELECT id FROM spool WHERE state = 'pending' AND visible_ms <= ?"
            "  ORDER BY visible_ms LIMIT ?"
            f") RETURNING {_PAYLOAD_COLUMNS}"
        )
        # A write like any other: it fails, as an outage, once the file is no longer the path's.
        rows = await self.file.write(
            lambda db: db.execute(claim, (token, now_ms + lease_ms, now_ms, limit)).fetchall()
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

    async def _retry(self, claim: Claim, due_ms: int, reason: str, attempts: int) -> bool:
        return bool(
            await self._changes(
                "UPDATE spool SET due_ms = ?, visible_ms = ?, token = ?,"
                " attempts = ?, last_error = ?"
                " WHERE id = ? AND token = ? AND state = 'pending'",
                [(due_ms, due_ms, _UNLEASED, attempts, reason, claim.payload.id, claim.token)],
            )
        )

    async def _dead_letter(self, claim: Claim, reason: str) -> bool:
        return bool(
            await self._changes(
                "UPDATE spool SET state = 'dead', token = ?, last_error = ?"
                " WHERE id = ? AND token = ? AND state = 'pending'",
                [(_UNLEASED, reason, claim.payload.id, claim.token)],
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

    async def _state_of(self, payload_id: str) -> EntryState | None:
        rows = await self._one(
            "SELECT state FROM spool WHERE id = ? AND state != 'delivered'", (payload_id,)
        )
        return _entry_state(rows[0][0]) if rows else None

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

    async def _count_due(
        self, destination: str | None, state: EntryState, start_ms: int | None, end_ms: int | None
    ) -> int:
        # A range of the (state, due_ms) or (state, destination, due_ms) index: no row is read.
        where: list[str] = ["state = ?"]
        params: list[object] = [state]
        if destination is not None:
            where.append("destination = ?")
            params.append(destination)
        if start_ms is not None:
            where.append("due_ms >= ?")
            params.append(start_ms)
        if end_ms is not None:
            where.append("due_ms < ?")
            params.append(end_ms)
        rows = await self._one(f"SELECT COUNT(*) FROM spool WHERE {' AND '.join(where)}", params)
        return int(rows[0][0])

    async def _lookup(
        self, field: LookupField, value: str, state: EntryState, limit: int
    ) -> list[Payload]:
        column = {"message_id": "message_id", "correlation_id": "correlation_id"}[field]
        rows = await self._one(
            f"SELECT {_PAYLOAD_COLUMNS} FROM spool WHERE {column} = ? AND state = ? LIMIT ?",
            (value, state, limit),
        )
        return [_payload(row) for row in rows]

    async def _cancel(self, payload_id: str) -> bool:
        return bool(
            await self._changes(
                "DELETE FROM spool WHERE id = ? AND state != 'delivered'", [(payload_id,)]
            )
        )

    async def _reschedule(self, payload_id: str, due_ms: int) -> bool:
        return bool(
            await self._changes(
                "UPDATE spool SET due_ms = ?, visible_ms = ?, token = ?, state = 'pending'"
                " WHERE id = ? AND state != 'delivered'",
                [(due_ms, due_ms, _UNLEASED, payload_id)],
            )
        )


def _set_up(db: sqlite3.Connection, path: Path) -> None:
    """Create or upgrade the schema (in one transaction); log whether the spool is new."""
    db.execute("BEGIN IMMEDIATE")
    try:
        found = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spool'"
        created = db.execute(found).fetchone() is None
        for statement in _SCHEMA:
            db.execute(statement)
        _upgrade(db)
        counts = dict(db.execute("SELECT state, COUNT(*) FROM spool GROUP BY state").fetchall())
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    if created:
        log.warning(
            "created a new, empty spool at %s (right on a first start; otherwise the spool that "
            "was here has been removed or moved)",
            path,
        )
    else:
        log.info(
            "opened the spool at %s: %d pending entries, %d dead",
            path, counts.get("pending", 0), counts.get("dead", 0),
        )  # fmt: skip


def _upgrade(db: sqlite3.Connection) -> None:
    """Add what later versions of the schema have to a spool file made before them (inside the
    caller's transaction)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= _SCHEMA_VERSION:
        return
    columns = {row[1] for row in db.execute("PRAGMA table_info(spool)")}
    if version < 1:
        for column in _LOOKUP_COLUMNS:
            if column not in columns:
                db.execute(f"ALTER TABLE spool ADD COLUMN {column} TEXT")
        # Entries stored before: their ids from their metadata (skipping unreadable ones).
        db.execute(
            "UPDATE spool SET"
            " message_id = json_extract(meta, '$.properties.message_id'),"
            " correlation_id = json_extract(meta, '$.properties.correlation_id')"
            " WHERE state != 'delivered' AND json_valid(meta)"
        )
        for statement in _LOOKUP_INDEXES:
            db.execute(statement)
    if version < 2 and "digest" not in columns:  # a new file has it from CREATE TABLE
        db.execute("ALTER TABLE spool ADD COLUMN digest TEXT")
    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


def _insert(
    db: sqlite3.Connection, batch: Sequence[Payload], digests: Sequence[str], state: EntryState
) -> Stored:
    """Store what is new of ``batch`` (inside the caller's write transaction)."""
    candidates = candidate_ids(batch, digests)
    taken: dict[str, str | None] = {}
    for start in range(0, len(candidates), _LOOKUP_CHUNK):
        chunk = candidates[start : start + _LOOKUP_CHUNK]
        marks = ", ".join("?" * len(chunk))
        taken.update(db.execute(f"SELECT id, digest FROM spool WHERE id IN ({marks})", chunk))
    inserts, stored = plan_store(batch, digests, taken)
    db.executemany(
        "INSERT INTO spool (id, token, state, due_ms, visible_ms, destination, attempts,"
        " last_error, created_ms, body, meta, digest, message_id, correlation_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                p.id,
                _UNLEASED,
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
                p.properties.message_id,
                p.properties.correlation_id,
            )
            for p, digest in inserts
        ],
    )
    return stored


def _reusable(db: sqlite3.Connection) -> int:
    """Bytes free inside the file: pages that delivered entries left, which stores reuse."""
    (pages,) = db.execute("PRAGMA freelist_count").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    return int(pages) * int(page_size)


def _entry_state(value: object) -> EntryState:
    return "dead" if value == "dead" else "pending"


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
