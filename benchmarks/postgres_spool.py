"""What the PostgreSQL spool costs per message, and how claimants add up (docs/scaling.md).

Runs payler's own storage API (no broker) against a PostgreSQL server on this machine, in a
schema of its own (dropped afterwards), and measures, per message:

- **store**: batches of ``--batch`` payloads (``--size``-byte bodies), with ``NOTIFY`` on and off;
- **claim + ack**: the spool drained by 1, 2, ... claimant *processes* at once (each a loop of
  ``claim_due(batch)`` then ``ack``), counting every entry claimed (a duplicate would show);
- **purge**: the tombstones the acks left, deleted once their dedupe window is over;
- **wake-up**: from a store's return in this process to another process's watcher (poll bound
  60 s) holding the entry, ``--wakeups`` times.

CPU is counted apart for payler (this process, or the claimant processes) and for the
PostgreSQL backends serving them (``/proc/<pid>/stat`` of each backend, found by its
``application_name``): what each side would need in cores at a given rate, whatever else runs on
the machine. Wall-clock rates are given too, but on a shared 2-core machine they say less.

    python benchmarks/postgres_spool.py                      # 20,000 entries, ~1 min
    python benchmarks/postgres_spool.py --count 100000 --claimants 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from infra import require_local

from payler.drivers.base import Rejection
from payler.drivers.storages.base import WatchSettings
from payler.drivers.storages.postgres import PostgresStorage
from payler.payload import Payload

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` used so far (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


async def wal_position(admin: asyncpg.Connection) -> str:
    return str(await admin.fetchval("SELECT pg_current_wal_lsn()::text"))


async def wal_bytes_since(admin: asyncpg.Connection, start: str) -> int:
    """WAL the whole server wrote since ``start`` (other databases' writes would count too)."""
    diff = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)"
    return int(await admin.fetchval(diff, start))


async def backends(admin: asyncpg.Connection, name: str) -> list[int]:
    rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", name)
    return [row["pid"] for row in rows]


def url_for(base: str, schema: str, name: str, **more: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in more.items())
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}&application_name={name}{extra}"


def payloads(count: int, size: int, due_ms: int, tag: str) -> list[Payload]:
    body = os.urandom(size)
    return [
        Payload(id=f"{tag}-{i}", body=body, destination="out", due_ms=due_ms, created_ms=due_ms)
        for i in range(count)
    ]


# -- one claimant process ----------------------------------------------------------------------


async def claimant(url: str, batch: int, lease_ms: int) -> None:
    """Claim and ack until nothing is due; print what was claimed and the CPU that this
    process and its PostgreSQL backends used (JSON)."""
    claimed = acked = 0
    async with PostgresStorage(url) as storage:
        mine = "SELECT pid FROM pg_stat_activity"
        mine += " WHERE application_name = current_setting('application_name')"
        pids = [row["pid"] for row in await storage.pool.fetch(mine)]
        server0, client0, wall0 = cpu_of(pids), time.process_time(), time.perf_counter()
        while True:
            claims = await storage.claim_due(storage.clock.now_ms(), batch, lease_ms)
            if not claims:
                break
            claimed += len(claims)
            acked += await storage.ack(claims)
        wall = time.perf_counter() - wall0
        pids = [row["pid"] for row in await storage.pool.fetch(mine)]
        report = {
            "claimed": claimed,
            "acked": acked,
            "cpu_s": time.process_time() - client0,
            "server_cpu_s": cpu_of(pids) - server0,
            "wall_s": wall,
        }
    print(json.dumps(report), flush=True)


# -- one watcher process -----------------------------------------------------------------------


async def watcher(url: str) -> None:
    """Watch the spool with a 60 s poll bound; print the time each entry is held."""
    stop = asyncio.Event()

    async def handler(batch: Sequence[Payload]) -> list[Rejection]:
        for payload in batch:
            print(json.dumps({"id": payload.id, "at": time.time()}), flush=True)
            if payload.id == "stop":
                stop.set()
        return []

    async with PostgresStorage(url) as storage:
        print(json.dumps({"ready": True}), flush=True)
        await storage.serve(handler, stop, settings=WatchSettings(max_poll_interval_s=60.0))


# -- the measurements --------------------------------------------------------------------------


async def measure_store(
    args: argparse.Namespace, admin: asyncpg.Connection, schema: str, notify: bool
) -> dict[str, float]:
    name = f"bench-store-{uuid.uuid4().hex[:6]}"
    url = url_for(args.postgres_url, schema, name, notify=str(notify).lower())
    # Due in a day: the drains below leave them alone.
    entries = payloads(args.count, args.size, int(time.time() * 1000) + 86_400_000, f"n{notify}")
    async with PostgresStorage(url, dedupe_window_ms=0) as storage:
        pids = await backends(admin, name)
        wal0 = await wal_position(admin)
        server0, client0, wall0 = cpu_of(pids), time.process_time(), time.perf_counter()
        for start in range(0, len(entries), args.batch):
            await storage.store(entries[start : start + args.batch])
        wall = time.perf_counter() - wall0
        client = time.process_time() - client0
        server = cpu_of(await backends(admin, name)) - server0
        wal = await wal_bytes_since(admin, wal0)
    return per_message(args.count, wall, client, server, wal)


