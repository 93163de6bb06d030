"""The exceptions payler raises, and what the runtime does with each.

- :class:`ConfigError` and :class:`StartupError` end the daemon with exit status 2 and one
  clear message (no traceback): the user has something to fix.
- :class:`TransientError` (and the driver libraries' connection errors that drivers wrap into it)
  inside a running workflow is logged and the workflow is restarted with backoff.
- Anything else is a programming error and crashes loudly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class PaylerError(Exception):
    """Base class of payler's own errors."""


class ConfigError(PaylerError):
    """The configuration is invalid: names the file, the key and what was expected."""


class StartupError(PaylerError):
    """A workflow could not start: an unreachable broker or storage, a bad URL."""


class TransientError(PaylerError):
    """A broker or storage failed in a way that a retry may mend (connection lost, timeout)."""


class InvalidSchedule(PaylerError):
    """A message's scheduling headers cannot be honoured; ``reason`` goes to the dead-letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Connection-level failures of the driver libraries, by module and class name: checked by name so
# that this module imports none of them (each backend is imported only when used).
_TRANSIENT_NAMES = {
    "aiormq": {"AMQPConnectionError", "ConnectionClosed", "ChannelInvalidStateError"},
    "aio_pika": {"AMQPConnectionError", "ConnectionClosed", "ChannelInvalidStateError"},
    "pymongo": {
        "ConnectionFailure",
        "AutoReconnect",
        "NetworkTimeout",
        "ServerSelectionTimeoutError",
    },
    "redis": {"ConnectionError", "TimeoutError", "BusyLoadingError"},
    "aiokafka": {"KafkaConnectionError", "KafkaTimeoutError", "NodeNotReadyError"},
}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a broker or storage failure that a reconnect may mend."""
    if isinstance(exc, TransientError | ConnectionError | TimeoutError):
        return True
    for cls in type(exc).__mro__:
        names = _TRANSIENT_NAMES.get(cls.__module__.partition(".")[0])
        if names and cls.__name__ in names:
            return True
    return False


def transient_on(
    errors: tuple[type[BaseException], ...], label: str
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate a driver's hooks: ``errors`` (a library's lost-connection family) become
    :class:`TransientError` naming ``label``, which the runtime retries with backoff."""

    def decorate(
        hook: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(hook)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await hook(*args, **kwargs)
            except errors as exc:
                raise TransientError(f"{label}: {exc}") from exc

        return wrapper

    return decorate
