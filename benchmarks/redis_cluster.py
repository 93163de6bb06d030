"""What a Redis Cluster spool costs, and what waiting for replicas (WAIT) adds (docs/scaling.md).

Starts a local Redis Cluster of its own (three masters, a replica each, on free ports, from
``redis-server``: ``tests/redis_cluster.py``), and runs payler's own storage API (no broker):

- **store**: ``--count`` payloads (``--size``-byte bodies) in batches of 1 and of ``--batch``,
  by ``--writers`` concurrent writers, with ``wait_replicas`` 0 (asynchronous replication: a
  failover may lose the last acknowledged stores) and 1 (a store returns once a replica has it);
- **claim + ack**: the spool drained by one claimant (``claim_due(--batch)`` then ``ack``);
- the same on the one Redis server at 127.0.0.1:6379 (unsharded, under a prefix of the run's own,
  deleted afterwards), for reference.

Wall-clock rates on whatever machine runs it: on a shared 2-core machine, with the six Redis
processes on the same cores as payler, they are a floor, not a capacity.

    python benchmarks/redis_cluster.py                  # 20,000 entries per row, ~1 min
    python benchmarks/redis_cluster.py --count 100000 --writers 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.redis_cluster

from payler.drivers.storages.redis import RedisStorage  # (after the path: tests.redis_cluster)
from payler.payload import Payload
from tests.redis_cluster import LocalCluster

SINGLE_SERVER = "redis://127.0.0.1:6379/0"


async def store_rate(url: str, count: int, batch: int, writers: int, size: int) -> dict[str, float]:
    """Store ``count`` payloads; entries per second and store-call latency percentiles."""
    body = b"x" * size
    latencies: list[float] = []
    per_writer = count // writers
    async with RedisStorage(url) as storage:
        now_ms = storage.clock.now_ms()

        async def writer(number: int) -> None:
            for start in range(0, per_writer, batch):
                payloads = [
                    Payload(
                        id=f"w{number}-{i}",
                        body=body,
                        destination="out",
                        due_ms=now_ms,
                        created_ms=now_ms,
                    )
                    for i in range(start, min(start + batch, per_writer))
                ]
                began = time.perf_counter()
                await storage.store(payloads)
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(writer(n) for n in range(writers)))
        elapsed = time.perf_counter() - began
        stored = await storage.count()
    latencies.sort()
    return {
        "rate": stored / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "stored": stored,
    }


async def drain_rate(url: str, batch: int) -> float:
    """Claim and ack everything in the spool; entries per second."""
    async with RedisStorage(url) as storage:
        total = 0
        began = time.perf_counter()
        while claims := await storage.claim_due(storage.clock.now_ms(), batch, 30_000):
            total += await storage.ack(claims)
        return total / (time.perf_counter() - began)


async def drop(url: str) -> None:
    async with RedisStorage(url) as storage:
        async for key in storage.client.scan_iter(match=storage.keys.match_all, count=1000):
            await storage.client.delete(key)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="payler-bench-cluster-") as workdir:
        cluster = LocalCluster(Path(workdir))
        cluster.start()
        try:
            rows = []
            for label, base in (
                ("one server (6379), unsharded", SINGLE_SERVER),
                ("cluster, 16 shards", cluster.url(shards=16)),
            ):
                waits = (0,) if base == SINGLE_SERVER else (0, 1)
                for wait in waits:
                    for batch in (1, args.batch):
                        count = args.count // 10 if batch == 1 else args.count
                        sep = "&" if "?" in base else "?"
                        url = f"{base}{sep}prefix=bench-{uuid.uuid4().hex[:8]}:"
                        if wait:
                            url += f"&wait_replicas={wait}"
                        try:
                            got = await store_rate(url, count, batch, args.writers, args.size)
                            drained = await drain_rate(url, args.batch) if batch > 1 else 0.0
                        finally:
                            await drop(url)
                        rows.append((label, wait, batch, got, drained))
                        print(f"{label} wait={wait} batch={batch}: {got} drain={drained:.0f}/s")
        finally:
            cluster.stop()
    print()
    print(
        f"{args.writers} writers, {args.size}-byte bodies, {args.count} entries per row "
        f"({args.count // 10} with batches of 1)\n"
    )
    print(
        "| spool | wait_replicas | batch | store entries/s | store call p50 ms | p99 ms "
        "| claim+ack entries/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, wait, batch, got, drained in rows:
        print(
            f"| {label} | {wait} | {batch} | {got['rate']:,.0f} | {got['p50_ms']:.2f} "
            f"| {got['p99_ms']:.2f} | {f'{drained:,.0f}' if drained else '–'} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    asyncio.run(main(parser.parse_args()))
