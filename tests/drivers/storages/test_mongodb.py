"""What the MongoDB storage does beyond the shared contract: the database it picks, how it fails at
start-up, and the one-time import of the original Payler's spool."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from payler.clock import FakeClock
from payler.drivers.storages import storage_from_url
from payler.drivers.storages.mongodb import MongoStorage
from payler.errors import StartupError
from payler.payload import Payload

pytestmark = pytest.mark.mongodb

NOW_MS = 1_700_000_000_000


@pytest.fixture
async def database(mongodb_url: str) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """This test's database, through a plain pymongo client (to see what the storage wrote)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_url)
    try:
        yield client.get_default_database()
    finally:
        await client.close()


def closed_port() -> int:
    """A port nothing listens on (the OS picked it free, and we let it go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def epoch_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


async def test_the_url_picks_the_database(
    mongodb_url: str, database: AsyncDatabase[dict[str, Any]]
) -> None:
    async with storage_from_url(mongodb_url) as storage:
        await storage.store([Payload(id="a", body=b"", destination="d", due_ms=1, created_ms=1)])
    assert await database["payler_spool"].count_documents({"_id": "a"}) == 1


async def test_without_a_database_in_the_url_it_is_payler(secantus_url: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(secantus_url)
    try:
        await client.drop_database("payler")
        async with storage_from_url(secantus_url) as storage:
            await storage.store(
                [Payload(id="a", body=b"x", destination="d", due_ms=1, created_ms=1)]
            )
        doc = await client["payler"]["payler_spool"].find_one({"_id": "a"})
        assert doc is not None
        assert (doc["body"], doc["state"], doc["token"], doc["visible_ms"]) == (
            b"x",
            "pending",
            None,
            1,
        )
        indexes = await (await client["payler"]["payler_spool"].list_indexes()).to_list()
        names = {index["name"] for index in indexes}
        assert names >= {"state_1_visible_ms_1", "state_1_destination_1_due_ms_1__id_1"}
    finally:
        await client.drop_database("payler")
        await client.close()


async def test_an_unreachable_server_fails_fast_with_the_password_masked() -> None:
    url = f"mongodb://spooler:s3cret-pw@127.0.0.1:{closed_port()}/spool"
    storage = MongoStorage(url, server_selection_timeout_ms=300)
    started = time.monotonic()
    with pytest.raises(StartupError) as failure:
        await storage.connect()
    assert time.monotonic() - started < 5
    message = str(failure.value)
    assert "s3cret-pw" not in message
    assert "mongodb://spooler:***@127.0.0.1:" in message
    assert "Connect" in message or "refused" in message  # what went wrong
    await storage.close()  # idempotent after a failed connect


async def test_a_malformed_url_is_a_startup_error() -> None:
    storage = MongoStorage("mongodb://spooler:s3cret-pw@127.0.0.1:not-a-port/spool")
    with pytest.raises(StartupError) as failure:
        await storage.connect()
    assert "s3cret-pw" not in str(failure.value)


async def test_payler_0_2_spool_is_imported_once(
    mongodb_url: str, database: AsyncDatabase[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    naive_utc = datetime(2030, 1, 2, 3, 4, 5, 678000)  # naive: as pymongo reads BSON dates
    aware = datetime(2030, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    past = datetime(2020, 1, 1, tzinfo=UTC)  # overdue: delivered at once
    legacy = [
        {"_id": ObjectId(), "message": b"\x00raw\xff", "reference_date": naive_utc},
        {"_id": ObjectId(), "message": "text é", "reference_date": aware},
        {"_id": ObjectId(), "message": {"job": [1, "two"]}, "reference_date": past},
    ]
    for doc in legacy:
        doc |= {"source": "payler-in", "destination": "payler-out"}
    unschedulable = {"_id": ObjectId(), "message": "no destination", "reference_date": past}
    await database["payloads"].insert_many([*legacy, unschedulable])

    clock = FakeClock(NOW_MS)
    with caplog.at_level(logging.INFO, logger="payler.storage"):
        async with storage_from_url(mongodb_url, clock=clock) as storage:
            assert await storage.count() == 3
            got = {doc["_id"]: await storage.get(f"payler-0.2:{doc['_id']}") for doc in legacy}
    assert "imported 3" in caplog.text

    bodies = [b"\x00raw\xff", "text é".encode(), json.dumps({"job": [1, "two"]}).encode()]
    dues = [epoch_ms(naive_utc.replace(tzinfo=UTC)), epoch_ms(aware), epoch_ms(past)]
    for doc, body, due in zip(legacy, bodies, dues, strict=True):
        payload = got[doc["_id"]]
        assert payload is not None, doc
        assert payload.body == body
        assert payload.due_ms == due
        assert (payload.source, payload.destination) == ("payler-in", "payler-out")
        assert (payload.created_ms, payload.attempts, payload.headers) == (NOW_MS, 0, {})
    # Imported entries left the legacy collection; the one it cannot schedule stayed, untouched.
    left = await database["payloads"].find().to_list()
    assert [(d["_id"], d["message"]) for d in left] == [(unschedulable["_id"], "no destination")]

    caplog.clear()
    async with storage_from_url(mongodb_url, clock=clock) as storage:  # a second start
        assert await storage.count() == 3
    assert "imported" not in caplog.text


async def test_legacy_import_keeps_entries_already_in_the_spool(
    mongodb_url: str, database: AsyncDatabase[dict[str, Any]]
) -> None:
    # A crash between the store and the delete of an import: the next start must not duplicate.
    legacy_id = ObjectId()
    due = datetime(2031, 1, 1, tzinfo=UTC)
    async with storage_from_url(mongodb_url) as storage:
        await storage.store(
            [
                Payload(
                    id=f"payler-0.2:{legacy_id}",
                    body=b"v1",
                    destination="q",
                    due_ms=1,
                    created_ms=1,
                )
            ]
        )
    await database["payloads"].insert_one(
        {
            "_id": legacy_id,
            "message": b"v1",
            "reference_date": due,
            "source": "",
            "destination": "q",
        }
    )
    async with storage_from_url(mongodb_url) as storage:
        assert await storage.count() == 1
        stored = await storage.get(f"payler-0.2:{legacy_id}")
        assert stored is not None
        assert stored.due_ms == 1  # the spool's entry wins: store is idempotent by id
    assert await database["payloads"].count_documents({}) == 0
