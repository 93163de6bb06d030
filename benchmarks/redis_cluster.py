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
import os
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
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` used so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


class Cpu:
    """payler's CPU (this process) and the servers' (``pids``) over a block, per entry (µs)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self) -> Cpu:
        self.own, self.servers = time.process_time(), cpu_of(self.pids)
        return self

    def __exit__(self, *_: object) -> None:
        self.own = time.process_time() - self.own
        self.servers = cpu_of(self.pids) - self.servers

    def per_entry(self, entries: int) -> tuple[float, float]:
        return 1e6 * self.own / entries, 1e6 * self.servers / entries if self.pids else 0.0


async def store_rate(
    url: str, count: int, batch: int, writers: int, size: int, pids: list[int]
) -> dict[str, float]:
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
        with Cpu(pids) as cpu:
            await asyncio.gather(*(writer(n) for n in range(writers)))
        elapsed = time.perf_counter() - began
        stored = await storage.count()
    own_us, server_us = cpu.per_entry(stored)
    latencies.sort()
    return {
        "rate": stored / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "stored": stored,
        "payler_us": own_us,
        "redis_us": server_us,
    }


async def drain_rate(url: str, batch: int, pids: list[int]) -> tuple[float, float, float]:
    """Claim and ack everything in the spool: entries per second, payler's and the servers'
    CPU µs per entry."""
    async with RedisStorage(url) as storage:
        total = 0
        began = time.perf_counter()
        with Cpu(pids) as cpu:
            while claims := await storage.claim_due(storage.clock.now_ms(), batch, 30_000):
                total += await storage.ack(claims)
        return (total / (time.perf_counter() - began), *cpu.per_entry(total))


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
                # The cluster's six processes (masters and replicas); the shared server's
                # CPU is not counted (other clients use it too).
                pids = [n.process.pid for n in cluster.nodes if n.process]
                pids = [] if base == SINGLE_SERVER else pids
                for wait in waits:
                    for batch in (1, args.batch):
                        count = args.count // 10 if batch == 1 else args.count
                        sep = "&" if "?" in base else "?"
                        url = f"{base}{sep}prefix=bench-{uuid.uuid4().hex[:8]}:"
                        if wait:
                            url += f"&wait_replicas={wait}"
                        try:
                            got = await store_rate(url, count, batch, args.writers, args.size, pids)
                            drained = await drain_rate(url, args.batch, pids) if batch > 1 else None
                        finally:
                            await drop(url)
                        rows.append((label, wait, batch, got, drained))
                        print(f"{label} wait={wait} batch={batch}: {got} drain={drained}")
        finally:
            cluster.stop()
    print()
    print(
        f"{args.writers} writers, {args.size}-byte bodies, {args.count} entries per row "
        f"({args.count // 10} with batches of 1)\n"
    )
    print(
        "| spool | wait_replicas | batch | store entries/s | store call p50 ms | p99 ms "
        "| store CPU µs/entry payler · Redis | claim+ack entries/s "
        "| claim+ack CPU µs/entry payler · Redis |"
    )
    print("| --- | --- | --- | --: | --: | --: | --: | --: | --: |")
    for label, wait, batch, got, drained in rows:
        redis_us = f"{got['redis_us']:.0f}" if got["redis_us"] else "–"
        drain = claim_cpu = "–"
        if drained is not None:
            drain = f"{drained[0]:,.0f}"
            claim_cpu = f"{drained[1]:.0f} · " + (f"{drained[2]:.0f}" if drained[2] else "–")
        print(
            f"| {label} | {wait} | {batch} | {got['rate']:,.0f} | {got['p50_ms']:.2f} "
            f"| {got['p99_ms']:.2f} | {got['payler_us']:.0f} · {redis_us} | {drain} "
            f"| {claim_cpu} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    asyncio.run(main(parser.parse_args()))
