"""Spool storages, chosen by URL scheme; each backend is imported only when used.

====================  ======================================================
``sqlite:///PATH``    the embedded default: a file, no server (``sqlite:////abs/path``)
``mongodb://...``     MongoDB (``mongodb+srv://`` too), through pymongo's asyncio API
``redis://...``       Redis (``rediss://`` too; ``?prefix=`` names the keys), redis.asyncio
``redis+cluster://``  a Redis Cluster (``rediss+cluster://`` too; ``?shards=N``), RedisCluster
``postgresql://...`` PostgreSQL (``postgres://`` too; ``?schema=`` names the schema), asyncpg
``memory://NAME``     in this process only: for tests
====================  ======================================================
"""

from __future__ import annotations

from payler import plugins
from payler.clock import Clock
from payler.drivers.storages.base import DEFAULT_DEDUPE_WINDOW_MS, SpoolStorage
from payler.metrics import Metrics

_BACKENDS: dict[str, tuple[str, str]] = {
    "sqlite": ("payler.drivers.storages.sqlite", "SQLiteStorage"),
    "mongodb": ("payler.drivers.storages.mongodb", "MongoStorage"),
    "mongodb+srv": ("payler.drivers.storages.mongodb", "MongoStorage"),
    "redis": ("payler.drivers.storages.redis", "RedisStorage"),
    "rediss": ("payler.drivers.storages.redis", "RedisStorage"),
    "redis+cluster": ("payler.drivers.storages.redis", "RedisStorage"),
    "rediss+cluster": ("payler.drivers.storages.redis", "RedisStorage"),
    "postgresql": ("payler.drivers.storages.postgres", "PostgresStorage"),
    "postgres": ("payler.drivers.storages.postgres", "PostgresStorage"),
    "memory": ("payler.drivers.storages.memory", "MemoryStorage"),
}

#: The URL schemes this module can open (plugins add theirs: :func:`known_schemes`).
STORAGE_SCHEMES = tuple(_BACKENDS)
#: The largest body each backend can hold at all: a ``max_body_bytes`` may not be set above it.
#: SQLite: its SQLITE_MAX_LENGTH as built by default; MongoDB: a BSON document; Redis: a string
#: (proto-max-bulk-len); PostgreSQL: a ``bytea`` value. The in-memory storage has none.
HARD_MAX_BODY_BYTES: dict[str, int] = {
    "sqlite": 1_000_000_000,
    "mongodb": 16 * 1024 * 1024,
    "mongodb+srv": 16 * 1024 * 1024,
    "redis": 512 * 1024 * 1024,
    "rediss": 512 * 1024 * 1024,
    "redis+cluster": 512 * 1024 * 1024,
    "rediss+cluster": 512 * 1024 * 1024,
    "postgresql": 1_000_000_000,  # a bytea value: at most 1 GB
    "postgres": 1_000_000_000,
}


def known_schemes() -> tuple[str, ...]:
    """The built-in schemes and those of plugins (:mod:`payler.plugins`)."""
    return plugins.known_schemes(plugins.STORAGE_GROUP, _BACKENDS)


def _backend(scheme: str, url: str) -> type[SpoolStorage]:
    backend: type[SpoolStorage] = plugins.driver_class(
        "storage", plugins.STORAGE_GROUP, _BACKENDS, scheme, url
    )
    return backend


def storage_from_url(
    url: str,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    dedupe_window_ms: int = DEFAULT_DEDUPE_WINDOW_MS,
    max_body_bytes: int | None = None,
    min_free_bytes: int | None = None,
) -> SpoolStorage:
    """The storage driver for ``url`` (not yet connected: use it as ``async with``).

    ``max_body_bytes`` and ``min_free_bytes`` override the backend's defaults (its
    ``max_body_bytes``; ``min_free_bytes`` matters to file-based storages only); a limit above
    what the backend can hold is a :class:`~payler.errors.ConfigError`.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    backend = _backend(scheme, url)
    return backend(
        url,
        clock=clock,
        metrics=metrics,
        dedupe_window_ms=dedupe_window_ms,
        max_body_bytes=max_body_bytes,
        min_free_bytes=min_free_bytes,
    )
