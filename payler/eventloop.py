"""The event loop the daemon runs on: uvloop where it is installed, asyncio's own otherwise.

uvloop (libuv, in Cython) runs the same asyncio programs with less overhead per callback, per
socket read and per future: what payler's profile is made of (the AMQP client and asyncio's
machinery, not payler's own code). It is a dependency on Linux and macOS; elsewhere, or with
``PAYLER_EVENT_LOOP=asyncio``, the daemon runs on asyncio's default loop.
``PAYLER_EVENT_LOOP=uvloop`` insists on uvloop (an error where it is missing).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from importlib.metadata import version
from typing import Any, Literal, TypeVar

from payler.errors import ConfigError

T = TypeVar("T")

#: The environment variable that chooses the loop.
ENV = "PAYLER_EVENT_LOOP"
LoopName = Literal["uvloop", "asyncio"]
_CHOICES = ("auto", "uvloop", "asyncio")


def choose(env: Mapping[str, str] | None = None) -> tuple[LoopName, Callable[[], Any]]:
    """The loop ``env`` (the process environment by default) asks for: (its name, a factory).

    Unset, empty or ``auto``: uvloop if it can be imported, else asyncio. Raises
    :class:`~payler.errors.ConfigError` for any other value, or ``uvloop`` without uvloop.
    """
    environ = os.environ if env is None else env
    wanted = environ.get(ENV, "").strip().lower() or "auto"
    if wanted not in _CHOICES:
        raise ConfigError(
            f"{ENV}={environ.get(ENV)!r}: expected one of {', '.join(_CHOICES)} (auto: uvloop "
            "where it is installed)"
        )
    if wanted == "asyncio":
        return "asyncio", asyncio.new_event_loop
    try:
        import uvloop  # noqa: PLC0415 - optional: not installed on Windows
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError(
                f"{ENV}=uvloop, but uvloop is not installed (pip install uvloop; it has no "
                "Windows build)"
            ) from None
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], env: Mapping[str, str] | None = None) -> T:
    """:func:`asyncio.run` on the loop :func:`choose` picks."""
    try:
        _, factory = choose(env)
    except ConfigError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """Which loop ``loop`` is, for the start-up log line: ``uvloop 0.21.0`` or ``asyncio``."""
    module = type(loop).__module__
    if module.startswith("uvloop"):
        return f"uvloop {version('uvloop')}"
    return "asyncio" if module.startswith("asyncio") else f"{module}.{type(loop).__name__}"
