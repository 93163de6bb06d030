"""Shared fixtures. Each section is self-contained: add new ones in a section of their own."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

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


@pytest.fixture(scope="session")
def secantus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SecantusDB server for the whole session; yields its URL (no database in it).

    Tests share the server: each one takes its own database (:func:`mongodb_url`).
    """
    workdir: Path = tmp_path_factory.mktemp("secantus")
    config = workdir / "secantusd.toml"
    config.write_text("")  # without --config, the server picks up stray secantusd.toml files
    stderr_path = workdir / "stderr.log"
    port = free_port()
    command = [sys.executable, "-m", "secantus", "--port", str(port), "--host", "127.0.0.1"]
    command += ["--storage-path", str(workdir / "data"), "--config", str(config)]
    command += ["--log-level", "WARNING"]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + SECANTUS_START_TIMEOUT_S
        while not _accepts_connections(port):
            if process.poll() is not None or time.monotonic() > deadline:
                what = "exited" if process.returncode is not None else "did not start in time"
                log = stderr_path.read_text(errors="replace")
                pytest.fail(f"SecantusDB {what} (port {port}); its stderr:\n{log}")
            time.sleep(0.05)  # polling a port that refuses at once: a short pause, not a wait
        yield f"mongodb://127.0.0.1:{port}/?directConnection=true&retryWrites=false"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


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
