"""The options of the built-in workflows: pydantic models, validated at start-up.

Connection URLs default to the environment, so a configuration file without options (the
original Payler's) works unchanged:

- broker: ``BROKER_URL``, else ``amqp://guest:guest@localhost:5672/``;
- storage: ``PAYLER_STORAGE_URL``, else ``MONGODB_URL`` (the original Payler's variable; with or
  without a database name in it), else the embedded ``sqlite:///payler-spool.db``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from payler.drivers import brokers, storages
from payler.drivers.storages import HARD_MAX_BODY_BYTES
from payler.urls import mask_url, scheme_of

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_STORAGE_URL = "sqlite:///payler-spool.db"


def default_broker_url() -> str:
    return os.environ.get("BROKER_URL") or DEFAULT_BROKER_URL


def default_storage_url() -> str:
    return (
        os.environ.get("PAYLER_STORAGE_URL") or os.environ.get("MONGODB_URL") or DEFAULT_STORAGE_URL
    )


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    broker_url: str = Field(default_factory=default_broker_url)
    storage_url: str = Field(default_factory=default_storage_url)
    dead_letter_queue: str = Field(default="payler-dead-letter", min_length=1)
    batch_size: int = Field(default=100, ge=1, le=10_000)

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        return _known_scheme(url, brokers.known_schemes(), "broker")

    @field_validator("storage_url")
    @classmethod
    def _known_storage(cls, url: str) -> str:
        return _known_scheme(url, storages.known_schemes(), "storage")


def _known_scheme(url: str, schemes: tuple[str, ...], what: str) -> str:
    if scheme_of(url) not in schemes:
        expected = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{what} URL {mask_url(url)!r} has an unknown scheme; expected {expected}")
    return url


class ProcessQueueOptions(_Options):
    """``client.process_queue``: consume a queue and spool each message until it is due."""

    queue: str = Field(default="payler-jobs", min_length=1)
    default_destination: str = Field(default="payler-out", min_length=1)
    #: Delay for messages with neither x-delay nor x-deliver-at; None: dead-letter them.
    default_delay_ms: int | None = Field(default=None, ge=0)
    max_delay_ms: int = Field(default=366 * 24 * 3600 * 1000, gt=0)
    #: Count x-delay from the publish time the message carries ("published"), or from receipt.
    delay_from: Literal["published", "received"] = "published"
    prefetch: int = Field(default=200, ge=1, le=65_535)
    #: Ids of AMQP messages without a message id: "random" (the default: two identical messages
    #: are never merged; a crash between store and ack may spool one twice) or "content" (a
    #: digest: a redelivery is recognised, but identical messages within the dedupe window are
    #: merged into one). See payler/identity.py.
    spool_id: Literal["random", "content"] = "random"
    #: The largest body spooled; a larger message is dead-lettered with the reason. None: the
    #: storage's default (64 MiB; MongoDB 15 MiB), which is also as high as it may be set for
    #: MongoDB (16 MiB documents); SQLite takes up to 1 GB, Redis up to 512 MiB.
    max_body_bytes: int | None = Field(default=None, gt=0)
    #: File-based storages (SQLite): below this many bytes free on the spool's file system,
    #: consuming pauses (messages wait in the source) while delivering goes on. None: 64 MiB.
    min_free_bytes: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _batch_defaults_to_fit_prefetch(cls, data: object) -> object:
        # A user who lowers only the prefetch gets batches that fit in it, not an error.
        if isinstance(data, dict) and "batch_size" not in data and "prefetch" in data:
            try:  # expanded from the environment, it is text: "50"
                prefetch = int(data["prefetch"])
            except (TypeError, ValueError):
                return data  # the field's own validation reports it
            if 1 <= prefetch < 100:
                return {**data, "batch_size": prefetch}
        return data

    @model_validator(mode="after")
    def _body_limit_fits_the_storage(self) -> ProcessQueueOptions:
        scheme = scheme_of(self.storage_url)
        most = HARD_MAX_BODY_BYTES.get(scheme)
        if self.max_body_bytes is not None and most is not None and self.max_body_bytes > most:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) is more than a {scheme}:// storage can "
                f"hold ({most} bytes)"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_prefetch(self) -> ProcessQueueOptions:
        if self.batch_size > self.prefetch:
            raise ValueError(
                f"batch_size ({self.batch_size}) cannot exceed prefetch ({self.prefetch}): "
                "a batch is taken from the prefetched messages"
            )
        return self


class WatchStorageOptions(_Options):
    """``client.watch_storage``: deliver due payloads from the spool to the broker."""

    #: Exchange to publish to ("" is the default exchange: the destination is a queue name).
    exchange: str = ""
    #: Queues declared (durable) at start if missing, so the default destination exists.
    declare_queues: list[str] = Field(default_factory=lambda: ["payler-out"])
    lease_ms: int = Field(default=30_000, ge=100)
    max_poll_interval_ms: int = Field(default=1_000, ge=1)
    #: Failed deliveries are retried with exponential backoff, then dead-lettered.
    max_attempts: int = Field(default=10, ge=1)
    #: Retry an unroutable payload (its destination queue may appear later) instead of
    #: dead-lettering it at once.
    retry_unroutable: bool = False
    #: Misfires: a payload found more than this late (payler was down, say) is dead-lettered
    #: instead of delivered. None (the default): deliver it however late.
    max_lateness_ms: int | None = Field(default=None, ge=0)
    #: How long a delivered payload's id keeps a redelivered copy of its source message from
    #: being spooled again (after a crash between store and acknowledgement).
    dedupe_window_ms: int = Field(default=600_000, ge=0)
    retry_base_ms: int = Field(default=1_000, ge=1)
    retry_max_ms: int = Field(default=300_000, ge=1)


class ForwardOptions(BaseModel):
    """``client.forward``: take messages from one broker to another (or the same), no delay.

    ``source_url`` and ``destination_url`` may be any broker payler speaks (``amqp://``,
    ``kafka://``, ``redis://`` streams). Each message goes to its ``x-destination`` header or
    ``default_destination``; what the destination refuses for good goes to
    ``dead_letter_queue`` on the destination broker, with the reason.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    source_url: str = Field(default_factory=default_broker_url)
    destination_url: str = Field(default_factory=default_broker_url)
    queue: str = Field(min_length=1)
    default_destination: str = Field(min_length=1)
    dead_letter_queue: str = Field(default="payler-dead-letter", min_length=1)
    prefetch: int = Field(default=200, ge=1, le=65_535)
    batch_size: int = Field(default=100, ge=1, le=10_000)

    @field_validator("source_url", "destination_url")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        return _known_scheme(url, brokers.known_schemes(), "broker")
