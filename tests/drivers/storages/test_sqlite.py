"""What is particular to the embedded SQLite storage (the contract suite covers the rest):
opening and sharing the file, and its faults on real file systems — removed, replaced,
immutable, full."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from payler import client
from payler.clock import SystemClock
from payler.drivers.storages.base import WatchSettings, _board
from payler.drivers.storages.sqlite import SQLiteStorage, parse_url, path_of
from payler.errors import ConfigError, StartupError, TransientError
from payler.options import ProcessQueueOptions, WatchStorageOptions
from payler.payload import Payload
from payler.testing import MemoryBroker, make_payload, reset
from payler.workflow import WorkflowContext
from tests.drivers.storages.conftest import SMALL_FS_BYTES, chattr, fill

T0 = 1_700_000_000_000
LEASE = 10_000
#: The two ways to run the file: shared (rollback journal, the default), exclusive (WAL).
LOCKING = pytest.mark.parametrize(
    "locking", ["", "?locking=exclusive"], ids=["shared", "exclusive"]
)


def payload(payload_id: str, body: bytes | None = None, due_ms: int = T0) -> Payload:
    body = f"body of {payload_id}".encode() if body is None else body
    return Payload(id=payload_id, body=body, destination="out", due_ms=due_ms, created_ms=T0)


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def run_python(code: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python process (a fault there cannot take the tests with it)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def mapped(folder: Path) -> list[str]:
    """The lines of this process's memory map that name a file in ``folder``."""
    return [
        line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line
    ]


def replace_file(path: Path) -> None:
    """Move ``path`` away and put an empty file in its place."""
    path.rename(path.with_name(f"{path.name}.moved"))
    path.write_bytes(b"")


