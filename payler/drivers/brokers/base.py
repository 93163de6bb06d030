"""What payler's workflows need of a broker, beyond the driver contract.

A :class:`Broker` is a :class:`~payler.drivers.base.BaseDriver` that, as a source, consumes one
queue (``serve``) and, as a destination, publishes each payload to ``payload.destination``
(``process``), confirmed and mandatory: a payload the broker cannot route is *rejected*
(permanently), never dropped. Published payloads lose their scheduling headers
(:data:`~payler.scheduling.SCHEDULING_HEADERS`), so a message routed back into payler is not
delayed twice.

Payloads a broker's ``serve`` produces are fresh from the source: their ``destination`` is empty
and their ``due_ms`` is the time they were received; the workflow schedules them. A message that
cannot be decoded still comes out, as a payload whose ``defect`` says why (its raw body kept):
one bad message can only ever be dead-lettered, never stop the source.

Publishing, for a delivery or a dead letter, goes through one hook, :meth:`Broker._publish`: it
returns the payloads the broker refused (permanently: never accepted as it is; or for now) and
raises only when the outcome of the whole batch is unknown (the connection was lost).

**A dead letter always fits.** :meth:`Broker.dead_letter` publishes a copy with the headers
intact plus the reason; when the destination refuses that copy for good (too large for a
record or a frame, a header it cannot carry), a *minimal* copy goes instead: no body, the
reason, the source, the message and correlation ids, the sizes of what was dropped, and
``x-payler-dead-letter-truncated``. What is refused even then is returned to the caller, who
parks it in the spool (a workflow with a spool) or keeps it at the source.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from payler.clock import Clock, SystemClock
from payler.codec import safe_text
from payler.drivers.base import BaseDriver, Handler, Rejection
from payler.errors import is_transient
from payler.isolation import describe, isolate
from payler.metrics import Metrics
from payler.payload import MessageProperties, Payload
from payler.reasons import reason_class
from payler.scheduling import without_scheduling_headers

#: Headers added to a dead-lettered message: why, from where, and when (epoch ms).
DEAD_LETTER_REASON = "x-payler-dead-letter-reason"
DEAD_LETTER_SOURCE = "x-payler-dead-letter-source"
DEAD_LETTERED_AT = "x-payler-dead-lettered-at"
#: Where the dead-lettered message was going (when it had a destination yet): where a replay
#: sends it back to.
DEAD_LETTER_DESTINATION = "x-payler-dead-letter-destination"
#: On a minimal dead letter (the full copy was refused): what was dropped, and why.
DEAD_LETTER_TRUNCATED = "x-payler-dead-letter-truncated"
#: On a minimal dead letter: the payload's spool id (where the source gave one, its position).
DEAD_LETTER_ID = "x-payler-dead-letter-id"
#: How long a publish may take, by default, before it counts as an outage.
DEFAULT_PUBLISH_TIMEOUT_S = 10.0
#: Reasons are cut to this many characters: a dead letter's own headers must stay small.
MAX_REASON_CHARS = 1000


class Broker(BaseDriver):
    """A message broker driver (see the module docstring)."""

    #: How much later than its stamped publish time a message may really have been published:
    #: the resolution of the source's timestamps (0 for millisecond ones; see
    #: :func:`~payler.scheduling.schedule`).
    timestamp_slack_ms: int = 0

    def __init__(
        self,
        url: str,
        *,
        queue: str | None = None,
        prefetch: int = 200,
        batch_size: int = 100,
        exchange: str = "",
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.url = url
        self.queue = queue
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.exchange = exchange
        #: The longest a publish (of a batch, confirmed) may take before it counts as an
        #: outage (:class:`~payler.errors.TransientError`): a watcher sets it below its lease,
        #: so that no other instance re-claims an entry whose publish is still in the air.
        self.publish_timeout_s = publish_timeout_s
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics or Metrics()

    @abstractmethod
    async def ensure_queue(self, name: str) -> None:
        """Make sure queue ``name`` exists: use it as it is, or declare it durable if missing."""

    async def process(self, batch: Sequence[Payload]) -> list[Rejection]:
        """Publish each payload to its destination, without its scheduling headers."""
        if not batch:
            return []
        with self.metrics.timer("publish_batch_seconds"):
            return await self._publish(
                [(p, without_scheduling_headers(p.headers)) for p in batch], dead_letters=False
            )

    async def send(self, items: Sequence[tuple[Payload, Mapping[str, Any]]]) -> list[Rejection]:
        """Publish each payload as a producer would: to the queue (topic, stream) named by its
        ``destination`` (RabbitMQ: through the default exchange), with the given headers as
        they are — scheduling headers included, so that a message sent to payler's own input
        queue is scheduled by it. Confirmed; returns the rejections as ``process`` does.
        (``payler send`` and the replay of a dead letter to its source use it.)
        """
        if not items:
            return []
        return await self._publish(items, dead_letters=True)

    async def peek(self, queue: str, limit: int) -> list[Payload]:
        """Up to ``limit`` messages waiting on ``queue``, oldest first, left where they are.

        Raises ``NotImplementedError`` where the broker has no non-destructive look (the admin
        operations then list the dead letters parked in the spool only).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot look into a queue")

    async def take(
        self, queue: str, limit: int, select: Callable[[Payload], bool], handler: Handler
    ) -> int:
        """Look at up to ``limit`` messages of ``queue``; hand the ones ``select`` picks to
        ``handler`` (one batch); remove from the queue those it did not reject, only once it
        returned; leave every other message on the queue. Returns how many were removed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot take from a queue")

    async def dead_letter(
        self, items: Sequence[tuple[Payload, str]], queue: str
    ) -> list[Rejection]:
        """Publish a dead-letter copy of each payload to ``queue``, with the reason.

        The copy has the body, properties and headers (scheduling headers included) plus
        :data:`DEAD_LETTER_REASON`, :data:`DEAD_LETTER_SOURCE` and :data:`DEAD_LETTERED_AT`. A
        copy refused for good is replaced by a minimal one (see the module docstring); so is
        one that the driver raised for alone (a bug: see :func:`~payler.isolation.isolate`).

        Returns the payloads that are *not* dead-lettered: ``permanent`` when even the minimal
        copy was refused (the caller must keep the message some other way: park it in the
        spool), else refused for now (retry later, with backoff). Raises
        :class:`~payler.errors.TransientError` only when the outcome of the whole call is
        unknown (connection lost before anything was confirmed): then the caller must not
        settle the originals. Payload ids must be unique within one call.
        """
        if not items:
            return []
        now_ms = self.clock.now_ms()
        reasons = {p.id: safe_text(reason)[:MAX_REASON_CHARS] for p, reason in items}
        copies = [
            (
                p.model_copy(update={"destination": queue}),
                dead_letter_headers(p, reasons[p.id], now_ms),
            )
            for p, _ in items
        ]
        refused = {r.payload_id: r for r in await self._publish_dead_letters(copies)}
        too_big = [p for p, _ in items if p.id in refused and refused[p.id].permanent]
        if too_big:
            minimal = [
                minimal_dead_letter(p, reasons[p.id], refused[p.id].reason, now_ms, queue)
                for p in too_big
            ]
            try:
                again = {r.payload_id: r for r in await self._publish_dead_letters(minimal)}
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # The full copies of the others are confirmed: only these are in doubt.
                reason = f"dead-lettering a minimal copy failed: {describe(exc)}"
                again = {p.id: Rejection(p.id, reason) for p in too_big}
            for payload in too_big:
                if payload.id in again:
                    first = refused[payload.id].reason
                    refused[payload.id] = Rejection(
                        payload.id,
                        f"the dead-letter destination {queue!r} refused the message "
                        f"({first}) and a minimal copy of it ({again[payload.id].reason})",
                        again[payload.id].permanent,
                    )
                else:
                    del refused[payload.id]
        self.metrics.incr(
            "dead_lettered",
            len(items) - len(refused),
            reasons=[reason_class(reasons[p.id]) for p, _ in items if p.id not in refused],
        )
        return list(refused.values())

    async def _publish_dead_letters(
        self, copies: Sequence[tuple[Payload, Mapping[str, Any]]]
    ) -> list[Rejection]:
        """:meth:`_publish` the copies; one the driver raises for alone is refused for good."""
        published, broken = await isolate(
            lambda part: self._publish(part, dead_letters=True),
            copies,
            "payler cannot dead-letter it",
            metrics=self.metrics,
            # Never "broken as a whole": a copy refused here gets a minimal copy, else is parked
            # in the spool. That is always safe, a restart loop is not.
            step_can_break=False,
        )
        rejections = [r for part in published for r in part]
        return rejections + [Rejection(c[0].id, reason, permanent=True) for c, reason in broken]

    @abstractmethod
    async def _publish(
        self, items: Sequence[tuple[Payload, Mapping[str, Any]]], *, dead_letters: bool
    ) -> list[Rejection]:
        """Publish each payload to ``payload.destination`` with the given headers (in place of
        ``payload.headers``), confirmed and mandatory; the sends of a batch are pipelined.

        ``dead_letters``: these are dead-letter copies (RabbitMQ publishes them to the default
        exchange, whatever the broker's ``exchange``). Returns the rejections, one per payload
        refused, ``permanent`` when the broker will never take it as it is (too large,
        unroutable, a header it cannot carry: checked per payload before sending, so that one
        bad payload never fails the batch or the connection). Raises
        :class:`~payler.errors.TransientError` when the outcome is unknown.
        """


def dead_letter_headers(payload: Payload, reason: str, now_ms: int) -> dict[str, object]:
    """The headers of a dead-lettered copy of ``payload``."""
    headers: dict[str, object] = {
        **payload.headers,
        DEAD_LETTER_REASON: reason,
        DEAD_LETTER_SOURCE: payload.source,
        DEAD_LETTERED_AT: now_ms,
    }
    if payload.destination:
        headers[DEAD_LETTER_DESTINATION] = payload.destination
    return headers


def minimal_dead_letter(
    payload: Payload, reason: str, refusal: str, now_ms: int, queue: str
) -> tuple[Payload, dict[str, object]]:
    """A dead-letter copy small enough for any destination: no body, no custom headers.

    It keeps what finds the message again: the reason, the source, the spool id, the message
    and correlation ids (as the broker's own properties), and says what was dropped and why.
    """
    props = payload.properties
    dropped = (
        f"body of {len(payload.body)} bytes and {len(payload.headers)} headers dropped: "
        f"the full copy was refused ({refusal[:300]})"
    )
    copy = payload.model_copy(
        update={
            "destination": queue,
            "body": b"",
            "headers": {},
            "key": payload.key if payload.key is not None and len(payload.key) <= 255 else None,
            "properties": MessageProperties(
                message_id=_short(props.message_id),
                correlation_id=_short(props.correlation_id),
                timestamp_ms=props.timestamp_ms,
                delivery_mode=props.delivery_mode,
            ),
        }
    )
    headers: dict[str, object] = {
        DEAD_LETTER_REASON: safe_text(reason[:MAX_REASON_CHARS]),
        DEAD_LETTER_SOURCE: safe_text(payload.source[:255]),
        DEAD_LETTERED_AT: now_ms,
        DEAD_LETTER_ID: safe_text(payload.id[:512]),
        DEAD_LETTER_TRUNCATED: safe_text(dropped),
    }
    if payload.destination:
        headers[DEAD_LETTER_DESTINATION] = payload.destination[:255]
    return copy, headers


def _short(value: str | None) -> str | None:
    """A property value that fits an AMQP short string (255 bytes) as text, else none."""
    if value is None or safe_text(value) != value or len(value.encode("utf-8")) > 255:
        return None
    return value
