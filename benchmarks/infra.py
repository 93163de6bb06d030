"""What every benchmark row uses: vhosts, daemon processes, a publisher, a collector, statistics.

Every wait here is bounded by a deadline and every loop by a count; nothing talks to a host
other than 127.0.0.1 (:func:`require_local`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
#: How long a daemon may take to say that it runs.
START_TIMEOUT_S = 30.0
#: The width of the message number at the start of every body: the benchmark's message id.
ID_WIDTH = 10


def require_local(url: str) -> str:
    """``url`` itself, or SystemExit when it points at anything but this machine."""
    host = urlsplit(url).hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"refusing {url!r}: the benchmark only talks to 127.0.0.1")
    return url


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_port(port: int, timeout_s: float) -> bool:
    """Whether something accepts connections on ``port`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


# -- RabbitMQ ----------------------------------------------------------------------------------


async def rabbitmqctl(*args: str, timeout_s: float = 60.0) -> str:
    """Run ``rabbitmqctl``; its output, or RuntimeError with its stderr."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: no answer in {timeout_s} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode(errors='replace')}")
    return out.decode(errors="replace")


def vhost_url(base_url: str, name: str) -> str:
    """``base_url`` (no vhost, or ``/``) pointing at virtual host ``name``."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}/{name}"


@contextlib.asynccontextmanager
async def fresh_vhost(base_url: str, label: str) -> AsyncIterator[tuple[str, str]]:
    """A RabbitMQ virtual host of this row's own, deleted afterwards: (its name, its URL)."""
    name = f"payler-bench-{label}-{uuid.uuid4().hex[:8]}"
    user = urlsplit(base_url).username or "guest"
    await rabbitmqctl("add_vhost", name)
    try:
        await rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield name, vhost_url(base_url, name)
    finally:
        with contextlib.suppress(Exception):
            await rabbitmqctl("delete_vhost", name)


async def queue_counts(vhost: str) -> dict[str, tuple[int, int]]:
    """Ready and unacknowledged messages of every queue in ``vhost`` (from the broker itself)."""
    out = await rabbitmqctl(
        "list_queues", "-q", "-p", vhost, "name", "messages_ready", "messages_unacknowledged"
    )
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


async def ready_count(connection: AbstractConnection, queue: str) -> int:
    """Messages ready on ``queue`` now: a passive declare on a fresh channel each time."""
    async with connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def wait_for_queue(connection: AbstractConnection, queue: str, timeout_s: float) -> bool:
    """Whether ``queue`` exists within ``timeout_s`` (the daemon declares it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await ready_count(connection, queue)
            return True
        except aio_pika.exceptions.ChannelNotFoundEntity:
            await asyncio.sleep(0.1)
    return False


def message_body(index: int, size: int) -> bytes:
    """A body of ``size`` bytes starting with the message's number (its benchmark id)."""
    head = f"{index:0{ID_WIDTH}d} ".encode()
    return head + b"x" * max(0, size - len(head))


def message_index(body: bytes) -> int:
    """The number :func:`message_body` put at the start of a body."""
    return int(body[:ID_WIDTH])


HeadersFor = Callable[[int, int], dict[str, Any]]  # (index, publish epoch ms) -> headers


@dataclass
class Publisher:
    """Publishes numbered messages with publisher confirms, ``window`` confirms in flight."""

    channel: AbstractChannel
    run_id: str
    size: int
    persistent: bool = True
    #: Message ids are unique to each publisher: payler spools a message id only once.
    _id_prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def message(self, index: int, headers: dict[str, Any]) -> aio_pika.Message:
        return aio_pika.Message(
            message_body(index, self.size),
            headers=headers,
            message_id=f"{self.run_id}-{self._id_prefix}-{index}",
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if self.persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
        )

    async def burst(
        self, queue: str, count: int, headers_for: HeadersFor, window: int = 1000
    ) -> tuple[float, float]:
        """Publish ``count`` messages as fast as the broker confirms them: (first, last) epoch s."""
        exchange = self.channel.default_exchange
        started = time.time()
        for start in range(0, count, window):
            now_ms = round(time.time() * 1000)
            await asyncio.gather(
                *(
                    exchange.publish(self.message(i, headers_for(i, now_ms)), queue)
                    for i in range(start, min(count, start + window))
                )
            )
        return started, time.time()

    async def paced(
        self,
        queue: str,
        rate: float,
        seconds: float,
        headers_for: HeadersFor,
        tick_s: float = 0.005,
    ) -> dict[int, float]:
        """Publish at ``rate`` msg/s for ``seconds``; each message's publish time (epoch s).

        Every ``tick_s`` it sends the messages whose scheduled time has come (so a late tick
        catches up); confirms are awaited in the background, all of them before returning.
        """
        exchange = self.channel.default_exchange
        total = round(rate * seconds)
        sent: dict[int, float] = {}
        confirms: list[asyncio.Future[Any]] = []
        start = time.time() + 0.05
        index = 0
        deadline = start + seconds + 60
        while index < total and time.time() < deadline:
            now = time.time()
            due = min(total, math.floor((now - start) * rate) + 1)
            batch = []
            while index < due:
                now_ms = round(time.time() * 1000)
                sent[index] = time.time()
                batch.append(
                    exchange.publish(self.message(index, headers_for(index, now_ms)), queue)
                )
                index += 1
            if batch:
                confirms.append(asyncio.gather(*batch))
            await asyncio.sleep(tick_s)
        await asyncio.gather(*confirms)
        return sent


@dataclass
class Collector:
    """Consumes a destination queue (no-ack) and records when each numbered message arrived."""

    arrivals: list[tuple[float, int]] = field(default_factory=list)
    first: dict[int, float] = field(default_factory=dict)
    _target: int = 0
    _enough: asyncio.Event = field(default_factory=asyncio.Event)
    _channel: AbstractChannel | None = None

    async def start(self, connection: AbstractConnection, queue: str) -> None:
        self._channel = await connection.channel()
        declared = await self._channel.declare_queue(queue, passive=True)
        await declared.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        index = message_index(message.body)
        self.arrivals.append((now, index))
        self.first.setdefault(index, now)
        if self._target and len(self.first) >= self._target:
            self._enough.set()

    async def wait_unique(self, count: int, deadline: float) -> bool:
        """Whether ``count`` distinct messages arrived before ``deadline`` (epoch s)."""
        self._target = count
        if len(self.first) >= count:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                await self._enough.wait()
        return len(self.first) >= count

    @property
    def duplicates(self) -> int:
        return len(self.arrivals) - len(self.first)

    def last_arrival(self) -> float | None:
        return max(self.first.values()) if self.first else None

    async def close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], deadline: float, interval_s: float = 0.025
) -> float | None:
    """Poll ``check`` until it holds (the epoch time it was seen to hold) or ``deadline``."""
    while time.time() < deadline:
        if await check():
            return time.time()
        await asyncio.sleep(interval_s)
    return None


# -- daemons -----------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A process under test, its output in a log file."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @classmethod
    async def start(
        cls, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path
    ) -> Daemon:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv, env=dict(env), cwd=cwd, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        return cls(name, process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    async def wait_for_line(self, text: str, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Whether the daemon logged ``text`` within ``timeout_s`` (False at once if it exited)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            if self.process.returncode is not None:
                return text in self.log()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 0.02)
        return False

    def status(self, field_name: str) -> int | None:
        """A ``/proc/PID/status`` memory figure (``VmHWM``, ``VmRSS``) in kB, if running."""
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{self.pid}/status").read_text()
            found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
            return int(found.group(1)) if found else None
        return None

    def peak_rss_mb(self) -> float | None:
        """The peak resident set size so far (VmHWM), MiB."""
        kb = self.status("VmHWM")
        return None if kb is None else kb / 1024

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``: the exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                self.kill()
                await self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


def child_env(**overrides: str) -> dict[str, str]:
    """This environment without storage/broker variables that could leak in, plus ``overrides``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"BROKER_URL", "MONGODB_URL", "PAYLER_STORAGE_URL", "PAYLER_FAULT"}
    }
    env.update(overrides)
    return env


# -- CPU accounting ----------------------------------------------------------------------------

#: Server processes the benchmark uses (by their ``comm``), counted apart from other load.
SERVICES = frozenset({"redis-server", "postgres", "epmd", "erl_child_setup", "inet_gethost"})
_TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def _processes() -> dict[int, tuple[str, float]]:
    """Every process now: its name (``comm``, or ``rabbitmq`` for the broker) and CPU seconds."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rpartition(")")[2].split()
            if name == "beam.smp" and b"rabbit\x00boot" in (entry / "cmdline").read_bytes():
                name = "rabbitmq"
        except (OSError, ValueError):
            continue
        found[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return found


@dataclass
class CpuMeter:
    """CPU used over a window, in % of one core: by the daemon under test, the servers
    (RabbitMQ, Redis, SecantusDB), this harness, py-spy, other processes, and the kernel.

    ``others`` is load from outside the benchmark (another job on this machine, a profiler):
    it makes a row's figures noisy. ``kernel`` is what no live process accounts for (network
    and disk work in interrupts, processes that exited during the window).
    """

    _daemon: set[int] = field(default_factory=set)
    _servers: set[int] = field(default_factory=set)
    _start: dict[int, tuple[str, float]] = field(default_factory=dict)
    _busy: float = 0.0
    _wall: float = 0.0

    def start(self, daemon_pids: Sequence[int], server_pids: Sequence[int] = ()) -> None:
        self._daemon, self._servers = set(daemon_pids), set(server_pids)
        self._start, self._busy, self._wall = _processes(), _busy_seconds(), time.monotonic()

    def stop(self) -> dict[str, Any]:
        if not self._wall:
            return {}
        end, busy, wall = _processes(), _busy_seconds(), time.monotonic() - self._wall
        shares: Counter[str] = Counter()
        foreign: Counter[str] = Counter()
        for pid, (name, seconds) in end.items():
            used = seconds - self._start.get(pid, (name, 0.0))[1]
            if pid in self._daemon:
                shares["daemon"] += used
            elif pid in self._servers or name in SERVICES or name == "rabbitmq":
                shares["servers"] += used
            elif pid == os.getpid():
                shares["harness"] += used
            elif name == "py-spy":  # --profile's own sampling: known, not outside load
                shares["profiler"] += used
            else:
                foreign[name] += used
        shares["others"] = sum(foreign.values())
        shares["kernel"] = max(0.0, busy - self._busy - sum(shares.values()))
        report: dict[str, Any] = {k: round(100 * v / wall) for k, v in shares.items()}
        report["window_s"] = round(wall, 1)
        report["top_others"] = {
            name: round(100 * v / wall) for name, v in foreign.most_common(3) if v / wall >= 0.02
        }
        self._wall = 0.0
        return report


# -- statistics --------------------------------------------------------------------------------


def percentiles(values_ms: Sequence[float]) -> dict[str, float] | None:
    """Nearest-rank p50/p95/p99 and the maximum of ``values_ms``; None when empty."""
    if not values_ms:
        return None
    ordered = sorted(values_ms)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": ordered[-1]}


def rate(count: int, seconds: float | None) -> float | None:
    return None if not seconds or seconds <= 0 else count / seconds
