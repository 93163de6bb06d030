"""The SQL of the PostgreSQL spool storage: its schema, its migrations and its statements.

Everything lives in one schema (``?schema=`` in the URL, else the connection's current schema):

==========================  ================================================================
``payler_spool``            one row per entry; a delivered entry's row stays, emptied, as its
                            tombstone (``state = 'delivered'``, ``visible_ms`` = its expiry)
``payler_schema_version``   one row per migration applied (``version``, ``applied_ms``)
==========================  ================================================================

Indexes: the claim order (``visible_ms, id`` of pending rows), the due order of the admin
listing and of the console's due counts (overall and per destination), the tombstones by expiry
(the purge), and the admin lookups by ``message_id`` and ``correlation_id``. ``digest`` holds
the entry's content digest (:func:`~payler.identity.content_digest`), kept in its tombstone too;
rows stored by the payler before this column was written have none (NULL), which ``store``
takes for "the same message" (schema version 1 already had the column: no migration).

The statements use only what PostgreSQL-compatible distributed databases also speak
(``FOR UPDATE SKIP LOCKED``, an ``INSERT`` inside ``WITH`` whose rows a query with window
functions chose, ``unnest`` of arrays ``WITH ORDINALITY``, partial indexes); ``pg_notify`` is
asked for only where the URL keeps notifications on.

**Text and NUL.** PostgreSQL's ``TEXT`` refuses the character U+0000, which ids, destinations
and errors may hold (any unicode is allowed in them). :func:`to_text` stores such a value with
a reversible escape (it then starts with U+0001); every other value is stored as it is, so the
rows read plainly in ``psql``. Text columns that are ordered or looked up use the ``"C"``
collation: byte order, the order the other storages use, whatever the database's locale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The schema version this payler creates and understands; MIGRATIONS[v - 1] brings v - 1 to v.
SCHEMA_VERSION = 1
SPOOL_TABLE = "payler_spool"
VERSION_TABLE = "payler_schema_version"

#: Each migration, in order: SQL run in one transaction, ``{s}`` standing for the quoted schema.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE {s}.payler_spool (
        id             TEXT COLLATE "C" PRIMARY KEY,
        state          TEXT NOT NULL CHECK (state IN ('pending', 'dead', 'delivered')),
        due_ms         BIGINT NOT NULL,
        visible_ms     BIGINT NOT NULL,
        token          TEXT,
        destination    TEXT COLLATE "C" NOT NULL,
        attempts       INTEGER NOT NULL DEFAULT 0,
        last_error     TEXT,
        created_ms     BIGINT NOT NULL,
        message_id     TEXT COLLATE "C",
        correlation_id TEXT COLLATE "C",
        digest         TEXT,
        body           BYTEA NOT NULL,
        meta           TEXT NOT NULL
    );
    CREATE INDEX payler_spool_claim ON {s}.payler_spool (visible_ms, id)
        WHERE state = 'pending';
    CREATE INDEX payler_spool_due ON {s}.payler_spool (state, due_ms, id)
        WHERE state IN ('pending', 'dead');
    CREATE INDEX payler_spool_destination ON {s}.payler_spool (state, destination, due_ms, id)
        WHERE state IN ('pending', 'dead');
    CREATE INDEX payler_spool_tombstones ON {s}.payler_spool (visible_ms)
        WHERE state = 'delivered';
    CREATE INDEX payler_spool_message_id ON {s}.payler_spool (message_id)
        WHERE message_id IS NOT NULL;
    CREATE INDEX payler_spool_correlation_id ON {s}.payler_spool (correlation_id)
        WHERE correlation_id IS NOT NULL;
    """,
]

#: The version table; created (if missing) before anything else, by every start.
VERSION_DDL = """
CREATE TABLE IF NOT EXISTS {s}.payler_schema_version (
    version    INTEGER PRIMARY KEY,
    applied_ms BIGINT NOT NULL
)
"""

