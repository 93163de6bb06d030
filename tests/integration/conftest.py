"""payler run as users run it: the ``payler`` command in a subprocess, and its log."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: How long payler may take to connect and report that it runs.
START_TIMEOUT_S = 20.0


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
