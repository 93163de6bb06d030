"""Kafka → spool → Kafka with one to three payler instances in one consumer group.

    python benchmarks/kafka_group.py                       # 50,000 records per row
    python benchmarks/kafka_group.py --count 5000 --spools sqlite --layouts 1x6,3x6

Each row fills a fresh topic of P partitions with N records (512 bytes, unique keys spread over
the partitions by Kafka's default partitioner, ``x-delay: 0``) and measures two phases, each
with K payler instances started together (``payler --config-file``, as users run it) on one
spool:

- **ingest**: ``client.process_queue`` alone, the K instances in one consumer group
  (``prefetch``/``batch_size`` 500): Kafka → spool. Nothing is delivered meanwhile.
- **deliver**: then ``client.watch_storage`` alone (``batch_size`` 500): spool → a Kafka topic
  (``acks=all``), entries claimed with leases by the K instances.

For each phase: records per second between 10 % and 90 % of N stored (or delivered) — the
window leaves out the start-up and the first rebalances — and the CPU the instances used in
that window, per record. Progress is the spool's pending count, polled every 50 ms through
payler's own storage API.

Rows are ``KxP`` layouts (K instances on P partitions) times spools: ``sqlite`` (one file that
the instances share, on this host) and ``redis`` (the server on 127.0.0.1:6379, keys under a
prefix of the run's own, deleted afterwards). The broker is tansu (started on a free port, in
memory), the Kafka-compatible stand-in the tests use, not Apache Kafka; the servers' CPU is
reported apart, and so is what other processes on the machine used (outside load makes a row
noisy: ``--repeat``). Every wait is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from brokers import REDIS_URL, fill_kafka, payloads, tansu
from infra import CpuMeter, Daemon, child_env

from payler.drivers.storages import storage_from_url

#: The consumer group settings: a member that stops is replaced within 2 s.
GROUP_OPTIONS = "session_timeout_ms=2000&heartbeat_interval_ms=200"
#: How often the harness counts the spool.
POLL_S = 0.05


@dataclass
class Result:
    phase: str
    spool: str
    instances: int
    partitions: int
    count: int
    #: Records per second between 10 % and 90 % of ``count`` stored (or delivered).
    rate: float
    #: CPU of the instances over that window: % of one core, and µs per record.
    cpu_percent: float
    cpu_us: float
    #: CPU over the window of the servers (tansu; Redis for the redis rows, which other
    #: clients may share), and of processes outside the benchmark (% of one core).
    servers_percent: float
    others_percent: float

    def line(self) -> str:
        return (
            f"| {self.phase} | {self.spool} | {self.instances} | {self.partitions} | "
            f"{self.count:,} | "
            f"{self.rate:,.0f} | {self.rate / self.instances:,.0f} | {self.cpu_percent:.0f} | "
            f"{self.cpu_us:,.0f} | {self.servers_percent:.0f} | {self.others_percent:.0f} |"
        )


HEADER = (
    "| phase | spool | instances | partitions | N | records/s | per instance | "
    "payler CPU % of a core | payler CPU µs/record | servers CPU % | other load % |\n"
    "| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |"
)


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def count_pending(storage_url: str) -> int:
    async with storage_from_url(storage_url) as storage:
        return await storage.count()


@dataclass
class Setup:
    """One row's topic, spool and configuration files."""

    bootstrap: str
    tansu_pid: int
    spool: str
    instances: int
    partitions: int
    count: int
    timeout_s: float
    folder: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def topic(self) -> str:
        return f"bench-{self.tag}"

    @property
    def storage_url(self) -> str:
        if self.spool == "sqlite":
            return f"sqlite:///{self.folder}/spool-{self.tag}.db"
        return f"{REDIS_URL}?prefix=bench-{self.tag}:"

    def config(self, phase: str) -> Path:
        url = f"kafka://{self.bootstrap}?group=bench-{self.tag}&{GROUP_OPTIONS}"
        workflow = {
            "ingest": f"""callable: client.process_queue
    options: {{broker_url: "{url}", queue: "{self.topic}", default_destination: "{self.topic}-out",
               dead_letter_queue: "{self.topic}-dead", prefetch: 500, batch_size: 500}}""",
            "deliver": f"""callable: client.watch_storage
    options: {{broker_url: "{url}", declare_queues: ["{self.topic}-out"],
               dead_letter_queue: "{self.topic}-dead", batch_size: 500}}""",
        }[phase]
        path = self.folder / f"{phase}-{self.tag}.yaml"
        path.write_text(f"workflows:\n  - {workflow}\nstats_interval_seconds: 86400\n")
        return path


