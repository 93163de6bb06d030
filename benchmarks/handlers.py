"""Handlers: payler's ``client.handle`` next to FastStream, the same trivial handler, one run.

    pip install -e '.[bench]'                 # FastStream, for this benchmark only
    python benchmarks/handlers.py             # 10,000 orders per row
    python benchmarks/handlers.py --count 2000

Each row gets a RabbitMQ virtual host of its own with a durable source queue already holding N
persistent JSON orders (about 60 bytes each), then starts its daemon as a user would (payler:
``python -m payler --config-file``; FastStream: ``python benchmarks/handler_apps.py
faststream``, its ``FastStream(broker).run()``), and a collector counts the invoices arriving on
the destination queue. Both decode the JSON, validate it as a small pydantic model and publish one
invoice, persistent, with publisher confirms, before acknowledging the order; both take the same
prefetch (``--prefetch``, 200; payler runs ``concurrency`` = half of it per batch, FastStream one
task per prefetched message). Figures: msg/s from the first invoice to the N-th (start-up
excluded), the daemon's CPU time per message, its peak RSS, lost and duplicated invoices. Only
127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from infra import Daemon, child_env, fresh_vhost, require_local

AMQP_URL = require_local(os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
HERE = Path(__file__).parent
SOURCE, DESTINATION = "orders", "invoices"


@dataclass
class Row:
    name: str
    count: int
    seconds: float
    unique: int
    arrivals: int
    cpu_s: float
    peak_rss_mb: float | None

    @property
    def rate(self) -> float:
        return (self.unique - 1) / self.seconds if self.seconds else 0.0

    def line(self, peer: Row | None) -> str:
        ratio = f"{self.rate / peer.rate:.0%}" if peer and peer.rate else "—"
        rss = f"{self.peak_rss_mb:.0f}" if self.peak_rss_mb else "?"
        return (
            f"| {self.name} | {self.count:,} | {self.rate:,.0f} | {ratio} | "
            f"{self.cpu_s * 1e6 / max(1, self.unique):,.0f} | {rss} | "
            f"{self.count - self.unique} | {self.arrivals - self.unique} |"
        )


async def fill(url: str, count: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(SOURCE, durable=True)
        await channel.declare_queue(DESTINATION, durable=True)
        for start in range(0, count, 1000):
            await asyncio.gather(*(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps({"id": i, "customer": f"c{i % 97}", "amount": "12.50"}).encode(),
                        content_type="application/json", message_id=f"o{i}",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    SOURCE,
                )
                for i in range(start, min(count, start + 1000))
            ))  # fmt: skip


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_row(name: str, count: int, prefetch: int, timeout_s: float, work: Path) -> Row:
    async with fresh_vhost(AMQP_URL, name) as (_, url):
        await fill(url, count)
        env = child_env(BENCH_AMQP_URL=url, BENCH_SOURCE=SOURCE, BENCH_DESTINATION=DESTINATION,
                        BENCH_PREFETCH=str(prefetch), PYTHONPATH=str(HERE))  # fmt: skip
        if name == "payler":
            config = work / "handlers.yaml"
            options = {"app": "handler_apps:app", "source_url": url, "queue": SOURCE,
                       "storage_url": f"sqlite:///{work}/spool.db",
                       "concurrency": prefetch // 2, "prefetch": prefetch}  # fmt: skip
            workflow = {"name": "bench", "callable": "client.handle", "options": options}
            config.write_text(json.dumps({"workflows": [workflow]}))
            argv = [sys.executable, "-m", "payler", "--config-file", str(config)]
        else:
            argv = [sys.executable, str(HERE / "handler_apps.py"), "faststream"]
        arrivals: list[float] = []
        seen: set[str] = set()
        done = asyncio.Event()

        async def on_invoice(message: AbstractIncomingMessage) -> None:
            arrivals.append(time.monotonic())
            seen.add(str(json.loads(message.body)["order_id"]))
            await message.ack()
            if len(seen) >= count:
                done.set()

        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.declare_queue(DESTINATION, durable=True)
            await queue.consume(on_invoice)
            daemon = await Daemon.start(name, argv, env, work / f"{name}.log", work)
            try:
                async with asyncio.timeout(timeout_s):
                    await done.wait()
                await asyncio.sleep(1.0)  # a duplicate beyond the N-th would land meanwhile
                cpu = cpu_seconds(daemon.pid)
                rss = daemon.peak_rss_mb()
            except TimeoutError:
                print(f"{name}: only {len(seen)} of {count} in {timeout_s} s\n{daemon.log_tail()}")
                cpu, rss = 0.0, None
            finally:
                await daemon.stop()
        return Row(name, count, arrivals[-1] - arrivals[0] if arrivals else 0.0, len(seen),
                   len(arrivals), cpu, rss)  # fmt: skip


async def main(count: int, prefetch: int, timeout_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="payler-bench-handlers-") as tmp:
        rows = {}
        for name in ("faststream", "payler"):
            work = Path(tmp) / name
            work.mkdir()
            rows[name] = await run_row(name, count, prefetch, timeout_s, work)
            print(f"{name}: {rows[name].rate:,.0f} msg/s", flush=True)
    print("\n| row | N | msg/s | of FastStream | daemon CPU µs/msg | peak RSS MB | lost | dup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(row.line(rows["faststream"] if name != "faststream" else None))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="orders per row")
    parser.add_argument("--prefetch", type=int, default=200, help="both daemons' prefetch")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per row, at most")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.prefetch, args.timeout))
