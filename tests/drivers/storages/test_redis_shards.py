"""The sharded Redis spool (``redis_shards.py``): URL options, how ids map to shards, the shard
count guard, WAIT for replicas, and which cluster errors are outages. The storage contract runs
on a sharded single server and on a real cluster (tests/contracts/)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Connection
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError

from payler.drivers.storages import storage_from_url
from payler.drivers.storages.redis import RedisStorage
from payler.drivers.storages.redis_calls import is_outage
from payler.drivers.storages.redis_shards import (
    cluster_nodes,
    shard_key,
    shard_of,
    shard_tags,
    split_options,
)
from payler.errors import ConfigError, StartupError, TransientError, is_transient
from payler.identity import derived_id
from payler.payload import Payload
from tests.conftest import REDIS_URL, RedisServers, wait_for_role


def payload(payload_id: str) -> Payload:
    return Payload(id=payload_id, body=b"x", destination="out", due_ms=0, created_ms=0)


def test_url_options() -> None:
    url, options = split_options("redis://h:1/0?prefix=p:&shards=4&socket_timeout=2")
    assert url == "redis://h:1/0?socket_timeout=2"
    assert (options.prefix, options.shards, options.cluster) == ("p:", 4, False)
    assert split_options("redis://h:1/0")[1].shards is None  # unsharded: today's layout
    _, options = split_options("redis+cluster://a:1,b:2?wait_replicas=1&wait_timeout_ms=250")
    assert (options.shards, options.cluster, options.wait_replicas) == (16, True, 1)
    assert options.wait_timeout_ms == 250
    for bad in ("shards=0", "shards=257", "shards=x", "wait_replicas=-1", "wait_timeout_ms=0"):
        with pytest.raises(ConfigError, match=bad.partition("=")[0]):
            split_options(f"redis://h:1/0?{bad}")
    with pytest.raises(ConfigError, match="prefix may not hold"):
        split_options("redis+cluster://a:1?prefix={x}:")


def test_cluster_urls_name_their_nodes() -> None:
    first, nodes = cluster_nodes("redis+cluster://u:pw@a:7000,b:7001/?ssl_cert_reqs=none")
    assert first == "redis://u:pw@a:7000/?ssl_cert_reqs=none"
    assert nodes == [("a", 7000), ("b", 7001)]
    assert cluster_nodes("rediss+cluster://a:1")[0] == "rediss://a:1"
    with pytest.raises(ConfigError, match="host:port"):
        cluster_nodes("redis+cluster://a:1,b")
    assert storage_from_url("redis+cluster://a:1,b:2").schemes == RedisStorage.schemes


def test_shards_spread_evenly_over_the_slots() -> None:
    tags = shard_tags(16)
    slots = [key_slot(tag.encode()) for tag in tags]
    width = REDIS_CLUSTER_HASH_SLOTS // 16
    assert [slot // width for slot in slots] == list(range(16))
    assert len(set(shard_tags(256))) == 256


def test_an_id_and_the_ids_derived_from_it_share_a_shard() -> None:
    digest = "0123456789abcdef" * 4
    once = derived_id("amqp:q:m-1", digest)
    twice = derived_id(once, digest[::-1])
    assert shard_key(once) == shard_key(twice) == "amqp:q:m-1"
    assert shard_of(once, 16) == shard_of("amqp:q:m-1", 16) == shard_of(twice, 16)
    # Random ids (``~`` and 32 hex digits) are no derived ids: they keep their spread.
    random_ids = [f"amqp:q:~{uuid.uuid4().hex}" for _ in range(1600)]
    assert all(shard_key(i) == i for i in random_ids)
    spread = Counter(shard_of(i, 16) for i in random_ids)
    assert len(spread) == 16 and min(spread.values()) > 50


def test_cluster_outages_are_transient_and_usage_errors_are_not() -> None:
    assert is_transient(ClusterDownError("CLUSTERDOWN The cluster is down"))
    assert is_transient(SlotNotCoveredError('Slot "1" is not covered by the cluster.'))
    unreachable = RedisClusterException("Redis Cluster cannot be connected.")
    unreachable.__cause__ = RedisConnectionError("Connection refused")
    assert is_transient(unreachable)
    assert not is_transient(RedisClusterException("No targets were found to execute"))


async def test_a_connection_closed_under_a_call_is_an_outage() -> None:
    connection = Connection()  # never connected: no stream, as after a concurrent close
    with pytest.raises(AttributeError) as raised:
        await connection._send_packed_command([b"PING"])
    assert is_outage(raised.value)
    assert not is_outage(AttributeError("a bug of ours"))


@pytest.mark.redis
async def test_a_spool_opens_only_with_its_own_shard_count() -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    url = f"{REDIS_URL}?prefix={prefix}"
    async with RedisStorage(f"{url}&shards=4") as storage:
        await storage.store([payload(f"id-{i}") for i in range(40)])
        assert len({storage.shard(f"id-{i}").prefix for i in range(40)}) == 4
        try:
            for other in (f"{url}&shards=8", url):
                with pytest.raises(StartupError, match="has 4 shards, but this URL says"):
                    await RedisStorage(other).connect()
            async with RedisStorage(f"{url}&shards=4") as again:
                assert await again.count() == 40
        finally:
            keys = [k async for k in storage.client.scan_iter(match=storage.keys.match_all)]
            await storage.client.delete(*keys)


@pytest.mark.redis
async def test_waiting_for_a_replica_that_is_not_there_is_an_outage(
    redis_servers: RedisServers,
) -> None:
    primary = redis_servers.start()
    url = f"{primary}?wait_replicas=1&wait_timeout_ms=50&shards=4"
    async with RedisStorage(url) as storage:
        with pytest.raises(TransientError, match="0 of 1 replicas acknowledged"):
            await storage.store([payload("a")])
    # Stored, but not acknowledged: the source sends it again once a replica is there. (A
    # timeout the loaded test machine cannot miss: the replica answers WAIT's GETACK at once.)
    replica = redis_servers.start(replica_of=primary)
    await wait_for_role(replica, "slave")
    async with RedisStorage(url.replace("wait_timeout_ms=50", "wait_timeout_ms=10000")) as storage:
        assert await storage.store([payload("a"), payload("b")]) == 1
        assert await storage.count() == 2
        await storage.client.script_flush()  # as on a master new after a failover: NOSCRIPT
        assert await storage.store([payload("c")]) == 1


@pytest.mark.redis
async def test_a_server_that_lost_its_scripts_gets_them_again(redis_servers: RedisServers) -> None:
    # A new master after a failover may not have the scripts that the pipelined calls (claims,
    # acks, stores over several shards) name by their SHA1: NOSCRIPT, then loaded and run.
    server = redis_servers.start()
    async with RedisStorage(f"{server}?shards=4") as storage:
        await storage.store([payload(f"id-{i}") for i in range(20)])
        await storage.client.script_flush()
        claims = await storage.claim_due(0, 20, 10_000)
        assert len(claims) == 20
        await storage.client.script_flush()
        assert await storage.ack(claims) == 20
        await storage.client.script_flush()
        assert await storage.store([payload(f"other-{i}") for i in range(20)]) == 20


@pytest.fixture
async def sharded() -> AsyncIterator[RedisStorage]:
    """A spool of 4 shards on the shared server, under a prefix of this test's own."""
    url = f"{REDIS_URL}?prefix=test-{uuid.uuid4().hex[:12]}:&shards=4"
    async with RedisStorage(url) as storage:
        try:
            yield storage
        finally:
            keys = [k async for k in storage.client.scan_iter(match=storage.keys.match_all)]
            if keys:
                await storage.client.delete(*keys)


