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
=========================  =======================================================================

- As a source, ``serve`` consumes topic ``queue`` in the consumer group, without auto-commit, in
  natural batches (what has arrived, up to ``batch_size``). A record's spool id is
  ``kafka:<topic>:<partition>:<offset>`` (:func:`record_id`): a record consumed again is the same
  entry. Offsets are committed per partition (last offset + 1) only once the handler returned.
- Kafka has no negative acknowledgement. A record the handler rejects *transiently* is consumed
  again: the partition's offset is committed up to that record, not past it, and the consumer
  seeks back to it — so the records after it in that partition are consumed again too (spooling
  them again is idempotent). A *permanent* rejection counts as handled: committed past, logged.
- If the handler raises, nothing is committed and the exception propagates: the runtime restarts
  the workflow and consumption resumes from the committed offsets.
- Rebalances wait for the batch in hand: the listener takes the same lock as handling does, so a
  batch is handled and committed before its partitions are revoked. Partitions no longer ours
  when a batch is done are not committed: their new owner consumes those records again.
- As a destination, ``process`` publishes to topic ``payload.destination`` with the payload's key,
  its body, its headers and properties as Kafka headers (:mod:`~payler.drivers.brokers.mapping`)
  and its publish time as the record timestamp, with ``acks=all``; the sends of a batch are
  pipelined (sent in order, then awaited together): records of one key keep their order, as
  aiokafka keeps one request in flight per broker, retries included. A record Kafka refuses for
  good (too large, invalid or missing topic, not authorised) is a permanent rejection; a timeout
  or a lost connection raises :class:`~payler.errors.TransientError`. (Idempotent producing
  stays off: not every Kafka-compatible broker supports it; a retried batch may deliver a record
  twice.)
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

from aiokafka import (  # type: ignore[import-untyped]  # aiokafka ships no type hints
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
)
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

from payler.drivers.base import Handler, Rejection
from payler.drivers.brokers.base import Broker
from payler.drivers.brokers.mapping import TYPED_HEADERS, from_kafka_headers, to_kafka_headers
from payler.errors import ConfigError, StartupError, TransientError
from payler.payload import Payload
from payler.urls import mask_url, redact

log = logging.getLogger("payler.kafka")

#: How long connecting may take before start-up fails.
CONNECT_TIMEOUT_S = 10.0
#: How long a request (a produce, a metadata lookup) may take.
REQUEST_TIMEOUT_MS = 30_000
#: How long one poll waits for records before ``serve`` looks at ``stop`` again.
POLL_MS = 250

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
     "max_request_size"),
)  # fmt: skip


