"""The HTTP server's life: uvicorn, in process, on the daemon's event loop.

Why FastAPI on uvicorn (and not aiohttp): the admin API's requests and answers are pydantic
models already (payler's data crossing a boundary is pydantic), and FastAPI turns them into
validation and into the ``/openapi.json`` that schemathesis tests and the web console reads,
with no second description to keep in step; uvicorn's ``Server`` runs as one more task on the
running loop (``serve()``), with a graceful shutdown we can await.

- Start: the socket is bound first, here, so that a port in use or a bad address is a start-up
  error (exit 2, one line) before any workflow starts; then uvicorn serves on it.
- Signals stay the CLI's: uvicorn's own handlers are not installed.
- Stop: after the workflows stopped, the server closes its socket, lets requests in progress
  finish for up to :data:`SHUTDOWN_TIMEOUT_S`, and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Generator

import uvicorn

from payler.admin.operations import Admin
from payler.admin.status import RateTracker
from payler.admin.target import AdminTarget
from payler.config import Loaded
from payler.errors import StartupError
from payler.http.app import create_app
from payler.http.exposition import RuntimeView, make_registry
from payler.http.sampling import SpoolSampler
from payler.http.settings import HttpSettings
from payler.http.state import ServerState

log = logging.getLogger("payler.http")

#: How long requests in progress may take to finish when payler stops.
SHUTDOWN_TIMEOUT_S = 3
#: How long the server may take to start serving once its socket is bound.
START_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: payler's CLI owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """The server of one daemon (see the module docstring)."""

    def __init__(
        self,
        runtime: RuntimeView,
        settings: HttpSettings,
        target: AdminTarget,
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.sampler = SpoolSampler(target, settings.sample_interval_seconds)
        self.admin = Admin(target)
        self.tracker = RateTracker(lambda: runtime.contexts)
        self.state = ServerState(
            runtime,
            settings,
            self.admin,
            make_registry(runtime, self.sampler),
            stopping,
            self.sampler,
            self.tracker,
        )
        self.app = create_app(self.state)
        self.port = settings.port
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sampling: asyncio.Task[None] | None = None
        self._tracking: asyncio.Task[None] | None = None
        self._stop_sampling = asyncio.Event()

    async def start(self) -> None:
        """Bind and serve; raise :class:`~payler.errors.StartupError` if it cannot."""
        sock = _bind(self.settings.host, self.settings.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
            timeout_keep_alive=5,
        )
        self._server = server = _Server(config)
        self._serving = asyncio.create_task(server.serve(sockets=[sock]), name="payler-http")
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not server.started:
                    if self._serving.done():
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        if not server.started:
            await self.stop()
            raise StartupError(f"the HTTP server on {self.url} did not start")
        self._sampling = asyncio.create_task(self.sampler.run(self._stop_sampling))
        self._tracking = asyncio.create_task(self.tracker.run(self._stop_sampling))
        where = "" if self.settings.loopback else ", bearer token required on /v1"
        log.info("HTTP server on %s (/metrics, /healthz, /readyz, /v1%s)", self.url, where)

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def stop(self) -> None:
        self._stop_sampling.set()
        if self._server is not None:
            self._server.should_exit = True
        for task in (self._serving, self._sampling, self._tracking):
            if task is None:
                continue
            try:
                await asyncio.wait_for(task, SHUTDOWN_TIMEOUT_S + 2)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except BaseException as exc:
                log.warning("the HTTP server stopped with %r", exc)
        await self.admin.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"the HTTP server cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    return sock


@contextlib.asynccontextmanager
async def serving(
    runtime: RuntimeView, loaded: Loaded, settings: HttpSettings, stopping: asyncio.Event
) -> AsyncIterator[HttpServer]:
    """Run the HTTP server for the block (the runtime wraps its workflows in it)."""
    server = HttpServer(runtime, settings, AdminTarget.from_config(loaded), stopping)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


__all__ = ["HttpServer", "serving"]
