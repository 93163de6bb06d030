"""A daemon in the test process (in-memory drivers) with its HTTP server, and a client."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from payler import config
from payler.runtime import Runtime
from payler.testing import MemoryBroker, reset
from tests.conftest import free_port


@dataclass
class Daemon:
    runtime: Runtime
    client: httpx.AsyncClient
    broker: MemoryBroker
    name: str

    @property
    def url(self) -> str:
        return str(self.runtime.http.url)


Start = Callable[..., Awaitable[Daemon]]


def write_config(path: Path, name: str, http: str, workflows: str | None = None) -> Path:
    urls = f'broker_url: "memory://{name}", storage_url: "memory://{name}"'
    path.write_text(
        "workflows:\n"
        + (
            workflows
            or f"""  - name: ingest
    callable: client.process_queue
    options: {{{urls}, default_delay_ms: 3600000}}
  - name: deliver
    callable: client.watch_storage
    options: {{{urls}, declare_queues: [out], max_poll_interval_ms: 50}}
"""
        )
        + f"shutdown_grace_seconds: 2\nhttp: {http}\n"
    )
    return path


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a daemon (``http`` is the section's YAML, ``workflows`` the list's); stopped after."""
    running: list[tuple[asyncio.Event, asyncio.Task[None], httpx.AsyncClient]] = []

    async def start(
        http: str | None = None, workflows: str | None = None, token: str | None = None
    ) -> Daemon:
        name = f"http-{uuid.uuid4().hex[:8]}"
        http = http or f"{{port: {free_port()}, sample_interval_seconds: 0.05}}"
        path = write_config(tmp_path / f"{name}.yaml", name, http, workflows)
        runtime = Runtime(config.load(path, environ={}))
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(stop))

        async def started() -> bool:
            return runtime.http is not None or task.done()

        await eventually(started)
        if task.done():
            await task  # raises what stopped it
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.AsyncClient(base_url=runtime.http.url, headers=headers, timeout=10)
        running.append((stop, task, client))
        broker = MemoryBroker(f"memory://{name}")
        await broker.connect()
        return Daemon(runtime, client, broker, name)

    try:
        yield start
    finally:
        for stop, task, client in running:
            await client.aclose()
            stop.set()
            await asyncio.wait_for(task, 10)
        reset()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it holds (a condition with a deadline, never a bare sleep)."""
    async with asyncio.timeout(timeout_s):
        for _ in itertools.count():
            if await check():
                return
            await asyncio.sleep(0.02)
