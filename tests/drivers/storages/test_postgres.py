"""What is particular to the PostgreSQL storage (the contract suite covers the rest): the schema
and its version, text PostgreSQL refuses, claims across many instances, outages, and the
LISTEN/NOTIFY wake-up of watchers in other processes."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from payler.drivers.base import Rejection
from payler.drivers.storages import postgres, storage_from_url
from payler.drivers.storages.base import Stored, WatchSettings
from payler.drivers.storages.postgres import PostgresStorage, is_outage
from payler.drivers.storages.postgres_settings import channel_of, split_settings
from payler.drivers.storages.postgres_sql import from_text, to_text
from payler.errors import ConfigError, StartupError, TransientError
from payler.identity import content_digest, derived_id
from payler.payload import MessageProperties, Payload
from tests.integration.conftest import Payler

pytestmark = pytest.mark.postgres

T0 = 1_700_000_000_000
LEASE = 10_000


def payload(
    payload_id: str, due_ms: int = T0, destination: str = "out", **fields: object
) -> Payload:
    fields.setdefault("body", payload_id.encode())
    return Payload(
        id=payload_id,
        destination=destination,
        due_ms=due_ms,
        created_ms=T0,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
async def raw(postgres_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, to see (and change) what the storage wrote."""
    conn = await asyncpg.connect(postgres_database)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def storage(postgres_url: str) -> AsyncIterator[PostgresStorage]:
    async with PostgresStorage(postgres_url) as s:
        yield s


def schema_of(url: str) -> str:
    return url.rpartition("schema=")[2]


# -- the schema ------------------------------------------------------------------------------------


async def test_the_schema_is_created_with_its_version(
    storage: PostgresStorage, raw: asyncpg.Connection
) -> None:
    table = f'"{storage.schema}"'
    versions = await raw.fetch(f"SELECT version FROM {table}.payler_schema_version")
    assert [r["version"] for r in versions] == [postgres.SCHEMA_VERSION]
    indexes = await raw.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'payler_spool'",
        storage.schema,
    )
    assert {r["indexname"] for r in indexes} >= {
        "payler_spool_claim",
        "payler_spool_due",
        "payler_spool_destination",
        "payler_spool_tombstones",
        "payler_spool_message_id",
        "payler_spool_correlation_id",
    }
    # A second start finds everything in place and changes nothing.
    async with PostgresStorage(storage.url) as again:
        assert again.schema == storage.schema
    assert len(await raw.fetch(f"SELECT * FROM {table}.payler_schema_version")) == 1


async def test_a_newer_schema_stops_the_start(postgres_url: str, raw: asyncpg.Connection) -> None:
    async with PostgresStorage(postgres_url) as first:
        schema = first.schema
    newer = postgres.SCHEMA_VERSION + 1
    await raw.execute(f'INSERT INTO "{schema}".payler_schema_version VALUES ($1, 0)', newer)
    later = PostgresStorage(postgres_url)
    with pytest.raises(StartupError, match=f"schema version {newer}, newer than this payler"):
        await later.connect()
    assert later._pool is None  # closed behind itself