class Logged(logging.Handler):
    """Sets :attr:`seen` once a record holding ``text`` is logged (by the event loop's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


# -- opening ------------------------------------------------------------------------------------


async def test_many_workflows_can_open_one_new_spool_at_once(tmp_path: Path) -> None:
    # The workflows of one configuration open the same new file together: they share it.
    for round_ in range(5):
        url = f"sqlite:///{tmp_path}/spool-{round_}.db"
        storages = [SQLiteStorage(url) for _ in range(8)]
        await asyncio.gather(*(s.connect() for s in storages))
        try:
            assert [await s.count() for s in storages] == [0] * 8
            await storages[0].store([payload("a")])
            assert [await s.count() for s in storages] == [1] * 8
        finally:
            await asyncio.gather(*(s.close() for s in storages))


def test_urls_name_relative_and_absolute_paths_and_how_the_file_is_shared() -> None:
    assert path_of("sqlite:///payler-spool.db") == Path("payler-spool.db")
    assert path_of("sqlite:////var/lib/payler/spool.db") == Path("/var/lib/payler/spool.db")
    assert parse_url("sqlite:///a.db").shared
    alone = parse_url("sqlite:///a.db?locking=exclusive&busy_timeout_ms=250")
    assert (alone.path, alone.shared, alone.busy_timeout_ms) == (Path("a.db"), False, 250)
    with pytest.raises(ConfigError, match="sqlite:///relative"):
        path_of("sqlite://payler-spool.db")
    for wrong in ("locking=maybe", "busy_timeout_ms=soon", "cache=shared"):
        with pytest.raises(ConfigError, match="locking=shared"):
            SQLiteStorage(f"sqlite:///a.db?{wrong}")


async def test_an_unopenable_file_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(StartupError, match="cannot open the SQLite spool"):
        await SQLiteStorage(f"sqlite:///{tmp_path}/a-directory.db").connect()


async def test_a_new_spool_is_announced_loudly_an_existing_one_with_its_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Defect 14: on restart after its file was deleted, payler made a new, empty spool and
    # reported OK. A new spool is a WARNING naming the path; an existing one, its entries.
    caplog.set_level(logging.INFO)
    path = tmp_path / "spool.db"
    async with SQLiteStorage(f"sqlite:///{path}") as storage:
        await storage.store([payload("a"), payload("b"), payload("c")])
        [claim, *_] = await storage.claim_due(T0, 1, LEASE)
        assert await storage.dead_letter(claim, "bad")
    async with SQLiteStorage(f"sqlite:///{path}"):
        pass
    [created] = messages(caplog, "created a new, empty spool")
    assert created.levelno == logging.WARNING
    assert created.getMessage() == (
        f"created a new, empty spool at {path} (right on a first start; otherwise the spool "
        "that was here has been removed or moved)"
    )
    [opened] = messages(caplog, "opened the spool")
    assert opened.levelno == logging.INFO
    assert opened.getMessage() == f"opened the spool at {path}: 2 pending entries, 1 dead"


async def test_a_spool_written_by_the_previous_schema_opens_and_keeps_working(
    tmp_path: Path,
) -> None:
    # The file as payler wrote it before entries had content digests.
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode = WAL")
    old.executescript(
        """
        CREATE TABLE spool (
            id TEXT PRIMARY KEY, due_ms INTEGER NOT NULL, visible_ms INTEGER NOT NULL,
            token TEXT, state TEXT NOT NULL DEFAULT 'pending', destination TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created_ms INTEGER NOT NULL,
            body BLOB NOT NULL, meta TEXT NOT NULL
        );
        CREATE INDEX spool_visible ON spool (state, visible_ms);
        CREATE INDEX spool_due ON spool (state, due_ms, id);
        CREATE INDEX spool_destination ON spool (state, destination, due_ms, id);
        """
    )
    for entry in (payload("old"), payload("done")):
        old.execute(
            "INSERT INTO spool (id, due_ms, visible_ms, destination, created_ms, body, meta)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (entry.id, T0, T0, "out", T0, entry.body, entry.meta_json()),
        )
    old.execute(
        "UPDATE spool SET state = 'delivered', visible_ms = ?, body = x'', meta = '{}'"
        " WHERE id = 'done'",
        (T0 + 600_000,),
    )
    old.close()
    async with SQLiteStorage(f"sqlite:///{path}") as storage:
        assert await storage.get("old") == payload("old")
        # Without a digest, the same id is taken for the same message, as before the upgrade.
        assert await storage.store([payload("old", b"other"), payload("done", b"other")]) == 0
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.ack([claim]) == 1
        assert await storage.store([payload("new")]) == 1
        assert await storage.count() == 1


# -- one process owns the file: nothing mapped, no signal ---------------------------------------


@LOCKING
async def test_nothing_of_the_spool_is_memory_mapped(tmp_path: Path, locking: str) -> None:
    # SQLite's WAL index (the -shm file) is memory-mapped by default: a write into the mapping
    # after the file turned unwritable kills the process with SIGBUS. Nothing is mapped here.
    async with SQLiteStorage(f"sqlite:///{tmp_path}/spool.db{locking}") as storage:
        await storage.store([payload(f"m{i}") for i in range(100)])
        await storage.ack(await storage.claim_due(T0, 100, LEASE))
        assert mapped(tmp_path) == []
        assert not await asyncio.to_thread(Path(f"{tmp_path}/spool.db-shm").exists)


@LOCKING
async def test_immutable_spool_files_are_an_outage_never_a_signal(
    tmp_path: Path, immutable_files: list[Path], locking: str
) -> None:
    # Defect 16: with the spool's files made immutable (chattr +i) the process died by SIGBUS
    # with nothing logged. Now every write fails as an outage that says what is wrong.
    folder = tmp_path / "spool"
    folder.mkdir()
    script = f"""
        import asyncio, subprocess
        from pathlib import Path
        from payler.drivers.storages.sqlite import SQLiteStorage
        from payler.errors import TransientError
        from payler.payload import Payload

        def batch(start):
            return [Payload(id=f"m{{i}}", body=b"x" * 1000, destination="out", due_ms=0,
                            created_ms=0) for i in range(start, start + 100)]

        async def main():
            async with SQLiteStorage("sqlite:///{folder}/spool.db{locking}") as storage:
                await storage.store(batch(0))
                files = [str(f) for f in Path("{folder}").iterdir()]
                print("files:", " ".join(files), flush=True)
                subprocess.run(["chattr", "+i", *files], check=True)
                for start in range(100, 5000, 100):
                    try:
                        await storage.store(batch(start))
                    except TransientError as exc:
                        print("store:", exc, flush=True)
                        break
                try:
                    await storage.claim_due(1, 10, 1000)
                except TransientError as exc:
                    print("claim:", exc, flush=True)

        asyncio.run(main())
    """
    done = await asyncio.to_thread(run_python, script)
    immutable_files += await asyncio.to_thread(lambda: list(folder.iterdir()))
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[0].startswith("files:") and "-shm" not in lines[0]
    store, claim = lines[1], lines[2]
    assert store.startswith(f"store: SQLite spool '{folder}/spool.db': ")
    assert f"'{folder}/spool.db' is not writable (made immutable with chattr +i" in store
    assert claim.startswith("claim: SQLite spool") and "is not writable" in claim


async def test_an_immutable_spool_at_start_is_a_clear_startup_error(
    tmp_path: Path, immutable_files: list[Path]
) -> None:
    path = tmp_path / "spool.db"
    async with SQLiteStorage(f"sqlite:///{path}") as storage:
        await storage.store([payload("a")])
    chattr("+i", path)
    immutable_files.append(path)
    with pytest.raises(StartupError) as raised:
        await SQLiteStorage(f"sqlite:///{path}").connect()
    assert str(raised.value) == (
        f"the SQLite spool '{path}' cannot be written: '{path}' is not writable (immutable "
        "(chattr +i), on a read-only file system, or its permissions)"
    )


async def test_another_process_cannot_open_a_spool_this_one_holds_exclusively(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/spool.db"
    async with SQLiteStorage(f"{url}?locking=exclusive") as storage:
        await storage.store([payload("a")])
        other = f"""
            import asyncio
            from payler.drivers.storages.sqlite import SQLiteStorage
            from payler.errors import StartupError
            try:
                asyncio.run(SQLiteStorage("{url}?busy_timeout_ms=100").connect())
            except StartupError as exc:
                print(exc)
        """
        done = await asyncio.to_thread(run_python, other)
        assert done.returncode == 0, done.stderr
        assert "another process holds it" in done.stdout
        assert "?locking=shared (the default)" in done.stdout


async def test_processes_share_a_spool_by_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/spool.db"
    async with SQLiteStorage(url) as storage:
        await storage.store([payload("mine")])
        other = f"""
            import asyncio
            from payler.drivers.storages.sqlite import SQLiteStorage
            from payler.payload import Payload

            async def main():
                async with SQLiteStorage("{url}") as storage:
                    await storage.store([Payload(id="theirs", body=b"", destination="out",
                                                 due_ms={T0}, created_ms={T0})])
                    print([c.payload.id for c in await storage.claim_due({T0}, 10, 1000)])

            asyncio.run(main())
        """
        done = await asyncio.to_thread(run_python, other)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "['mine', 'theirs']"
        assert await storage.count() == 2
        assert mapped(tmp_path) == []


# -- the path must still name the open file ------------------------------------------------------


@LOCKING
async def test_a_store_into_a_deleted_spool_is_an_outage_not_an_acknowledgement(
    tmp_path: Path, locking: str
) -> None:
    # Defect 14: with the spool's directory removed while payler ran, stores went on succeeding
    # into the unlinked file (and sources were acknowledged): 1,000 messages lost.
    folder = tmp_path / "spool"
    async with SQLiteStorage(f"sqlite:///{folder}/spool.db{locking}") as storage:
        assert await storage.store([payload("a")]) == 1
        shutil.rmtree(folder)
        with pytest.raises(TransientError) as raised:
            await storage.store([payload("b")])
        assert f"the SQLite spool file '{folder}/spool.db' was removed" in str(raised.value)
        with pytest.raises(TransientError, match="was removed"):
            await storage.claim_due(T0, 10, LEASE)
        with pytest.raises(TransientError, match="was removed"):
            await storage.store([payload("c")])  # and it stays an outage
    # Opened again (the workflow restarts): a new spool, announced as such.
    async with SQLiteStorage(f"sqlite:///{folder}/spool.db{locking}") as storage:
        assert await storage.store([payload("b")]) == 1


@LOCKING
async def test_a_store_into_a_replaced_spool_is_an_outage(tmp_path: Path, locking: str) -> None:
    path = tmp_path / "spool.db"
    async with SQLiteStorage(f"sqlite:///{path}{locking}") as storage:
        await storage.store([payload("a")])
        replace_file(path)
        with pytest.raises(TransientError, match="was replaced by another file"):
            await storage.store([payload("b")])


async def test_a_store_after_its_wal_file_was_deleted_is_an_outage(tmp_path: Path) -> None:
    # The commits of a WAL-mode file are in its -wal file until a checkpoint: deleting that one
    # loses them as surely as deleting the database.
    path = tmp_path / "spool.db"
    async with SQLiteStorage(f"sqlite:///{path}?locking=exclusive") as storage:
        await storage.store([payload("a")])
        await asyncio.to_thread(Path(f"{path}-wal").unlink)
        with pytest.raises(TransientError, match=r"spool\.db-wal' was removed"):
            await storage.store([payload("b")])


async def test_every_workflow_of_the_process_sees_the_file_gone_and_reopens_a_new_one(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "spool"
    url = f"sqlite:///{folder}/spool.db"
    ingest, watch = SQLiteStorage(url), SQLiteStorage(url)
    await asyncio.gather(ingest.connect(), watch.connect())
    try:
        shutil.rmtree(folder)
        with pytest.raises(TransientError):
            await ingest.store([payload("a")])
        async with SQLiteStorage(url) as restarted:  # the ingest workflow, restarted
            assert await restarted.store([payload("a")]) == 1
            with pytest.raises(TransientError):  # the watcher still holds the old file
                await watch.claim_due(T0, 10, LEASE)
            async with SQLiteStorage(url) as watching:  # ... until it restarts too
                assert [c.payload.id for c in await watching.claim_due(T0, 10, LEASE)] == ["a"]
    finally:
        await asyncio.gather(ingest.close(), watch.close())


# -- values and outages ---------------------------------------------------------------------------


async def test_a_value_sqlite_refuses_fails_its_payload_not_the_spool(tmp_path: Path) -> None:
    async with SQLiteStorage(f"sqlite:///{tmp_path}/spool.db") as storage:
        limit = await storage.file.read(lambda db: db.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))
        await storage.file.read(lambda db: db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000))
        try:
            with pytest.raises(sqlite3.DataError):  # not a TransientError: isolated, dead-lettered
                await storage.store([payload("big", b"x" * 2000)])
        finally:
            await storage.file.read(lambda db: db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit))
        assert await storage.store([payload("fits")]) == 1


# -- free space ----------------------------------------------------------------------------------


async def test_admission_follows_the_free_space_of_the_file_system(small_fs: Path) -> None:
    watermark = 2 * 1024 * 1024
    url = f"sqlite:///{small_fs}/spool.db"
    async with SQLiteStorage(url, min_free_bytes=watermark) as storage:
        assert await storage.admission(100_000) is None
        assert await storage.admission(SMALL_FS_BYTES) is not None  # no room for that much
        filler = fill(small_fs, leave_bytes=watermark // 2)
        reason = await storage.admission(0)
        assert reason is not None
        assert f"on the file system of '{small_fs}/spool.db'" in reason
        assert f"less than the watermark of {watermark} bytes (min_free_bytes)" in reason
        filler.unlink()
        assert await storage.admission(100_000) is None


async def test_room_freed_inside_the_spool_counts_as_free(small_fs: Path) -> None:
    # Delivered entries free pages inside the file, which later stores reuse, but not the file
    # system's space: a watermark on the file system alone would pause ingest for ever.
    watermark = 1024 * 1024
    async with SQLiteStorage(f"sqlite:///{small_fs}/spool.db", min_free_bytes=watermark) as s:
        await s.store([payload(f"m{i}", b"x" * 100_000) for i in range(20)])  # about 2 MB
        await s.file.read(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        fill(small_fs, leave_bytes=watermark // 2)
        assert await s.admission(0) is not None
        await s.ack(await s.claim_due(T0, 20, LEASE))
        assert await s.admission(0) is None
        assert await s.admission(100_000) is None


@LOCKING
async def test_a_full_disk_pauses_ingest_while_delivering_goes_on(
    small_fs: Path, caplog: pytest.LogCaptureFixture, locking: str
) -> None:
    # Defect 16: with the disk full, both workflows restarted in a loop and 53 overdue entries
    # were never delivered, although delivering frees space. Here the spool is on a real 8 MiB
    # file system: ingest fills it to the watermark and pauses (the rest waits in the source,
    # unacknowledged); once the watcher runs, deliveries free room and ingest resumes. Nothing
    # is lost, duplicated, dead-lettered, or restarted.
    caplog.set_level(logging.INFO)
    reset()
    broker_url, total, body = f"memory://disk-{uuid.uuid4().hex}", 120, 64 * 1024
    storage_url = f"sqlite:///{small_fs}/spool.db{locking}"
    async with MemoryBroker(broker_url) as broker:
        sent = {f"m{i:03}".encode() + b"." * (body - 4) for i in range(total)}
        now_ms = SystemClock().now_ms()  # received now (make_payload's default is 1970)
        for message in sorted(sent):
            published = make_payload(message, headers={"x-delay": 0}, due_ms=now_ms)
            broker.publish("payler-jobs", published)
        ingest = WorkflowContext(
            "ingest",
            options=ProcessQueueOptions(
                broker_url=broker_url,
                storage_url=storage_url,
                min_free_bytes=3 * 1024 * 1024,
                prefetch=10,
            ),
        )
        ingesting = asyncio.create_task(client.process_queue(ingest))
        watch = WorkflowContext(
            "watch",
            options=WatchStorageOptions(
                broker_url=broker_url, storage_url=storage_url, max_poll_interval_ms=50
            ),
        )
        watching: asyncio.Task[None] | None = None
        paused, resumed = Logged("consuming paused"), Logged("consuming resumed")
        for handler in (paused, resumed):
            logging.getLogger().addHandler(handler)
        try:
            await asyncio.wait_for(paused.seen.wait(), 30)
            waiting = len(broker.messages("payler-jobs"))
            assert 0 < waiting < total  # the source keeps what the spool has no room for
            watching = asyncio.create_task(client.watch_storage(watch))
            delivered = await broker.wait_for("payler-out", total, timeout_s=60)
            await asyncio.wait_for(resumed.seen.wait(), 10)
        finally:
            for handler in (paused, resumed):
                logging.getLogger().removeHandler(handler)
            ingest.stop.set()
            watch.stop.set()
            await asyncio.wait_for(ingesting, 10)
            if watching is not None:
                await asyncio.wait_for(watching, 10)
        assert sorted(p.body for p in delivered) == sorted(sent)  # each once, none lost
        assert broker.messages("payler-dead-letter") == []
    assert "restarts" not in ingest.metrics.totals and "restarts" not in watch.metrics.totals
    assert not messages(caplog, "database or disk is full")
    # Once per pause, and it may pause again as it fills up again: each with its resumption.
    pauses, resumptions = (
        messages(caplog, "consuming paused"),
        messages(caplog, "consuming resumed"),
    )
    assert len(pauses) == len(resumptions) >= 1
    assert {r.levelno for r in pauses} == {logging.WARNING}
    assert {r.levelno for r in resumptions} == {logging.INFO}
    assert "less than the watermark of 3145728 bytes (min_free_bytes)" in pauses[0].getMessage()
    reset()


# -- one process, two workflows: one connection, writes committed together, wake-ups ------------


@LOCKING
async def test_the_workflows_of_a_process_share_one_connection_and_wake_each_other(
    tmp_path: Path, locking: str
) -> None:
    # process_queue stores, watch_storage watches: two storages of one file in one process.
    # They share one connection (no lock contention, no busy-handler sleeps between them), and
    # a store of an entry due sooner than the watcher's next poll (60 s here) wakes it at once.
    url = f"sqlite:///{tmp_path}/spool.db{locking}"
    ingest, watch = SQLiteStorage(url), SQLiteStorage(url, clock=SystemClock())
    async with ingest, watch:
        assert ingest.file is watch.file
        await ingest.store([payload("far", due_ms=2**62)])
        got = asyncio.Event()
        seen: list[str] = []

        async def handler(batch: list[Payload]) -> list[Any]:
            seen.extend(p.id for p in batch)
            got.set()
            return []

        stop = asyncio.Event()
        task = asyncio.create_task(
            watch.serve(handler, stop, settings=WatchSettings(max_poll_interval_s=60))
        )
        try:
            for _ in range(200):  # bounded: until the watcher sleeps on the far entry
                if any(w.wake_at_ms for w in _board._watchers.get(url, ())):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the watcher never went to sleep")
            await ingest.store([payload("soon", due_ms=0)])
            async with asyncio.timeout(10):  # far below the 60 s poll
                await got.wait()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert seen == ["soon"]
        assert await watch.count() == 1  # "soon" acked, "far" left


async def test_writes_that_queue_up_commit_together_and_fail_alone(tmp_path: Path) -> None:
    storage = SQLiteStorage(f"sqlite:///{tmp_path}/spool.db")
    async with storage:
        spool_file = storage.file
        commits: list[str] = []
        released = threading.Event()

        def hold(db: sqlite3.Connection) -> None:  # keeps the file's thread busy
            db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
            released.wait(10)

        holding = asyncio.ensure_future(spool_file.read(hold))
        good = asyncio.ensure_future(storage.store([payload("a"), payload("b")]))
        # A value SQLite refuses (NOT NULL): that write alone fails.
        bad = asyncio.ensure_future(
            spool_file.write(lambda db: db.execute("INSERT INTO spool (id) VALUES ('x')"))
        )
        also_good = asyncio.ensure_future(storage.store([payload("c")]))
        await asyncio.sleep(0.05)  # let the three queue behind the busy thread
        released.set()
        await holding
        assert (await good, await also_good) == (2, 1)
        with pytest.raises(sqlite3.IntegrityError):
            await bad
        assert commits == ["COMMIT"]  # one transaction for the three writes
        assert sorted(p.id for p in (await storage.list(limit=10)).items) == ["a", "b", "c"]
