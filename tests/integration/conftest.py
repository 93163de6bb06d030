"""Fixtures for tests against the real RabbitMQ (127.0.0.1:5672) and payler run as users run it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

AMQP_URL = os.environ.get("PAYLER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
#: How long payler may take to connect and report that it runs.
START_TIMEOUT_S = 20.0


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

    async def count(self, queue: str) -> int:
        declared = await self.channel.declare_queue(queue, passive=True)
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


@dataclass
class Payler:
    """A ``payler --config-file`` process, its log, and a way to wait for what it logs."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: Path, env: Mapping[str, str], cwd: Path) -> Payler:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "payler", "--config-file", str(config),
            env={**os.environ, **env}, cwd=cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        payler = cls(process)
        payler._reader = asyncio.create_task(payler._read())
        return payler

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._changed.set()
        self._changed.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_line(self, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not any(text in line for line in self.lines):
                    if self.process.returncode is not None and self._reader and self._reader.done():
                        break
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pass
        if not any(text in line for line in self.lines):
            pytest.fail(f"payler never logged {text!r}; its output:\n{self.log}")

    async def running(self) -> Payler:
        await self.wait_for_line("payler is running")
        return self

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await self.wait(timeout_s)

    async def wait(self, timeout_s: float = 30.0) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            pytest.fail(f"payler did not exit within {timeout_s} s; its output:\n{self.log}")
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
