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

from payler import plugins
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

#: The URL schemes this module can open (plugins add theirs: :func:`known_schemes`).
BROKER_SCHEMES = tuple(_BACKENDS)


def known_schemes() -> tuple[str, ...]:
    """The built-in schemes and those of plugins (:mod:`payler.plugins`)."""
    return (*_BACKENDS, *(s for s in plugins.schemes(plugins.BROKER_GROUP) if s not in _BACKENDS))


def _backend(scheme: str, url: str) -> type[Broker]:
    if scheme in _BACKENDS:
        module_name, class_name = _BACKENDS[scheme]
        backend: type[Broker] = getattr(importlib.import_module(module_name), class_name)
        return backend
    target = plugins.target_for(plugins.BROKER_GROUP, scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in known_schemes())
        raise ConfigError(f"broker URL {mask_url(url)!r}: unknown scheme; expected one of {known}")
    try:
        loaded: type[Broker] = plugins.load(target)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"broker URL {mask_url(url)!r}: the plugin {target!r} for {scheme}:// cannot be "
            f"loaded: {exc}"
        ) from None
    return loaded


def broker_from_url(url: str, **settings: Any) -> Broker:
    """The broker driver for ``url`` (not yet connected: use it as ``async with``)."""
    return _backend(scheme_of(url), url)(url, **settings)
