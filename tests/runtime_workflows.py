"""Workflows that the runtime tests load by ``location`` + ``callable``, as users' own are."""

from __future__ import annotations

import asyncio
from typing import Any

from payler.errors import StartupError, TransientError
from payler.workflow import WorkflowContext

#: What the workflows saw, for the tests to read.
calls: dict[str, Any] = {}
#: Set when ``flaky`` starts its third run.
third_run = asyncio.Event()


async def fails_before_ready(ctx: WorkflowContext) -> None:
    raise ConnectionRefusedError("connection refused by 127.0.0.1:1")


async def flaky(ctx: WorkflowContext) -> None:
    """Ready, then loses its connection twice; the third run waits for stop."""
    calls["flaky"] = calls.get("flaky", 0) + 1
    ctx.ready()
    if calls["flaky"] < 3:
        raise TransientError("connection lost")
    third_run.set()
    await ctx.stop.wait()


#: Set when ``buggy`` starts its third run.
buggy_third_run = asyncio.Event()


async def buggy(ctx: WorkflowContext) -> None:
    """Ready, then hits a bug twice; the third run waits for stop."""
    calls["buggy"] = calls.get("buggy", 0) + 1
    ctx.ready()
    if calls["buggy"] < 3:
        raise ZeroDivisionError("a bug")
    buggy_third_run.set()
    await ctx.stop.wait()


async def stubborn(ctx: WorkflowContext) -> None:
    """Ignores stop: the runtime must cancel it after the grace period."""
    ctx.ready()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        calls["stubborn cancelled"] = True
        raise


async def polite(ctx: WorkflowContext) -> None:
    ctx.ready()
    await ctx.stop.wait()
    calls["polite options"] = ctx.options


async def legacy(loop: asyncio.AbstractEventLoop) -> None:
    """The original Payler's workflow signature."""
    calls["legacy loop"] = loop
    await asyncio.Event().wait()


async def broker_restarting(ctx: WorkflowContext) -> None:
    """Ready; loses its broker; cannot reconnect at once (a start-up error); then can."""
    calls["broker_restarting"] = calls.get("broker_restarting", 0) + 1
    run = calls["broker_restarting"]
    if run == 2:
        raise StartupError("cannot connect to RabbitMQ at amqp://x/: connection refused")
    ctx.ready()
    if run == 1:
        raise TransientError("connection lost")
    third_run.set()
    await ctx.stop.wait()


async def loses_broker_while_stopping(ctx: WorkflowContext) -> None:
    ctx.ready()
    await ctx.stop.wait()
    raise TransientError("connection lost while draining")


#: For ``gated``: set ``fail`` to make its first run lose its "broker"; ``resume`` to let the
#: next run become ready again. (Fresh events per test: see tests/http/test_server.py.)
gates: dict[str, asyncio.Event] = {}


async def gated(ctx: WorkflowContext) -> None:
    """Ready; fails once ``gates['fail']`` is set; the next run waits for ``gates['resume']``."""
    calls["gated"] = calls.get("gated", 0) + 1
    if calls["gated"] > 1:
        await gates["resume"].wait()
    ctx.ready()
    if calls["gated"] == 1:
        await gates["fail"].wait()
        raise TransientError("lost the broker at amqp://payler:s3cret@broker/ (a test)")
    await ctx.stop.wait()


async def never_ready(ctx: WorkflowContext) -> None:
    """Connects for ever (never calls ``ctx.ready()``), but stops when asked."""
    await ctx.stop.wait()
    calls["never_ready stopped"] = True


#: ``outage``'s broker is down over each ``[from, until)`` of these (on the runtime's clock).
outages: list[tuple[int, int]] = []
#: ``outage`` appends ``("run", ms)`` when it connects, ``("fail", ms)`` when it fails.
outage_log: list[tuple[str, int]] = []
#: Set when ``outage`` has connected this many times.
connected_runs = 3
all_runs = asyncio.Event()


async def outage(ctx: WorkflowContext) -> None:
    """A workflow whose broker goes away during each of :data:`outages`: it runs until the next
    one starts, loses its connection, and cannot connect until that outage is over."""
    now = ctx.clock.now_ms()
    if any(start <= now < end for start, end in outages):
        outage_log.append(("fail", now))
        raise ConnectionRefusedError("connection refused by 127.0.0.1:5672")
    ctx.ready()
    outage_log.append(("run", now))
    if sum(1 for kind, _ in outage_log if kind == "run") == connected_runs:
        all_runs.set()
        await ctx.stop.wait()
        return
    next_start = min(start for start, _ in outages if start > now)
    await ctx.clock.sleep((next_start - now) / 1000)
    outage_log.append(("fail", ctx.clock.now_ms()))
    raise TransientError("connection lost")
