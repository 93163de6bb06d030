"""Browser sessions of the web console, and the checks that keep a browser's requests honest.

- **Sessions.** When tokens are configured, the console's login form takes a token once and
  answers with a session cookie (``payler_session``: ``HttpOnly``, ``SameSite=Strict``,
  ``Secure`` when the request came over TLS, ``Path=/``). The cookie holds a random session id,
  never the token; the session (the token's name, a CSRF token, an expiry) lives in this
  process' memory, so a restart signs everyone out. The admin API accepts the cookie as it
  accepts ``Authorization: Bearer``.
- **CSRF.** A state-changing request (anything but GET, HEAD, OPTIONS) authenticated by the
  cookie must carry the session's CSRF token in the ``X-Payler-CSRF`` header (a synchronizer
  token, which another site cannot read); on top of ``SameSite=Strict``, and whatever the
  authentication, a state-changing request that a browser marks as coming from another site
  (``Sec-Fetch-Site``, or an ``Origin`` that is not this server's) is refused.
- **DNS rebinding.** Without tokens (loopback only), a page of another site could still reach
  ``127.0.0.1`` by a name of its own resolving there: then the ``Host`` header must be an IP
  address or ``localhost``.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from payler.clock import Clock, SystemClock

#: The session cookie's name.
SESSION_COOKIE = "payler_session"
#: The header a cookie-authenticated change must carry the session's CSRF token in.
CSRF_HEADER = "x-payler-csrf"
#: How long a console session lasts after its login.
SESSION_LIFETIME_S = 12 * 3600
#: Sessions kept at most (the oldest are dropped first).
MAX_SESSIONS = 1000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: whose token it presented, and its CSRF token."""

    name: str
    csrf: str = field(repr=False)
    expires_ms: int


class Sessions:
    """The console's sessions, in memory (see the module docstring)."""

    def __init__(self, clock: Clock | None = None, lifetime_s: float = SESSION_LIFETIME_S) -> None:
        self.clock: Clock = clock or SystemClock()
        self.lifetime_ms = int(lifetime_s * 1000)
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, name: str) -> tuple[str, Session]:
        """A new session for the token named ``name``: its id (the cookie) and itself."""
        session_id = secrets.token_urlsafe(32)
        session = Session(name, secrets.token_urlsafe(32), self.clock.now_ms() + self.lifetime_ms)
        self._sessions[session_id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id, or ``None`` (unknown, or expired: then forgotten)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is not None and session.expires_ms <= self.clock.now_ms():
            del self._sessions[session_id]
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)


def csrf_matches(session: Session, presented: str | None) -> bool:
    return presented is not None and secrets.compare_digest(
        session.csrf.encode(), presented.encode()
    )


def cross_site(method: str, headers: Mapping[str, str], scheme: str) -> str | None:
    """Why a state-changing request looks sent by another site's page, or ``None``."""
    if method.upper() in SAFE_METHODS:
        return None
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"a {site} request cannot change anything here"
    origin = headers.get("origin")
    host = headers.get("host")
    if origin is not None and origin != f"{scheme}://{host}":
        return "a request from another origin cannot change anything here"
    return None


def refusal(
    method: str, headers: Mapping[str, str], scheme: str, *, open_access: bool
) -> str | None:
    """Why a request to ``/v1`` or ``/ui`` is refused before any authentication (403), or
    ``None``: a foreign ``Host`` while no token protects the server (``open_access``), or a
    state-changing request from another site."""
    if open_access and not local_host(headers.get("host")):
        return (
            "no token is configured, so this server only answers requests addressed to an IP "
            "address or localhost"
        )
    return cross_site(method, headers, scheme)


def local_host(host_header: str | None) -> bool:
    """Whether a ``Host`` header names this machine by address or as ``localhost`` (what a
    DNS-rebinding page cannot: its requests carry its own domain name)."""
    if not host_header:
        return False
    host = host_header
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


__all__ = [
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Session",
    "Sessions",
    "cross_site",
    "csrf_matches",
    "local_host",
    "refusal",
]
