"""Brokers, chosen by URL scheme; each backend is imported only when used.

=====================  =========================================
``amqp://``/``amqps://``  RabbitMQ (aio-pika)
``kafka://``              Kafka (aiokafka)
``redis://``/``rediss://``  Redis streams (redis-py asyncio): see ``redis_streams.py``
``memory://NAME``         in this process only: for tests
=====================  =========================================
"""

from __future__ import annotations

from typing import Any

from payler import plugins
from payler.drivers.brokers.base import Broker
from payler.urls import scheme_of

_BACKENDS: dict[str, tuple[str, str]] = {
    "amqp": ("payler.drivers.brokers.rabbitmq", "RabbitMQBroker"),
    "amqps": ("payler.drivers.brokers.rabbitmq", "RabbitMQBroker"),
    "redis": ("payler.drivers.brokers.redis_streams", "RedisStreamsBroker"),
    "rediss": ("payler.drivers.brokers.redis_streams", "RedisStreamsBroker"),
    "kafka": ("payler.drivers.brokers.kafka", "KafkaBroker"),
    "memory": ("payler.drivers.brokers.memory", "MemoryBroker"),
}

#: The URL schemes this module can open (plugins add theirs: :func:`known_schemes`).
BROKER_SCHEMES = tuple(_BACKENDS)


def known_schemes() -> tuple[str, ...]:
    """The built-in schemes and those of plugins (:mod:`payler.plugins`)."""
    return plugins.known_schemes(plugins.BROKER_GROUP, _BACKENDS)


def _backend(scheme: str, url: str) -> type[Broker]:
    backend: type[Broker] = plugins.driver_class(
        "broker", plugins.BROKER_GROUP, _BACKENDS, scheme, url
    )
    return backend


def broker_from_url(url: str, **settings: Any) -> Broker:
    """The broker driver for ``url`` (not yet connected: use it as ``async with``)."""
    return _backend(scheme_of(url), url)(url, **settings)
