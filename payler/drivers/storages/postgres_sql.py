"""The SQL of the PostgreSQL spool storage: its schema, its migrations and its statements.

Everything lives in one schema (``?schema=`` in the URL, else the connection's current schema):

==========================  ================================================================
``payler_spool``            one row per entry; a delivered entry's row stays, emptied, as its
                            tombstone (``state = 'delivered'``, ``visible_ms`` = its expiry)
``payler_schema_version``   one row per migration applied (``version``, ``applied_ms``)
==========================  ================================================================

Indexes: the claim order (``visible_ms, id`` of pending rows), the due order of the admin
listing (overall and per destination), the tombstones by expiry (the purge), and the admin
lookups by ``message_id`` and ``correlation_id``. ``digest`` holds a content digest of the
entry (kept in its tombstone too); nothing writes it yet.

The statements use only what PostgreSQL-compatible distributed databases also speak
(``FOR UPDATE SKIP LOCKED``, ``INSERT ... ON CONFLICT DO NOTHING``, ``unnest`` of arrays,
partial indexes); ``pg_notify`` is asked for only where the URL keeps notifications on.

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
        # $1 state, $2..$11 one array per column, $12 notify?, $13 channel.
        return self._notifying(
            f"INSERT INTO {self.table} (id, state, due_ms, visible_ms, destination, attempts,"
            " last_error, created_ms, message_id, correlation_id, body, meta)"
            " SELECT e.id, $1, e.due, e.due, e.destination, e.attempts, e.last_error,"
            " e.created, e.message_id, e.correlation_id, e.body, e.meta"
            " FROM unnest($2::text[], $3::bigint[], $4::text[], $5::int[], $6::text[],"
            " $7::bigint[], $8::text[], $9::text[], $10::bytea[], $11::text[])"
            " AS e(id, due, destination, attempts, last_error, created, message_id,"
            " correlation_id, body, meta)"
            " ON CONFLICT (id) DO NOTHING RETURNING due_ms",
            "$12",
            "$13",
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
        # $1 id, $2 token, $3 due, $4 reason, $5 notify?, $6 channel.
        return self._notifying(
            f"UPDATE {self.table} SET due_ms = $3, visible_ms = $3, token = NULL,"
            " attempts = attempts + 1, last_error = $4"
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
