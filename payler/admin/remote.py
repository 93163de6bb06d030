"""The admin operations through a running daemon's API (``payler ... --api URL``).

:class:`RemoteAdmin` has the methods of :class:`~payler.admin.operations.Admin` that the CLI
uses, and returns the same views: the CLI does not care which one it holds. HTTP through the
standard library (the CLI needs no HTTP client package), in a thread.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from payler.admin.views import (
    Count,
    DeadLetterPage,
    DeadLetterWhere,
    DiscardRequest,
    DiscardResult,
    Entry,
    EntryPage,
    NewMessage,
    ReplayRequest,
    ReplayResult,
    Scheduled,
    State,
)
from payler.errors import PaylerError
from payler.reasons import ReasonClass

M = TypeVar("M", bound=BaseModel)
TIMEOUT_S = 60.0


class RemoteError(PaylerError):
    """The API answered with an error, or could not be reached."""


class RemoteAdmin:
    """The admin operations over HTTP (see the module docstring)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    async def __aenter__(self) -> RemoteAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def list_entries(
        self,
        *,
        state: State = "pending",
        destination: str | None = None,
        due_from_ms: int | None = None,
        due_to_ms: int | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        header: tuple[str, str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
        body_cap: int = 256,
    ) -> EntryPage:
        query = {
            "state": state,
            "destination": destination,
            "due_from": due_from_ms,
            "due_to": due_to_ms,
            "message_id": message_id,
            "correlation_id": correlation_id,
            "header": None if header is None else "=".join(header),
            "limit": limit,
            "cursor": cursor,
            "body_limit": body_cap,
        }
        return await self._call(EntryPage, "GET", "/v1/scheduled", query=query)

    async def get(self, payload_id: str, body_cap: int = 64 * 1024) -> Entry | None:
        path = f"/v1/scheduled/{_quote(payload_id)}"
        return await self._request(Entry, "GET", path, query={"body_limit": body_cap})

    async def count(self, destination: str | None = None) -> Count:
        return await self._call(
            Count, "GET", "/v1/scheduled/count", query={"destination": destination}
        )

    async def cancel(self, payload_id: str, *, who: str) -> bool:
        done = await self._request(_Done, "DELETE", f"/v1/scheduled/{_quote(payload_id)}")
        return done is not None

    async def reschedule(
        self,
        payload_id: str,
        *,
        who: str,
        delay_ms: int | float | str | None = None,
        deliver_at: str | int | None = None,
    ) -> Entry | None:
        body = {"delay_ms": delay_ms, "deliver_at": deliver_at}
        return await self._request(Entry, "PATCH", f"/v1/scheduled/{_quote(payload_id)}", body=body)

    async def deliver_now(self, payload_id: str, *, who: str) -> Entry | None:
        return await self._request(Entry, "POST", f"/v1/scheduled/{_quote(payload_id)}/deliver")

    async def schedule(self, message: NewMessage, *, who: str) -> Scheduled:
        body = message.model_dump(exclude_none=True)
        return await self._call(Scheduled, "POST", "/v1/scheduled", body=body)

    async def dead_letters(
        self,
        *,
        where: DeadLetterWhere | None = None,
        reason: ReasonClass | None = None,
        destination: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        body_cap: int = 256,
    ) -> DeadLetterPage:
        query = {
            "where": where,
            "reason": reason,
            "destination": destination,
            "limit": limit,
            "cursor": cursor,
            "body_limit": body_cap,
        }
        return await self._call(DeadLetterPage, "GET", "/v1/dead-letters", query=query)

    async def replay(
        self,
        request: ReplayRequest,
        *,
        who: str,
        progress: Callable[[int], None] | None = None,
    ) -> ReplayResult:
        body = request.model_dump(exclude_defaults=True)
        result = await self._call(ReplayResult, "POST", "/v1/dead-letters/replay", body=body)
        if progress is not None:
            progress(result.replayed)
        return result

    async def discard(
        self,
        request: DiscardRequest,
        *,
        who: str,
        progress: Callable[[int], None] | None = None,
    ) -> DiscardResult:
        body = request.model_dump(exclude_defaults=True)
        result = await self._call(DiscardResult, "POST", "/v1/dead-letters/discard", body=body)
        if progress is not None:
            progress(result.discarded)
        return result

    # -- HTTP ----------------------------------------------------------------------------------

    async def _call(
        self,
        model: type[M],
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> M:
        found = await self._request(model, method, path, query=query, body=body, missing_ok=False)
        if found is None:  # a 404 where none is expected
            raise RemoteError(f"{method} {path}: 404: not found")
        return found

    async def _request(
        self,
        model: type[M],
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        missing_ok: bool = True,
    ) -> M | None:
        query = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = (
            None
            if body is None
            else json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        )
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        status, text = await asyncio.to_thread(_send, request)
        if status == 404 and missing_ok:
            return None
        if status >= 400:
            try:
                detail = json.loads(text)["detail"]
            except (ValueError, KeyError, TypeError):
                detail = text[:300]
            raise RemoteError(f"{method} {path}: {status}: {detail}")
        return model.model_validate_json(text)


class _Done(BaseModel):
    id: str
    done: bool


def _send(request: urllib.request.Request) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RemoteError(f"cannot reach the payler API at {request.full_url}: {reason}") from None


def _quote(payload_id: str) -> str:
    return urllib.parse.quote(payload_id, safe="")


__all__ = ["RemoteAdmin", "RemoteError"]
