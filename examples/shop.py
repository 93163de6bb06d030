"""A handler application: orders in, invoices out, a payment reminder a day later.

- ``order.created`` → an invoice now (queue ``invoices``) and a reminder 24 h later (queue
  ``payment-reminders``: kept in payler's spool meanwhile, not in memory). The invoice needs the
  customer's tax rate from a rates file (``TAX_RATES_FILE``, JSON ``{"FR": 20, ...}``); while it
  cannot be read (the "service" is down), the order is retried with exponential backoff.
- ``payment.received`` → a receipt (queue ``receipts``); a payment of a negative amount is
  rejected: dead-lettered at once, never retried.
- Anything else — no handler matches — is dead-lettered with the reason; so is an order that does
  not validate.

Run it with the configuration beside it (``payler --config-file examples/shop.yaml``), or from
Python: ``python examples/shop.py``. Test it without a broker, as ``tests/processing/test_shop.py``
uses :class:`payler.testing.TestClient`.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, Field

from payler.processing import Application, Context, Output, Reject, RetryPolicy, header

#: 24 h, unless the environment says otherwise (the tests shorten it).
REMINDER_DELAY_MS = int(os.environ.get("REMINDER_DELAY_MS", "86400000"))


class Order(BaseModel):
    id: str
    customer: str
    country: str = Field(min_length=2, max_length=2)
    amount: Decimal = Field(gt=0)


class Invoice(BaseModel):
    order_id: str
    customer: str
    net: Decimal
    tax: Decimal
    total: Decimal


class Reminder(BaseModel):
    order_id: str
    customer: str
    total: Decimal


class Payment(BaseModel):
    order_id: str
    amount: Decimal


app = Application(
    "shop",
    retry=RetryPolicy(
        max_attempts=int(os.environ.get("RETRY_MAX_ATTEMPTS", "8")),
        base_ms=int(os.environ.get("RETRY_BASE_MS", "1000")),
        max_ms=600_000,
    ),
)


def tax_rate(country: str) -> Decimal:
    """The tax rate of ``country``, in percent; raises while the rates cannot be read."""
    rates = json.loads(Path(os.environ.get("TAX_RATES_FILE", "tax-rates.json")).read_text())
    return Decimal(str(rates.get(country, 0)))


@app.handler(header("type", "order.created"))
async def invoice(order: Order, ctx: Context) -> list[Output]:
    rate = tax_rate(order.country)  # raises while the rates are missing: retried later
    tax = (order.amount * rate / 100).quantize(Decimal("0.01"))
    total = order.amount + tax
    ctx.log.info("invoiced (attempt %d)", ctx.attempt)
    return [
        Output("invoices", Invoice(order_id=order.id, customer=order.customer, net=order.amount,
                                   tax=tax, total=total)),
        Output("payment-reminders", Reminder(order_id=order.id, customer=order.customer,
                                             total=total), delay_ms=REMINDER_DELAY_MS),
    ]  # fmt: skip


@app.handler(header("type", "payment.received"))
def receipt(payment: Payment) -> Output:  # a plain function: payler runs it in a thread
    if payment.amount <= 0:
        raise Reject(f"a payment of {payment.amount} makes no sense")
    return Output("receipts", {"order_id": payment.order_id, "paid": str(payment.amount)})


if __name__ == "__main__":  # the Python-first entry: no configuration file
    app.run_forever(
        source_url=os.environ.get("BROKER_URL", "amqp://guest:guest@localhost:5672/"),
        queue=os.environ.get("ORDERS_QUEUE", "shop-events"),
        storage_url=os.environ.get("PAYLER_STORAGE_URL", "sqlite:///shop-spool.db"),
        declare_queues={"source": ["invoices", "payment-reminders", "receipts"]},
    )
