"""The FastAPI application: ``/metrics``, ``/healthz``, ``/readyz``, ``/v1`` (the admin API) and
``/openapi.json``. No route serves assets from the internet (no CDN'd docs page): the
OpenAPI document is the reference.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from payler import __version__
from payler.admin.operations import Admin
from payler.http import api
from payler.http.exposition import RuntimeView
from payler.http.security import BodyLimit
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


class WorkflowStatus(BaseModel):
    state: WorkflowState
    problem: str | None = None


class Readiness(BaseModel):
    """``/readyz``'s answer: ready, or why not (naming the workflow)."""

    ready: bool
    reason: str | None = None
    workflows: dict[str, WorkflowStatus]


class Health(BaseModel):
    status: str


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(
        title="payler",
        version=__version__,
        summary="The payload spooler's operations: metrics, probes, and the admin API.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.payler = state
    app.add_middleware(BodyLimit, max_bytes=state.settings.max_request_bytes)
    app.include_router(api.router)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
        summary="Prometheus metrics (no token needed)",
    )
    async def metrics(request: Request) -> Response:
        registry: CollectorRegistry = request.app.state.payler.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="Liveness: the process and its event loop answer")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        summary="Readiness: 200 while every workflow is connected and ready, else 503",
        responses={503: {"model": Readiness, "description": "Not ready: the reason says why."}},
    )
    async def readyz(request: Request) -> Any:
        ready = readiness(request.app.state.payler)
        return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)

    return app


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


__all__ = ["Readiness", "ServerState", "create_app", "readiness"]