def ids_in_shard(shard: int, count: int, shards: int = 4) -> list[str]:
    found = (f"id-{shard}-{i}" for i in range(100_000))
    return [i for i in found if shard_of(i, shards) == shard][:count]


def due(payload_id: str, due_ms: int) -> Payload:
    return Payload(id=payload_id, body=b"x", destination="out", due_ms=due_ms, created_ms=0)


@pytest.mark.redis
async def test_a_claim_takes_the_earliest_of_every_shard_s_head(sharded: RedisStorage) -> None:
    # Shard 0 has a backlog of later entries; every shard has one entry due earlier.
    early = [ids_in_shard(shard, 1)[0] for shard in range(4)]
    backlog = ids_in_shard(0, 50)[1:]
    await sharded.store([due(i, 100) for i in backlog] + [due(i, 10) for i in early])
    first = await sharded.claim_due(1000, 4, 10_000)
    assert sorted(c.payload.id for c in first) == sorted(early)
    # Only shard 0 has due entries left: a claim still fills its limit from it.
    assert len(await sharded.claim_due(1000, 20, 10_000)) == 20


async def test_a_cluster_no_node_of_which_answers_stops_the_start_naming_it() -> None:
    url = "redis+cluster://u:s3cret-pw@127.0.0.1:1,127.0.0.1:2/"
    with pytest.raises(
        StartupError, match=r"127\.0\.0\.1:1,127\.0\.0\.1:2.*cannot be connected"
    ) as e:
        await RedisStorage(url, connect_timeout_s=1).connect()
    assert "s3cret-pw" not in str(e.value)