#: The columns a payload is rebuilt from, in the order :func:`payler.payload.Payload.from_stored`
#: takes them in the storage.
PAYLOAD_COLUMNS = "id, body, meta, destination, due_ms, created_ms, attempts, last_error"


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (any characters; NUL is refused by the caller)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Statements:
    """The storage's statements for one schema (``$n`` parameters, asyncpg's style)."""

    schema: str

    @property
    def table(self) -> str:
        return f"{quote_ident(self.schema)}.{SPOOL_TABLE}"

    @staticmethod
    def _notifying(changed: str, flag: str, channel: str) -> str:
        """``changed`` (a statement returning ``due_ms``), counted, and announced on ``channel``
        with the earliest due time when it changed anything and ``flag`` is true: one statement,
        so the notification goes out when (and only if) the change commits."""
        return (
            f"WITH changed AS ({changed}) SELECT count(*)::int AS n,"
            f" CASE WHEN count(*) > 0 AND {flag} THEN pg_notify({channel}, min(due_ms)::text) END"
            " AS notified FROM changed"
        )

    @property
    def store(self) -> str:
        # $1 state; $2 ids, $3 digests, $4 derived ids; $5..$13 one array per other column;
        # $14 notify?, $15 channel. Returns a row per payload stored (or deferred): its
        # position `n` in the batch, whether under its own id, whether it was deferred.
        #
        # The rule of payler/drivers/storages/dedupe.py (plan_store), in one statement. `aimed`
        # says where each payload goes (NULL: nowhere, a redelivery). It takes its own id when
        # no entry holds it (the first payload of the batch with that id decides which content
        # it names); it is a redelivery when the entry holding its id has its digest, or none
        # (stored before digests were kept); otherwise it is another message reusing the id,
        # stored under its derived id unless an entry holds that too (the same reuse,
        # redelivered). `planned`: the first payload aimed at a place is stored there, a later
        # one with the same content is a redelivery; a later one with other content (an id
        # that is another's derived id: only made on purpose) is deferred, for the caller to
        # store again once this is done, as if it came in the next batch.
        #
        # No ON CONFLICT: an id a concurrent store committed after this statement's snapshot
        # fails the whole statement (unique_violation), and the caller runs it again; the
        # next snapshot sees that entry, and every decision is made again (a payload aimed at a
        # derived id because another of the batch would take its own id was aimed right only
        # if that one is stored). The rows go in in id order, so that stores of overlapping
        # batches wait for each other in one order, never in a cycle. The wide columns are
        # unnested apart, joined by position at the insert: the plan sorts narrow rows only.
        return f"""
            WITH batch AS (
                SELECT * FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY
                    AS b(id, digest, derived, n)
            ),
            held AS (
                SELECT id, digest FROM {self.table} WHERE id = ANY($2::text[] || $4::text[])
            ),
            aimed AS (
                SELECT b.n, b.id, b.digest, CASE
                    WHEN own.id IS NOT NULL AND (own.digest IS NULL OR own.digest = b.digest)
                        THEN NULL
                    WHEN own.id IS NULL AND b.digest
                        = first_value(b.digest) OVER (PARTITION BY b.id ORDER BY b.n)
                        THEN b.id
                    WHEN reused.id IS NOT NULL THEN NULL
                    ELSE b.derived
                END AS target
                FROM batch AS b
                LEFT JOIN held AS own ON own.id = b.id
                LEFT JOIN held AS reused ON reused.id = b.derived
            ),
            planned AS (
                SELECT n, id, target, nth > 1 AS deferred FROM (
                    SELECT *,
                        row_number() OVER (PARTITION BY target ORDER BY n) AS nth,
                        first_value(digest) OVER (PARTITION BY target ORDER BY n) AS first
                    FROM aimed WHERE target IS NOT NULL
                ) AS a WHERE nth = 1 OR digest <> first
            ),
            inserted AS (
                INSERT INTO {self.table} (id, state, due_ms, visible_ms, destination, attempts,
                    last_error, created_ms, message_id, correlation_id, digest, body, meta)
                SELECT p.target, $1, e.due, e.due, e.destination, e.attempts, e.last_error,
                    e.created, e.message_id, e.correlation_id, e.digest, e.body, e.meta
                FROM unnest($3::text[], $5::bigint[], $6::text[], $7::int[], $8::text[],
                    $9::bigint[], $10::text[], $11::text[], $12::bytea[], $13::text[])
                    WITH ORDINALITY AS e(digest, due, destination, attempts, last_error,
                        created, message_id, correlation_id, body, meta, n)
                JOIN planned AS p ON p.n = e.n AND NOT p.deferred
                ORDER BY p.target COLLATE "C"
                RETURNING due_ms
            )
            SELECT n, target = id AS own, deferred,
                (SELECT CASE WHEN count(*) > 0 AND $14 THEN pg_notify($15, min(due_ms)::text)
                    END FROM inserted) AS notified
            FROM planned
        """

    @property
    def state_of(self) -> str:
        return f"SELECT state FROM {self.table} WHERE id = $1 AND state IN ('pending', 'dead')"

    def lookup(self, column: str, state: str) -> str:
        """Entries in ``state`` whose ``column`` (``message_id`` or ``correlation_id``) is $1,
        at most $2, through that column's index. The state is written in (as in the listing)."""
        if column not in ("message_id", "correlation_id") or state not in ("pending", "dead"):
            raise ValueError(f"no lookup by {column!r} in state {state!r}")
        return (
            f"SELECT {PAYLOAD_COLUMNS} FROM {self.table}"
            f" WHERE {column} = $1 AND state = '{state}' LIMIT $2"
        )

    @property
    def claim(self) -> str:
        # $1 now, $2 limit, $3 token, $4 lease end. The rows are locked, skipping the ones a
        # concurrent claimant holds, then leased in the same statement. ARRAY(...): the ids
        # are collected first and the rows then found by key, whatever the planner thinks of
        # the table's size (a join may scan it all).
        return (
            f"UPDATE {self.table} SET token = $3, visible_ms = $4"
            f" WHERE id = ANY(ARRAY(SELECT id FROM {self.table}"
            " WHERE state = 'pending' AND visible_ms <= $1"
            " ORDER BY visible_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED))"
            f" RETURNING {PAYLOAD_COLUMNS}"
        )

    @property
    def ack(self) -> str:
        # $1 tombstone expiry, $2 ids, $3 tokens. The row stays, emptied, as the tombstone.
        return (
            f"UPDATE {self.table} AS s SET state = 'delivered', visible_ms = $1, token = NULL,"
            " body = '', meta = '{}', last_error = NULL, message_id = NULL,"
            " correlation_id = NULL FROM unnest($2::text[], $3::text[]) AS c(id, token)"
            " WHERE s.id = c.id AND s.token = c.token AND s.state = 'pending'"
        )

    @property
    def purge(self) -> str:
        # $1 now, $2 batch size. SKIP LOCKED: instances purging together share the rows out
        # instead of waiting on (or deadlocking over) each other's.
        return (
            f"DELETE FROM {self.table} WHERE id = ANY(ARRAY(SELECT id FROM {self.table}"
            " WHERE state = 'delivered' AND visible_ms <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED))"
        )

    @property
    def retry(self) -> str:
        # $1 id, $2 token, $3 due, $4 reason, $5 notify?, $6 channel, $7 attempts.
        return self._notifying(
            f"UPDATE {self.table} SET due_ms = $3, visible_ms = $3, token = NULL,"
            " attempts = $7, last_error = $4"
            " WHERE id = $1 AND token = $2 AND state = 'pending' RETURNING due_ms",
            "$5",
            "$6",
        )

    @property
    def dead_letter(self) -> str:
        # $1 id, $2 token, $3 reason.
        return (
            f"UPDATE {self.table} SET state = 'dead', token = NULL, last_error = $3"
            " WHERE id = $1 AND token = $2 AND state = 'pending'"
        )

    @property
    def next_visible(self) -> str:
        return f"SELECT min(visible_ms) FROM {self.table} WHERE state = 'pending'"

    @property
    def get(self) -> str:
        return (
            f"SELECT {PAYLOAD_COLUMNS} FROM {self.table}"
            " WHERE id = $1 AND state IN ('pending', 'dead')"
        )

    @property
    def cancel(self) -> str:
        return f"DELETE FROM {self.table} WHERE id = $1 AND state IN ('pending', 'dead')"

    @property
    def reschedule(self) -> str:
        # $1 id, $2 due, $3 notify?, $4 channel.
        return self._notifying(
            f"UPDATE {self.table} SET due_ms = $2, visible_ms = $2, token = NULL,"
            " state = 'pending' WHERE id = $1 AND state IN ('pending', 'dead') RETURNING due_ms",
            "$3",
            "$4",
        )


