"""Kafka, through aiokafka.

``kafka://host:port[,host:port...][?option=value&...]``; the options:

=========================  =======================================================================
``group``                  the consumer group of ``serve`` (default ``payler``)
``session_timeout_ms``,    the group membership settings (default 10000 and 3000): a member that
``heartbeat_interval_ms``  misses heartbeats for the session timeout loses its partitions
``auto_offset_reset``      where a group without committed offsets starts: ``earliest`` (the
                           default: nothing already in the topic is missed) or ``latest``
``partitions``,            of the topics ``ensure_queue`` creates: 3 partitions; replicated
``replication_factor``     on min(3, brokers in the cluster) unless set
``max_request_size``       the largest record ``process`` sends (default 1048576, Kafka's default
                           ``message.max.bytes``): raise both for topics of larger records
``retry_base_ms``,         a record the handler refuses for now is taken again after
``retry_max_ms``           ``retry_base_ms * 2**n`` (with jitter), at most ``retry_max_ms``
                           (default 1000 and 30000)
``topic_check_ms``         how often ``serve`` checks that its topic was not deleted and created
                           anew (default 10000; see below)
=========================  =======================================================================

As a source (:mod:`~payler.drivers.brokers.kafka_source`):

- ``serve`` consumes topic ``queue`` in the consumer group, without auto-commit, in natural
  batches (what has arrived, up to ``batch_size``). Compressed topics (gzip, snappy, lz4, zstd)
  are read like any other. Offsets are committed per partition only once the handler returned,
  and never past a record not yet handled.
- A record's spool id is ``kafka:<cluster>:<topic>[@<topic id>]:<partition>:<offset>``
  (:func:`~payler.drivers.brokers.kafka_source.record_id`): a record consumed again is the same
  entry, while two clusters feeding one spool, or a topic deleted and created again (its offsets
  starting at 0 again), never collide. ``<cluster>`` is the cluster id from the cluster's
  metadata (the bootstrap servers where a broker reports none); ``<topic id>`` is the topic's id
  where the broker reports one (Kafka 2.8 and later). A source checks its topic's id every
  ``topic_check_ms`` (and at each rebalance): a new id means the topic was deleted and created
  again, and its partitions are read again from their start (``auto_offset_reset``), as the
  new topic has no committed offsets — a running consumer would otherwise wait past the new
  topic's end and miss its first records. Without topic ids (older brokers) neither is
  possible: a recreated topic's records take the old one's ids, and may be taken for
  redeliveries within the spool's dedupe window.
- Kafka has no negative acknowledgement. When the handler refuses records *for now*, their
  partition's commit stops at the first of them; the partition is paused for a backoff
  (``retry_base_ms``, ``retry_max_ms``), then read again from there — and the records the handler
  took after the refused one are skipped, not handed over again
  (:mod:`~payler.drivers.brokers.kafka_offsets`). The other partitions flow on meanwhile. A
  *permanent* rejection counts as handled: committed past, logged.
- A record payler cannot decode comes out as a payload with a ``defect`` (its value and headers
  kept as they came): the workflow dead-letters it alone.
- If the handler raises, nothing is committed and the exception propagates: the runtime restarts
  the workflow and consumption resumes from the committed offsets.
- Rebalances wait for the batch in hand: the listener takes the same lock as handling does, so a
  batch is handled and committed before its partitions are revoked. Partitions no longer ours
  when a batch is done are not committed: their new owner consumes those records again. Each
  assignment is logged (one INFO line: which partitions this member reads).
- A member that misses its heartbeats for ``session_timeout_ms`` with a batch in hand (the
  process paused, the machine overloaded) is dropped from the group, which goes on without it.
  When it comes back, its commit is refused (``CommitFailedError``): not an outage, so
  ``serve`` goes on. The member takes nothing more from its old assignment (its partitions
  are paused), rejoins, and every partition is read again from its committed offset by its
  owner: the batch is handed over again (a WARNING says how many records), at least once.

As a destination, ``process`` publishes to topic ``payload.destination`` with the payload's key,
its body, its headers and properties as Kafka headers (:mod:`~payler.drivers.brokers.mapping`),
with ``acks=all``:

- The record's timestamp is the time of this publish; the message's original publish time
  travels in the header ``payler-timestamp`` (a record stamped with an old time could fall out
  of the topic's retention at once, or be refused by ``log.message.timestamp.before.max.ms``).
- The sends of a batch are pipelined (sent in order, then awaited together): records of one key
  keep their order, as aiokafka keeps one request in flight per broker, retries included.
- A publish never takes longer than the broker's ``publish_timeout_s`` (a watcher sets it below
  its lease): past it, it raises :class:`~payler.errors.TransientError` (an outage; the outcome
  is unknown). A topic that does not exist is found with one metadata request and is a
  permanent rejection (unroutable), as is a record Kafka refuses for good (too large, invalid
  topic, not authorised); a lost connection raises :class:`~payler.errors.TransientError`.
  (Idempotent producing stays off: not every Kafka-compatible broker supports it; a retried batch
  may deliver a record twice.)
- A payload from a tombstone (header ``x-payler-null-value``) is published as a tombstone again
  when it has a key; its dead-letter copy is an empty record with the header, so that a
  compacted dead-letter topic does not delete it.
- ``ensure_queue`` creates a missing topic (the workflows' dead-letter and ``declare_queues``
  topics, the served one); an existing topic is used as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]  # no type hints
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

from payler.backoff import Backoff
from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.base import Broker
from payler.drivers.brokers.kafka_metadata import (
    MetadataUnavailable,
    MetadataUnsupported,
    describe_topics,
)
from payler.drivers.brokers.kafka_source import REQUEST_TIMEOUT_MS, KafkaSource, record_id
from payler.drivers.brokers.mapping import NULL_VALUE, to_kafka_headers
from payler.errors import ConfigError, StartupError, TransientError
from payler.payload import Payload
from payler.urls import mask_url, redact

__all__ = ["KafkaBroker", "KafkaSettings", "record_id"]

log = logging.getLogger("payler.kafka")

#: How long connecting may take before start-up fails.
CONNECT_TIMEOUT_S = 10.0

#: Errors that mean "this record will never be accepted": permanent rejections.
_REFUSED = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.InvalidTimestampError,
    kafka_errors.PolicyViolationError,
    kafka_errors.UnsupportedForMessageFormatError,
)
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
#: The URL options that are numbers (positive integers); the others are text.
_INT_OPTIONS = frozenset(
    ("session_timeout_ms", "heartbeat_interval_ms", "partitions", "replication_factor",
     "max_request_size", "retry_base_ms", "retry_max_ms", "topic_check_ms"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """What a ``kafka://`` URL says (see the module docstring)."""

    bootstrap_servers: list[str]
    group: str = "payler"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    auto_offset_reset: str = "earliest"
    partitions: int = 3
    replication_factor: int | None = None
    max_request_size: int = 1_048_576
    retry_base_ms: int = 1_000
    retry_max_ms: int = 30_000
    topic_check_ms: int = 10_000

    @property
    def retry_backoff(self) -> Backoff:
        """The backoff before a record refused for now is taken again."""
        return Backoff(self.retry_base_ms / 1000, max(self.retry_base_ms, self.retry_max_ms) / 1000)

    @classmethod
    def from_url(cls, url: str) -> KafkaSettings:
        parts = urlsplit(url)
        servers = [s.strip() for s in parts.netloc.split(",") if s.strip()]
        if not servers or "@" in parts.netloc:
            raise ConfigError(
                f"broker URL {mask_url(url)!r}: expected kafka://host:port[,host:port...] "
                "(credentials are not supported)"
            )
        options: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name not in cls.__dataclass_fields__ or name == "bootstrap_servers":
                raise ConfigError(f"broker URL {mask_url(url)!r}: unknown option {name!r}")
            if name not in _INT_OPTIONS:
                options[name] = value
            elif value.isdigit() and int(value) > 0:
                options[name] = int(value)
            else:
                raise ConfigError(
                    f"broker URL {mask_url(url)!r}: {name} must be a positive integer, "
                    f"not {value!r}"
                )
        if options.get("auto_offset_reset", "earliest") not in {"earliest", "latest"}:
            raise ConfigError(
                f"broker URL {mask_url(url)!r}: auto_offset_reset must be earliest or latest"
            )
        if not options.get("group", "payler"):
            raise ConfigError(f"broker URL {mask_url(url)!r}: group must not be empty")
        return cls(servers, **options)


