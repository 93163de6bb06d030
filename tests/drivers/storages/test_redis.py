"""What is particular to the Redis storage (the contract suite covers the rest): atomic claims
across instances, fencing seen in the raw keys, prefixes, start-up failures, round trips."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from payler.clock import FakeClock
from payler.drivers.storages import storage_from_url
from payler.drivers.storages.base import PURGE_INTERVAL_MS
from payler.drivers.storages.redis import _PURGE_CHUNK, RedisStorage, split_prefix
from payler.drivers.storages.redis_keys import KeySpace
from payler.errors import StartupError, TransientError
from payler.identity import content_digest
from payler.payload import Payload
from tests.conftest import RedisServers, fail_over, wait_for_role

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("PAYLER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T0 = 1_700_000_000_000
LEASE = 10_000


def payload(payload_id: str, due_ms: int = T0, destination: str = "out") -> Payload:
    return Payload(
        id=payload_id,
        body=payload_id.encode(),
        destination=destination,
        due_ms=due_ms,
        created_ms=T0,
    )


def closed_port() -> int:
    """A port nothing listens on (the OS picked it free, and we let it go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    """A plain client on the test server, to see what the storage wrote."""
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def new_url(raw: Redis) -> AsyncIterator[Callable[[], str]]:
    """Makes spool URLs with prefixes of this test's own; their keys are deleted after it."""
    prefixes: list[str] = []

    def make() -> str:
        prefixes.append(f"test:{uuid.uuid4().hex}:")
        return f"{REDIS_URL}?prefix={prefixes[-1]}"

    yield make
    for prefix in prefixes:
        keys = [key async for key in raw.scan_iter(match=KeySpace(prefix).match_all)]
        if keys:
            await raw.delete(*keys)


@pytest.fixture
async def storage(new_url: Callable[[], str]) -> AsyncIterator[RedisStorage]:
    async with RedisStorage(new_url()) as s:
        yield s


async def test_claims_are_atomic_across_instances(new_url: Callable[[], str]) -> None:
    url, total = new_url(), 500
    storages = [RedisStorage(url) for _ in range(5)]
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


async def test_what_redis_holds(storage: RedisStorage, raw: Redis) -> None:
    keys = storage.keys
    stored = payload("a", T0 + 5, "x")
    await storage.store([stored])
    entry = await raw.hgetall(keys.entry("a"))
    due = str(T0 + 5).encode()
    assert {k: v for k, v in entry.items() if k != b"meta"} == {
        b"digest": content_digest(stored).encode(),
        b"id": b"a",
        b"body": b"a",
        b"destination": b"x",
        b"due_ms": due,
        b"visible_ms": due,
        b"created_ms": str(T0).encode(),
        b"attempts": b"0",
        b"state": b"pending",
    }  # no token (unleased), no last_error (None)
    assert await raw.zscore(keys.visible, "a") == T0 + 5
    assert await raw.zscore(keys.by_destination("pending", "x"), "a") == T0 + 5
    [claim] = await storage.claim_due(T0 + 5, 10, LEASE)
    assert await raw.zscore(keys.visible, "a") == T0 + 5 + LEASE  # the lease, not a wait
    assert await raw.hget(keys.entry("a"), "token") == claim.token.encode()
    assert await storage.dead_letter(claim, "unroutable")
    assert await raw.zscore(keys.visible, "a") is None
    assert await raw.zscore(keys.by_due("pending"), "a") is None
    assert await raw.zscore(keys.by_destination("dead", "x"), "a") == T0 + 5
    assert await storage.cancel("a")
    left = [key async for key in raw.scan_iter(match=keys.match_all)]
    assert left == [keys.schema.encode()]  # nothing left over but the layout's version


async def test_a_delivered_entry_leaves_only_its_id_and_digest(
    storage: RedisStorage, raw: Redis
) -> None:
    keys = storage.keys
    await storage.store([payload("a")])
    claims = await storage.claim_due(T0, 10, LEASE)
    storage.clock = FakeClock(T0 + 1)
    assert await storage.ack(claims) == 1
    until = T0 + 1 + storage.dedupe_window_ms
    assert await raw.zrange(keys.delivered, 0, -1, withscores=True) == [(b"a", until)]
    digest = content_digest(payload("a")).encode()
    assert await raw.hgetall(keys.delivered_digests) == {b"a": digest}
    assert await raw.exists(keys.entry("a")) == 0
    assert (await storage.get("a"), await storage.count()) == (None, 0)
    assert await storage.store([payload("a")]) == 0  # a redelivered copy stays out
    assert await storage.claim_due(until - 1, 10, LEASE) == []  # purges, but it is not expired
    assert await storage.store([payload("a")]) == 0
    await storage.claim_due(until - 1 + PURGE_INTERVAL_MS, 10, LEASE)  # the next purge
    assert await raw.exists(keys.delivered, keys.delivered_digests) == 0
    assert await storage.store([payload("a")]) == 1


async def test_a_purge_forgets_every_expired_tombstone_a_chunk_at_a_time(
    storage: RedisStorage, raw: Redis
) -> None:
    total = 2 * _PURGE_CHUNK + 7
    storage.clock = FakeClock(T0)
    await storage.store([payload(f"m{i}") for i in range(total)])
    assert await storage.ack(await storage.claim_due(T0, total, LEASE)) == total
    assert await raw.hlen(storage.keys.delivered_digests) == total
    await storage.claim_due(T0 + storage.dedupe_window_ms + PURGE_INTERVAL_MS, 10, LEASE)
    assert await raw.exists(storage.keys.delivered, storage.keys.delivered_digests) == 0


async def snapshot(raw: Redis, keys: KeySpace, payload_id: str) -> dict[str, Any]:
    """Everything Redis holds about one entry: its hash and its score in every index."""
    indexes = [keys.visible, keys.by_due("pending"), keys.by_due("dead")]
    indexes += [keys.by_destination("pending", "out"), keys.by_destination("dead", "out")]
    scores = {index: await raw.zscore(index, payload_id) for index in indexes}
    return {"entry": await raw.hgetall(keys.entry(payload_id)), **scores}


async def test_a_stale_token_changes_nothing(storage: RedisStorage, raw: Redis) -> None:
    await storage.store([payload("a")])
    [stale] = await storage.claim_due(T0, 10, LEASE)
    [fresh] = await storage.claim_due(T0 + LEASE, 10, LEASE)  # the lease expired: re-claimed
    before = await snapshot(raw, storage.keys, "a")
    assert await storage.ack([stale]) == 0
    assert not await storage.retry(stale, T0, "late")
    assert not await storage.dead_letter(stale, "late")
    assert await snapshot(raw, storage.keys, "a") == before
    assert await storage.retry(fresh, T0 + 1, "broker down")
    after_retry = await snapshot(raw, storage.keys, "a")
    assert not await storage.dead_letter(fresh, "spent")  # a retry spends the token
    assert await storage.ack([fresh, stale]) == 0
    assert await snapshot(raw, storage.keys, "a") == after_retry


async def test_the_prefix_isolates_two_spools(new_url: Callable[[], str], raw: Redis) -> None:
    async with RedisStorage(new_url()) as one, RedisStorage(new_url()) as two:
        assert one.keys.prefix != two.keys.prefix
        await one.store([payload("a"), payload("b")])
        await two.store([payload("a", T0 + 1)])
        assert (await one.count(), await two.count()) == (2, 1)
        assert [c.payload.id for c in await two.claim_due(T0 + 1, 10, LEASE)] == ["a"]
        assert [c.payload.id for c in await one.claim_due(T0, 10, LEASE)] == ["a", "b"]
        assert await two.cancel("a")
        assert await one.get("a") == payload("a")
        for storage in (one, two):
            keys = [key async for key in raw.scan_iter(match=storage.keys.match_all)]
            assert all(key.startswith(storage.keys.prefix.encode()) for key in keys)
        left = [key async for key in raw.scan_iter(match=two.keys.match_all)]
        assert left == [two.keys.schema.encode()]


def test_the_url_names_the_prefix_and_the_scheme_the_backend() -> None:
    assert RedisStorage("redis://127.0.0.1:6379/0").keys.prefix == "payler:"
    url = "rediss://u:pw@host:6380/2?ssl_cert_reqs=none&prefix=a%3Ab%3A&socket_timeout=3"
    assert split_prefix(url) == (
        "rediss://u:pw@host:6380/2?ssl_cert_reqs=none&socket_timeout=3",
        "a:b:",
    )
    storage = storage_from_url(url)
    assert isinstance(storage, RedisStorage)
    assert storage.keys.prefix == "a:b:"
    assert KeySpace("x[1]*:").match_all == "x\\[1\\]\\*:*"


async def test_an_unreachable_server_fails_fast_with_the_password_masked() -> None:
    storage = RedisStorage(f"redis://spooler:s3cret-pw@127.0.0.1:{closed_port()}/0?prefix=p:")
    started = time.monotonic()
    with pytest.raises(StartupError) as failure:
        await storage.connect()
    assert time.monotonic() - started < 2
    message = str(failure.value)
    assert "s3cret-pw" not in message
    assert "redis://spooler:***@127.0.0.1:" in message
    assert "connecting to 127.0.0.1" in message  # what went wrong
    await storage.close()  # idempotent after a failed connect


async def test_a_server_that_never_answers_is_a_startup_error() -> None:
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the PING, answers nothing, until the client hangs up
        writer.close()
        hung_up.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        storage = RedisStorage(f"redis://:pw@127.0.0.1:{port}/0", connect_timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(StartupError, match=r"redis://:\*\*\*@127\.0\.0\.1"):
            await storage.connect()
        assert time.monotonic() - started < 2
        async with asyncio.timeout(2):
            await hung_up.wait()  # a failed connect leaves no connection open
    finally:
        server.close()


async def test_a_malformed_url_is_a_startup_error() -> None:
    with pytest.raises(StartupError) as failure:
        await RedisStorage("redis://spooler:s3cret-pw@127.0.0.1:not-a-port/0").connect()
    assert "s3cret-pw" not in str(failure.value)


async def test_a_batch_is_one_round_trip(
    storage: RedisStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.store([payload("warm-up")])  # loads the scripts (EVALSHA falls back once)
    await storage.ack(await storage.claim_due(T0, 1, LEASE))
    commands: list[Any] = []
    execute = storage.client.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        commands.append(args[0])
        return await execute(*args, **options)

    monkeypatch.setattr(storage.client, "execute_command", counted)
    assert await storage.store([payload(f"m{i:04}") for i in range(1_000)]) == 1_000
    claims = await storage.claim_due(T0, 1_000, LEASE)
    assert len(claims) == 1_000
    assert await storage.ack(claims) == 1_000
    assert commands == ["EVALSHA"] * 3


async def test_a_cursor_survives_the_removal_of_its_entry(storage: RedisStorage) -> None:
    # A long run of equal due times: the next page is found by id within the run.
    await storage.store([payload(f"p{i:03}") for i in range(200)])
    page = await storage.list(limit=50)
    assert page.next_cursor is not None
    assert await storage.cancel(page.items[-1].id)  # "p049": gone before the next page
    rest = await storage.list(limit=50, cursor=page.next_cursor)
    assert [p.id for p in rest.items] == [f"p{i:03}" for i in range(50, 100)]


@contextlib.asynccontextmanager
async def redis_proxy() -> AsyncIterator[tuple[int, Callable[[], Awaitable[None]]]]:
    """A TCP proxy to the test Redis: yields its port and a function that cuts it for good."""
    target = urlsplit(REDIS_URL)
    transports: list[asyncio.WriteTransport] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65_536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        transports.extend([writer.transport, up_writer.transport])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)

    async def cut() -> None:
        server.close()
        for transport in transports:
            transport.abort()

    try:
        yield server.sockets[0].getsockname()[1], cut
    finally:
        await cut()


async def test_a_lost_server_is_a_transient_error(new_url: Callable[[], str]) -> None:
    prefix = split_prefix(new_url())[1]
    async with (
        redis_proxy() as (port, cut),
        RedisStorage(f"redis://127.0.0.1:{port}/0?prefix={prefix}") as storage,
    ):
        await storage.store([payload("a")])
        await cut()
        with pytest.raises(TransientError, match="Redis spool"):
            await storage.claim_due(T0, 10, LEASE)
        with pytest.raises(TransientError):
            await storage.count()


async def test_a_server_demoted_to_a_replica_is_an_outage_and_nothing_is_lost(
    redis_servers: RedisServers,
) -> None:
    primary = redis_servers.start()
    replica = redis_servers.start(replica_of=primary)
    await wait_for_role(replica, "slave")
    async with RedisStorage(primary) as storage:
        await storage.store([payload("before")])
    # The primary hands over to its replica (no write lost), and is now a replica: every
    # write is refused with READONLY, which is an outage to wait out, not a bug.
    await fail_over(primary, replica)
    async with RedisStorage(primary) as storage:
        with pytest.raises(TransientError, match=r"Redis spool: .*read only replica"):
            await storage.store([payload("during")])
        with pytest.raises(TransientError, match=r"Redis spool: .*read only replica"):
            await storage.claim_due(T0, 10, LEASE)
        assert await storage.count() == 1  # reads still work
    # Promoted back, it serves again, with everything it had.
    await fail_over(replica, primary)
    async with RedisStorage(primary) as storage:
        await storage.store([payload("after")])
        claimed = await storage.claim_due(T0, 10, LEASE)
        assert sorted(c.payload.id for c in claimed) == ["after", "before"]


async def test_an_index_entry_whose_record_is_gone_is_dropped_not_claimed(
    redis_spool_url: str,
) -> None:
    # Under an allkeys eviction policy (or a hand-deleted key) the hash can go alone.
    async with RedisStorage(redis_spool_url) as storage:
        await storage.store(
            [
                Payload(id=name, body=b"x", destination="d", due_ms=0, created_ms=0)
                for name in ("gone", "kept")
            ]
        )
        await storage.client.delete(storage.keys.entry("gone"))
        claims = await storage.claim_due(1, 10, 1000)
        assert [c.payload.id for c in claims] == ["kept"]
        assert await storage.client.zscore(storage.keys.visible, "gone") is None
        assert not await storage.client.exists(storage.keys.entry("gone"))
