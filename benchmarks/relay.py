"""The ceiling: the least a queue-to-queue relay can do on RabbitMQ with aio-pika.

Consume ``--source`` with a prefetch window; take whatever has arrived (up to ``--batch``);
publish the batch to ``--destination`` with publisher confirms, all publishes in flight together
(``asyncio.gather``); then acknowledge the whole batch at once (``multiple=True``) after the
confirms. No decoding, no storage, no validation: the same broker round trips payler makes,
and nothing else, on the same event loop as payler in the row it is compared with
(``--loop``). ``benchmarks/run.py`` runs it as a subprocess, like payler.

    python benchmarks/relay.py --url amqp://guest:guest@127.0.0.1:5672/ --source a --destination b
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage


async def relay(url: str, source: str, destination: str, prefetch: int, batch_size: int) -> None:
    connection = await aio_pika.connect(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with connection:
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        publish_channel = await connection.channel(publisher_confirms=True)
        exchange = publish_channel.default_exchange
        queue = await consume_channel.declare_queue(source, passive=True)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        await queue.consume(on_message)
        print("relay ready", flush=True)
        stopper = asyncio.ensure_future(stop.wait())
        while not stop.is_set():
            getter = asyncio.ensure_future(inbox.get())
            await asyncio.wait([getter, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            batch = [getter.result()]
            while len(batch) < batch_size and not inbox.empty():
                batch.append(inbox.get_nowait())
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            m.body,
                            headers=m.headers,
                            message_id=m.message_id,
                            delivery_mode=m.delivery_mode,
                        ),
                        destination,
                    )
                    for m in batch
                )
            )
            await batch[-1].ack(multiple=True)
    print("relay stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="AMQP URL (vhost included)")
    parser.add_argument("--source", required=True, help="queue to consume (must exist)")
    parser.add_argument("--destination", required=True, help="queue to publish to")
    parser.add_argument("--prefetch", type=int, default=200, help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=100, help="default: %(default)s")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop (the same as payler's in the row it is compared with)",
    )
    args = parser.parse_args()
    factory = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415  (the asyncio row must not need it)

        factory = uvloop.new_event_loop
    print(f"relay on {args.loop}", flush=True)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(relay(args.url, args.source, args.destination, args.prefetch, args.batch))


if __name__ == "__main__":
    main()
