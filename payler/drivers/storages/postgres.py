"""The PostgreSQL spool storage, through asyncpg.

``postgresql://[user[:password]@]host[:port]/database[?schema=NAME&...]`` (``postgres://`` too).
payler's own query parameters, taken out before the rest goes to asyncpg (``sslmode``,
``application_name``, ...):

- ``schema``: where the tables go (created if missing); the connection's current schema
  (``public``, usually) by default. Several spools share a database, one schema each.
- ``pool_size`` (4): connections per storage (one workflow's, or the admin's, operations).
- ``notify`` (``true``): announce stores with ``NOTIFY`` and ``LISTEN`` for them; ``false``
  where the database has no ``LISTEN`` (CockroachDB): watchers then poll.
- ``command_timeout`` (30): seconds after which a statement counts as an outage.

**Schema.** :meth:`PostgresStorage.connect` creates the tables, or migrates them, and records the
version in ``payler_schema_version``; a version newer than this payler knows stops it at start
(exit status 2) rather than writing rows an older payler would misread. The SQL and the table
layout are in :mod:`payler.drivers.storages.postgres_sql`.

**Claims** lock due rows with ``FOR UPDATE SKIP LOCKED`` and lease them in the same statement
(a fresh fencing token, ``visible_ms`` moved to the lease's end), so instances claiming together
never wait for each other nor take the same entry. Every operation is one statement (one
round trip) in its own transaction, committed before it returns: with the server's default
``synchronous_commit = on`` a returned store is on disk (and on the synchronous standbys, if
configured).

**Stores** are one statement per batch of up to 1,000 payloads (a larger batch takes several, in
one transaction; the SQL is ``Statements.store``): it reads the content digests of the entries
that the batch's ids (and their derived ids) name, applies the rule of
:func:`~payler.drivers.storages.dedupe.plan_store` (a redelivery is left as it is, a reused id
with other content goes under its derived id) and inserts, all on one snapshot. A concurrent
store that commits one of these ids after that snapshot fails the statement as a whole (a unique
violation: nothing of it is written), and it runs again, seeing that entry: the outcome is the
one of the two stores made one after the other. Rows stored by the payler before digests were
kept have none: the same message, for a redelivery.

**Limits.** A body is at most ``max_body_bytes`` (64 MiB by default, as every storage; up to
1,000,000,000 bytes, under PostgreSQL's 1 GB per ``bytea`` value and per protocol message).
There is no disk here to watch: :meth:`~payler.drivers.storages.base.SpoolStorage.admission`
admits every batch, and ``min_free_bytes`` is not used. A server whose disk is full refuses
the write (``53100``) or goes down: an outage, retried with backoff while the batch stays
unacknowledged in its source. Watch the server's disk where it runs.

**Wake-ups.** A store, retry or reschedule sends ``NOTIFY`` on the spool's channel with the
earliest due time, in the same statement, so it goes out when the change commits. A watch loop
keeps one extra connection that ``LISTEN``\\ s (reconnected with backoff when lost) and wakes
this process's watchers at once: entries stored on one instance are claimed at once by every
instance's watcher instead of at their poll bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from payler.backoff import Backoff
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
from payler.drivers.storages.dedupe import Stored
from payler.drivers.storages.postgres_listen import ERRORS, Listener
from payler.drivers.storages.postgres_settings import channel_of, split_settings
from payler.drivers.storages.postgres_sql import (
    MIGRATIONS,
    PAYLOAD_COLUMNS,
    SCHEMA_VERSION,
    VERSION_DDL,
    Statements,
    from_optional_text,
    from_text,
    optional_text,
    quote_ident,
    to_text,
)
from payler.errors import StartupError, TransientError
from payler.identity import derived_id
from payler.metrics import Metrics
from payler.payload import Payload
from payler.urls import mask_url, redact

log = logging.getLogger("payler.storage.postgres")

#: A connection: one of our own, or one lent by the pool.
Connection = asyncpg.Connection | PoolConnectionProxy
P = ParamSpec("P")
R = TypeVar("R")

#: Payloads and body bytes per INSERT statement: they bound one protocol message (PostgreSQL
#: refuses one past 1 GB) and how much the server parses at once.
_STORE_CHUNK = 1000
_STORE_CHUNK_BYTES = 16 * 1024 * 1024
#: Attempts at a store whose ids concurrent stores keep taking (each attempt that fails saw
#: another store commit: as many attempts as instances storing the same ids at once).
_STORE_ROUNDS = 10
#: Tombstones deleted per purge statement; a purge that finds more goes on in the background.
_PURGE_BATCH = 5000
#: Attempts at creating the schema when instances starting together race for it.
_MIGRATE_ATTEMPTS = 5
#: SQLSTATEs (or their classes) that mean "the database cannot do it now", not "never": lost
#: connections (08), resources (53: disk full, too many connections), shutdown and cancelled
#: statements (57), serialization failures and deadlocks (40001, 40P01), a read-only server
#: (25006: a standby after a failover), a lock not available (55P03).
_OUTAGE_STATES = ("08", "53", "57", "40001", "40P01", "25006", "55P03")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (from asyncpg) is an outage that a retry may mend."""
    if isinstance(exc, OSError | TimeoutError):  # refused, reset, timed out
        return True
    if isinstance(exc, asyncpg.InterfaceError):  # the connection (or pool) is closed
        return "clos" in str(exc)
    if isinstance(exc, asyncpg.InternalClientError):  # the protocol lost its footing: a
        return True  # connection that the server ended under a statement
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith(_OUTAGE_STATES)


