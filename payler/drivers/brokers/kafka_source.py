"""Kafka as a source: the consuming loop behind :meth:`KafkaBroker.serve
<payler.drivers.brokers.kafka.KafkaBroker.serve>` (see :mod:`payler.drivers.brokers.kafka`).

One :class:`KafkaSource` per ``serve``: a consumer in the group, the partitions' rewinds
(:mod:`~payler.drivers.brokers.kafka_offsets`), and the source's identity — the cluster id and the
topic id that go into every record's spool id (:func:`record_id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import (  # type: ignore[import-untyped]  # aiokafka ships no type hints
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
)
from aiokafka import errors as kafka_errors

from payler.drivers.base import Handler
from payler.drivers.brokers.kafka_metadata import (
    MetadataUnavailable,
    MetadataUnsupported,
    describe_topics,
)
from payler.drivers.brokers.kafka_offsets import Rewinds
from payler.drivers.brokers.mapping import NULL_VALUE, from_kafka_headers
from payler.errors import TransientError
from payler.isolation import describe
from payler.payload import Payload

if TYPE_CHECKING:
    from payler.drivers.brokers.kafka import KafkaBroker

log = logging.getLogger("payler.kafka")

#: How long one poll waits for records before ``serve`` looks at ``stop`` (and the paused
#: partitions) again.
POLL_MS = 250
#: How long asking the cluster for its id and the topic's may take.
METADATA_TIMEOUT_S = 10.0
#: How long one request of the consumer (a fetch, a commit) may take.
REQUEST_TIMEOUT_MS = 30_000


def record_id(
    cluster: str, topic: str, partition: int, offset: int, topic_id: str | None = None
) -> str:
    """The spool id of a Kafka record,
    ``kafka:<cluster>:<topic>[@<topic id>]:<partition>:<offset>``.

    The same record consumed again is the same entry; a record of another cluster, or of a
    topic of the same name created anew (its offsets starting at 0 again), is another one.
    Topic names hold neither ``:`` nor ``@``, so the id reads back unambiguously from its
    right end.
    """
    where = f"{topic}@{topic_id}" if topic_id else topic
    return f"kafka:{cluster}:{where}:{partition}:{offset}"


class KafkaSource:
    """Consumes ``broker.queue`` for one ``serve`` (see the module docstring)."""

    def __init__(self, broker: KafkaBroker, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        settings = broker.settings
        self.rewinds = Rewinds(settings.retry_backoff)
        #: The cluster's identity in spool ids: its id, else the bootstrap servers.
        self.cluster = ",".join(sorted(settings.bootstrap_servers))
        self.topic_id: str | None = None
        #: Ask the cluster who it is and what the topic's id is before the next batch: at start,
        #: after a rebalance, and when a partition's offsets went back (the topic was recreated).
        self.stale = True
        #: Per partition, the offset the next batch should start at; lower means a reset.
        self._next: dict[Hashable, int] = {}
        #: When to look at the topic's id again (a running consumer sees no sign of a topic
        #: deleted and created again while its position is past the new topic's end).
        self._check_at_ms = 0
        self._unsupported = False
        self.guard = _BatchGuard(self)

    async def run(self, handler: Handler, stop: asyncio.Event) -> None:
        settings = self.broker.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="payler",
            group_id=settings.group,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_records=self.broker.batch_size,
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        consumer.subscribe([self.topic], listener=self.guard)
        try:
            await consumer.start()
            while not stop.is_set():
                self._resume_due(consumer)
                if self.broker.clock.now_ms() >= self._check_at_ms:
                    async with self.guard.lock:
                        await self._identify(consumer, required=False)
                records = await consumer.getmany(
                    timeout_ms=self._poll_ms(), max_records=self.broker.batch_size
                )
                if records and self.broker.batch_wait_ms:
                    await self._fill(consumer, records, stop)
                if records:
                    async with self.guard.lock:  # a rebalance waits for this batch
                        await self._handle(consumer, records, handler)
        except kafka_errors.KafkaError as exc:
            raise TransientError(f"consuming topic {self.topic!r} failed: {exc!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()  # commits nothing: auto-commit is off

    def _poll_ms(self) -> int:
        due = self.rewinds.next_due_ms()
        if due is None:
            return POLL_MS
        return max(1, min(POLL_MS, due - self.broker.clock.now_ms()))

    def _resume_due(self, consumer: Any) -> None:
        owned = consumer.assignment()
        resumed = [tp for tp in self.rewinds.due(self.broker.clock.now_ms()) if tp in owned]
        if resumed:
            consumer.resume(*resumed)

    async def _fill(
        self, consumer: Any, records: dict[Any, list[Any]], stop: asyncio.Event
    ) -> None:
        """Add to ``records`` what arrives within ``batch_wait_ms``, up to ``batch_size``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.broker.batch_wait_ms / 1000
        while not stop.is_set():
            wanted = self.broker.batch_size - sum(len(batch) for batch in records.values())
            left_ms = int((deadline - loop.time()) * 1000)
            if wanted <= 0 or left_ms <= 0:
                return
            more = await consumer.getmany(timeout_ms=min(left_ms, POLL_MS), max_records=wanted)
            for tp, batch in more.items():
                records.setdefault(tp, []).extend(batch)

    async def _handle(self, consumer: Any, records: dict[Any, list[Any]], handler: Handler) -> None:
        for tp, batch in records.items():
            if batch[0].offset < self._next.get(tp, 0):
                self.stale = True  # offsets went back without our seek: a new topic, maybe
        if self.stale and await self._identify(consumer, required=True):
            return  # the topic was created anew: these records are read again from its start
        received_ms = self.broker.clock.now_ms()
        fresh = {
            tp: [r for r in batch if not self.rewinds.handled(tp, r.offset)]
            for tp, batch in records.items()
        }
        payloads = {
            tp: [self.decode(record, received_ms) for record in batch]
            for tp, batch in fresh.items()
        }
        handing = [p for batch in payloads.values() for p in batch]
        self.broker.metrics.incr("received", len(handing))
        rejections = {r.payload_id: r for r in await handler(handing)} if handing else {}
        offsets: dict[Any, int] = {}
        rewinds: dict[Any, int] = {}
        now_ms = self.broker.clock.now_ms()
        for tp, batch in records.items():
            refused = set()
            for record, payload in zip(fresh[tp], payloads[tp], strict=True):
                rejection = rejections.get(payload.id)
                if rejection is not None and rejection.permanent:
                    log.warning("dropping record %s: %s", payload.id, rejection.reason)
                elif rejection is not None:
                    refused.add(record.offset)
            settled = self.rewinds.settle(tp, [r.offset for r in batch], refused, now_ms)
            offsets[tp] = self._next[tp] = settled.commit
            if settled.rewind:
                rewinds[tp] = settled.commit
                first = next(p for r, p in zip(fresh[tp], payloads[tp], strict=True)
                             if r.offset == settled.commit)  # fmt: skip
                log.warning(
                    "%d record(s) of %s refused for now (first: %s: %s): partition paused, "
                    "taken again from offset %d in %.1f s",
                    len(refused), tp, first.id, rejections[first.id].reason, settled.commit,
                    ((settled.resume_at_ms or now_ms) - now_ms) / 1000,
                )  # fmt: skip
        # Partitions revoked meanwhile are not ours to commit: their new owner consumes again.
        owned = consumer.assignment()
        try:
            await consumer.commit({tp: o for tp, o in offsets.items() if tp in owned})
        except kafka_errors.CommitFailedError as exc:
            self._left_behind(consumer, sum(map(len, fresh.values())), exc)
            return
        except kafka_errors.KafkaError as exc:
            raise TransientError(
                f"could not commit the offsets of topic {self.topic!r} "
                f"(the records will be consumed again): {exc!r}"
            ) from exc
        for tp, offset in rewinds.items():
            if tp in owned:
                consumer.seek(tp, offset)  # drops what was fetched beyond it
                consumer.pause(tp)

    def _left_behind(self, consumer: Any, handled: int, exc: Exception) -> None:
        """The group refused the commit: it went on without this member (which missed its
        heartbeats for the session timeout: a pause, an overloaded machine) or is rebalancing.

        Not an outage: aiokafka rejoins by itself, and every partition starts again from its
        committed offset in its owner, this member or another, which reads this batch again
        (the spool recognises its records by id). Until the new assignment, nothing more is
        taken from the old one: its partitions are paused (a new assignment starts unpaused),
        and what is known of them is forgotten.
        """
        owned = list(consumer.assignment())
        self.rewinds.forget(owned)
        for tp in owned:
            self._next.pop(tp, None)
        if owned:
            consumer.pause(*owned)
        log.warning(
            "the consumer group of topic %r went on without this member while it handled a "
            "batch (%s): the %d record(s) it handled are read again by their partitions' "
            "owners; rejoining",
            self.topic, _reason(exc), handled,
        )  # fmt: skip

    async def _identify(self, consumer: Any, *, required: bool) -> bool:
        """Read the cluster id and the topic id.

        ``required``: before handling records whose ids depend on it (at start, after a
        rebalance): an outage raises :class:`~payler.errors.TransientError`, and nothing is
        handled. Otherwise (the periodic check) an outage is logged and tried again later.

        Returns whether the topic has a new id: deleted and created again. Its offsets start
        anew, with no committed offset: the partitions are read again from the start (or the
        end, with ``auto_offset_reset=latest``), as a group new to the topic would.
        """
        producer, admin = self.broker._connected()
        self._check_at_ms = self.broker.clock.now_ms() + self.broker.settings.topic_check_ms
        try:
            described = await describe_topics(
                producer.client, [self.topic], timeout_s=METADATA_TIMEOUT_S
            )
            cluster_id = described.cluster_id
            state = described.topics.get(self.topic)
            topic_id = state.topic_id if state is not None else None
        except MetadataUnavailable as exc:
            reason = f"cannot read the metadata of topic {self.topic!r}: {exc}"
            if required:
                raise TransientError(reason) from exc
            log.warning("%s (checked again in %d ms)", reason, self.broker.settings.topic_check_ms)
            return False
        except MetadataUnsupported as exc:
            if not self._unsupported:
                log.warning("topic ids unavailable (%s): spool ids go without them", exc)
            self._unsupported = True
            try:
                cluster_id = (await admin.describe_cluster()).get("cluster_id")
            except kafka_errors.KafkaError as error:
                raise TransientError(f"cannot describe the Kafka cluster: {error!r}") from error
            topic_id = None
        self.stale = False
        if cluster_id:
            self.cluster = cluster_id
        if topic_id is None or topic_id == self.topic_id:
            return False  # no id, or none now (the topic deleted, maybe to come again)
        previous, self.topic_id = self.topic_id, topic_id
        if previous is None:
            return False
        self.rewinds.forget(list(self._next))  # offsets of the old topic mean nothing now
        self._next.clear()
        owned = consumer.assignment()
        log.warning(
            "topic %r has a new id (%s, was %s): it was deleted and created again; reading its "
            "%d partition(s) here from the %s",
            self.topic, topic_id, previous, len(owned),
            "start" if self.broker.settings.auto_offset_reset == "earliest" else "end",
        )  # fmt: skip
        if owned:
            consumer.resume(*owned)
            if self.broker.settings.auto_offset_reset == "earliest":
                await consumer.seek_to_beginning(*owned)
            else:
                await consumer.seek_to_end(*owned)
        return True

    def decode(self, record: Any, received_ms: int) -> Payload:
        """The payload of one record; never raises: what payler cannot read comes out as a
        payload with a ``defect`` (its raw value and headers kept), to be dead-lettered alone."""
        payload_id = record_id(
            self.cluster, record.topic, record.partition, record.offset, self.topic_id
        )
        stamp = record.timestamp  # -1 (or None) when the producer set none
        timestamp = stamp if isinstance(stamp, int) and stamp >= 0 else None
        fields: dict[str, Any] = {
            "id": payload_id,
            "body": record.value if isinstance(record.value, bytes) else b"",
            "key": record.key if isinstance(record.key, bytes) else None,
            "source": record.topic,
            "destination": "",
            "due_ms": received_ms,
            "created_ms": received_ms,
        }
        try:
            problems: list[str] = []
            headers, properties = from_kafka_headers(record.headers, timestamp, problems)
            if record.value is None:
                if NULL_VALUE in headers:  # x-payler-* is payler's namespace: said, not silent
                    problems.append(
                        f"its own header {NULL_VALUE!r} ({headers[NULL_VALUE]!r}) is payler's "
                        "tombstone mark: replaced by true"
                    )
                headers[NULL_VALUE] = True  # a tombstone, not an empty body
            for problem in problems:
                log.warning("record %s: %s", payload_id, problem)
            return Payload(**fields, headers=headers, properties=properties)
        except Exception as exc:  # a bug in payler, for this record alone
            log.exception("decoding record %s failed (a bug in payler)", payload_id)
            return Payload(
                **fields,
                headers=_raw_headers(record),
                defect=f"payler cannot decode the Kafka record (a bug in payler): {describe(exc)}",
            )