async def test_a_newer_schema_makes_payler_exit_2(
    postgres_url: str, raw: asyncpg.Connection, tmp_path: Path
) -> None:
    async with PostgresStorage(postgres_url) as first:
        schema = first.schema
    await raw.execute(f'INSERT INTO "{schema}".payler_schema_version VALUES (999, 0)')
    config = tmp_path / "configuration.yaml"
    config.write_text("workflows:\n  - callable: client.watch_storage\n")
    env = {"PAYLER_STORAGE_URL": postgres_url, "BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
    payler = await Payler.start(config, env, tmp_path)
    assert await payler.wait() == 2, payler.log
    assert "schema version 999, newer than this payler knows" in payler.log


async def test_a_bad_url_parameter_makes_payler_exit_2(postgres_url: str, tmp_path: Path) -> None:
    config = tmp_path / "configuration.yaml"
    config.write_text("workflows:\n  - callable: client.watch_storage\n")
    env = {
        "PAYLER_STORAGE_URL": f"{postgres_url}&pool_size=lots",
        "BROKER_URL": "amqp://guest:guest@127.0.0.1:1/",
    }
    payler = await Payler.start(config, env, tmp_path)
    assert await payler.wait() == 2, payler.log
    assert "pool_size='lots' is not a whole number" in payler.log


async def test_an_older_schema_is_migrated(
    postgres_url: str, raw: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStorage(postgres_url) as first:
        await first.store([payload("kept")])
        schema = first.schema
    # A payler of the next version: one more migration.
    migration = "ALTER TABLE {s}.payler_spool ADD COLUMN tenant TEXT"
    monkeypatch.setattr(postgres, "MIGRATIONS", [*postgres.MIGRATIONS, migration])
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", postgres.SCHEMA_VERSION + 1)
    async with PostgresStorage(postgres_url) as upgraded:
        assert await upgraded.get("kept") is not None
    versions = await raw.fetch(f'SELECT version FROM "{schema}".payler_schema_version')
    assert sorted(r["version"] for r in versions) == [1, 2]
    columns = await raw.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = $1 AND table_name = 'payler_spool'",
        schema,
    )
    assert "tenant" in {r["column_name"] for r in columns}


async def test_a_role_that_only_reads_and_writes_the_spool_can_run_it(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    # An administrator created the schema (as the owner) and granted the spool's tables only.
    async with PostgresStorage(postgres_url) as owner:
        schema = owner.schema
    role = f"payler_rw_{uuid.uuid4().hex[:8]}"
    await raw.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await raw.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        await raw.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO {role}'
        )
        scheme, _, rest = postgres_url.partition("://")
        async with PostgresStorage(f"{scheme}://{role}@{rest.partition('@')[2]}") as storage:
            await storage.store([payload("a")])
            [claim] = await storage.claim_due(T0, 10, LEASE)
            assert await storage.ack([claim]) == 1
    finally:
        await raw.execute(f"DROP OWNED BY {role}")
        await raw.execute(f"DROP ROLE {role}")


async def test_instances_starting_together_on_a_new_schema(postgres_url: str) -> None:
    storages = [PostgresStorage(postgres_url) for _ in range(6)]
    try:
        await asyncio.gather(*(s.connect() for s in storages))
        await storages[0].store([payload("a")])
        assert [await s.count() for s in storages] == [1] * 6
    finally:
        await asyncio.gather(*(s.close() for s in storages))


# -- what the table holds --------------------------------------------------------------------------


async def test_what_the_table_holds(storage: PostgresStorage, raw: asyncpg.Connection) -> None:
    properties = MessageProperties(message_id="m-1", correlation_id="c-1")
    stored = payload("a", T0 + 5, "x", properties=properties)
    await storage.store([stored])
    table = f'"{storage.schema}".payler_spool'
    row = await raw.fetchrow(f"SELECT * FROM {table} WHERE id = 'a'")
    assert row is not None
    assert {k: row[k] for k in ("state", "due_ms", "visible_ms", "token", "destination")} == {
        "state": "pending",
        "due_ms": T0 + 5,
        "visible_ms": T0 + 5,
        "token": None,
        "destination": "x",
    }
    digest = content_digest(stored)
    assert (row["message_id"], row["correlation_id"], row["digest"]) == ("m-1", "c-1", digest)
    assert bytes(row["body"]) == b"a"
    [claim] = await storage.claim_due(T0 + 5, 10, LEASE)
    leased = await raw.fetchrow(f"SELECT token, visible_ms FROM {table} WHERE id = 'a'")
    assert leased is not None
    assert (leased["token"], leased["visible_ms"]) == (claim.token, T0 + 5 + LEASE)
    assert await storage.ack([claim]) == 1
    tombstone = await raw.fetchrow(f"SELECT * FROM {table} WHERE id = 'a'")
    assert tombstone is not None
    assert tombstone["state"] == "delivered"
    assert (bytes(tombstone["body"]), tombstone["message_id"], tombstone["token"]) == (
        b"",
        None,
        None,
    )
    assert tombstone["digest"] == digest  # what tells a redelivered copy from a reused id


async def test_text_with_nul_and_any_unicode_round_trips(
    storage: PostgresStorage, raw: asyncpg.Connection
) -> None:
    odd = ["nul\x00inside", "\x01starts-with-the-escape", "\x01\x00\x01\x02\x03", "é ü 中 🎉", ""]
    entries = [
        payload(
            f"id-{text}",
            T0 + i,
            f"to-{text}",
            last_error=f"error {text}",
            properties=MessageProperties(message_id=text, correlation_id=text),
        )
        for i, text in enumerate(odd)
    ]
    assert await storage.store(entries) == len(odd)
    for entry in entries:
        assert await storage.get(entry.id) == entry
    assert (await storage.list(limit=10)).items == entries
    assert await storage.count(destination="to-nul\x00inside") == 1
    page = await storage.list(limit=1, destination="to-\x01\x00\x01\x02\x03")
    assert [p.id for p in page.items] == ["id-\x01\x00\x01\x02\x03"]
    claims = await storage.claim_due(T0 + 10, 10, LEASE)
    assert [c.payload for c in claims] == entries
    assert await storage.retry(claims[0], T0 + 20, "again \x00")
    assert (await storage.get(entries[0].id)).last_error == "again \x00"  # type: ignore[union-attr]
    assert await storage.ack(claims[1:]) == len(odd) - 1
    assert await storage.cancel(entries[0].id)
    # Plain text stays plain in the table: what psql shows is what was sent.
    await storage.store([payload("plain é")])
    row = await raw.fetchrow(
        f'SELECT id FROM "{storage.schema}".payler_spool WHERE id = $1', "plain é"
    )
    assert row is not None


def test_the_nul_escape_is_reversible() -> None:
    samples = ["", "plain", "\x00", "\x01", "\x01\x02", "a\x00b\x01c", "\x01\x03", "x\x01y"]
    for text in samples:
        stored = to_text(text)
        assert "\x00" not in stored
        assert from_text(stored) == text
    assert len({to_text(t) for t in samples}) == len(samples)
    assert to_text("x\x01y") == "x\x01y"  # only NUL, or a leading U+0001, is escaped


# -- stores: redeliveries and reused ids -----------------------------------------------------------


async def test_a_spool_of_the_first_postgres_payler_is_used_as_it_is(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    # The first PostgreSQL payler (schema version 1) wrote no digests: its rows, pending, dead
    # and delivered, are the messages they name for a redelivery, and the schema stays as it is.
    async with PostgresStorage(postgres_url) as first:
        await first.store([payload(i) for i in ("pending", "dead", "done")])
        claims = {c.payload.id: c for c in await first.claim_due(T0, 10, LEASE)}
        assert await first.dead_letter(claims["dead"], "bad")
        assert await first.ack([claims["done"]]) == 1
        table = f'"{first.schema}".payler_spool'
        await raw.execute(f"UPDATE {table} SET digest = NULL")
    async with PostgresStorage(postgres_url) as storage:
        again = [payload(i, body=b"other content") for i in ("pending", "dead", "done")]
        stored = await storage.store_batch(again)
        assert stored == Stored(duplicates=["pending", "dead", "done"])
        assert await storage.store_batch([payload("new")]) == Stored(new=["new"])
        assert [c.payload.id for c in await storage.claim_due(T0, 10, LEASE)] == ["new"]
    versions = await raw.fetch(
        f'SELECT version FROM "{schema_of(postgres_url)}".payler_schema_version'
    )
    assert [r["version"] for r in versions] == [postgres.SCHEMA_VERSION] == [1]


MINE, THEIRS = payload("x", body=b"mine"), payload("x", body=b"theirs")
MINE_DERIVED = derived_id("x", content_digest(MINE))


@pytest.mark.parametrize(
    ("theirs", "ours", "expected"),
    [
        (MINE, [MINE], Stored(duplicates=["x"])),
        (THEIRS, [MINE], Stored(new=[MINE_DERIVED], renamed={"x": MINE_DERIVED})),
        # Ours aimed "theirs" at its derived id, "mine" taking "x": wrong once "x" is taken.
        (
            THEIRS,
            [MINE, THEIRS],
            Stored(new=[MINE_DERIVED], duplicates=["x"], renamed={"x": MINE_DERIVED}),
        ),
    ],
    ids=["redelivery", "reused-id", "reused-id-and-redelivery"],
)
async def test_a_store_racing_another_for_an_id_decides_again(
    postgres_url: str,
    raw: asyncpg.Connection,
    theirs: Payload,
    ours: list[Payload],
    expected: Stored,
) -> None:
    # Another instance inserts "x" after our statement's snapshot and commits while our insert
    # waits on it: ours must decide again, seeing it, not take the other message for its own.
    name = f"payler-test-{uuid.uuid4().hex[:8]}"
    async with PostgresStorage(f"{postgres_url}&application_name={name}") as storage:
        table = f'"{storage.schema}".payler_spool'
        async with raw.transaction():
            await raw.execute(
                f"INSERT INTO {table} (id, state, due_ms, visible_ms, destination, created_ms,"
                " digest, body, meta) VALUES ('x', 'pending', $1, $1, 'out', $1, $2, $3, $4)",
                T0,
                content_digest(theirs),
                theirs.body,
                theirs.meta_json(),
            )
            storing = asyncio.create_task(storage.store_batch(ours))
            waiting = "SELECT 1 FROM pg_stat_activity WHERE application_name = $1"
            waiting += " AND wait_event_type = 'Lock'"
            for _ in range(200):  # bounded: 10 s
                if await raw.fetchval(waiting, name):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the store never waited for the other insert")
        assert await asyncio.wait_for(storing, 10) == expected
        bodies = sorted(c.payload.body for c in await storage.claim_due(T0, 10, LEASE))
        assert bodies == sorted({theirs.body, *(p.body for p in ours)})


async def test_instances_storing_reused_ids_together_store_each_message_once(
    postgres_url: str,
) -> None:
    # Five instances store overlapping batches: the same few ids, two contents each, in
    # different orders. Every message is stored once, under its id or its derived one, and
    # exactly one store reports it new.
    contents = [
        payload(f"id{i % 40}", T0 + i, body=f"content {i % 80}".encode()) for i in range(80)
    ]
    storages = [PostgresStorage(postgres_url) for _ in range(5)]
    await asyncio.gather(*(s.connect() for s in storages))
    try:
        batches = [contents[k::3] + contents[: k * 7] for k in range(5)]
        results = await asyncio.gather(
            *(s.store_batch(b) for s, b in zip(storages, batches, strict=True))
        )
        new = [i for stored in results for i in stored.new]
        assert len(new) == len(set(new)) == len(contents)
        claimed = await storages[0].claim_due(T0 + 100, 200, LEASE)
        assert sorted(c.payload.body for c in claimed) == sorted(p.body for p in contents)
        assert sorted(c.payload.id for c in claimed) == sorted(new)
    finally:
        await asyncio.gather(*(s.close() for s in storages))


async def test_a_store_in_several_statements_is_one_batch(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past a chunk's size, a store takes several statements in one transaction: a later
    # chunk sees the earlier ones' entries as the rule says (earlier payloads count as stored).
    monkeypatch.setattr(postgres, "_STORE_CHUNK", 2)
    one, two = payload("x", body=b"one"), payload("x", body=b"two")
    derived = derived_id("x", content_digest(two))
    stored = await storage.store_batch([one, payload("a"), two, one, payload("b"), two])
    assert stored == Stored(
        new=["x", "a", derived, "b"], duplicates=["x", "x"], renamed={"x": derived}
    )
    assert await storage.count() == 4


# -- claims, purges, outages -----------------------------------------------------------------------


async def test_claims_are_atomic_across_instances(postgres_url: str) -> None:
    total = 500
    storages = [PostgresStorage(postgres_url) for _ in range(5)]
    await asyncio.gather(*(s.connect() for s in storages))
    try:
        await storages[0].store([payload(f"m{i:03}", T0 + i % 11) for i in range(total)])
        seen: list[str] = []
        for _ in range(total):  # bounded: every round claims something until all are taken
            rounds = await asyncio.gather(
                *(s.claim_due(T0 + 20, 9, LEASE) for s in storages for _ in range(3))
            )
            claimed = [c.payload.id for claims in rounds for c in claims]
            if not claimed:
                break
            seen += claimed
        assert len(seen) == len(set(seen)), "an entry was claimed twice"
        assert sorted(seen) == [f"m{i:03}" for i in range(total)]
        assert await storages[1].next_visible_ms() == T0 + 20 + LEASE
    finally:
        await asyncio.gather(*(s.close() for s in storages))


async def test_a_backlog_of_tombstones_is_purged_in_batches(
    storage: PostgresStorage, raw: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "_PURGE_BATCH", 3)
    await storage.store([payload(f"t{i}") for i in range(10)])
    assert await storage.ack(await storage.claim_due(T0, 100, LEASE)) == 10
    after = storage.clock.now_ms() + storage.dedupe_window_ms + 1
    await storage.claim_due(after, 1, LEASE)  # one batch now, the rest beside the claims
    if storage._purging is not None:
        await asyncio.wait_for(storage._purging, 10)
    left = await raw.fetchval(f'SELECT count(*) FROM "{storage.schema}".payler_spool')
    assert left == 0
    assert await storage.store([payload("t0")]) == 1


async def test_a_lost_connection_is_an_outage_and_the_next_call_reconnects(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    name = f"payler-test-{uuid.uuid4().hex[:8]}"
    async with PostgresStorage(f"{postgres_url}&application_name={name}") as storage:
        await storage.store([payload("a")])
        table = f'"{storage.schema}".payler_spool'
        async with raw.transaction():
            # The claim waits on our lock, so its connection is surely busy when it goes.
            await raw.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            claiming = asyncio.create_task(storage.claim_due(T0, 10, LEASE))
            waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
            waiting += " AND wait_event_type = 'Lock'"
            for _ in range(200):  # bounded: 10 s
                if (pid := await raw.fetchval(waiting, name)) is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the claim never waited on the lock")
            await raw.execute("SELECT pg_terminate_backend($1)", pid)  # our own connection
            with pytest.raises(TransientError, match="PostgreSQL spool"):
                await asyncio.wait_for(claiming, 10)
        assert [c.payload.id for c in await storage.claim_due(T0, 10, LEASE)] == ["a"]


def test_outages_and_refusals_are_told_apart() -> None:
    assert is_outage(ConnectionResetError())
    assert is_outage(TimeoutError())
    assert is_outage(asyncpg.exceptions.ReadOnlySQLTransactionError("read-only"))  # failover
    assert is_outage(asyncpg.exceptions.DiskFullError("disk full"))
    assert is_outage(asyncpg.exceptions.AdminShutdownError("shutdown"))
    assert is_outage(asyncpg.exceptions.SerializationError("retry"))
    assert is_outage(asyncpg.exceptions.TooManyConnectionsError("too many"))
    assert is_outage(asyncpg.InterfaceError("connection is closed"))
    assert not is_outage(asyncpg.exceptions.CharacterNotInRepertoireError("bad byte"))
    assert not is_outage(asyncpg.exceptions.ProgramLimitExceededError("too big"))
    assert not is_outage(asyncpg.InterfaceError("cannot perform operation: another operation"))


async def test_an_unreachable_server_is_a_startup_error_with_the_password_masked() -> None:
    storage = PostgresStorage(
        "postgresql://payler:s3cret-pw@127.0.0.1:1/payler", connect_timeout_s=2
    )
    with pytest.raises(StartupError, match=r"payler:\*\*\*@127\.0\.0\.1:1") as caught:
        await storage.connect()
    assert "s3cret-pw" not in str(caught.value)


def test_url_settings() -> None:
    settings = split_settings(
        "postgres://u:p@h:5/db?schema=spool&sslmode=disable&pool_size=2&notify=off"
        "&command_timeout=5"
    )
    assert settings.dsn == "postgres://u:p@h:5/db?sslmode=disable"
    assert (settings.schema, settings.pool_size, settings.notify) == ("spool", 2, False)
    assert settings.command_timeout_s == 5.0
    defaults = split_settings("postgresql://h/db")
    assert (defaults.schema, defaults.pool_size, defaults.notify) == ("", 4, True)
    for bad in ("pool_size=0", "pool_size=x", "notify=maybe", "schema=", "command_timeout=-1"):
        with pytest.raises(ConfigError, match=bad.partition("=")[0]):
            split_settings(f"postgresql://h/db?{bad}")
    assert isinstance(storage_from_url("postgres://h/db"), PostgresStorage)
    assert len(channel_of("s" * 200).encode()) <= 63
    assert channel_of("s" * 200) != channel_of("s" * 199)


# -- LISTEN / NOTIFY -------------------------------------------------------------------------------

_STORE_ELSEWHERE = """
import asyncio, sys, time
from payler.drivers.storages import storage_from_url
from payler.payload import Payload

async def main() -> None:
    async with storage_from_url(sys.argv[1]) as storage:
        now = storage.clock.now_ms()
        await storage.store([Payload(id="elsewhere", body=b"x", destination="out",
                                     due_ms=now, created_ms=now)])
        print(time.time(), flush=True)

asyncio.run(main())
"""


async def watch_until(
    storage: PostgresStorage, delivered: Callable[[float], None], stop: asyncio.Event
) -> None:
    """Run the watch loop with a poll bound far longer than any test; report each delivery."""

    async def handler(batch: object) -> list[Rejection]:
        delivered(time.time())
        return []

    settings = WatchSettings(max_poll_interval_s=120.0)
    await storage.serve(handler, stop, settings=settings)


async def store_in_another_process(url: str) -> float:
    """Store one due entry from a separate Python process; return when its store returned."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STORE_ELSEWHERE, url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    return float(out.decode().split()[-1])


@pytest.mark.parametrize("restart_listener", [False, True], ids=["listening", "reconnected"])
async def test_a_store_in_another_process_wakes_the_watcher_at_once(
    postgres_url: str, raw: asyncpg.Connection, restart_listener: bool
) -> None:
    name = f"payler-test-{uuid.uuid4().hex[:8]}"
    woken: list[float] = []
    arrived = asyncio.Event()

    def delivered(at: float) -> None:
        woken.append(at)
        arrived.set()

    stop = asyncio.Event()
    async with PostgresStorage(f"{postgres_url}&application_name={name}") as storage:
        watching = asyncio.create_task(watch_until(storage, delivered, stop))
        try:
            # The watcher is asleep for its 120 s poll bound once it has listened and looked.
            for _ in range(1000):  # bounded: 10 s
                if storage._listener is not None and storage._listener.tried.is_set():
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the watch loop never listened")
            if restart_listener:  # the listening connection dies: it is made again
                listening = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
                listening += " AND query LIKE 'LISTEN%'"
                old = await raw.fetchval(listening, name)
                await raw.execute("SELECT pg_terminate_backend($1)", old)
                for _ in range(200):  # bounded: 10 s
                    if await raw.fetchval(listening, name) not in (None, old):
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the listening connection was not made again")
            stored_at = await store_in_another_process(storage.url)
            await asyncio.wait_for(arrived.wait(), 30)
        finally:
            stop.set()
            await asyncio.wait_for(watching, 10)
    latency_s = woken[0] - stored_at
    assert latency_s < 2.0, f"woken {latency_s:.3f} s after the store (poll bound: 120 s)"


async def test_without_notify_nothing_listens(postgres_url: str, raw: asyncpg.Connection) -> None:
    name = f"payler-test-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}&notify=false&application_name={name}"
    stop = asyncio.Event()
    async with PostgresStorage(url) as storage:
        watching = asyncio.create_task(watch_until(storage, lambda _at: None, stop))
        await asyncio.sleep(0)  # let the loop start
        stop.set()
        await asyncio.wait_for(watching, 10)
        listening = await raw.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND query LIKE 'LISTEN%'",
            name,
        )
        assert listening == 0
        assert storage._listener is None
