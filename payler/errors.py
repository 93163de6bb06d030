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
    # redis-py raises a class of its own for most error replies that mean "the server cannot
    # serve writes now" (a failover, a restart, memory full): they are outages, not refusals.
    "redis": {
        "ConnectionError",  # also AuthenticationError, BusyLoadingError (LOADING: restarting)
        "TimeoutError",
        "ReadOnlyError",  # READONLY: the server was demoted to a replica (a failover)
        "OutOfMemoryError",  # OOM: maxmemory reached; frees as consumers catch up
        "TryAgainError",  # TRYAGAIN: a key moving between cluster nodes
        "ClusterDownError",  # CLUSTERDOWN, and MASTERDOWN (a subclass): a replica lost its master
        "SlotNotCoveredError",  # a cluster slot no known node serves (a failover under way)
    },
    "aiokafka": {"KafkaConnectionError", "KafkaTimeoutError", "NodeNotReadyError"},
}


#: Redis error replies that are outages, by their code. redis-py strips the code from the
#: message of the replies it has a class for (above) and leaves it at the head of the others,
#: which it raises as a plain ``ResponseError``: those are recognised by this code. (Older
#: redis-py versions have no class for some of the codes above: they are listed here too.)
_REDIS_OUTAGE_CODES = frozenset(
    {
        "BUSY",  # a script or module command is running long: the server answers nothing else
        "NOREPLICAS",  # min-replicas-to-write: not enough replicas connected to accept a write
        "MISCONF",  # the server cannot persist (disk full, say) and refuses writes meanwhile
        "UNBLOCKED",  # a blocked read cut short: the server became a replica as it waited
        "READONLY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "LOADING",
        "OOM",
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a broker or storage failure that a reconnect may mend.

    Decided by the exception's class (checked by name, so that this module imports no driver
    library); for a Redis error reply that redis-py raises as a plain ``ResponseError``, by
    the reply's code (:data:`_REDIS_OUTAGE_CODES`).
    """
    if isinstance(exc, TransientError | ConnectionError | TimeoutError):
        return True
    for cls in type(exc).__mro__:
        library = cls.__module__.partition(".")[0]
        names = _TRANSIENT_NAMES.get(library)
        if names and cls.__name__ in names:
            return True
        if library == "redis" and cls.__name__ == "ResponseError":
            return str(exc).partition(" ")[0] in _REDIS_OUTAGE_CODES
        if library == "redis" and cls.__name__ == "RedisClusterException":
            # The cluster client's own failures: "cannot be connected" (no node reachable)
            # is raised from the connection error; the others are usage errors.
            return exc.__cause__ is not None and is_transient(exc.__cause__)
    return False


def transient_on(
    errors: tuple[type[BaseException], ...],
    label: str,
    *,
    when: Callable[[BaseException], bool] | None = None,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate a driver's hooks: ``errors`` (a library's lost-connection family) become
    :class:`TransientError` naming ``label``, which the runtime retries with backoff.

    With ``when``, only the ``errors`` for which ``when(exc)`` holds do (a library whose
    outages and refusals share one class: ``transient_on((RedisError,), label,
    when=is_transient)``); the others propagate as they are.
    """

    def decorate(
        hook: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(hook)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await hook(*args, **kwargs)
            except errors as exc:
                if when is not None and not when(exc):
                    raise
                raise TransientError(f"{label}: {exc}") from exc

        return wrapper

    return decorate
