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
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel

from payler import __version__
from payler.admin.operations import Admin
from payler.admin.status import Overview, SpoolOverview
from payler.admin.views import (
    LIST_BODY_PREVIEW,
    MAX_BODY_PREVIEW,
    Count,
    DeadLetterPage,
    DeadLetterWhere,
    DiscardRequest,
    DiscardResult,
    Done,
    DueHistogram,
    Entry,
    EntryPage,
    NewMessage,
    ReasonGroups,
    ReplayRequest,
    ReplayResult,
    Reschedule,
    Scheduled,
    State,
)
from payler.errors import InvalidSchedule, StartupError, is_transient
from payler.http.security import Caller, authenticate
from payler.http.sessions import (
    CSRF_HEADER,
    SAFE_METHODS,
    SESSION_COOKIE,
    csrf_matches,
    refusal,
)
from payler.http.state import ServerState, readiness
from payler.isolation import describe
from payler.reasons import ReasonClass
from payler.scheduling import parse_deliver_at
from payler.urls import mask_url, mask_urls

T = TypeVar("T")


class Problem(BaseModel):
    """An error: what went wrong, for a person."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "A value payler refuses."},
    401: {"model": Problem, "description": "No valid bearer token."},
    403: {"model": Problem, "description": "A browser's request from another site."},
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
    """The caller of a ``/v1`` request: a bearer token, the console's session cookie (with its
    CSRF token on a change), or ``loopback`` when no token is configured. 401 without a valid
    one; 403 for a request that a browser sent from another site, or, with no token
    configured, addressed to a name other than an IP address or localhost (see
    :mod:`payler.http.sessions`)."""
    state: ServerState = request.app.state.payler
    tokens = state.settings.tokens
    refused = refusal(request.method, request.headers, request.url.scheme, open_access=not tokens)
    if refused is not None:
        raise HTTPException(403, refused)
    if authorization is None:
        session = state.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            unsafe = request.method not in SAFE_METHODS
            if unsafe and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
                raise HTTPException(403, "the console's CSRF token is missing or stale: reload")
            return Caller(session.name)
    who = authenticate(tokens, authorization)
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


#: The latest time a due filter may name (the end of year 9999), in epoch ms.
_LATEST_MS = 253_402_300_799_999


def _ms(value: str | None, name: str) -> int | None:
    """A due filter (ISO 8601 with an offset, or epoch ms) as epoch ms; an empty one (FastAPI
    hands ``?due_from=`` over as ``""``) is no filter; anything else is a 400 naming it."""
    if value is None or not value.strip():
        return None
    try:
        ms = parse_deliver_at(value)
    except (InvalidSchedule, ValueError, OverflowError):
        ms = -1
    if not 0 <= ms <= _LATEST_MS:
        raise HTTPException(
            400, f"{name}: expected ISO 8601 with a UTC offset, or epoch milliseconds"
        )
    return ms


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
            due_from_ms=_ms(due_from, "due_from"),
            due_to_ms=_ms(due_to, "due_to"),
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


@router.get("/scheduled/histogram", summary="How many pending entries are due per time bucket")
async def due_histogram(
    admin: AdminDep,
    destination: str | None = None,
    due_from: Annotated[
        str | None, Query(description="The first bucket's start (default: now).")
    ] = None,
    due_to: Annotated[
        str | None, Query(description="The last bucket's end (default: 24 hours after the start).")
    ] = None,
    bucket_ms: Annotated[
        int, Query(ge=1000, le=366 * 24 * 3_600_000, description="Each bucket's span.")
    ] = 3_600_000,
) -> DueHistogram:
    start = _ms(due_from, "due_from")
    start = admin.clock.now_ms() if start is None else start
    end = _ms(due_to, "due_to")
    end = start + 24 * 3_600_000 if end is None else end
    return await _run(lambda: admin.due_histogram(start, end, bucket_ms, destination))


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


@router.get("/dead-letters/reasons", summary="Dead letters grouped by reason class, with counts")
async def dead_letter_reasons(admin: AdminDep, destination: str | None = None) -> ReasonGroups:
    return await _run(lambda: admin.reason_groups(destination))


@router.post("/dead-letters/replay", summary="Re-inject dead letters to where they were going")
async def replay(request: ReplayRequest, admin: AdminDep, who: CallerDep) -> ReplayResult:
    return await _run(lambda: admin.replay(request, who=who.name))


@router.post("/dead-letters/discard", summary="Delete dead letters for good")
async def discard(request: DiscardRequest, admin: AdminDep, who: CallerDep) -> DiscardResult:
    return await _run(lambda: admin.discard(request, who=who.name))


@router.get("/overview", summary="The daemon at a glance: workflows, rates, lateness, spools")
async def overview(request: Request) -> Overview:
    state: ServerState = request.app.state.payler
    samples = await state.sampler.fresh()
    window_s, workflows = state.tracker.workflows()
    ready = readiness(state)
    spools = [
        SpoolOverview(
            storage=mask_url(url),
            up=sample.up,
            pending=sample.pending,
            dead=sample.dead,
            oldest_overdue_s=sample.oldest_overdue_s,
            error=sample.error,
            sampled_ms=sample.sampled_ms,
        )
        for url, sample in samples.items()
    ]
    return Overview(
        version=__version__,
        now_ms=state.admin.clock.now_ms(),
        ready=ready.ready,
        reason=ready.reason,
        window_s=window_s,
        workflows=workflows,
        spools=spools,
    )


def _found(entry: Entry | None, entry_id: str) -> Entry:
    if entry is None:
        raise HTTPException(404, f"no entry {entry_id!r}")
    return entry


__all__ = ["router"]
