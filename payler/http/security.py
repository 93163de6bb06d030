"""Who may call the admin API, and how much they may send.

- Bearer tokens (:class:`~payler.http.settings.Token`): when any is configured, every ``/v1``
  request must present one (``Authorization: Bearer <token>``). Each is compared in constant
  time (:func:`hmac.compare_digest`), all of them every time, so that the timing tells nothing.
  Without tokens (only allowed on a loopback address) the caller is ``loopback``.
- :class:`BodyLimit`: an ASGI middleware that refuses a request body over the limit with 413
  before any route reads it (by its ``Content-Length``, or by counting a chunked one).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payler.http.settings import Token


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: a token's name, or ``loopback``."""

    name: str


def authenticate(tokens: Sequence[Token], authorization: str | None) -> Caller | None:
    """The caller that ``authorization`` (the header's value) proves, or ``None``."""
    if not tokens:
        return Caller("loopback")
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    found: Token | None = None
    given = presented.strip().encode()
    for token in tokens:  # every one, always: no early exit to time
        if hmac.compare_digest(given, token.secret.encode()):
            found = token
    return None if found is None else Caller(found.name)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        # Read the body here (it is small, by the limit): a chunked one is counted as it comes.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                # Take the rest of it (dropped as it comes) so that the client, still
                # sending, reads the answer instead of a reset connection.
                while more:
                    message = await receive()
                    more = message["type"] == "http.request" and message.get("more_body", False)
                await self._refuse(send)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)

    async def _refuse(self, send: Send) -> None:
        detail = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(detail)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": detail})


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that gives ``messages`` first, then waits on ``then`` (disconnects)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


__all__ = ["BodyLimit", "Caller", "authenticate"]
