"""The admin API, ``/v1``: scheduled entries and dead letters (:class:`~payler.admin.
operations.Admin` over HTTP).

Errors are JSON ``{"detail": ...}``: 400 for a value payler refuses (a due time past the
maximum delay, say), 401 without a valid token, 404 for an entry that is not there (cancelled,
delivered), 413 for a body over the limit, 422 for a request that does not match the schema,
503 when the storage or the broker cannot be reached (passwords masked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel

from payler.admin.operations import Admin
from payler.admin.views import (
    LIST_BODY_PREVIEW,
    MAX_BODY_PREVIEW,
    Count,
    DeadLetterPage,
    DeadLetterWhere,
    Done,
    Entry,
    EntryPage,
    NewMessage,
    ReplayRequest,
    ReplayResult,
    Reschedule,
    Scheduled,
    State,
)
from payler.errors import InvalidSchedule, StartupError, is_transient
from payler.http.security import Caller, authenticate
from payler.isolation import describe
from payler.reasons import ReasonClass
from payler.scheduling import parse_deliver_at
from payler.urls import mask_urls

T = TypeVar("T")


class Problem(BaseModel):
    """An error: what went wrong, for a person."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "A value payler refuses."},
    401: {"model": Problem, "description": "No valid bearer token."},
    413: {"model": Problem, "description": "The request body is over the limit."},
    503: {"model": Problem, "description": "The storage or the broker cannot be reached."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such entry (cancelled, delivered, never there)."}
}


def admin_of(request: Request) -> Admin:
    admin: Admin = request.app.state.payler.admin
    return admin


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """The caller of a ``/v1`` request (401 without a valid token, when tokens are set)."""
    who = authenticate(request.app.state.payler.settings.tokens, authorization)
    if who is None:
        raise HTTPException(
            401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    return who


router = APIRouter(prefix="/v1", dependencies=[Depends(caller)], responses=ERRORS)
AdminDep = Annotated[Admin, Depends(admin_of)]
CallerDep = Annotated[Caller, Depends(caller)]
EntryId = Annotated[str, Path(description="The spool id (URL-encode it: ids hold ':').")]
Limit = Annotated[int, Query(ge=1, le=1000, description="Entries per page.")]
Cursor = Annotated[
    str | None, Query(pattern=r"^-?[0-9]+:", description="`next_cursor` of the previous page.")
]
BodyLimitQuery = Annotated[
    int, Query(ge=0, le=MAX_BODY_PREVIEW, description="Body bytes to show (the rest is cut).")
]


@asynccontextmanager
async def _outages() -> AsyncIterator[None]:
    """Storage and broker outages as 503, refused values as 400."""
    try:
        yield
    except (InvalidSchedule, ValueError) as exc:
        raise HTTPException(400, mask_urls(str(exc))) from None
    except StartupError as exc:
        raise HTTPException(503, mask_urls(str(exc))) from None
    except Exception as exc:
        if is_transient(exc):
            raise HTTPException(503, mask_urls(describe(exc))) from None
        raise


async def _run(step: Callable[[], Awaitable[T]]) -> T:
    async with _outages():
        return await step()


def _ms(value: datetime | str | None) -> int | None:
    # FastAPI hands an empty query value over as it is (""): no filter.
    if value is None or isinstance(value, str):
        return None
    return parse_deliver_at(value if value.tzinfo else value.replace(tzinfo=UTC))


def _header(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    name, sep, wanted = value.partition("=")
    if not sep or not name:
        raise HTTPException(400, "header: expected name=value")
    return name, wanted


@router.get("/scheduled", summary="List scheduled entries in due order")
async def list_scheduled(
    admin: AdminDep,
    destination: str | None = None,
    due_from: Annotated[
        str | None, Query(description="ISO 8601 with an offset, or epoch ms.")
    ] = None,
    due_to: Annotated[
        str | None, Query(description="ISO 8601 with an offset, or epoch ms.")
    ] = None,
    message_id: Annotated[str | None, Query(description="Indexed lookup.")] = None,
    correlation_id: Annotated[str | None, Query(description="Indexed lookup.")] = None,
    header: Annotated[
        str | None,
        Query(
            pattern=r"^[^=]+=",
            description="name=value: no index, so at most 10,000 entries are read per page; "
            "`scanned` says how many, `next_cursor` where to go on.",
        ),
    ] = None,
    state: State = "pending",
    limit: Limit = 100,
    cursor: Cursor = None,
    body_limit: BodyLimitQuery = LIST_BODY_PREVIEW,
) -> EntryPage:
    return await _run(
        lambda: admin.list_entries(
            state=state,
            destination=destination,
            due_from_ms=_ms(due_from),
            due_to_ms=_ms(due_to),
            message_id=message_id,
            correlation_id=correlation_id,
            header=_header(header),
            limit=limit,
            cursor=cursor,
            body_cap=body_limit,
        )
    )


@router.get("/scheduled/count", summary="Count pending and dead entries")
async def count_scheduled(admin: AdminDep, destination: str | None = None) -> Count:
    return await _run(lambda: admin.count(destination))


@router.post(
    "/scheduled",
    status_code=201,
    summary="Schedule a new message",
    responses={200: {"model": Scheduled, "description": "That idempotency key was used."}},
)
async def schedule(
    message: NewMessage,
    admin: AdminDep,
    who: CallerDep,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=200, description="As the body's field.")
    ] = None,
) -> Scheduled:
    if idempotency_key is not None and message.idempotency_key is None:
        message = message.model_copy(update={"idempotency_key": idempotency_key})
    done = await _run(lambda: admin.schedule(message, who=who.name))
    if not done.created:
        response.status_code = 200
    return done


