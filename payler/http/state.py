"""What the routes reach (:class:`ServerState`), and readiness: shared by the probes, the
admin API's overview and the console."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from payler.admin.operations import Admin
from payler.admin.status import RateTracker
from payler.http.exposition import RuntimeView
from payler.http.sampling import SpoolSampler
from payler.http.sessions import Sessions
from payler.http.settings import HttpSettings
from payler.workflow import WorkflowState


@dataclass(slots=True)
class ServerState:
    """What the routes reach: the runtime (states, metrics), the admin operations, settings."""

    runtime: RuntimeView
    settings: HttpSettings
    admin: Admin
    registry: CollectorRegistry
    stopping: asyncio.Event
    sampler: SpoolSampler
    tracker: RateTracker
    sessions: Sessions = field(default_factory=Sessions)


class WorkflowStatus(BaseModel):
    state: WorkflowState
    problem: str | None = None


class Readiness(BaseModel):
    """``/readyz``'s answer: ready, or why not (naming the workflow)."""

    ready: bool
    reason: str | None = None
    workflows: dict[str, WorkflowStatus]


def readiness(state: ServerState) -> Readiness:
    """Ready only while every workflow is ready (one that finished on its own counts as done,
    not as unready), and the daemon is not stopping."""
    contexts = state.runtime.contexts
    workflows = {ctx.name: WorkflowStatus(state=ctx.state, problem=ctx.problem) for ctx in contexts}
    if state.stopping.is_set():
        return Readiness(ready=False, reason="payler is stopping", workflows=workflows)
    for ctx in contexts:
        if ctx.state in ("starting", "restarting"):
            why = f"workflow {ctx.name!r} is {ctx.state}"
            if ctx.problem:
                why += f" ({ctx.problem})"
            return Readiness(ready=False, reason=why, workflows=workflows)
    return Readiness(ready=True, workflows=workflows)


__all__ = ["Readiness", "ServerState", "WorkflowStatus", "readiness"]
