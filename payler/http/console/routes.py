"""The console's routes: the pages' HTML shell, the login form, sign-out, and the static assets.

Every page is the same shell (:file:`templates/shell.html`): the browser's modules draw the
page its path names from the ``/v1`` API. With tokens configured, a page asks for a session
first (a redirect to ``/ui/login``); the login form posts the token once (never in a URL) and
gets a session cookie back (:mod:`payler.http.sessions`).
"""

from __future__ import annotations

import html
import logging
import string
import urllib.parse
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from payler import __version__
from payler.http.security import authenticate
from payler.http.sessions import SESSION_COOKIE, Session, csrf_matches, refusal
from payler.http.state import ServerState

log = logging.getLogger("payler.http")

HERE = Path(__file__).parent
#: Where the console is served.
PREFIX = "/ui"
#: What a console page may load and do: its own scripts, styles and images only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: Chromium then sends "Origin: null" with a form post, and the origin check
    # (see payler.http.sessions) could not tell the login form from another site.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)
#: The assets (the app mounts it at ``/ui/static``).
static = StaticFiles(directory=HERE / "static")


@cache
def _template(name: str) -> string.Template:
    return string.Template((HERE / "templates" / name).read_text(encoding="utf-8"))


def _page(name: str, status: int = 200, **values: str) -> HTMLResponse:
    escaped = {key: html.escape(value, quote=True) for key, value in values.items()}
    body = _template(name).substitute(escaped, version=html.escape(__version__))
    return HTMLResponse(body, status_code=status, headers=_HEADERS)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.payler
    return state


def _guard(request: Request) -> None:
    state = _state(request)
    refused = refusal(
        request.method,
        request.headers,
        request.url.scheme,
        open_access=not state.settings.tokens,
    )
    if refused is not None:
        raise HTTPException(403, refused)


def _session(request: Request) -> Session | None:
    return _state(request).sessions.get(request.cookies.get(SESSION_COOKIE))


def _next(value: str | None) -> str:
    """Where to go after signing in: a console path, never another site."""
    if value and value.startswith(f"{PREFIX}") and not value.startswith("//"):
        return value
    return PREFIX


async def _shell(request: Request) -> Response:
    _guard(request)
    state = _state(request)
    if not state.settings.tokens:
        return _page("shell.html", csrf="", user="", signout="hidden")
    session = _session(request)
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        query = urllib.parse.urlencode({"next": target})
        return RedirectResponse(f"{PREFIX}/login?{query}", status_code=303, headers=_HEADERS)
    return _page("shell.html", csrf=session.csrf, user=session.name, signout="")


@router.get("")
async def overview_page(request: Request) -> Response:
    return await _shell(request)


@router.get("/scheduled")
async def scheduled_page(request: Request) -> Response:
    return await _shell(request)


@router.get("/scheduled/{entry_id:path}")
async def message_page(request: Request, entry_id: str) -> Response:
    return await _shell(request)


@router.get("/dead-letters")
async def dead_letters_page(request: Request) -> Response:
    return await _shell(request)


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    _guard(request)
    if not _state(request).settings.tokens or _session(request) is not None:
        return RedirectResponse(_next(next), status_code=303, headers=_HEADERS)
    return _page("login.html", next=_next(next), error="", error_hidden="hidden")


@router.post("/login")
async def login(request: Request) -> Response:
    """Exchange a token for a session cookie (the form posts it: never in a URL or a log)."""
    _guard(request)
    state = _state(request)
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _next((form.get("next") or [""])[0])
    who = authenticate(state.settings.tokens, f"Bearer {token}") if token else None
    if who is None or not state.settings.tokens:
        message = "That token is not valid." if token else "Enter a token."
        return _page("login.html", 401, next=target, error=message, error_hidden="")
    session_id, _ = state.sessions.open(who.name)
    log.info("console: %s signed in", who.name)
    response = RedirectResponse(target, status_code=303, headers=_HEADERS)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=state.sessions.lifetime_ms // 1000,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    _guard(request)
    state = _state(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    session = state.sessions.get(session_id)
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    if session is not None:
        if not csrf_matches(session, (form.get("csrf") or [""])[0]):
            raise HTTPException(403, "the console's CSRF token is missing or stale: reload")
        state.sessions.close(session_id)
        log.info("console: %s signed out", session.name)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303, headers=_HEADERS)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


__all__ = ["CONTENT_SECURITY_POLICY", "PREFIX", "router", "static"]
