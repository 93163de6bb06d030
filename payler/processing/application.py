"""The handler API: an :class:`Application` of handlers, each registered with a matcher.

    app = Application()

    @app.handler(header("type", "order"))
    async def on_order(order: Order, ctx: Context) -> list[Output]:
        return [Output("invoices", Invoice(order_id=order.id)),
                Output("reminders", Reminder(order_id=order.id), delay_ms=24 * 3600 * 1000)]

For each message the application (one message: :meth:`Application.run`):

1. **routes** it: exactly one handler's matcher must match, else it is dead-lettered
   (``no handler matched``; ``ambiguous: a, b``). A fallback handler (``app.fallback``) takes
   what no other matches (never what several match).
2. **decodes and validates** it into the type of the handler's first parameter: a pydantic
   model, ``dict`` or any type pydantic validates (by the message's content type, or the
   handler's ``content_type`` when set, else the application's default, JSON), ``bytes`` (the
   body as it is), ``str`` (UTF-8 text), or :class:`~payler.processing.messages.Message` (the
   raw message). A message that cannot be decoded or does not validate is dead-lettered with
   the reason, never retried.
3. **calls** the handler (an ``async def`` on the event loop; a plain ``def`` in a thread) with
   the value and, if it has a parameter annotated :class:`~payler.processing.messages.Context`
   (or named ``ctx``), the context. It returns ``None``, one output, or an iterable of outputs:
   :class:`~payler.processing.messages.Output`, or ``(destination, body)`` pairs.
4. **decides**: outputs encoded (each with a deterministic id: the source message's id and the
   output's index), or a retry at ``now + backoff`` (the handler raised; its
   :class:`~payler.processing.retries.RetryPolicy`), or a dead letter (``Reject``, or the last
   attempt failed: the reason has the error's type, message and a short traceback).

What happens next (publishing, the spool, acknowledging the source) is the workflow's:
:mod:`payler.processing.runner` and :mod:`payler.processing.workflow`. This module performs no
I/O of its own, which is also what lets :class:`payler.testing.TestClient` run it bare.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from payler.clock import Clock
from payler.metrics import Metrics
from payler.payload import MessageProperties, Payload
from payler.processing.matchers import Matcher, Predicate, as_matcher
from payler.processing.messages import Context, Message, MessageLog, Output
from payler.processing.retries import Reject, RetryLater, RetryPolicy, describe_failure
from payler.processing.serializers import BYTES, JSON, TEXT, Serializer, find_serializer
from payler.reasons import reason_class

log = logging.getLogger("payler.processing")

#: The handler name of messages no handler took (metrics label).
NO_HANDLER = "(none)"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One run of a message: the payload (payler's own headers taken off), the id of the
    source message it stems from (output ids derive from it), and which attempt this is."""

    payload: Payload
    origin: str
    attempt: int = 1


@dataclass(slots=True)
class Outcome:
    """What one run of a message came to: outputs (``(broker, payload)``, ``broker`` None for
    the default output), or a retry at ``retry_at_ms``, or a dead letter with ``dead``."""

    delivery: Delivery
    handler: str = NO_HANDLER
    outputs: list[tuple[str | None, Payload]] = field(default_factory=list)
    retry_at_ms: int | None = None
    dead: str | None = None
    #: The error of a failed run (retried, or dead-lettered after the last attempt).
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """A batch handler's batches: at most ``max_size`` messages; the source waits up to
    ``max_wait_ms`` for a batch to fill (see the ``handle`` workflow's ``batch_wait_ms``)."""

    max_size: int = 100


@dataclass(slots=True)
class Handler:
    """A registered handler (see the module docstring)."""

    name: str
    function: Callable[..., Any]
    matcher: Matcher | None
    retry: RetryPolicy
    content_type: str | None
    output_content_type: str | None
    message_type: Any
    context_parameter: str | None
    batch: BatchSettings | None = None
    is_async: bool = True
    _adapter: TypeAdapter[Any] | None = None

    def decode(self, message: Message) -> Any:
        """The message as the handler's parameter type; ``ValueError`` naming why not."""
        wanted = self.message_type
        if wanted is Message:
            return message
        if wanted is bytes:
            return message.body
        if wanted is str:
            return TEXT.decode(message.body)
        serializer = find_serializer(self.content_type) if self.content_type else None
        serializer = serializer or message.serializer
        if serializer is None:
            raise ValueError(f"no serializer for content type {message.content_type!r}")
        try:
            if wanted is Any:
                return serializer.decode(message.body)
            if self._adapter is None:
                self._adapter = TypeAdapter(wanted)
            if serializer is JSON:  # pydantic-core parses and validates in one pass
                return self._adapter.validate_json(message.body)
            return self._adapter.validate_python(serializer.decode(message.body))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise ValueError(f"cannot be decoded as JSON: {problems}") from None
            raise ValueError(f"does not validate as {_type_name(wanted)}: {problems}") from None


