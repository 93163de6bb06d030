"""Plugins: brokers, storages and serializers that payler does not ship, used without changing it.

A plugin is found, by URL scheme (brokers, storages) or content type (serializers):

- in code: :func:`register_broker`, :func:`register_storage`,
  :func:`payler.processing.serializers.register_serializer`;
- in the configuration file: ``plugins: {brokers: {nats: "my_pkg.nats:NatsBroker"},
  storages: {...}, serializers: {"application/x-protobuf": "my_pkg.proto:serializer"}}``;
- through Python entry points, in the groups ``payler.brokers``, ``payler.storages`` (the entry
  point's name is the scheme; its object a :class:`~payler.drivers.brokers.base.Broker` or
  :class:`~payler.drivers.storages.base.SpoolStorage` subclass) and ``payler.serializers`` (the
  name is the content type). An installed package that declares one is used by every payler of
  that environment, with no configuration.

A broker or storage plugin implements the same contract as the built-in drivers (and should pass
the same contract tests); it is constructed with the same arguments: ``cls(url, **settings)``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any

from payler.errors import ConfigError
from payler.urls import mask_url

BROKER_GROUP = "payler.brokers"
STORAGE_GROUP = "payler.storages"

_registered: dict[str, dict[str, str]] = {BROKER_GROUP: {}, STORAGE_GROUP: {}}


def register_broker(scheme: str, target: str) -> None:
    """Open ``scheme://`` URLs with the broker class at ``target`` (``"module:Class"``)."""
    _registered[BROKER_GROUP][scheme.lower()] = target


def register_storage(scheme: str, target: str) -> None:
    """Open ``scheme://`` URLs with the storage class at ``target`` (``"module:Class"``)."""
    _registered[STORAGE_GROUP][scheme.lower()] = target


def target_for(group: str, scheme: str) -> str | None:
    """The ``module:Class`` registered (in code, configuration or an entry point) for
    ``scheme`` in ``group``, or None."""
    found = _registered[group].get(scheme)
    if found is not None:
        return found
    for entry in importlib.metadata.entry_points(group=group):
        if entry.name.lower() == scheme:
            return entry.value
    return None


def schemes(group: str) -> tuple[str, ...]:
    """The schemes plugins provide in ``group``."""
    names = set(_registered[group])
    names.update(e.name.lower() for e in importlib.metadata.entry_points(group=group))
    return tuple(sorted(names))


def load(target: str) -> Any:
    """The object at ``target``: ``"module:attr"`` (or ``"module.attr"``); ``ImportError`` or
    ``AttributeError`` naming what is missing."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{target!r} is not a 'module:attribute' path")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def known_schemes(group: str, builtins: Mapping[str, Any]) -> tuple[str, ...]:
    """The built-in schemes (``builtins``' keys) and those of the plugins of ``group``."""
    return (*builtins, *(s for s in schemes(group) if s not in builtins))


def driver_class(
    kind: str, group: str, builtins: Mapping[str, tuple[str, str]], scheme: str, url: str
) -> Any:
    """The class serving ``scheme``: built in (``builtins``: scheme → (module, class name),
    imported on first use) or a plugin of ``group``. :class:`~payler.errors.ConfigError` naming
    the ``kind`` ("broker", "storage") and the masked ``url`` when there is none or it cannot
    be loaded."""
    if scheme in builtins:
        module_name, class_name = builtins[scheme]
        return getattr(importlib.import_module(module_name), class_name)
    target = target_for(group, scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in known_schemes(group, builtins))
        raise ConfigError(f"{kind} URL {mask_url(url)!r}: unknown scheme; expected one of {known}")
    try:
        return load(target)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{kind} URL {mask_url(url)!r}: the plugin {target!r} for {scheme}:// cannot be "
            f"loaded: {exc}"
        ) from None


__all__ = [
    "driver_class",
    "known_schemes",
    "load",
    "register_broker",
    "register_storage",
    "schemes",
    "target_for",
]