# -- text without NUL ------------------------------------------------------------------------------

_ESCAPE = "\x01"
_ESCAPES = {"\x00": "\x01\x03", "\x01": "\x01\x02"}
_UNESCAPES = {escaped: plain for plain, escaped in _ESCAPES.items()}
_TO_ESCAPE = re.compile("[\x00\x01]")
_TO_UNESCAPE = re.compile("\x01[\x02\x03]")


def to_text(value: str) -> str:
    """``value`` as PostgreSQL ``TEXT`` can hold it: as it is unless it holds a NUL (or starts
    with the escape character U+0001); then U+0001 followed by it, NUL and U+0001 escaped."""
    if "\x00" not in value and not value.startswith(_ESCAPE):
        return value
    return _ESCAPE + _TO_ESCAPE.sub(lambda m: _ESCAPES[m.group()], value)


def from_text(stored: str) -> str:
    """Inverse of :func:`to_text`."""
    if not stored.startswith(_ESCAPE):
        return stored
    return _TO_UNESCAPE.sub(lambda m: _UNESCAPES[m.group()], stored[1:])


def optional_text(value: str | None) -> str | None:
    return None if value is None else to_text(value)


def from_optional_text(stored: str | None) -> str | None:
    return None if stored is None else from_text(stored)


__all__ = [
    "MIGRATIONS",
    "PAYLOAD_COLUMNS",
    "SCHEMA_VERSION",
    "SPOOL_TABLE",
    "VERSION_DDL",
    "VERSION_TABLE",
    "Statements",
    "from_optional_text",
    "from_text",
    "optional_text",
    "quote_ident",
    "to_text",
]
