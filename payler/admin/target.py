"""Which spool, broker and queues the admin operations work on.

The daemon's own: the built-in workflows' options of the configuration file (the spool that
``client.watch_storage`` delivers from, its broker and exchange, the dead-letter queues, the
input queue of ``client.process_queue``), overridden by the ``http:`` section's ``storage_url``
/ ``broker_url``. Without a configuration file (the CLI on a bare machine), the same
environment variables as the daemon: ``PAYLER_STORAGE_URL`` (else ``MONGODB_URL``, else the
embedded SQLite file) and ``BROKER_URL``, with the default queue names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from payler.config import Loaded
from payler.options import (
    ForwardOptions,
    ProcessQueueOptions,
    WatchStorageOptions,
    default_broker_url,
    default_storage_url,
)

DEFAULT_MAX_DELAY_MS = 366 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class AdminTarget:
    """The spool, broker and queue names the admin operations use."""

    storage_url: str
    broker_url: str
    #: The exchange deliveries are published to (RabbitMQ; "" is the default exchange).
    exchange: str = ""
    #: payler's input queue: where ``payler send`` publishes.
    input_queue: str = "payler-jobs"
    default_destination: str = "payler-out"
    dead_letter_queues: tuple[str, ...] = ("payler-dead-letter",)
    max_delay_ms: int = DEFAULT_MAX_DELAY_MS
    #: Every distinct spool of the configuration (the pending gauges sample each).
    storage_urls: tuple[str, ...] = field(default=())

    @classmethod
    def from_environment(cls) -> AdminTarget:
        storage = default_storage_url()
        return cls(storage, default_broker_url(), storage_urls=(storage,))

    @classmethod
    def from_config(cls, loaded: Loaded) -> AdminTarget:
        target = cls.from_environment()
        ingest = [w.options for w in loaded.workflows if isinstance(w.options, ProcessQueueOptions)]
        watch = [w.options for w in loaded.workflows if isinstance(w.options, WatchStorageOptions)]
        forward = [w.options for w in loaded.workflows if isinstance(w.options, ForwardOptions)]
        spools = [o.storage_url for o in [*watch, *ingest]]
        dead = [o.dead_letter_queue for o in watch + ingest] + [
            o.dead_letter_queue for o in forward
        ]
        if spools:
            target = replace(target, storage_url=spools[0])
        if watch:
            target = replace(target, broker_url=watch[0].broker_url, exchange=watch[0].exchange)
        elif ingest:
            target = replace(target, broker_url=ingest[0].broker_url)
        if ingest:
            target = replace(
                target,
                input_queue=ingest[0].queue,
                default_destination=ingest[0].default_destination,
                max_delay_ms=ingest[0].max_delay_ms,
            )
            if not watch:
                target = replace(target, broker_url=ingest[0].broker_url)
        if dead:
            target = replace(target, dead_letter_queues=tuple(dict.fromkeys(dead)))
        http = loaded.http
        if http is not None and http.storage_url:
            target = replace(target, storage_url=http.storage_url)
        if http is not None and http.broker_url:
            target = replace(target, broker_url=http.broker_url)
        everything = dict.fromkeys([target.storage_url, *spools])
        return replace(target, storage_urls=tuple(everything))


__all__ = ["AdminTarget"]
