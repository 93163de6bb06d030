"""What a workflow receives: its :class:`WorkflowContext`.

A workflow is any ``async def`` function, found by ``location`` + ``callable`` in the
configuration, with this signature::

    async def my_workflow(ctx: WorkflowContext) -> None:
        async with broker_from_url(ctx.options["broker_url"], queue="in") as broker:
            ctx.ready()                      # connected: start-up succeeded
            await broker.serve(handler, ctx.stop)  # returns once ctx.stop is set

- ``ctx.options``: the workflow's ``options`` from the file; an instance of the function's
  ``options_model`` (a pydantic model) when it declares one, else a plain dict.
- ``ctx.stop``: set on SIGINT/SIGTERM. Stop taking new work, finish what is in hand, return.
  A workflow still running after the grace period is cancelled.
- ``ctx.ready()``: call it once the workflow's connections are up. An error *before* it is a
  start-up failure (the daemon exits with status 2), and so is not calling it within
  ``startup_timeout_seconds``; an error *after* it is retried: the runtime restarts the workflow
  with backoff (logged in one line for a lost connection, with a traceback for anything else).
- ``ctx.clock``, ``ctx.metrics``, ``ctx.log``: time, counters (summarised periodically in the log,
  exported on ``/metrics``), and a logger named after the workflow.
- ``ctx.state``: ``starting`` until ``ready()``, ``ready`` while it runs, ``restarting`` from a
  failure until the next run calls ``ready()`` again, ``stopped`` once it returned; the runtime
  sets it and ``/readyz`` reports it.

The original Payler's signature, ``async def workflow(loop)``, still works: such a workflow gets
the running event loop, and counts as ready at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from payler.clock import Clock, SystemClock
from payler.metrics import Metrics

WorkflowState = Literal["starting", "ready", "restarting", "stopped"]
#: Every state, in a stable order (the ``payler_workflow_state`` gauge has one series each).
WORKFLOW_STATES: tuple[WorkflowState, ...] = ("starting", "ready", "restarting", "stopped")


@dataclass(slots=True)
class WorkflowContext:
    """A running workflow's view of the runtime (see the module docstring)."""

    name: str
    options: Any = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    clock: Clock = field(default_factory=SystemClock)
    metrics: Metrics = field(default_factory=Metrics)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("payler.workflow"))
    started: asyncio.Event = field(default_factory=asyncio.Event)
    state: WorkflowState = "starting"
    #: Why the workflow last failed (while ``restarting``), password-free.
    problem: str | None = None

    def ready(self) -> None:
        """Tell the runtime the workflow is connected and running: start-up succeeded."""
        self.started.set()
        self.state, self.problem = "ready", None

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()
