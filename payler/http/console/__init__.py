"""The web console at ``/ui``: a face on the admin API for operators, served by the daemon.

- Pages (:mod:`payler.http.console.routes`): one HTML shell for every page (overview,
  scheduled, message, dead letters) and the login form; the pages are drawn in the browser by
  hand-written JavaScript modules (``static/``) from the ``/v1`` API's JSON — nothing the API
  cannot do, nothing computed from raw lists: rates, lateness, the due-time histogram and the
  reason groups are the API's.
- No CDN, no build step: the HTML, CSS and JavaScript are files of this package (package
  data), served as they are; no library is vendored.
- Security (:mod:`payler.http.sessions`): the API's — loopback without a token; with tokens,
  a login form that exchanges a token for an ``HttpOnly``, ``SameSite=Strict`` session cookie
  (``Secure`` over TLS); a CSRF token on every change; a strict Content-Security-Policy (no
  inline script, nothing from elsewhere).
"""

from payler.http.console.routes import router

__all__ = ["router"]