def _transient(
    hook: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """An outage inside ``hook`` becomes a :class:`TransientError` (the runtime retries it); any
    other error (a value PostgreSQL refuses) stays what it is: one payload's problem."""

    @functools.wraps(hook)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await hook(*args, **kwargs)
        except ERRORS as exc:
            if is_outage(exc):
                raise TransientError(f"PostgreSQL spool: {type(exc).__name__}: {exc}") from exc
            raise

    return wrapper


class PostgresStorage(SpoolStorage):
    """The spool in a PostgreSQL table; see :class:`~payler.drivers.storages.base.SpoolStorage`.

    ``connect_timeout_s`` bounds how long :meth:`connect` waits for the server.
    """

    schemes = ("postgresql", "postgres")
    hard_max_body_bytes = HARD_MAX_BODY_BYTES["postgresql"]

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        dedupe_window_ms: int = DEFAULT_DEDUPE_WINDOW_MS,
        max_body_bytes: int | None = None,
        min_free_bytes: int | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            url,
            clock=clock,
            metrics=metrics,
            dedupe_window_ms=dedupe_window_ms,
            max_body_bytes=max_body_bytes,
            min_free_bytes=min_free_bytes,
        )
        self.connect_timeout_s = connect_timeout_s
        settings = split_settings(url)
        self._dsn, self._schema = settings.dsn, settings.schema
        self.pool_size, self.notify = settings.pool_size, settings.notify
        self.command_timeout_s = settings.command_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._sql = Statements("")
        self.channel = ""
        self._listener: Listener | None = None
        self._watch_loops = 0
        self._purging: asyncio.Task[None] | None = None

    # -- connecting --------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool and create or migrate the schema.

        Raises :class:`~payler.errors.StartupError` naming the (password-masked) URL: an
        unreachable server, refused credentials, a schema newer than this payler knows.
        """
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                **self._connect_options(),
            )
            async with self._pool.acquire() as conn:
                schema = self._schema or await conn.fetchval("SELECT current_schema()")
                if not schema:
                    raise StartupError("the connection has no current schema: set ?schema=")
                await self._migrate(conn, schema)
        except (*ERRORS, ValueError) as exc:
            await self.close()
            what = redact(f"{type(exc).__name__}: {exc}", self.url)
            raise StartupError(
                f"cannot use the PostgreSQL spool storage {mask_url(self.url)!r}: {what}"
            ) from exc
        except BaseException:
            await self.close()
            raise
        self._sql = Statements(schema)
        self.channel = channel_of(schema)

    def _connect_options(self) -> dict[str, Any]:
        # Named in pg_stat_activity, unless the URL names it.
        if "application_name" in dict(parse_qsl(urlsplit(self._dsn).query)):
            return {}
        return {"server_settings": {"application_name": "payler"}}

    async def _migrate(self, conn: Connection, schema: str) -> None:
        """Bring ``schema`` to :data:`SCHEMA_VERSION`, one transaction per migration.

        Each migration first inserts its version row: a second instance migrating at the same
        time waits on that key, then fails on it and finds the work done. Creating the schema
        and the version table may race the same way (``IF NOT EXISTS`` is not atomic in
        PostgreSQL): such a start is tried again.
        """
        quoted = quote_ident(schema)
        for attempt in range(_MIGRATE_ATTEMPTS):
            try:
                # Created only when missing: IF NOT EXISTS alone still asks for the CREATE
                # privilege, which a role that only reads and writes the spool lacks.
                exists = "SELECT 1 FROM pg_namespace WHERE nspname = $1"
                if self._schema and not await conn.fetchval(exists, schema):
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
                table = f"{quoted}.payler_schema_version"
                if await conn.fetchval("SELECT to_regclass($1)::text", table) is None:
                    await conn.execute(VERSION_DDL.format(s=quoted))
                while (version := await self._version(conn, quoted)) < SCHEMA_VERSION:
                    async with conn.transaction():
                        await conn.execute(
                            f"INSERT INTO {quoted}.payler_schema_version VALUES ($1, $2)",
                            version + 1,
                            self.clock.now_ms(),
                        )
                        await conn.execute(MIGRATIONS[version].format(s=quoted))
                    log.info(
                        "PostgreSQL spool schema %r migrated to version %d", schema, version + 1
                    )
                break
            except (asyncpg.UniqueViolationError, asyncpg.DuplicateObjectError,
                    asyncpg.DuplicateTableError, asyncpg.DuplicateSchemaError):  # fmt: skip
                if attempt == _MIGRATE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(Backoff(base_s=0.05, max_s=1.0).delay_s(attempt))
        if version > SCHEMA_VERSION:
            raise StartupError(
                f"the PostgreSQL spool in schema {schema!r} has schema version {version}, newer"
                f" than this payler knows ({SCHEMA_VERSION}): a newer payler migrated it; run"
                " that version (or give this one another ?schema=)"
            )

    @staticmethod
    async def _version(conn: Connection, quoted: str) -> int:
        found = await conn.fetchval(f"SELECT max(version) FROM {quoted}.payler_schema_version")
        return int(found or 0)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
        if self._purging is not None:
            self._purging.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._purging
        self._listener = self._purging = None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.connect_timeout_s)
            except ERRORS:
                pool.terminate()  # the server is gone: do not wait for goodbyes

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool."""
        if self._pool is None:
            raise RuntimeError("the PostgreSQL storage is not connected (use it as `async with`)")
        return self._pool

    @property
    def schema(self) -> str:
        """The schema the spool's tables are in (known once connected)."""
        return self._sql.schema

    # -- the hooks -------------------------------------------------------------------------------

    @_transient
    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        notify = self.notify and state == "pending"
        chunks = list(_chunks(batch))
        if len(chunks) == 1:  # each statement committed on its own
            return await self._insert(self.pool, batch, digests, state, notify)
        for _ in range(_STORE_ROUNDS):
            try:
                stored = Stored()
                async with self.pool.acquire() as conn, conn.transaction():  # one commit
                    for start, end in chunks:
                        stored += await self._insert(
                            conn, batch[start:end], digests[start:end], state, notify, retry=False
                        )
                return stored
            except asyncpg.UniqueViolationError:
                continue  # a concurrent store took one of the ids: all again, seeing it
        raise _ids_taken()

    async def _insert(
        self,
        conn: asyncpg.Pool | Connection,
        batch: Sequence[Payload],
        digests: Sequence[str],
        state: EntryState,
        notify: bool,
        *,
        retry: bool = True,
    ) -> Stored:
        """Store one chunk with :attr:`Statements.store`: the payloads it defers go in a
        statement of their own after it; a statement that fails on an id a concurrent store
        took (it changed nothing) is run again, unless ``retry`` is false (the caller's
        transaction is then aborted: it runs again as a whole)."""
        placed: dict[int, str | None] = {}  # position in batch: the id stored under, or None
        todo = list(range(len(batch)))
        attempts = 0
        while todo:
            try:
                rows = await conn.fetch(
                    self._sql.store,
                    state,
                    *_columns([batch[i] for i in todo], [digests[i] for i in todo]),
                    notify,
                    self.channel,
                )
            except asyncpg.UniqueViolationError:
                attempts += 1
                if not retry:
                    raise
                if attempts == _STORE_ROUNDS:
                    raise _ids_taken() from None
                continue
            returned = {todo[row["n"] - 1]: row for row in rows}
            deferred = []
            for i in todo:
                row = returned.get(i)
                if row is None:  # a redelivery
                    placed[i] = None
                elif row["deferred"]:
                    deferred.append(i)
                else:
                    placed[i] = batch[i].id if row["own"] else derived_id(batch[i].id, digests[i])
            todo = deferred  # shorter each time: the first payload of a round is never deferred
        stored = Stored()
        for i, payload in enumerate(batch):
            target = placed[i]
            if target is None:
                stored.duplicates.append(payload.id)
                continue
            stored.new.append(target)
            if target != payload.id:
                stored.renamed[payload.id] = target
        return stored

    @_transient
    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        token = new_token()
        rows = await self.pool.fetch(self._sql.claim, now_ms, limit, token, now_ms + lease_ms)
        payloads = sorted(map(_payload, rows), key=lambda p: (p.due_ms, p.id))
        return [Claim(p, token) for p in payloads]

    @_transient
    async def _ack(self, claims: Sequence[Claim], tombstone_until_ms: int) -> int:
        ids = [to_text(c.payload.id) for c in claims]
        status = await self.pool.execute(
            self._sql.ack, tombstone_until_ms, ids, [c.token for c in claims]
        )
        return _row_count(status)

    @_transient
    async def _purge_tombstones(self, now_ms: int) -> None:
        if self._purging is not None and not self._purging.done():
            return  # the last purge is still at it
        if (
            _row_count(await self.pool.execute(self._sql.purge, now_ms, _PURGE_BATCH))
            < _PURGE_BATCH
        ):
            return
        # A backlog of tombstones (a busy dedupe window): delete the rest beside the claims.
        self._purging = asyncio.create_task(self._purge_rest(now_ms))

    async def _purge_rest(self, now_ms: int) -> None:
        try:
            while _row_count(await self.pool.execute(self._sql.purge, now_ms, _PURGE_BATCH)):
                pass
        except ERRORS as exc:
            log.warning(
                "purging delivered entries' tombstones stopped (next purge goes on): %s", exc
            )

    @_transient
    async def _retry(self, claim: Claim, due_ms: int, reason: str, attempts: int) -> bool:
        found = await self.pool.fetchrow(
            self._sql.retry,
            to_text(claim.payload.id),
            claim.token,
            due_ms,
            to_text(reason),
            self.notify,
            self.channel,
            attempts,
        )
        return bool(found and found["n"])

    @_transient
    async def _dead_letter(self, claim: Claim, reason: str) -> bool:
        status = await self.pool.execute(
            self._sql.dead_letter, to_text(claim.payload.id), claim.token, to_text(reason)
        )
        return _row_count(status) == 1

    @_transient
    async def _next_visible_ms(self) -> int | None:
        found = await self.pool.fetchval(self._sql.next_visible)
        return None if found is None else int(found)

    @_transient
    async def _get(self, payload_id: str) -> Payload | None:
        row = await self.pool.fetchrow(self._sql.get, to_text(payload_id))
        return None if row is None else _payload(row)

    @_transient
    async def _state_of(self, payload_id: str) -> EntryState | None:
        state = await self.pool.fetchval(self._sql.state_of, to_text(payload_id))
        if state is None:
            return None
        return "dead" if state == "dead" else "pending"

    @_transient
    async def _list(
        self,
        destination: str | None,
        due_from_ms: int | None,
        due_to_ms: int | None,
        state: EntryState,
        limit: int,
        cursor: str | None,
    ) -> Page:
        # The state is written into the statement (one of two literals): with a parameter, a
        # prepared statement's generic plan could not use the partial indexes.
        where, params = _filters(destination, state)
        if due_from_ms is not None:
            params.append(due_from_ms)
            where.append(f"due_ms >= ${len(params)}")
        if due_to_ms is not None:
            params.append(due_to_ms)
            where.append(f"due_ms <= ${len(params)}")
        if cursor is not None:
            after_due, after_id = decode_cursor(cursor)
            params += [after_due, to_text(after_id)]
            where.append(f"(due_ms, id) > (${len(params) - 1}, ${len(params)})")
        params.append(limit + 1)
        rows = await self.pool.fetch(
            f"SELECT {PAYLOAD_COLUMNS} FROM {self._sql.table} WHERE {' AND '.join(where)}"
            f" ORDER BY due_ms, id LIMIT ${len(params)}",
            *params,
        )
        items = [_payload(row) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].due_ms, items[-1].id) if more else None)

    @_transient
    async def _count(self, destination: str | None, state: EntryState) -> int:
        where, params = _filters(destination, state)
        sql = f"SELECT count(*) FROM {self._sql.table} WHERE {' AND '.join(where)}"
        return int(await self.pool.fetchval(sql, *params))

    @_transient
    async def _count_due(
        self, destination: str | None, state: EntryState, start_ms: int | None, end_ms: int | None
    ) -> int:
        # A range of the (state, due_ms) or (state, destination, due_ms) index.
        where, params = _filters(destination, state)
        if start_ms is not None:
            params.append(start_ms)
            where.append(f"due_ms >= ${len(params)}")
        if end_ms is not None:
            params.append(end_ms)
            where.append(f"due_ms < ${len(params)}")
        sql = f"SELECT count(*) FROM {self._sql.table} WHERE {' AND '.join(where)}"
        return int(await self.pool.fetchval(sql, *params))

    @_transient
    async def _lookup(
        self, field: LookupField, value: str, state: EntryState, limit: int
    ) -> list[Payload]:
        rows = await self.pool.fetch(self._sql.lookup(field, state), to_text(value), limit)
        return [_payload(row) for row in rows]

    @_transient
    async def _cancel(self, payload_id: str) -> bool:
        return _row_count(await self.pool.execute(self._sql.cancel, to_text(payload_id))) == 1

    @_transient
    async def _reschedule(self, payload_id: str, due_ms: int) -> bool:
        found = await self.pool.fetchrow(
            self._sql.reschedule, to_text(payload_id), due_ms, self.notify, self.channel
        )
        return bool(found and found["n"])

    # -- wake-ups: LISTEN (postgres_listen.py) ------------------------------------------------

    async def _start_wakeups(self) -> None:
        self._watch_loops += 1
        if not self.notify:
            return
        if self._listener is None:
            self._listener = Listener(
                self._dsn,
                self.channel,
                self._stored_elsewhere,
                connect_options=self._connect_options(),
                connect_timeout_s=self.connect_timeout_s,
                command_timeout_s=self.command_timeout_s,
            )
        await self._listener.start()

    async def _stop_wakeups(self) -> None:
        self._watch_loops -= 1
        if self._watch_loops <= 0 and self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.stop()


