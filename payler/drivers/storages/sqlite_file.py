"""The SQLite spool file: opened once per process, used from one thread, and watched.

**Nothing memory-mapped, so no signal.** In WAL mode SQLite keeps the WAL index in a ``-shm``
file that every connection memory-maps. When that file stops being writable under a running
process (made immutable with ``chattr +i``, say), the next commit writes into the mapping and the
kernel kills the process with SIGBUS: no exception, nothing logged. ``PRAGMA mmap_size=0`` does
not cover the ``-shm`` file. So the spool never runs WAL with shared memory:

- ``shared`` (the default) uses a rollback journal (``PERSIST``), which has no shared memory:
  several processes may use the file (other payler instances, the ``sqlite3`` shell);
- ``exclusive`` sets SQLite's exclusive locking mode *before the first access*, in which WAL
  keeps its index in heap memory and never creates or maps a ``-shm`` file (SQLite's "WAL
  without shared memory"); the file is then this process's alone.

With ``mmap_size=0`` too, nothing of the spool is mapped, and every I/O failure comes back as an
error code, which payler reports as an outage that says what is wrong (not writable, read-only
file system, disk full, file gone).

**One connection per file and process**, on a thread of its own: every
:class:`~payler.drivers.storages.sqlite.SQLiteStorage` of a process that names the file shares
one :class:`SpoolFile`, and each operation is one call on its thread, so two workflows'
transactions never interleave (and exclusive mode, where one connection owns the file, works),
and neither waits in SQLite's busy handler for the other. Writes that queue up while the thread
is busy (the ingest's store, the watcher's claim and the previous batch's ack) are committed
together: one transaction and one journal sync for all of them, each in a savepoint of its own
(:meth:`SpoolFile.write`).

**The path must still name the open file.** Removing the spool's directory (or replacing the
file) while payler runs leaves the connection writing into a file that no one can open again:
stores succeed, sources are acknowledged, and on restart an empty spool is opened in its place.
So every write, once committed, checks that the path (and, in WAL mode, the WAL file, where
commits live until a checkpoint) still names the file the connection has open: device and inode,
one or two ``stat`` calls, a few microseconds against the millisecond of an fsync'ed commit. If
not, the write is an outage, never a success: the source keeps its messages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import sqlite3
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from payler.errors import StartupError, TransientError

T = TypeVar("T")

#: How long a writer waits for another connection's lock before giving up (shared mode; in
#: exclusive mode, how long an opening process waits for the one that holds the file).
DEFAULT_BUSY_TIMEOUT_MS = 10_000
#: SQLite's result codes that say something about a *value* (too big, wrong type, a constraint):
#: those fail the payload that carries it. Every other error is about the file or the disk (full,
#: read-only, I/O, locked, corrupt): an outage of the spool, retried, never a payload's fault.
_VALUE_ERRORS = frozenset({"SQLITE_TOOBIG", "SQLITE_MISMATCH", "SQLITE_RANGE", "SQLITE_CONSTRAINT"})

#: What "database is locked" most likely means, past the busy timeout.
_HELD_ELSEWHERE = (
    "another process holds it: one that opened it with ?locking=exclusive keeps it to itself. "
    "Let the processes that use one file share it, with ?locking=shared (the default), or run "
    "one payler per file with ?locking=exclusive"
)

_files: dict[Path, SpoolFile] = {}
_opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


#: A write waiting for the file's thread: the work, its caller's future, the caller's loop.
_Queued = tuple[
    Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop
]


class _Gone(Exception):
    """The path no longer names the file the connection has open."""


class SpoolFile:
    """One open spool file, shared by every storage of this process that names it."""

    def __init__(self, path: Path, *, shared: bool, busy_timeout_ms: int) -> None:
        self.path = path
        self.shared = shared
        self.busy_timeout_ms = busy_timeout_ms
        self.users = 0
        #: Why the file can no longer be used (it was removed or replaced), once it is known.
        self.gone: str | None = None
        self._wal = Path(f"{path}-wal")
        self._identity: dict[Path, tuple[int, int]] = {}
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"payler-sqlite-{path.name}")
        #: Writes waiting for the file's thread: (work, its future, its loop); see :meth:`write`.
        self._queued: collections.deque[_Queued] = collections.deque()

    # -- running work on the file's thread -------------------------------------------------------

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` on the file's thread (statements in autocommit)."""
        return await self._call(lambda: work(self._connection()))

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` in an ``IMMEDIATE`` transaction; return once it is
        committed into the file that the path still names (else raise an outage).

        Writes that queue up while the file's thread is busy commit together (group commit):
        one transaction, one journal sync, each write inside a savepoint of its own, so that
        one write's error about a value rolls back that write alone. An outage (the disk, the
        lock, the file gone) fails every write of the group, none of which is then committed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queued.append((work, future, loop))
        return await self._guard(self._flush_on_thread(loop, future))

    async def _flush_on_thread(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[T]
    ) -> T:
        # Every write asks for a flush; the first to run takes every write queued by then, the
        # others find their writes done (or find nothing queued) and return at once.
        await loop.run_in_executor(self._thread, self._flush)
        return await future

    def _flush(self) -> None:
        """On the file's thread: commit every queued write in one transaction."""
        group = []
        while self._queued:
            queued = self._queued.popleft()
            if not queued[1].cancelled():  # its caller gave up before it ran: it never runs
                group.append(queued)
        if not group:
            return
        results: list[tuple[bool, object]] = []
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                for work, _, _ in group:
                    results.append(self._one_write(db, work))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the error at hand says more
                        db.execute("ROLLBACK")
                raise
            self._verify()
        except BaseException as exc:  # an outage: every write of the group fails with it
            results = [(False, exc)] * len(group)
        for (_, future, loop), (ok, value) in zip(group, results, strict=True):
            loop.call_soon_threadsafe(_settle, future, ok, value)

    @staticmethod
    def _one_write(
        db: sqlite3.Connection, work: Callable[[sqlite3.Connection], object]
    ) -> tuple[bool, object]:
        """One write of a group, in a savepoint: (True, its result) or (False, its error about
        a value, rolled back alone). Any other error aborts the group (raised)."""
        db.execute("SAVEPOINT payler_write")
        try:
            result = work(db)
        except sqlite3.Error as exc:
            if _is_outage(exc):
                raise
            db.execute("ROLLBACK TO payler_write")
            db.execute("RELEASE payler_write")
            return False, exc
        except (_Gone, OSError):
            raise
        except Exception as exc:  # a bug in ``work``: its own failure, not the group's
            db.execute("ROLLBACK TO payler_write")
            db.execute("RELEASE payler_write")
            return False, exc
        db.execute("RELEASE payler_write")
        return True, result

    async def _call(self, call: Callable[[], T]) -> T:
        return await self._guard(asyncio.get_running_loop().run_in_executor(self._thread, call))

    async def _guard(self, running: Awaitable[T]) -> T:
        """Await ``running`` (work on the file's thread); its errors as payler reports them."""
        try:
            return await running
        except _Gone as exc:
            raise TransientError(str(exc)) from None
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, sqlite3.Error) and not _is_outage(exc):
                raise
            what = await asyncio.get_running_loop().run_in_executor(self._thread, self.diagnose)
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                what += f" ({_HELD_ELSEWHERE})"
            raise TransientError(f"SQLite spool {str(self.path)!r}: {exc}{what}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self.gone is not None:
            raise _Gone(self.gone)
        if self._db is None:
            raise RuntimeError(f"the SQLite spool {str(self.path)!r} is closed")
        return self._db

    # -- is it still the file the path names? ----------------------------------------------------

    def _verify(self) -> None:
        """Raise :class:`_Gone` unless the path and the WAL file still name the open files."""
        if not self.shared and self._wal not in self._identity:
            # The WAL file appears with the first write, and stays while the connection lives.
            with contextlib.suppress(FileNotFoundError):
                self._identity[self._wal] = _identity(self._wal)
        for path, known in self._identity.items():
            try:
                now: tuple[int, int] | None = _identity(path)
            except FileNotFoundError:
                now = None
            if now != known:
                what = "was removed" if now is None else "was replaced by another file"
                self.gone = (
                    f"the SQLite spool file {str(path)!r} {what} while payler had it open (was "
                    f"its directory deleted?): what is written now goes into a file no one can "
                    f"open again, so nothing more is stored or acknowledged. The entries it held "
                    f"went with it. payler reopens {str(self.path)!r} on restart: a new, empty "
                    "spool unless the file is put back"
                )
                # Forget it here and now: the next storage that opens the path gets a new file.
                if _files.get(self.path) is self:
                    del _files[self.path]
                raise _Gone(self.gone)

    def diagnose(self) -> str:
        """What is wrong with the spool's files, for an error message ('' when nothing shows)."""
        found: list[str] = []
        with contextlib.suppress(_Gone):
            self._verify()
        if self.gone is not None:
            return f" ({self.gone})"
        folder = self.path.parent
        try:
            stats = os.statvfs(folder)
        except OSError as exc:
            return f" (its folder cannot be read: {exc})"
        if stats.f_flag & os.ST_RDONLY:
            found.append(f"the file system of {str(folder)!r} is mounted read-only")
        free = stats.f_bavail * stats.f_frsize
        if free < 1024 * 1024:
            found.append(f"the file system of {str(folder)!r} is full ({free} bytes free)")
        for path in (folder, self.path, self._wal):
            if path.exists() and not os.access(path, os.W_OK):
                found.append(
                    f"{str(path)!r} is not writable (made immutable with chattr +i, read-only, "
                    "or its permissions)"
                )
        return f" ({'; '.join(found)})" if found else ""

    def free_bytes(self) -> int:
        """Bytes free (to unprivileged users) on the file system of the spool."""
        stats = os.statvfs(self.path.parent)
        return stats.f_bavail * stats.f_frsize

    def wal_bytes(self) -> int:
        """The size of the WAL file: at most what the next checkpoint copies into the file."""
        try:
            return os.stat(self._wal).st_size
        except FileNotFoundError:
            return 0

    # -- opening and closing ---------------------------------------------------------------------

    def _open(self, setup: Callable[[sqlite3.Connection], None]) -> None:
        """Open the file (on its thread): checks, pragmas, ``setup`` (the schema), identity."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        for what in (path.parent, path, self._wal):
            if what.exists() and not os.access(what, os.W_OK):
                raise StartupError(
                    f"the SQLite spool {str(path)!r} cannot be written: {str(what)!r} is not "
                    "writable (immutable (chattr +i), on a read-only file system, or its "
                    "permissions)"
                )
        db = sqlite3.connect(path, isolation_level=None, timeout=self.busy_timeout_ms / 1000)
        try:
            # Before anything reads the file: in exclusive mode, WAL runs without shared memory.
            # (A file an older payler left in WAL mode is read in WAL mode until the switch to
            # a rollback journal just below: the one moment a -shm file is mapped.)
            db.execute(f"PRAGMA locking_mode = {'NORMAL' if self.shared else 'EXCLUSIVE'}")
            db.execute("PRAGMA mmap_size = 0")
            journal = "PERSIST" if self.shared else "WAL"
            (mode,) = db.execute(f"PRAGMA journal_mode = {journal}").fetchone()
            if str(mode).upper() != journal:
                raise StartupError(
                    f"the SQLite spool {str(path)!r} cannot use journal mode {journal} "
                    f"(it stays in {mode})"
                )
            db.execute("PRAGMA synchronous = FULL")
            # Some builds (Debian's) overwrite every freed page: an ack of large entries would
            # then write as much as they held, and need that much free space to free any.
            db.execute("PRAGMA secure_delete = FAST")
            setup(db)
            self._identity[path] = _identity(path)
        except BaseException:
            db.close()
            raise
        self._db = db
        self._verify()  # records the WAL file's identity when it exists

    async def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=False)

    async def release(self) -> None:
        """One storage is done with the file; the last one closes it."""
        self.users -= 1
        if self.users > 0:
            return
        if _files.get(self.path) is self:
            del _files[self.path]
        await self._close()


async def acquire(
    path: Path,
    *,
    shared: bool,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    setup: Callable[[sqlite3.Connection], None],
) -> SpoolFile:
    """The open :class:`SpoolFile` of ``path`` in this process, opened (and ``setup`` run on
    it, once) if it is not open yet. Call :meth:`SpoolFile.release` when done.

    Raises :class:`~payler.errors.StartupError` when the file cannot be opened, naming the path
    and why (in use by another process, not writable, not a database).
    """
    key = _absolute(path)
    loop = asyncio.get_running_loop()
    lock = _opening.setdefault(loop, asyncio.Lock())
    async with lock:  # one opening at a time: two workflows opening one file share it
        spool_file = _files.get(key)
        if spool_file is None:
            spool_file = await _open(key, shared, busy_timeout_ms, setup)
            _files[key] = spool_file
        spool_file.users += 1
        return spool_file


async def _open(
    path: Path, shared: bool, busy_timeout_ms: int, setup: Callable[[sqlite3.Connection], None]
) -> SpoolFile:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + busy_timeout_ms / 1000
    while True:
        spool_file = SpoolFile(path, shared=shared, busy_timeout_ms=busy_timeout_ms)
        try:
            await loop.run_in_executor(spool_file._thread, spool_file._open, setup)
            return spool_file
        except StartupError:
            spool_file._thread.shutdown(wait=False)
            raise
        except (OSError, sqlite3.Error) as exc:
            spool_file._thread.shutdown(wait=False)
            # Switching a file out of WAL takes a lock that SQLite's busy handler does not wait
            # for: processes sharing a file (?locking=shared) that open it together collide.
            locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
            if not (locked and shared) or loop.time() > deadline:
                raise StartupError(_open_failure(path, exc)) from exc
        await asyncio.sleep(0.01 + random.random() * 0.05)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Resolve a write's future on its loop (unless its caller gave up on it)."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _is_outage(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is about the spool's file or disk, not about a value being written."""
    if getattr(exc, "sqlite_errorname", "") in _VALUE_ERRORS:
        return False
    # Corrupt, not a database, I/O, full, read-only, locked: OperationalError or DatabaseError
    # itself. Its other subclasses say a value (DataError, IntegrityError) or payler (a
    # ProgrammingError) is wrong.
    return type(exc) in (sqlite3.OperationalError, sqlite3.DatabaseError)


def _open_failure(path: Path, exc: BaseException) -> str:
    text = f"cannot open the SQLite spool {str(path)!r}: {exc}"
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        text += f" ({_HELD_ELSEWHERE})"
    return text


def _absolute(path: Path) -> Path:
    """The key of a file in this process's table of open spools."""
    return Path(os.path.normpath(os.path.abspath(path)))


def _identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


__all__ = ["DEFAULT_BUSY_TIMEOUT_MS", "SpoolFile", "acquire"]
