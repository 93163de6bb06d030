"""The trivial handler the handler benchmark runs, once in payler and once in FastStream: decode a
JSON order, validate it as a small pydantic model, return one invoice (published, confirmed,
then the order acknowledged).

    python benchmarks/handler_apps.py faststream   # FastStream's app (BENCH_* variables)
    (payler loads ``handler_apps:app`` from the configuration benchmarks/handlers.py writes)
"""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import Decimal

from pydantic import BaseModel

from payler.processing import Application, Output


class Order(BaseModel):
    id: int
    customer: str
    amount: Decimal


class Invoice(BaseModel):
    order_id: int
    customer: str
    total: Decimal


def invoice_for(order: Order) -> Invoice:
    return Invoice(order_id=order.id, customer=order.customer, total=order.amount * 2)


# -- payler ------------------------------------------------------------------------------------

app = Application("bench")


@app.handler()
async def invoice(order: Order) -> Output:
    return Output(os.environ.get("BENCH_DESTINATION", "out"), invoice_for(order))


# -- FastStream --------------------------------------------------------------------------------


def faststream_main() -> None:
    from faststream import FastStream  # noqa: PLC0415 - the bench extra, only for this row
    from faststream.rabbit import RabbitBroker, RabbitQueue  # noqa: PLC0415
    from faststream.rabbit.schemas import Channel  # noqa: PLC0415

    prefetch = int(os.environ["BENCH_PREFETCH"])
    broker = RabbitBroker(
        os.environ["BENCH_AMQP_URL"],
        default_channel=Channel(prefetch_count=prefetch, publisher_confirms=True),
        # No line per message, as payler (FastStream logs two per message at INFO by default).
        logger=None,
    )

    # The default ack policy (REJECT_ON_ERROR) acknowledges after the handler *and* its
    # publishers returned; the channel has publisher confirms: the same durability as payler's.
    @broker.subscriber(RabbitQueue(os.environ["BENCH_SOURCE"], durable=True))
    @broker.publisher(os.environ["BENCH_DESTINATION"], persist=True)
    async def handle(order: Order) -> Invoice:
        return invoice_for(order)

    asyncio.run(FastStream(broker).run())


if __name__ == "__main__" and sys.argv[1:] == ["faststream"]:
    faststream_main()