@router.get("/scheduled/{entry_id:path}", responses=NOT_FOUND, summary="One entry, with its body")
async def get_scheduled(
    entry_id: EntryId, admin: AdminDep, body_limit: BodyLimitQuery = 64 * 1024
) -> Entry:
    return _found(await _run(lambda: admin.get(entry_id, body_limit)), entry_id)


@router.delete("/scheduled/{entry_id:path}", responses=NOT_FOUND, summary="Cancel an entry")
async def cancel_scheduled(entry_id: EntryId, admin: AdminDep, who: CallerDep) -> Done:
    if not await _run(lambda: admin.cancel(entry_id, who=who.name)):
        raise HTTPException(404, f"no entry {entry_id!r}")
    return Done(id=entry_id, done=True)


@router.patch("/scheduled/{entry_id:path}", responses=NOT_FOUND, summary="Reschedule an entry")
async def reschedule(
    entry_id: EntryId, change: Reschedule, admin: AdminDep, who: CallerDep
) -> Entry:
    moved = await _run(
        lambda: admin.reschedule(
            entry_id, who=who.name, delay_ms=change.delay_ms, deliver_at=change.deliver_at
        )
    )
    return _found(moved, entry_id)


@router.post(
    "/scheduled/{entry_id:path}/deliver", responses=NOT_FOUND, summary="Make an entry due now"
)
async def deliver_now(entry_id: EntryId, admin: AdminDep, who: CallerDep) -> Entry:
    return _found(await _run(lambda: admin.deliver_now(entry_id, who=who.name)), entry_id)


@router.get("/dead-letters", summary="Dead letters: in the spool, and on the dead-letter queues")
async def dead_letters(
    admin: AdminDep,
    where: DeadLetterWhere | None = None,
    reason: ReasonClass | None = None,
    destination: str | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
    body_limit: BodyLimitQuery = LIST_BODY_PREVIEW,
) -> DeadLetterPage:
    return await _run(
        lambda: admin.dead_letters(
            where=where,
            reason=reason,
            destination=destination,
            limit=limit,
            cursor=cursor,
            body_cap=body_limit,
        )
    )


@router.post("/dead-letters/replay", summary="Re-inject dead letters to where they were going")
async def replay(request: ReplayRequest, admin: AdminDep, who: CallerDep) -> ReplayResult:
    return await _run(lambda: admin.replay(request, who=who.name))


def _found(entry: Entry | None, entry_id: str) -> Entry:
    if entry is None:
        raise HTTPException(404, f"no entry {entry_id!r}")
    return entry


__all__ = ["router"]
