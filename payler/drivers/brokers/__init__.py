"""Brokers, chosen by URL scheme; each backend is imported only when used.

=====================  =========================================
``amqp://``/``amqps://``  RabbitMQ (aio-pika)
``kafka://``              Kafka (aiokafka)
``redis://``/``rediss://``  Redis streams (redis-py asyncio): see ``redis_streams.py``
``memory://NAME``         in this process only: for tests
=====================  =========================================
"""

from __future__ import annotations

import importlib
from typing import Any

from payler.drivers.brokers.base import Broker
from payler.errors import ConfigError
from payler.urls import mask_url, scheme_of

_BACKENDS: dict[str, tuple[str, str]] = {
    "amqp": ("payler.drivers.brokers.rabbitmq", "RabbitMQBroker"),
    "amqps": ("payler.drivers.brokers.rabbitmq", "RabbitMQBroker"),
    "redis": ("payler.drivers.brokers.redis_streams", "RedisStreamsBroker"),
    "rediss": ("payler.drivers.brokers.redis_streams", "RedisStreamsBroker"),
    "kafka": ("payler.drivers.brokers.kafka", "KafkaBroker"),
    "memory": ("payler.drivers.brokers.memory", "MemoryBroker"),
}

#: The URL schemes this module can open.
BROKER_SCHEMES = tuple(_BACKENDS)


def broker_from_url(url: str, **settings: Any) -> Broker:
    """The broker driver for ``url`` (not yet connected: use it as ``async with``)."""
    scheme = scheme_of(url)
    if scheme not in _BACKENDS:
        known = ", ".join(f"{s}://" for s in _BACKENDS)
        raise ConfigError(f"broker URL {mask_url(url)!r}: unknown scheme; expected one of {known}")
    module_name, class_name = _BACKENDS[scheme]
    backend: type[Broker] = getattr(importlib.import_module(module_name), class_name)
    return backend(url, **settings)
