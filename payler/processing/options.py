"""The options of the ``client.handle`` workflow, validated at start-up like the others."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from payler import plugins
from payler.drivers import brokers, storages
from payler.options import _known_scheme, default_broker_url, default_storage_url
from payler.processing.application import Application
from payler.processing.breaker import BreakerLimits

#: The output name of the source broker itself.
SOURCE_OUTPUT = "source"
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ORDER_BY = re.compile(r"^(key|partition|header:.+)$")


class BreakerOptions(BaseModel):
    """The dead-letter breaker (:mod:`payler.processing.breaker`); off unless a limit is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_invalid_ratio: float | None = Field(default=None, gt=0, le=1)
    max_consecutive_invalid: int | None = Field(default=None, ge=1)
    window_seconds: float = Field(default=60.0, gt=0)
    min_messages: int = Field(default=20, ge=1)

    def limits(self) -> BreakerLimits:
        return BreakerLimits(
            max_invalid_ratio=self.max_invalid_ratio,
            max_consecutive_invalid=self.max_consecutive_invalid,
            window_s=self.window_seconds,
            min_messages=self.min_messages,
        )


class HandleOptions(BaseModel):
    """``client.handle``: consume a source, run each message through an application's
    handlers, publish or spool their outputs, retry their failures through the spool."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, arbitrary_types_allowed=True
    )

    #: ``"module:attribute"`` (or ``module.attribute``) naming an
    #: :class:`~payler.processing.application.Application`; in Python, the object itself.
    app: Any
    source_url: str = Field(default_factory=default_broker_url)
    queue: str = Field(min_length=1)
    #: Output brokers by name: ``{invoices: "amqp://...", audit: "kafka://..."}``. The source
    #: broker is always there too, as ``source``.
    outputs: dict[str, str] = Field(default_factory=dict)
    #: Where an output without ``broker`` goes.
    default_output: str = SOURCE_OUTPUT
    #: The spool of delayed outputs and retries: give each ``handle`` workflow one of its own.
    storage_url: str = Field(default_factory=default_storage_url)
    #: What the handling dead-letters goes there, with the reason: a queue (topic, stream) on
    #: the output broker ``dead_letter_output`` (the source broker by default).
    dead_letter_queue: str = Field(default="payler-dead-letter", min_length=1)
    dead_letter_output: str = SOURCE_OUTPUT
    #: Handler runs in flight at once.
    concurrency: int = Field(default=16, ge=1, le=10_000)
    #: Messages taken from the source per batch (default: ``concurrency``, or a batch
    #: handler's ``max_size`` when larger); ``prefetch`` (default: twice that) bounds what
    #: the source hands over unacknowledged.
    batch_size: int | None = Field(default=None, ge=1, le=10_000)
    prefetch: int | None = Field(default=None, ge=1, le=65_535)
    #: How long a batch may wait to fill (for batch handlers); 0: take what has arrived.
    batch_wait_ms: int = Field(default=0, ge=0, le=60_000)
    #: Keep the order of messages sharing a ``key``, ``partition`` or ``header:NAME``.
    order_by: str | None = None
    spool_id: Literal["random", "content"] = "random"
    breaker: BreakerOptions = Field(default_factory=BreakerOptions)
    #: Queues (topics) to create at start if missing, per output name.
    declare_queues: dict[str, list[str]] = Field(default_factory=dict)
    #: The spool side: due entries claimed per batch, their lease, the longest sleep.
    spool_batch_size: int = Field(default=100, ge=1, le=10_000)
    lease_ms: int = Field(default=30_000, ge=100)
    max_poll_interval_ms: int = Field(default=1_000, ge=1)
    #: A delayed output its broker refuses for now is retried with backoff, then dead-lettered.
    max_delivery_attempts: int = Field(default=10, ge=1)
    retry_base_ms: int = Field(default=1_000, ge=1)
    retry_max_ms: int = Field(default=300_000, ge=1)

    @field_validator("app", mode="before")
    @classmethod
    def _application(cls, value: Any) -> Application:
        if isinstance(value, Application):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError("expected 'module:attribute' naming a payler Application")
        try:
            found = plugins.load(value.strip())
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import {value!r}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # the user's module raised on import
            raise ValueError(f"importing {value!r} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(found, Application):
            raise ValueError(f"{value!r} is a {type(found).__name__}, not a payler Application")
        return found

    @field_validator("source_url")
    @classmethod
    def _source(cls, url: str) -> str:
        return _known_scheme(url, brokers.known_schemes(), "broker")

    @field_validator("storage_url")
    @classmethod
    def _storage(cls, url: str) -> str:
        return _known_scheme(url, storages.known_schemes(), "storage")

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, outputs: dict[str, str]) -> dict[str, str]:
        for name, url in outputs.items():
            if name == SOURCE_OUTPUT or not _OUTPUT_NAME.match(name):
                raise ValueError(
                    f"output name {name!r}: letters, digits, '.', '_', '-' (and not "
                    f"{SOURCE_OUTPUT!r}, the source broker's)"
                )
            _known_scheme(url, brokers.known_schemes(), "broker")
        return outputs

    @field_validator("order_by")
    @classmethod
    def _order_by(cls, order_by: str | None) -> str | None:
        if order_by is not None and not _ORDER_BY.match(order_by):
            raise ValueError("order_by is key, partition or header:NAME")
        return order_by

    @model_validator(mode="after")
    def _consistent(self) -> HandleOptions:
        names = {SOURCE_OUTPUT, *self.outputs}
        for key in ("default_output", "dead_letter_output"):
            if getattr(self, key) not in names:
                raise ValueError(f"{key} {getattr(self, key)!r} is none of {sorted(names)}")
        for name in self.declare_queues:
            if name not in names:
                raise ValueError(f"declare_queues: no output named {name!r}")
        if self.prefetch is not None and self.prefetch < self.source_batch_size:
            raise ValueError(
                f"prefetch ({self.prefetch}) cannot be below batch_size "
                f"({self.source_batch_size}): a batch is taken from the prefetched messages"
            )
        return self

    @property
    def application(self) -> Application:
        app: Application = self.app
        return app

    @property
    def source_batch_size(self) -> int:
        """The source's batch size: ``batch_size``, else the concurrency or the largest batch
        handler's ``max_size``."""
        if self.batch_size is not None:
            return self.batch_size
        sizes = [h.batch.max_size for h in self.application.handlers if h.batch is not None]
        return max([self.concurrency, *sizes])

    @property
    def source_prefetch(self) -> int:
        """What the source may hand over unacknowledged: ``prefetch``, else two batches (one
        handled, the next arriving)."""
        return self.prefetch or min(65_535, 2 * self.source_batch_size)

    @property
    def output_urls(self) -> dict[str, str]:
        return {SOURCE_OUTPUT: self.source_url, **self.outputs}


__all__ = ["SOURCE_OUTPUT", "BreakerOptions", "HandleOptions"]