class Application:
    """Handlers, their matchers, and the defaults they share (see the module docstring)."""

    def __init__(
        self,
        name: str = "app",
        *,
        content_type: str = "application/json",
        retry: RetryPolicy | None = None,
    ) -> None:
        self.name = name
        self.default_serializer: Serializer = find_serializer(content_type) or JSON
        self.content_type = content_type
        self.retry = retry or RetryPolicy()
        self.handlers: list[Handler] = []
        self.fallback_handler: Handler | None = None

    # -- registering -------------------------------------------------------------------------

    def handler(
        self,
        match: Predicate | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
        output_content_type: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a handler for the messages ``match`` accepts (every message when None)."""

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            self._add(function, match, name, retry, content_type, output_content_type, None)
            return function

        return register

    def batch_handler(
        self,
        match: Predicate | None = None,
        *,
        max_size: int = 100,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
        output_content_type: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a handler of batches: its first parameter is a list of messages (``list[
        Order]``); it returns the outputs of the whole batch. If it raises, each message of the
        batch is retried (or dead-lettered) on its own, as with a single handler."""
        if max_size < 1:
            raise ValueError("max_size must be at least 1")

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            settings = BatchSettings(max_size)
            self._add(function, match, name, retry, content_type, output_content_type, settings)
            return function

        return register

    def fallback(
        self,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
        output_content_type: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the handler of the messages that no other handler matches."""

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            if self.fallback_handler is not None:
                raise ValueError(f"{self.name} already has a fallback handler")
            self.fallback_handler = self._make(
                function, None, name, retry, content_type, output_content_type, None
            )
            return function

        return register

    def _add(
        self,
        function: Callable[..., Any],
        match: Predicate | None,
        name: str | None,
        retry: RetryPolicy | None,
        content_type: str | None,
        output_content_type: str | None,
        batch: BatchSettings | None,
    ) -> None:
        matcher = as_matcher(match) if match is not None else None
        made = self._make(function, matcher, name, retry, content_type, output_content_type, batch)
        if any(h.name == made.name for h in self.handlers):
            raise ValueError(f"{self.name} already has a handler named {made.name!r}")
        self.handlers.append(made)

    def _make(
        self,
        function: Callable[..., Any],
        matcher: Matcher | None,
        name: str | None,
        retry: RetryPolicy | None,
        content_type: str | None,
        output_content_type: str | None,
        batch: BatchSettings | None,
    ) -> Handler:
        for given in (content_type, output_content_type):
            if given is not None and find_serializer(given) is None:
                raise ValueError(f"no serializer for content type {given!r}")
        message_type, context_parameter = _signature(function, batch is not None)
        return Handler(
            name=name or str(getattr(function, "__name__", None) or repr(function)),
            function=function,
            matcher=matcher,
            retry=retry or self.retry,
            content_type=content_type,
            output_content_type=output_content_type,
            message_type=message_type,
            context_parameter=context_parameter,
            batch=batch,
            is_async=inspect.iscoroutinefunction(function),
        )

    def run_forever(self, **options: Any) -> None:
        """Run this application as a ``handle`` workflow until SIGINT/SIGTERM: the Python-first
        entry (``if __name__ == "__main__": app.run_forever(queue="orders")``). See
        :func:`payler.processing.workflow.run` for the options."""
        from payler.processing.workflow import run  # noqa: PLC0415 - the I/O side, when used

        run(self, **options)

    # -- routing -----------------------------------------------------------------------------

    def route(self, message: Message) -> Handler | str:
        """The one handler that matches, or why none does (the dead letter's reason)."""
        matching = [h for h in self.handlers if h.matcher is None or h.matcher(message)]
        if len(matching) == 1:
            return matching[0]
        if len(matching) > 1:
            return "ambiguous: " + ", ".join(h.name for h in matching)
        if self.fallback_handler is not None:
            return self.fallback_handler
        return "no handler matched"

    def message(self, payload: Payload) -> Message:
        return Message(payload, self.default_serializer)

    def policy(self, handler: str) -> RetryPolicy:
        """The retry policy of the handler named ``handler`` (the default for an unknown one)."""
        for candidate in [*self.handlers, self.fallback_handler]:
            if candidate is not None and candidate.name == handler:
                return candidate.retry
        return self.retry

    # -- running -----------------------------------------------------------------------------

    async def run(
        self,
        delivery: Delivery,
        *,
        clock: Clock,
        metrics: Metrics | None = None,
        handler: Handler | None = None,
        brokers: frozenset[str] | None = None,
    ) -> Outcome:
        """Route, decode, call and decide one message (see the module docstring). Never
        raises for what the message or the handler does."""
        payload = delivery.payload
        if payload.defect is not None:
            return self.dead(delivery, NO_HANDLER, payload.defect, metrics)
        message = self.message(payload)
        if handler is None:
            routed = self.route(message)
            if isinstance(routed, str):
                return self.dead(delivery, NO_HANDLER, routed, metrics)
            handler = routed
        try:
            value = handler.decode(message)
        except ValueError as exc:
            return self.dead(delivery, handler.name, _undecodable(exc), metrics)
        context = self.context(delivery, handler, clock)
        return (await self._call(handler, [delivery], value, context, clock, metrics, brokers))[0]

    async def run_batch(
        self,
        handler: Handler,
        deliveries: Sequence[Delivery],
        *,
        clock: Clock,
        metrics: Metrics | None = None,
        brokers: frozenset[str] | None = None,
    ) -> list[Outcome]:
        """Decode the messages a batch handler matched, and call it once with those that
        decode (the others are dead-lettered alone)."""
        outcomes: list[Outcome] = []
        values, kept = [], []
        for delivery in deliveries:
            try:
                values.append(handler.decode(self.message(delivery.payload)))
                kept.append(delivery)
            except ValueError as exc:
                outcomes.append(self.dead(delivery, handler.name, _undecodable(exc), metrics))
        if kept:
            context = self.context(kept[0], handler, clock)
            outcomes += await self._call(handler, kept, values, context, clock, metrics, brokers)
        return outcomes

    def context(self, delivery: Delivery, handler: Handler, clock: Clock) -> Context:
        payload = delivery.payload
        return Context(
            message_id=delivery.origin,
            headers=payload.headers,
            properties=payload.properties,
            source=payload.source,
            key=payload.key,
            attempt=delivery.attempt,
            handler=handler.name,
            clock=clock,
            log=MessageLog(
                logging.getLogger(f"payler.handler.{handler.name}"), {"message_id": delivery.origin}
            ),
            last_error=payload.last_error,
        )

    async def _call(
        self,
        handler: Handler,
        deliveries: Sequence[Delivery],
        value: Any,
        context: Context,
        clock: Clock,
        metrics: Metrics | None,
        brokers: frozenset[str] | None,
    ) -> list[Outcome]:
        kwargs = {handler.context_parameter: context} if handler.context_parameter else {}
        started = time.perf_counter()
        try:
            if handler.is_async:
                returned = await handler.function(value, **kwargs)
            else:
                returned = await asyncio.to_thread(handler.function, value, **kwargs)
            outputs = self._outputs(handler, deliveries[0], returned, clock, brokers)
        except Reject as exc:
            reason = f"rejected by handler {handler.name!r}: {exc.reason}"
            _observe(metrics, handler.name, started)
            return [self.dead(d, handler.name, reason, metrics) for d in deliveries]
        except Exception as exc:
            _observe(metrics, handler.name, started)
            return [self._failed(d, handler, exc, clock, metrics) for d in deliveries]
        _observe(metrics, handler.name, started)
        if metrics is not None:
            metrics.handler(handler.name, "handled", len(deliveries))
            metrics.handler(handler.name, "outputs", len(outputs))
        first = Outcome(deliveries[0], handler.name, outputs)
        return [first, *(Outcome(d, handler.name) for d in deliveries[1:])]

    def _outputs(
        self,
        handler: Handler,
        delivery: Delivery,
        returned: Any,
        clock: Clock,
        brokers: frozenset[str] | None,
    ) -> list[tuple[str | None, Payload]]:
        if returned is None:
            return []
        if isinstance(returned, Output) or (
            isinstance(returned, tuple) and len(returned) == 2 and isinstance(returned[0], str)
        ):  # one output, or one (destination, body) pair
            returned = [returned]
        if not isinstance(returned, Iterable) or isinstance(returned, str | bytes | dict):
            raise TypeError(
                f"handler {handler.name!r} returned a {type(returned).__name__}: return None, "
                "an Output, or a list of Outputs"
            )
        now_ms = clock.now_ms()
        encoded = []
        for index, item in enumerate(returned):
            output = _as_output(item)
            if brokers is not None and output.broker is not None and output.broker not in brokers:
                known = ", ".join(sorted(brokers))
                raise ValueError(f"output broker {output.broker!r} is not configured ({known})")
            encoded.append((output.broker, self.encode(handler, output, delivery, index, now_ms)))
        return encoded

    def encode(
        self, handler: Handler, output: Output, delivery: Delivery, index: int, now_ms: int
    ) -> Payload:
        """The payload of ``output``: its body encoded, its deterministic id."""
        source = delivery.payload
        body, content_type = self._body(handler, output)
        output_id = f"{delivery.origin}#{index}"
        key = output.key.encode() if isinstance(output.key, str) else output.key
        return Payload(
            id=output_id,
            body=body,
            headers=dict(output.headers),
            properties=MessageProperties(
                content_type=content_type,
                message_id=output.message_id or output_id,
                correlation_id=output.correlation_id or source.properties.correlation_id,
                type=output.type,
                timestamp_ms=now_ms,
                delivery_mode=2,  # persistent: a handler's output is as durable as its source
            ),
            source=source.source,
            destination=output.destination,
            due_ms=output.due_ms(now_ms),
            created_ms=now_ms,
            key=key if key is not None else source.key,
        )

    def _body(self, handler: Handler, output: Output) -> tuple[bytes, str]:
        named = output.content_type or handler.output_content_type
        serializer = find_serializer(named) if named else None
        if named and serializer is None:
            raise ValueError(f"no serializer for content type {named!r}")
        if isinstance(output.body, bytes | bytearray | memoryview) and serializer in (None, BYTES):
            return bytes(output.body), named or BYTES.content_type
        if isinstance(output.body, str) and serializer in (None, TEXT):
            return TEXT.encode(output.body), named or TEXT.content_type
        serializer = serializer or self.default_serializer
        return serializer.encode(output.body), named or serializer.content_type

    def _failed(
        self,
        delivery: Delivery,
        handler: Handler,
        exc: Exception,
        clock: Clock,
        metrics: Metrics | None,
    ) -> Outcome:
        error = describe_failure(exc)
        if metrics is not None:
            metrics.handler(handler.name, "failed")
        if delivery.attempt >= handler.retry.max_attempts:
            reason = f"gave up after {delivery.attempt} attempts: {error}"
            outcome = self.dead(delivery, handler.name, reason, metrics)
            outcome.error = error
            return outcome
        delay_ms = handler.retry.delay_ms(delivery.attempt)
        if isinstance(exc, RetryLater) and exc.delay_ms is not None:
            delay_ms = max(0, exc.delay_ms)
        if metrics is not None:
            metrics.handler(handler.name, "retried")
        return Outcome(delivery, handler.name, retry_at_ms=clock.now_ms() + delay_ms, error=error)

    def dead(
        self, delivery: Delivery, handler: str, reason: str, metrics: Metrics | None
    ) -> Outcome:
        """The outcome of a message dead-lettered with ``reason`` (counted for ``handler``)."""
        if metrics is not None:
            metrics.handler(handler, "dead_lettered", reason=reason_class(reason))
        return Outcome(delivery, handler, dead=reason)


def _as_output(item: Any) -> Output:
    if isinstance(item, Output):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return Output(item[0], item[1])
    raise TypeError(f"not an output: {type(item).__name__} (return Output(destination, body))")


def _undecodable(exc: ValueError) -> str:
    text = str(exc)
    if text.startswith(("does not validate", "cannot be decoded")):
        return text
    return f"cannot be decoded: {text}"


def _observe(metrics: Metrics | None, handler: str, started: float) -> None:
    if metrics is not None:
        metrics.handler_duration(handler, time.perf_counter() - started)


def _type_name(wanted: Any) -> str:
    return getattr(wanted, "__name__", None) or str(wanted)


def _signature(function: Callable[..., Any], batch: bool) -> tuple[Any, str | None]:
    """The type of the message parameter (the first) and the name of the context one."""
    if not callable(function):
        raise TypeError(f"a handler is a function, not {function!r}")
    parameters = list(inspect.signature(function).parameters.values())
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:  # a forward reference that cannot be resolved
        raise TypeError(f"handler {function!r}: cannot read its annotations: {exc}") from None
    if not parameters:
        raise TypeError(f"handler {function!r} takes no message parameter")
    message_type: Any = hints.get(parameters[0].name, Any)
    if batch:
        args = typing.get_args(message_type)
        if typing.get_origin(message_type) not in (list, Sequence) and message_type is not Any:
            raise TypeError(f"batch handler {function!r}: annotate its first parameter list[...]")
        message_type = args[0] if args else Any
    if message_type in (object, dict) and message_type is not dict:
        message_type = Any
    context = None
    for parameter in parameters[1:]:
        if hints.get(parameter.name) is Context or parameter.name in ("ctx", "context"):
            context = parameter.name
        elif parameter.default is inspect.Parameter.empty:
            raise TypeError(
                f"handler {function!r}: parameter {parameter.name!r} is neither the context "
                "(annotate it Context) nor optional"
            )
    if isinstance(message_type, type) and issubclass(message_type, BaseModel):
        TypeAdapter(message_type)  # fail at registration on a model pydantic cannot build
    return message_type, context


__all__ = ["NO_HANDLER", "Application", "Delivery", "Handler", "Outcome"]
