"""Run every workflow of a configuration on one event loop, and stop them cleanly.

- All workflows run in one :class:`asyncio.TaskGroup`.
- Start-up: each workflow calls ``ctx.ready()`` once connected. If one fails before, or has not
  called it within ``startup_timeout_seconds`` (stuck connecting, or a workflow that never calls
  it), the runtime stops the others and raises :class:`~payler.errors.StartupError` naming it
  (the CLI exits 2). That limit is real time (the event loop's), whatever the runtime's clock: it
  watches progress, it does not schedule anything.
- Running: a workflow that fails once it has started is restarted after a backoff (0.5 s,
  doubling, at most :data:`RESTART_BACKOFF`'s cap of 5 s, with ±20 % jitter; back to the start
  once the workflow ran well for :data:`HEALTHY_RUN_MS`). The cap bounds how long a workflow
  waits once its broker is back: one backoff (at most 6 s), then its reconnection. A transient
  error (a lost connection) is logged in one line; anything else is logged with its traceback,
  as the bug it is — but it never stops the other workflows: only a start-up failure or a
  configuration error ends the daemon. (One bad message does not make a workflow fail: the
  workflows dead-letter it alone; see :mod:`payler.isolation`.)
- Stopping: :meth:`Runtime.run`'s ``stop`` event (set by the CLI on SIGINT/SIGTERM) is passed to
  every workflow; they finish their work in hand and return. Whatever is still running after
  ``shutdown_grace_seconds`` is cancelled: safe, since nothing is acknowledged before it is stored.
- Every ``stats_interval_seconds``, one log line per workflow that did something.
- With an ``http:`` section (or ``PAYLER_HTTP_PORT``/``METRIC_SERVER_PORT``), the HTTP server
  (:mod:`payler.http`) runs on the same loop for as long as the workflows do. Each workflow's
  ``ctx.state`` (starting, ready, restarting, stopped) is what ``/readyz`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any

from payler import eventloop, logs
from payler.backoff import Backoff
from payler.clock import Clock, SystemClock
from payler.config import Loaded, LoadedWorkflow
from payler.errors import ConfigError, StartupError, is_transient
from payler.isolation import describe
from payler.urls import mask_urls
from payler.workflow import WorkflowContext

log = logging.getLogger("payler.runtime")

#: How long a failed workflow waits before it is restarted: short enough that a broker back from
#: a restart is used again within seconds, long enough that a failing one cannot spin.
RESTART_BACKOFF = Backoff(base_s=0.5, max_s=5.0)
#: A run that lasted this long resets the backoff: the next failure is a new outage.
HEALTHY_RUN_MS = 30_000


class Runtime:
    """The workflows of one configuration, run together."""

    def __init__(self, loaded: Loaded, *, clock: Clock | None = None) -> None:
        self.loaded = loaded
        self.clock: Clock = clock or SystemClock()
        self.contexts: list[WorkflowContext] = []
        self.started = asyncio.Event()
        #: The HTTP server (:class:`payler.http.server.HttpServer`) while it runs, else None.
        self.http: Any = None

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (then drain within the grace period) or a fatal error.

        A fatal error (a start-up failure, a bug) in one workflow stops the others the same way
        a signal does — they finish their work in hand and close their connections — and is then
        raised from here.
        """
        settings = self.loaded.config
        stopping = asyncio.Event()  # set by ``stop`` or by a fatal error
        fatal: list[BaseException] = []
        log.info("event loop: %s", eventloop.describe(asyncio.get_running_loop()))
        for w in self.loaded.workflows:  # JSON log lines name the workflow
            logs.workflow_names[f"payler.workflow.{w.index}"] = w.name
        self.contexts = [
            WorkflowContext(
                name=w.name,
                options=w.options,
                stop=stopping,
                clock=self.clock,
                log=logging.getLogger(f"payler.workflow.{w.index}"),
            )
            for w in self.loaded.workflows
        ]
        async with self._operator_surface(stopping) as http, asyncio.TaskGroup() as group:
            self.http = http
            tasks = [
                group.create_task(
                    self._supervise(w, ctx, fatal, stopping), name=f"workflow:{ctx.name}"
                )
                for w, ctx in zip(self.loaded.workflows, self.contexts, strict=True)
            ]
            helpers = [
                group.create_task(self._report(settings.stats_interval_seconds, stopping)),
                group.create_task(
                    self._announce_start(settings.startup_timeout_seconds, fatal, stopping)
                ),
                group.create_task(_relay(stop, stopping)),
            ]
            await stopping.wait()
            if not fatal:
                log.info(
                    "stopping: finishing work in hand (grace period %.0f s)",
                    settings.shutdown_grace_seconds,
                )
            _, pending = await asyncio.wait(tasks, timeout=settings.shutdown_grace_seconds)
            for task in pending:
                log.warning(
                    "workflow %r did not stop within the grace period: cancelled",
                    task.get_name().removeprefix("workflow:"),
                )
                task.cancel()
            for helper in helpers:
                helper.cancel()
        self._log_summaries(final=True)
        if fatal:
            raise fatal[0]

    def _operator_surface(self, stopping: asyncio.Event) -> AbstractAsyncContextManager[Any]:
        """The HTTP server (metrics, probes, admin API) while the workflows run, if configured:
        started before them (a port in use is a start-up error), stopped after them."""
        if self.loaded.http is None:
            return contextlib.nullcontext()
        from payler.http.server import serving  # noqa: PLC0415 - the web stack only when used

        return serving(self, self.loaded, self.loaded.http, stopping)

    async def _announce_start(
        self, timeout_s: float, fatal: list[BaseException], stopping: asyncio.Event
    ) -> None:
        """Say when every workflow is ready; end the start-up as failed past ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(ctx.started.wait() for ctx in self.contexts))
        except TimeoutError:
            late = ", ".join(repr(c.name) for c in self.contexts if not c.started.is_set())
            fatal.append(
                StartupError(
                    f"workflow {late} did not start within {timeout_s:g} s "
                    "(startup_timeout_seconds): still connecting, or it never calls ctx.ready()"
                )
            )
            stopping.set()
            return
        self.started.set()
        log.info("payler is running %d workflow(s)", len(self.contexts))

    async def _supervise(
        self,
        workflow: LoadedWorkflow,
        ctx: WorkflowContext,
        fatal: list[BaseException],
        stopping: asyncio.Event,
    ) -> None:
        try:
            await self._run_with_restarts(workflow, ctx)
        except Exception as exc:
            fatal.append(exc)
            stopping.set()

    async def _run_with_restarts(self, workflow: LoadedWorkflow, ctx: WorkflowContext) -> None:
        attempt = 0
        while True:
            started_ms = self.clock.now_ms()
            try:
                await self._call(workflow, ctx)
            except ConfigError:
                raise
            except Exception as exc:
                if not ctx.started.is_set():
                    if isinstance(exc, StartupError):
                        raise
                    raise StartupError(f"workflow {ctx.name!r} could not start: {exc}") from exc
                # Once a workflow has run, failing to reconnect is an outage to wait out, not
                # a start-up failure: the broker may be restarting.
                transient = isinstance(exc, StartupError) or is_transient(exc)
                if ctx.stopping:  # the broker went away as we stopped: nothing left to do
                    log.warning("workflow %r: %s while stopping", ctx.name, exc)
                    return
                if self.clock.now_ms() - started_ms > HEALTHY_RUN_MS:
                    attempt = 0  # it ran well for a while: this is a new outage
                delay = RESTART_BACKOFF.delay_s(attempt)
                attempt += 1
                ctx.metrics.incr("restarts")
                ctx.state, ctx.problem = "restarting", mask_urls(describe(exc))
                log.log(
                    logging.WARNING if transient else logging.ERROR,
                    "workflow %r failed (%s); restarting in %.1f s",
                    ctx.name,
                    describe(exc),
                    delay,
                    exc_info=None if transient else exc,
                )
                await _sleep_unless(ctx.stop, delay, self.clock)
                if ctx.stopping:
                    return
                continue
            if not ctx.stopping:
                log.info("workflow %r finished", ctx.name)
            ctx.started.set()  # a workflow that returned has nothing left to start
            ctx.state = "stopped"
            return

    async def _call(self, workflow: LoadedWorkflow, ctx: WorkflowContext) -> None:
        parameters = inspect.signature(workflow.function).parameters
        if "loop" in parameters:  # the original Payler's signature
            ctx.ready()
            await workflow.function(loop=asyncio.get_running_loop())
        else:
            await workflow.function(ctx)

    async def _report(self, interval_s: float, stop: asyncio.Event) -> None:
        while True:
            await _sleep_unless(stop, interval_s, self.clock)
            if stop.is_set():
                return  # run() logs the final summaries
            self._log_summaries(final=False)

    def _log_summaries(self, *, final: bool) -> None:
        for ctx in self.contexts:
            summary = ctx.metrics.take()
            if summary:
                log.info("%s%s: %s", "final: " if final else "", ctx.name, summary)


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _sleep_unless(stop: asyncio.Event, seconds: float, clock: Clock) -> None:
    """Sleep ``seconds`` on ``clock``, or less if ``stop`` is set meanwhile."""
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([sleeper, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (sleeper, stopper):
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