def _reason(exc: Exception) -> str:
    """aiokafka's CommitFailedError in a few words: its cause (the broker's error), not its
    advice about max_poll_interval_ms."""
    cause = exc.__cause__ or exc.__context__
    return type(cause).__name__ if cause is not None else type(exc).__name__


def _raw_headers(record: Any) -> dict[str, Any]:
    """The record's headers as they came (bytes, nulls; repeated names as lists)."""
    raw: dict[str, list[Any]] = {}
    with contextlib.suppress(Exception):
        for name, value in record.headers:
            raw.setdefault(str(name), []).append(value)
    return {name: values[0] if len(values) == 1 else values for name, values in raw.items()}


class _BatchGuard(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Makes a rebalance wait until the batch in hand is handled and committed, and has the
    source forget the partitions it loses."""

    def __init__(self, source: KafkaSource) -> None:
        self.lock = asyncio.Lock()
        self.source = source

    async def on_partitions_revoked(self, revoked: Sequence[Any]) -> None:
        async with self.lock:
            self.source.rewinds.forget(revoked)
            for tp in revoked:
                self.source._next.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        self.source.stale = True  # the topic may have been recreated meanwhile
        # One line per rebalance: which member reads what, for whoever runs many instances.
        partitions = sorted(tp.partition for tp in assigned)
        log.info(
            "consuming partition(s) %s of topic %r in group %r",
            ", ".join(map(str, partitions)) or "none", self.source.topic,
            self.source.broker.settings.group,
        )  # fmt: skip
