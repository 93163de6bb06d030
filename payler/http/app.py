"""The FastAPI application: ``/metrics``, ``/healthz``, ``/readyz``, ``/v1`` (the admin API),
``/openapi.json`` and the web console at ``/ui`` (:mod:`payler.http.console`). Nothing is
served from the internet (no CDN'd docs page, no CDN'd script): the OpenAPI document is the
API's reference, and the console's assets are files of the package.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from payler import __version__
from payler.http import api
from payler.http.console import routes as console
from payler.http.security import BodyLimit
from payler.http.state import Readiness, ServerState, readiness


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
    app.include_router(console.router)
    app.mount(f"{console.PREFIX}/static", console.static, name="console-static")

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


__all__ = ["Readiness", "ServerState", "create_app", "readiness"]