async def phase(setup: Setup, name: str, done: Callable[[int], int]) -> Result:
    """Run ``setup.instances`` instances of the phase's workflow; time ``done(pending)`` (records
    stored, or delivered) from 10 % to 90 % of the records, with the CPU the instances used."""
    env = child_env(PAYLER_STORAGE_URL=setup.storage_url, PAYLER_LOG_LEVEL="WARNING")
    argv = [sys.executable, "-m", "payler", "--config-file", str(setup.config(name))]
    logs = setup.folder / f"{name}-{setup.tag}"
    daemons = [
        await Daemon.start(f"payler-{i}", argv, env, logs.with_suffix(f".{i}.log"), setup.folder)
        for i in range(setup.instances)
    ]
    meter = CpuMeter()
    marks: dict[int, float] = {}
    low, high = setup.count // 10, setup.count * 9 // 10
    try:
        deadline = time.monotonic() + setup.timeout_s
        while time.monotonic() < deadline and high not in marks:
            progress = done(await count_pending(setup.storage_url))
            now = time.monotonic()
            if progress >= low and low not in marks:
                marks[low] = now
                meter.start([d.pid for d in daemons], [setup.tansu_pid])
            if progress >= high:
                marks[high] = now
            await asyncio.sleep(POLL_S)  # polling the spool's count
        cpu = meter.stop()
        if high not in marks:
            tails = "\n".join(d.log_tail() for d in daemons)
            raise RuntimeError(
                f"{name} {setup.spool} {setup.instances}x{setup.partitions}: "
                f"not done in time\n{tails}"
            )
    finally:
        for daemon in daemons:
            await daemon.stop()
    window_s = marks[high] - marks[low]
    return Result(
        phase=name,
        spool=setup.spool,
        instances=setup.instances,
        partitions=setup.partitions,
        count=setup.count,
        rate=(high - low) / window_s,
        cpu_percent=cpu["daemon"],
        cpu_us=cpu["daemon"] / 100 * cpu["window_s"] / (high - low) * 1e6,
        servers_percent=cpu["servers"],
        others_percent=cpu["others"],
    )


async def row(setup: Setup, size: int) -> list[Result]:
    """Fill the row's topic, ingest it all into the spool, then deliver it all to a topic."""
    await create_topic(setup.bootstrap, setup.topic, setup.partitions)
    await fill_kafka(setup.bootstrap, setup.topic, payloads(setup.count, size))
    await count_pending(setup.storage_url)  # the spool exists before the instances race for it
    try:
        ingest = await phase(setup, "ingest", lambda pending: pending)
        deliver = await phase(setup, "deliver", lambda pending: setup.count - pending)
    finally:
        if setup.spool == "redis":
            await _drop_redis_keys(f"bench-{setup.tag}:")
    return [ingest, deliver]


async def _drop_redis_keys(prefix: str) -> None:
    import redis.asyncio as aioredis  # noqa: PLC0415 - only the redis rows need it

    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def main(args: argparse.Namespace) -> None:
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        async with tansu() as bootstrap:
            tansu_pid = _pid_listening()
            for _ in range(args.repeat):
                for spool in args.spools.split(","):
                    for instances, partitions in layouts:
                        setup = Setup(
                            bootstrap, tansu_pid, spool, instances, partitions, args.count,
                            args.timeout, Path(folder),
                        )  # fmt: skip
                        for result in await row(setup, args.size):
                            print(result.line(), flush=True)


def _pid_listening() -> int:
    """The pid of the tansu process this harness started (its only child named tansu)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if not entry.name.isdigit():
                continue
            stat = (entry / "stat").read_text()
            parent = int(stat.rpartition(")")[2].split()[1])
            if parent == os.getpid() and "tansu" in stat[: stat.rindex(")")]:
                return int(entry.name)
    return -1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000, help="records per row")
    parser.add_argument("--size", type=int, default=512, help="record value bytes")
    parser.add_argument(
        "--layouts", default="1x1,1x6,2x6,3x6,3x2",
        help="KxP: K instances on a topic of P partitions (comma-separated)",
    )  # fmt: skip
    parser.add_argument("--spools", default="sqlite,redis", help="sqlite, redis")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every row")
    asyncio.run(main(parser.parse_args()))
