"""What is particular to the embedded SQLite storage (the contract suite covers the rest)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from payler.drivers.storages.sqlite import SQLiteStorage, path_of
from payler.errors import ConfigError, StartupError


async def test_many_workflows_can_open_one_new_spool_at_once(tmp_path: Path) -> None:
    # Two workflows of one configuration open the same new file at start: switching it to WAL
    # collides ("database is locked") unless the storage waits its turn.
    for round_ in range(5):
        url = f"sqlite:///{tmp_path}/spool-{round_}.db"
        storages = [SQLiteStorage(url) for _ in range(8)]
        await asyncio.gather(*(s.connect() for s in storages))
        try:
            assert [await s.count() for s in storages] == [0] * 8
        finally:
            await asyncio.gather(*(s.close() for s in storages))


def test_urls_name_relative_and_absolute_paths() -> None:
    assert path_of("sqlite:///payler-spool.db") == Path("payler-spool.db")
    assert path_of("sqlite:////var/lib/payler/spool.db") == Path("/var/lib/payler/spool.db")
    with pytest.raises(ConfigError, match="sqlite:///relative"):
        path_of("sqlite://payler-spool.db")


async def test_an_unopenable_file_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(StartupError, match="cannot open the SQLite spool"):
        await SQLiteStorage(f"sqlite:///{tmp_path}/a-directory.db").connect()
