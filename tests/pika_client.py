"""Publishing and reading as another AMQP client does (pika, in a thread): the bytes on the wire
are pika's, not pamqp's, so tests can send what pamqp itself would refuse to write — timestamps
past 9999, short strings that are not UTF-8 — and read back exactly what payler published."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pika

from tests.conftest import AMQP_URL


class WireSeconds(datetime):
    """A header value pika writes as an AMQP timestamp (``T``) of any 64-bit ``seconds``, even
    past the year 9999 (pika packs ``calendar.timegm(utctimetuple())``, which only adds the
    day of the month, however large)."""

    seconds: int

    def __new__(cls, seconds: int) -> WireSeconds:
        moment = super().__new__(cls, 1970, 1, 1)
        moment.seconds = seconds
        return moment

    def utctimetuple(self) -> Any:
        days, rest = divmod(self.seconds, 86_400)
        return (1970, 1, 1 + days, rest // 3600, rest // 60 % 60, rest % 60, 0, 0, 0)


async def publish(
    queue: str, messages: list[tuple[bytes, pika.BasicProperties]], url: str = AMQP_URL
) -> None:
    """Publish each ``(body, properties)`` to ``queue`` (default exchange), confirmed."""

    def run() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for body, properties in messages:
                channel.basic_publish("", queue, body, properties, mandatory=True)
        finally:
            connection.close()

    await asyncio.to_thread(run)


async def get_all(queue: str, url: str = AMQP_URL) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message on ``queue`` now, with its properties as pika reads them (acknowledged)."""

    def run() -> list[tuple[pika.BasicProperties, bytes]]:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        got = []
        try:
            channel = connection.channel()
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return got
                got.append((properties, body))
        finally:
            connection.close()

    return await asyncio.to_thread(run)