# -- rows ------------------------------------------------------------------------------------------


def _filters(destination: str | None, state: EntryState) -> tuple[list[str], list[Any]]:
    where = ["state = 'dead'" if state == "dead" else "state = 'pending'"]
    params: list[Any] = []
    if destination is not None:
        params.append(to_text(destination))
        where.append(f"destination = ${len(params)}")
    return where, params


def _ids_taken() -> TransientError:
    return TransientError(
        f"PostgreSQL spool: concurrent stores kept taking this batch's ids ({_STORE_ROUNDS}"
        " attempts)"
    )


def _row_count(status: str) -> int:
    """The row count of a command status (``UPDATE 3``, ``DELETE 0``)."""
    return int(status.rpartition(" ")[2] or 0)


def _chunks(batch: Sequence[Payload]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of runs of ``batch`` of at most ``_STORE_CHUNK`` payloads and about
    ``_STORE_CHUNK_BYTES``."""
    start, size = 0, 0
    for end, payload in enumerate(batch):
        if end > start and (end - start == _STORE_CHUNK or size > _STORE_CHUNK_BYTES):
            yield start, end
            start, size = end, 0
        size += len(payload.body)
    yield start, len(batch)


def _columns(batch: Sequence[Payload], digests: Sequence[str]) -> list[list[Any]]:
    """The arrays :attr:`Statements.store` takes, in its order: ids, digests, derived ids, then
    the other columns."""
    columns: list[list[Any]] = [[] for _ in range(12)]
    for p, digest in zip(batch, digests, strict=True):
        row = (
            to_text(p.id),
            to_text(digest),
            to_text(derived_id(p.id, digest)),
            p.due_ms,
            to_text(p.destination),
            p.attempts,
            optional_text(p.last_error),
            p.created_ms,
            optional_text(p.properties.message_id),
            optional_text(p.properties.correlation_id),
            p.body,
            p.meta_json(),
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _payload(row: asyncpg.Record) -> Payload:
    payload_id, body, meta, destination, due_ms, created_ms, attempts, last_error = row
    return Payload.from_stored(
        id=from_text(payload_id),
        body=body,
        meta_json=meta,
        destination=from_text(destination),
        due_ms=due_ms,
        created_ms=created_ms,
        attempts=attempts,
        last_error=from_optional_text(last_error),
    )


__all__ = ["PostgresStorage", "is_outage"]