class KafkaBroker(Broker):
    """A Kafka broker (see the module docstring)."""

    _producer: Any = None
    _admin: Any = None

    def __init__(self, url: str, **settings: Any) -> None:
        super().__init__(url, **settings)
        self.settings = KafkaSettings.from_url(url)

    async def connect(self) -> None:
        common = {"bootstrap_servers": self.settings.bootstrap_servers, "client_id": "payler"}
        self._producer = AIOKafkaProducer(
            **common,
            acks="all",
            enable_idempotence=False,
            # aiokafka waits this long for a produce, and for the metadata of a topic it does not
            # know: well within the publish timeout, which bounds the whole batch.
            request_timeout_ms=max(
                1000, min(REQUEST_TIMEOUT_MS, int(self.publish_timeout_s * 500))
            ),
            max_request_size=self.settings.max_request_size,
        )
        self._admin = AIOKafkaAdminClient(**common, request_timeout_ms=REQUEST_TIMEOUT_MS)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._producer.start()
                await self._admin.start()
        except (kafka_errors.KafkaError, OSError, TimeoutError) as exc:
            await self.close()
            raise StartupError(
                f"cannot connect to Kafka at {mask_url(self.url)}: "
                f"{redact(_describe(exc), self.url)}"
            ) from exc

    async def close(self) -> None:
        producer, admin, self._producer, self._admin = self._producer, self._admin, None, None
        for stopping in (producer and producer.stop, admin and admin.close):
            if stopping:
                with contextlib.suppress(Exception):  # closing a lost connection must not fail
                    await stopping()

    def _connected(self) -> tuple[Any, Any]:
        if self._producer is None:
            raise RuntimeError("the Kafka broker is not connected (use it as `async with`)")
        return self._producer, self._admin

    async def ensure_queue(self, name: str) -> None:
        if (reason := _invalid_topic(name)) is not None:
            raise StartupError(reason)
        _, admin = self._connected()
        try:
            if name in await admin.list_topics():
                return
            replication = self.settings.replication_factor
            if replication is None:
                replication = min(3, len((await admin.describe_cluster())["brokers"]))
            topic = NewTopic(name, self.settings.partitions, replication)
            response = await admin.create_topics([topic])
        except kafka_errors.KafkaError as exc:
            raise TransientError(f"could not look up or create topic {name!r}: {exc!r}") from exc
        for _, code, *message in response.topic_errors:  # the message is there from v1 on
            error = kafka_errors.for_code(code)
            if error not in (kafka_errors.NoError, kafka_errors.TopicAlreadyExistsError):
                detail = f": {message[0]}" if message and message[0] else ""
                raise StartupError(f"cannot create topic {name!r}: {error.__name__}{detail}")
        log.info("created topic %r (%d partitions)", name, self.settings.partitions)

    # -- as a source ---------------------------------------------------------------------------

    async def serve(self, handler: Handler, stop: asyncio.Event) -> None:
        if self.queue is None:
            raise ValueError("this broker was opened without a queue to serve")
        await self.ensure_queue(self.queue)
        await KafkaSource(self, self.queue).run(handler, stop)

    # -- as a destination ----------------------------------------------------------------------

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                return await self._publish_batch(items, dead_letters)
        except TimeoutError:
            raise TransientError(
                f"publishing {len(items)} record(s) to Kafka took longer than "
                f"{self.publish_timeout_s:g} s: an outage (the outcome is unknown)"
            ) from None

    async def _publish_batch(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], dead_letters: bool
    ) -> list[Rejection]:
        rejections: list[Rejection] = []
        sent: list[tuple[Payload, asyncio.Future[Any]]] = []
        unroutable = await self._unroutable_topics({p.destination for p, _ in items})
        for payload, headers in items:
            topic = payload.destination
            reason = unroutable.get(topic) or _invalid_topic(topic)
            if reason is None:
                try:
                    sent.append((payload, await self._send(payload, headers, dead_letters)))
                    continue
                except _REFUSED as exc:
                    reason = f"Kafka refuses it: {_describe(exc)}"
                except (TypeError, ValueError) as exc:  # a header value Kafka cannot carry
                    reason = f"cannot encode for Kafka: {exc}"
                except kafka_errors.UnknownTopicOrPartitionError as exc:
                    reason = unroutable[topic] = await self._missing_topic(topic, exc)
            rejections.append(Rejection(payload.id, reason, permanent=True))
        results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        for (payload, _), result in zip(sent, results, strict=True):
            if isinstance(result, _REFUSED):
                reason = f"Kafka refused it: {_describe(result)}"
                rejections.append(Rejection(payload.id, reason, permanent=True))
            elif isinstance(result, Exception):
                raise TransientError(f"publishing to Kafka failed: {_describe(result)}") from result
            elif isinstance(result, BaseException):
                raise result
        return rejections

    async def _unroutable_topics(self, topics: set[str]) -> dict[str, str]:
        """Why each of ``topics`` that cannot be published to cannot be (missing, forbidden).

        aiokafka, asked to send to a topic it has no metadata for, asks again and again until its
        request timeout; one metadata request here tells a missing topic at once.
        """
        producer, _ = self._connected()
        unknown = [
            t
            for t in topics
            if _invalid_topic(t) is None and producer.client.cluster.partitions_for_topic(t) is None
        ]
        if not unknown:
            return {}
        try:
            # As the producer's own lookup would: a broker that creates topics on demand may.
            described = await describe_topics(
                producer.client, unknown, timeout_s=self.publish_timeout_s, auto_create=True
            )
        except MetadataUnavailable as exc:
            raise TransientError(f"cannot reach Kafka: {exc}") from exc
        except MetadataUnsupported:
            return {}  # aiokafka's own lookup decides, bounded by the publish timeout
        reasons = {}
        for topic in unknown:
            state = described.topics.get(topic)
            if state is None:
                continue
            if state.missing:
                reasons[topic] = _unroutable(topic)
            elif state.error is kafka_errors.TopicAuthorizationFailedError:
                reasons[topic] = f"Kafka refuses it: not authorised to publish to topic {topic!r}"
        return reasons

    async def _send(
        self, payload: Payload, headers: Mapping[str, Any], dead_letter: bool
    ) -> asyncio.Future[Any]:
        """Queue one record; the future it returns resolves when the broker has it."""
        producer, _ = self._connected()
        value: bytes | None = payload.body
        tombstone = headers.get(NULL_VALUE) is True and not payload.body
        if tombstone and payload.key is not None and not dead_letter:
            value = None  # a tombstone again (aiokafka refuses one without a key)
            headers = {k: v for k, v in headers.items() if k != NULL_VALUE}
        try:
            future: asyncio.Future[Any] = await producer.send(
                payload.destination,
                value=value,
                key=payload.key,
                headers=to_kafka_headers(payload, headers),
                timestamp_ms=self.clock.now_ms(),
            )
        except (*_REFUSED, kafka_errors.UnknownTopicOrPartitionError):
            raise
        except (kafka_errors.KafkaError, OSError) as exc:
            raise TransientError(f"publishing to Kafka failed: {_describe(exc)}") from exc
        return future

    async def _missing_topic(self, topic: str, exc: BaseException) -> str:
        # The producer waited for the topic's metadata in vain: a missing topic, or no broker?
        producer, _ = self._connected()
        if not await producer.client.force_metadata_update():
            raise TransientError(f"cannot reach Kafka: {_describe(exc)}") from exc
        return _unroutable(topic)


def _request_timeout_ms(publish_timeout_s: float) -> int:
    return max(1000, min(REQUEST_TIMEOUT_MS, int(publish_timeout_s * 500)))


def _unroutable(topic: str) -> str:
    return f"unroutable: topic {topic!r} does not exist (and Kafka does not create it)"


def _invalid_topic(name: str) -> str | None:
    if _TOPIC_NAME.match(name) and name not in {".", ".."}:
        return None
    return (
        f"invalid Kafka topic name {name!r}: 1 to 249 characters among "
        "ASCII letters, digits, '.', '_' and '-'"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
