"""Handlers: your code between a source and its destinations, with payler's guarantees around it.

    from payler.processing import Application, Context, Output, header

    app = Application("orders")

    @app.handler(header("type", "order.created"))
    async def invoice(order: Order, ctx: Context) -> list[Output]:
        return [Output("invoices", Invoice.for_order(order))]

Run it with the ``client.handle`` workflow (``app: "my_module:app"`` in the configuration), or
``app.run(queue="orders", ...)`` from Python; test it with :class:`payler.testing.TestClient`.
Modules: :mod:`~payler.processing.application` (the handler API), :mod:`~.matchers`,
:mod:`~.serializers`, :mod:`~.retries`, :mod:`~.breaker`, :mod:`~.runner` (concurrency,
ordering), :mod:`~.workflow` (the workflow that wires it to brokers and the spool).
"""

from __future__ import annotations

from payler.processing.application import Application
from payler.processing.breaker import BreakerLimits
from payler.processing.matchers import (
    Matcher,
    always,
    content_type,
    field,
    has_header,
    header,
)
from payler.processing.messages import Context, Message, Output
from payler.processing.retries import Reject, RetryLater, RetryPolicy
from payler.processing.serializers import Serializer, register_serializer

__all__ = [
    "Application",
    "BreakerLimits",
    "Context",
    "Matcher",
    "Message",
    "Output",
    "Reject",
    "RetryLater",
    "RetryPolicy",
    "Serializer",
    "always",
    "content_type",
    "field",
    "has_header",
    "header",
    "register_serializer",
]
