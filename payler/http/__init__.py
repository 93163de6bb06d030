"""The operator's HTTP surface: one server per daemon, on the daemon's event loop.

- :mod:`payler.http.settings`: the ``http:`` section and its environment variables (no web
  stack imported: the configuration loader uses it).
- :mod:`payler.http.server`: the server's life (uvicorn, in process), started by the runtime.
- :mod:`payler.http.app`: the FastAPI application: ``/metrics``, ``/healthz``, ``/readyz``,
  the admin API under ``/v1`` (:mod:`payler.http.api`), and ``/openapi.json``.
"""
