"""A Redis failover under payler: the server it uses is demoted to a replica mid-traffic
(``FAILOVER``: its replica becomes the master), then promoted back.

``payler --config-file`` runs a stream workflow and a spool workflow on that server (a Redis
stream source spooled into the Redis storage, delivered to a Redis stream). While the server is
a replica every write is refused (READONLY, and UNBLOCKED for a blocked read): an outage, which
payler waits out — no exit, no traceback, no message lost or dead-lettered. The servers are the
test's own (:class:`~tests.conftest.RedisServers`), never the shared one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from redis.asyncio import Redis

from payler.drivers.storages.redis import RedisStorage
from tests.conftest import RedisServers, eventually, fail_over, wait_for_role
from tests.integration.conftest import Payler

pytestmark = pytest.mark.redis

#: Entries written before the failover, and while the other server is the master.
BEFORE, DURING = 300, 200
#: How long everything may take to arrive once the server is back.
DELIVERY_TIMEOUT_S = 60.0


def configure(tmp_path: Path, server: str) -> Path:
    spool = f"{server}?prefix=spool:"
    config = tmp_path / "configuration.yaml"
    config.write_text(
        f"""
workflows:
  - name: "Spool the stream"
    callable: client.process_queue
    options:
      broker_url: "{server}?block_ms=100&consumer=payler-test"
      storage_url: "{spool}"
      queue: jobs
      default_destination: out
      dead_letter_queue: dead
      default_delay_ms: 50
      batch_size: 20
  - name: "Deliver to a stream"
    callable: client.watch_storage
    options:
      broker_url: "{server}"
      storage_url: "{spool}"
      declare_queues: [out]
      dead_letter_queue: dead
      max_poll_interval_ms: 100
      lease_ms: 2000
      retry_base_ms: 100
      retry_max_ms: 1000
stats_interval_seconds: 1
"""
    )
    return config


async def delivered(client: Redis, stream: str) -> Counter[bytes]:
    return Counter(fields[b"body"] for _, fields in await client.xrange(stream))


async def test_a_failover_and_back_loses_nothing_and_payler_keeps_running(
    tmp_path: Path, redis_servers: RedisServers
) -> None:
    primary = redis_servers.start()
    replica = redis_servers.start(replica_of=primary)
    await wait_for_role(replica, "slave")
    a, b = Redis.from_url(primary), Redis.from_url(replica)
    payler = await (await Payler.start(configure(tmp_path, primary), {}, tmp_path)).running()
    try:
        for i in range(BEFORE):
            await a.xadd("jobs", {"body": f"m{i}"})

        async def some_delivered() -> bool:  # mid-traffic
            return bool(await a.xlen("out") >= BEFORE // 5)

        await eventually(some_delivered, DELIVERY_TIMEOUT_S, "some entries delivered")

        await fail_over(primary, replica)  # payler's server is now a read-only replica
        for i in range(BEFORE, BEFORE + DURING):  # producers write to the new master
            await b.xadd("jobs", {"body": f"m{i}"})
        for workflow in ("Spool the stream", "Deliver to a stream"):
            await payler.wait_for_line(f"workflow {workflow!r} failed (TransientError")
        await fail_over(replica, primary)  # and back

        expected = {f"m{i}".encode() for i in range(BEFORE + DURING)}

        async def all_delivered() -> bool:
            assert payler.process.returncode is None, payler.log
            return set(await delivered(a, "out")) == expected

        await eventually(all_delivered, DELIVERY_TIMEOUT_S, "every entry delivered")
        async with RedisStorage(f"{primary}?prefix=spool:") as spool:

            async def spool_empty() -> bool:  # the last acks settle
                return await spool.count() == 0

            await eventually(spool_empty, DELIVERY_TIMEOUT_S, "the spool emptied")
        assert payler.process.returncode is None, payler.log
        assert await payler.stop() == 0, payler.log
        arrived = await delivered(a, "out")
        assert await a.xlen("dead") == 0, payler.log
        assert (await a.xpending("jobs", "payler"))["pending"] == 0
    except BaseException:
        await payler.kill()
        raise
    finally:
        await a.aclose()
        await b.aclose()
    assert set(arrived) == expected, ("lost", sorted(expected - set(arrived))[:10], payler.log)
    # An outage is logged as one line per restart, never as a bug with its traceback.
    assert "Traceback" not in payler.log, payler.log
    assert " ERROR " not in payler.log, payler.log
    # At least once: a delivery whose spool ack the demotion refused is delivered again.
    duplicates = sum(n - 1 for n in arrived.values())
    assert duplicates <= 100, f"{duplicates} duplicates"  # at most the batch in flight
