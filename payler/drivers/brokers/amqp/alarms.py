"""RabbitMQ's resource alarms, as a publisher sees them.

When a node runs low on memory or disk it raises an alarm and stops reading from every
connection that publishes, after telling it why (``Connection.Blocked`` with a reason such as
``low on memory``), until the alarm clears (``Connection.Unblocked``). A publish on a blocked
connection is never confirmed; a connection that has not published yet is not blocked (and not
told) until it does. payler treats a blocked connection as an outage: a publish fails at once
with :class:`~payler.errors.TransientError` naming the alarm (the workflow restarts with backoff
and retries), and every publish is bounded by the broker's ``publish_timeout_s`` in any case.

aiormq handles both frames (it stops writing while blocked) but offers no callback for them;
:meth:`Alarm.watch` wraps its two handlers on one connection object, so that payler learns of
them as they arrive. Should an aiormq release rename them, payler goes on without the
notifications: the publish timeout still bounds every publish.

The log says it once per alarm and server, not once per restarted connection: a WARNING when a
node first blocks payler (with the reason) and one when it takes publishes again.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from payler.clock import Clock
from payler.errors import TransientError

log = logging.getLogger("payler.rabbitmq")

#: The alarms in force, by server (masked URL), with when payler first saw each (epoch ms).
#: Module state: a workflow restarted by the outage has a new broker object, and the alarm is
#: the same one.
_IN_FORCE: dict[str, tuple[str, int]] = {}

_BLOCKED_HANDLER = "_Connection__handle_connection_blocked"
_UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"


class Alarm:
    """Whether one connection to ``server`` is blocked by a resource alarm, and why."""

    def __init__(self, server: str, clock: Clock) -> None:
        self.server = server
        self.clock = clock
        self.reason: str | None = None
        self._blocked = asyncio.Event()

    @property
    def blocked(self) -> bool:
        return self._blocked.is_set()

    def watch(self, connection: object) -> bool:
        """Learn of ``Connection.Blocked`` and ``Unblocked`` on an aiormq ``connection``;
        False if this aiormq offers no way to (see the module docstring)."""
        on_blocked = getattr(connection, _BLOCKED_HANDLER, None)
        on_unblocked = getattr(connection, _UNBLOCKED_HANDLER, None)
        if not callable(on_blocked) or not callable(on_unblocked):
            log.debug("this aiormq gives no Connection.Blocked notifications to payler")
            return False

        def wrap(
            handler: Callable[[Any], Awaitable[None]], then: Callable[[Any], None]
        ) -> Callable[[Any], Awaitable[None]]:
            async def wrapped(frame: Any) -> None:
                await handler(frame)
                then(frame)

            return wrapped

        setattr(connection, _BLOCKED_HANDLER, wrap(on_blocked, self._on_blocked))
        setattr(connection, _UNBLOCKED_HANDLER, wrap(on_unblocked, self._on_unblocked))
        return True

    def _on_blocked(self, frame: Any) -> None:
        reason = str(getattr(frame, "reason", "") or "no reason given")
        self.reason = reason
        self._blocked.set()
        if _IN_FORCE.get(self.server, ("",))[0] != reason:
            _IN_FORCE[self.server] = (reason, self.clock.now_ms())
            log.warning(
                "RabbitMQ at %s blocks publishing: resource alarm %r (the node is low on memory "
                "or disk). Publishes fail as an outage, retried with backoff, until it clears",
                self.server, reason,
            )  # fmt: skip

    def _on_unblocked(self, _frame: Any) -> None:
        self.reason = None
        self._blocked.clear()
        self.cleared()

    def cleared(self) -> None:
        """The server takes publishes (it unblocked, or a publish was confirmed)."""
        if self.server in _IN_FORCE:
            reason, since = _IN_FORCE.pop(self.server)
            log.warning(
                "RabbitMQ at %s takes publishes again: resource alarm %r is over (%.0f s)",
                self.server, reason, (self.clock.now_ms() - since) / 1000,
            )  # fmt: skip

    def check(self) -> None:
        """Raise :class:`TransientError` if the connection is blocked."""
        if self.blocked:
            raise TransientError(self._refusal())

    async def wait(self, sends: Sequence[asyncio.Future[Any]], timeout_s: float) -> None:
        """Wait until every one of ``sends`` is done, or ``timeout_s`` has passed; raise
        :class:`TransientError` if the connection is blocked first (their outcome unknown)."""
        everything: asyncio.Future[Any] = asyncio.gather(*sends, return_exceptions=True)
        blocked: asyncio.Future[Any] = asyncio.ensure_future(self._blocked.wait())
        try:
            done, _ = await asyncio.wait(
                [everything, blocked], timeout=max(0.0, timeout_s), return_when=FIRST_COMPLETED
            )
        finally:
            blocked.cancel()
        if blocked in done and everything not in done:
            raise TransientError(self._refusal())

    def _refusal(self) -> str:
        return (
            f"RabbitMQ at {self.server} blocks publishing (resource alarm {self.reason!r}): "
            "the outcome of publishes in the air is unknown"
        )