def record_id(topic: str, partition: int, offset: int) -> str:
    """The spool id of a Kafka record: the same record consumed again is the same entry."""
    return f"kafka:{topic}:{partition}:{offset}"


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
            request_timeout_ms=REQUEST_TIMEOUT_MS,
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
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            client_id="payler",
            group_id=self.settings.group,
            enable_auto_commit=False,
            auto_offset_reset=self.settings.auto_offset_reset,
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
            max_poll_records=self.batch_size,
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        guard = _BatchGuard()
        consumer.subscribe([self.queue], listener=guard)
        try:
            await consumer.start()
            while not stop.is_set():
                records = await consumer.getmany(timeout_ms=POLL_MS, max_records=self.batch_size)
                if records and self.batch_wait_ms:
                    await self._fill(consumer, records, stop)
                if records:
                    async with guard.lock:  # a rebalance waits for this batch
                        await self._handle(consumer, records, handler)
        except kafka_errors.KafkaError as exc:
            raise TransientError(f"consuming topic {self.queue!r} failed: {exc!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()  # commits nothing: auto-commit is off

    async def _fill(
        self, consumer: Any, records: dict[Any, list[Any]], stop: asyncio.Event
    ) -> None:
        """Add to ``records`` what arrives within ``batch_wait_ms``, up to ``batch_size``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_ms / 1000
        while not stop.is_set():
            wanted = self.batch_size - sum(len(batch) for batch in records.values())
            left_ms = int((deadline - loop.time()) * 1000)
            if wanted <= 0 or left_ms <= 0:
                return
            more = await consumer.getmany(timeout_ms=min(left_ms, POLL_MS), max_records=wanted)
            for tp, batch in more.items():
                records.setdefault(tp, []).extend(batch)

    async def _handle(self, consumer: Any, records: dict[Any, list[Any]], handler: Handler) -> None:
        received_ms = self.clock.now_ms()
        payloads = {
            tp: [self._decode(record, received_ms) for record in batch]
            for tp, batch in records.items()
        }
        self.metrics.incr("received", sum(len(batch) for batch in records.values()))
        rejections = {
            r.payload_id: r for r in await handler([p for ps in payloads.values() for p in ps])
        }
        offsets, rewind = {}, {}
        for tp, batch in records.items():
            offsets[tp] = batch[-1].offset + 1
            for record, payload in zip(batch, payloads[tp], strict=True):
                rejection = rejections.get(payload.id)
                if rejection is None:
                    continue
                if not rejection.permanent:  # consumed again, with what follows it
                    offsets[tp] = rewind[tp] = record.offset
                    break
                log.warning("dropping record %s: %s", payload.id, rejection.reason)
        # Partitions revoked meanwhile are not ours to commit: their new owner consumes again.
        owned = consumer.assignment()
        try:
            await consumer.commit({tp: o for tp, o in offsets.items() if tp in owned})
        except kafka_errors.KafkaError as exc:
            raise TransientError(
                f"could not commit the offsets of topic {self.queue!r} "
                f"(the records will be consumed again): {exc!r}"
            ) from exc
        for tp, offset in rewind.items():
            if tp in owned:
                consumer.seek(tp, offset)

    def _decode(self, record: Any, received_ms: int) -> Payload:
        stamp = record.timestamp  # -1 (or None) when the producer set none
        timestamp = stamp if isinstance(stamp, int) and stamp >= 0 else None
        try:
            headers, properties = from_kafka_headers(record.headers, timestamp)
        except ValueError as exc:  # a foreign producer's malformed typed header: keep it as text
            log.warning("record %s:%s:%s: %s", record.topic, record.partition, record.offset, exc)
            plain = [(k, v) for k, v in record.headers if k != TYPED_HEADERS]
            headers, properties = from_kafka_headers(plain, timestamp)
        return Payload(
            id=record_id(record.topic, record.partition, record.offset),
            body=record.value or b"",
            key=record.key,
            headers=headers,
            properties=properties,
            source=record.topic,
            destination="",
            due_ms=received_ms,
            created_ms=received_ms,
        )

    # -- as a destination ----------------------------------------------------------------------

    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        rejections: list[Rejection] = []
        sent: list[tuple[Payload, asyncio.Future[Any]]] = []
        missing: dict[str, str] = {}  # topic → why it cannot be published to
        for payload, headers in items:
            topic = payload.destination
            reason = missing.get(topic) or _invalid_topic(topic)
            if reason is None:
                try:
                    sent.append((payload, await self._send(topic, payload, headers)))
                    continue
                except _REFUSED as exc:
                    reason = f"Kafka refuses it: {_describe(exc)}"
                except (TypeError, ValueError) as exc:  # a header value Kafka cannot carry
                    reason = f"cannot encode for Kafka: {exc}"
                except kafka_errors.UnknownTopicOrPartitionError as exc:
                    reason = missing[topic] = await self._missing_topic(topic, exc)
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

    async def _send(self, topic: str, payload: Payload, headers: Mapping[str, Any]) -> Any:
        """Queue one record; the future it returns resolves when the broker has it."""
        producer, _ = self._connected()
        try:
            return await producer.send(
                topic,
                value=payload.body,
                key=payload.key,
                headers=to_kafka_headers(payload, headers),
                timestamp_ms=payload.properties.timestamp_ms,
            )
        except (*_REFUSED, kafka_errors.UnknownTopicOrPartitionError):
            raise
        except (kafka_errors.KafkaError, OSError) as exc:
            raise TransientError(f"publishing to Kafka failed: {_describe(exc)}") from exc

    async def _missing_topic(self, topic: str, exc: BaseException) -> str:
        # The producer waited for the topic's metadata in vain: a missing topic, or no broker?
        producer, _ = self._connected()
        if not await producer.client.force_metadata_update():
            raise TransientError(f"cannot reach Kafka: {_describe(exc)}") from exc
        return f"unroutable: topic {topic!r} does not exist (and Kafka does not create it)"


class _BatchGuard(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Makes a rebalance wait until the batch in hand is handled and committed."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()

    async def on_partitions_revoked(self, revoked: object) -> None:
        async with self.lock:
            pass

    async def on_partitions_assigned(self, assigned: object) -> None:
        pass


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