async def measure_drain(
    args: argparse.Namespace, admin: asyncpg.Connection, schema: str, claimants: int
) -> dict[str, float]:
    command = [sys.executable, __file__, "--batch", str(args.batch), "--claimant"]
    processes = [
        await asyncio.create_subprocess_exec(
            *command,
            url_for(args.postgres_url, schema, f"bench-claim-{uuid.uuid4().hex[:6]}"),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(claimants)
    ]
    wal0 = await wal_position(admin)
    outs = await asyncio.gather(*(p.communicate() for p in processes))
    wal = await wal_bytes_since(admin, wal0)
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
    claimed = sum(r["claimed"] for r in results)
    acked = sum(r["acked"] for r in results)
    row = per_message(
        claimed,
        max(r["wall_s"] for r in results),
        sum(r["cpu_s"] for r in results),
        sum(r["server_cpu_s"] for r in results),
        wal,
    )
    row.update(claimants=claimants, duplicates=claimed - acked)
    return row


async def measure_purge(
    args: argparse.Namespace, admin: asyncpg.Connection, schema: str
) -> dict[str, float]:
    """Delete every tombstone the drains left, as the purge does once their window is over."""
    name = f"bench-purge-{uuid.uuid4().hex[:6]}"
    async with PostgresStorage(url_for(args.postgres_url, schema, name)) as storage:
        count = await admin.fetchval(
            f"SELECT count(*) FROM \"{schema}\".payler_spool WHERE state = 'delivered'"
        )
        pids = await backends(admin, name)
        wal0 = await wal_position(admin)
        server0, wall0 = cpu_of(pids), time.perf_counter()
        await storage._purge_tombstones(storage.clock.now_ms() + storage.dedupe_window_ms + 1)
        if storage._purging is not None:
            await storage._purging
        wall = time.perf_counter() - wall0
        server = cpu_of(await backends(admin, name)) - server0
        wal = await wal_bytes_since(admin, wal0)
    return per_message(count, wall, 0.0, server, wal)


async def measure_wakeups(args: argparse.Namespace, schema: str) -> dict[str, float]:
    url = url_for(args.postgres_url, schema, f"bench-wake-{uuid.uuid4().hex[:6]}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--watcher", url, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    latencies = []
    try:
        await asyncio.wait_for(process.stdout.readline(), 30)  # ready
        async with PostgresStorage(url) as storage:
            for i in range(args.wakeups + 1):
                entry_id = "stop" if i == args.wakeups else f"wake-{i}"
                now_ms = storage.clock.now_ms()
                await storage.store([Payload(id=entry_id, body=b"x", destination="out",
                                             due_ms=now_ms, created_ms=now_ms)])  # fmt: skip
                stored = time.time()
                line = await asyncio.wait_for(process.stdout.readline(), 70)
                latencies.append((json.loads(line)["at"] - stored) * 1000)
                await asyncio.sleep(0.05)  # spaced: each wake-up on its own
        await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 1),
        "max_ms": round(ordered[-1], 1),
        "n": len(ordered),
    }


def per_message(
    count: int, wall: float, client: float, server: float, wal: int
) -> dict[str, float]:
    return {
        "count": count,
        "msg_s": round(count / wall if wall else 0.0),
        "payler_us": round(1e6 * client / max(1, count), 1),
        "postgres_us": round(1e6 * server / max(1, count), 1),
        "wal_bytes": round(wal / max(1, count)),
    }


async def main(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(args.postgres_url)
    schema = f"bench_spool_{uuid.uuid4().hex[:8]}"
    results: dict[str, object] = {"count": args.count, "batch": args.batch, "size": args.size}
    try:
        async with PostgresStorage(url_for(args.postgres_url, schema, "bench-setup")):
            pass  # the schema
        results["postgres"] = await admin.fetchval("SHOW server_version")
        for notify in (False, True):
            results[f"store_notify_{notify}"] = await measure_store(args, admin, schema, notify)
        for claimants in args.claimants:
            async with PostgresStorage(url_for(args.postgres_url, schema, "bench-fill")) as s:
                entries = payloads(args.count, args.size, int(time.time() * 1000) - 1000,
                                   f"c{claimants}")  # fmt: skip
                for start in range(0, len(entries), 1000):
                    await s.store(entries[start : start + 1000])
            results[f"drain_{claimants}"] = await measure_drain(args, admin, schema, claimants)
        results["purge"] = await measure_purge(args, admin, schema)
        if args.wakeups:
            results["wakeups"] = await measure_wakeups(args, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
    print(json.dumps(results, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=20_000, help="entries per measurement")
    parser.add_argument("--batch", type=int, default=100, help="payloads per store / claim")
    parser.add_argument("--size", type=int, default=512, help="body bytes")
    parser.add_argument("--claimants", default="1,2,3", help="claimant processes, per drain")
    parser.add_argument("--wakeups", type=int, default=30, help="wake-ups measured (0: none)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--claimant", help=argparse.SUPPRESS)  # internal: one claimant process
    parser.add_argument("--watcher", help=argparse.SUPPRESS)  # internal: one watcher process
    args = parser.parse_args()
    args.claimants = [int(c) for c in args.claimants.split(",") if c.strip()]
    require_local(args.postgres_url if not (args.claimant or args.watcher) else "//127.0.0.1")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.claimant:
        asyncio.run(claimant(arguments.claimant, arguments.batch, 30_000))
    elif arguments.watcher:
        asyncio.run(watcher(arguments.watcher))
    else:
        asyncio.run(main(arguments))
