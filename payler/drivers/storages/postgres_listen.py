"""Hearing of stores made by other processes: PostgreSQL's ``LISTEN``, kept up.

The PostgreSQL storage sends ``NOTIFY <channel>, '<earliest due ms>'`` in the very statement
that stores, retries or reschedules entries, so the notification goes out when (and only if)
the change commits. A :class:`Listener` holds one connection of its own that ``LISTEN``\\ s on
the channel and hands each due time it hears to a callback (the storage wakes its watchers).

It is a background task that never fails: a lost connection is made again with backoff (the
watchers poll at their bound meanwhile, and are woken once it is back, for the stores made while
nobody listened); a database without ``LISTEN`` (CockroachDB) is logged once and left alone.
A connection whose peer vanished without a word would hear nothing forever: a query every
``heartbeat_s`` proves it alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from payler.backoff import Backoff

log = logging.getLogger("payler.storage.postgres")

#: What asyncpg raises when a connection, or the server, fails.
ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


class Listener:
    """``LISTEN`` on ``channel`` through a connection of its own; ``heard(earliest_due_ms)``
    for each notification (0 when its payload is not a time: look anyway)."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        heard: Callable[[int], None],
        *,
        connect_options: dict[str, Any],
        connect_timeout_s: float,
        command_timeout_s: float,
        heartbeat_s: float = 30.0,
    ) -> None:
        self.dsn, self.channel, self.heard = dsn, channel, heard
        self.connect_options = connect_options
        self.connect_timeout_s, self.command_timeout_s = connect_timeout_s, command_timeout_s
        self.heartbeat_s = heartbeat_s
        #: Set once the first attempt is over (listening, or failed: the watchers poll).
        self.tried = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start listening; return once LISTEN is in place, or failed, or took too long."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        # The watch loop's first query must come after LISTEN, or a store committed between the
        # two would wake no one; a listener that cannot connect does not hold it up long.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.connect_timeout_s):
                await self.tried.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        backoff, failures = Backoff(base_s=0.5, max_s=30.0), 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=self.connect_timeout_s, **self.connect_options
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._notified)
                if failures:  # stores made while nobody listened: look again now
                    self.heard(0)
                failures = 0
                self.tried.set()
                await self._until_lost(conn, lost)
            except asyncpg.FeatureNotSupportedError as exc:
                log.warning("no LISTEN here (%s): watchers poll; set ?notify=false", exc)
                self.tried.set()
                return
            except ERRORS as exc:
                log.warning("PostgreSQL spool: listening for stores failed, again soon: %s", exc)
            finally:
                if conn is not None:
                    conn.terminate()
            self.tried.set()  # deaf for now: the watch loop polls meanwhile
            await asyncio.sleep(backoff.delay_s(failures))
            failures += 1

    async def _until_lost(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await lost.wait()
            if not lost.is_set():
                await conn.fetchval("SELECT 1", timeout=self.command_timeout_s)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            earliest_due_ms = int(str(payload))
        except ValueError:  # not ours (someone else's NOTIFY on the channel): look anyway
            earliest_due_ms = 0
        self.heard(earliest_due_ms)


__all__ = ["ERRORS", "Listener"]
