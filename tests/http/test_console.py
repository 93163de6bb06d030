"""The web console's server side, over real HTTP: pages and assets served from the package,
the login form and its session cookie, CSRF, DNS rebinding, the headers that lock a page down.
(The pages themselves are tested in a browser: tests/integration/test_console_browser.py.)"""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from tests.conftest import free_port
from tests.http.conftest import Daemon, Start

TOKEN = "console-token-0123456789abcdef"


async def with_token(start_daemon: Start) -> Daemon:
    return await start_daemon(
        http=f"{{port: {free_port()}, token: {TOKEN}, sample_interval_seconds: 0.05}}"
    )


async def test_pages_and_assets_are_served_from_the_package(start_daemon: Start) -> None:
    daemon = await start_daemon()
    for path in ("/ui", "/ui/scheduled", "/ui/scheduled/amqp%3Aq%3Am-1", "/ui/dead-letters"):
        page = await daemon.client.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/ui/static/app.js' in page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-frame-options"] == "DENY"
    # Every asset a page names is there; nothing comes from another host.
    shell = (await daemon.client.get("/ui")).text
    assets = set(re.findall(r'(?:src|href)="(/ui/static/[^"?]+)', shell))
    modules = ["app.js", "api.js", "ui.js", "pages/overview.js", "pages/scheduled.js",
               "pages/message.js", "pages/dead-letters.js"]  # fmt: skip
    assets |= {f"/ui/static/{name}" for name in modules}
    for asset in sorted(assets):
        served = await daemon.client.get(asset)
        assert served.status_code == 200, asset
        text = served.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert "http://" not in text and "https://" not in text, asset
        if asset.endswith(".js"):
            assert "javascript" in served.headers["content-type"]
    assert (await daemon.client.get("/ui/static/nothing.js")).status_code == 404
    # No login on loopback without tokens.
    assert (await daemon.client.get("/ui/login")).status_code == 303
    assert "/ui" not in str((await daemon.client.get("/openapi.json")).json()["paths"])


async def test_login_sets_a_locked_down_session_cookie_and_the_api_takes_it(
    start_daemon: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    daemon = await with_token(start_daemon)
    browser = httpx.AsyncClient(base_url=daemon.url, timeout=10)
    try:
        page = await browser.get("/ui/scheduled", params={"destination": "x"})
        assert page.status_code == 303
        assert page.headers["location"] == "/ui/login?next=%2Fui%2Fscheduled%3Fdestination%3Dx"
        assert (await browser.get("/v1/scheduled")).status_code == 401
        form = await browser.get("/ui/login")
        assert form.status_code == 200 and 'type="password"' in form.text

        wrong = await browser.post("/ui/login", data={"token": "nope", "next": "/ui"})
        assert wrong.status_code == 401 and "That token is not valid." in wrong.text
        assert "set-cookie" not in wrong.headers
        signed_in = await browser.post(
            "/ui/login", data={"token": TOKEN, "next": "https://elsewhere.example/"}
        )
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "/ui"  # never sent to another site
        cookie = signed_in.headers["set-cookie"]
        assert cookie.startswith("payler_session=")
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        assert "secure" not in attributes  # plain HTTP here; over TLS it is set
        assert TOKEN not in cookie

        shell = await browser.get("/ui")
        assert shell.status_code == 200
        csrf = re.search(r'name="payler-csrf" content="([^"]+)"', shell.text)
        assert csrf is not None
        # The cookie is a credential for the API: reads as they are, changes with the CSRF token.
        assert (await browser.get("/v1/scheduled")).status_code == 200
        new = {"destination": "out", "body": "x", "delay_ms": 3_600_000}
        refused = await browser.post("/v1/scheduled", json=new)
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
        done = await browser.post("/v1/scheduled", json=new, headers={"X-Payler-CSRF": csrf[1]})
        assert done.status_code == 201
        stale = await browser.post("/v1/scheduled", json=new, headers={"X-Payler-CSRF": "x" * 43})
        assert stale.status_code == 403

        # Sign out: the session ends (and needs the CSRF token too).
        assert (await browser.post("/ui/logout", data={"csrf": "wrong"})).status_code == 403
        out = await browser.post("/ui/logout", data={"csrf": csrf[1]})
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        browser.cookies.clear()
        browser.cookies.set("payler_session", cookie.split(";")[0].split("=", 1)[1])
        assert (await browser.get("/v1/scheduled")).status_code == 401
    finally:
        await browser.aclose()
    assert TOKEN not in caplog.text
    assert "console: token signed in" in caplog.text


async def test_secure_cookie_behind_a_tls_proxy(start_daemon: Start) -> None:
    daemon = await with_token(start_daemon)
    # uvicorn trusts X-Forwarded-Proto from a proxy on this machine (forwarded_allow_ips).
    signed_in = await daemon.client.post(
        "/ui/login", data={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"}
    )
    assert signed_in.status_code == 303
    assert "secure" in signed_in.headers["set-cookie"].lower()


async def test_requests_from_other_sites_and_rebound_names_are_refused(
    start_daemon: Start,
) -> None:
    daemon = await start_daemon()  # loopback, no token: any local program may call the API
    entry = "/v1/scheduled/none/deliver"
    assert (await daemon.client.post(entry)).status_code == 404  # curl, the CLI: no Origin
    own = {"Origin": daemon.url}
    assert (await daemon.client.post(entry, headers=own)).status_code == 404
    # A page of another site posting a form or a fetch to 127.0.0.1 (CSRF):
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        refused = await daemon.client.post(entry, headers=headers)
        assert refused.status_code == 403, headers
        assert "cannot change anything here" in refused.json()["detail"]
    assert (await daemon.client.get("/v1/scheduled", headers={"Origin": "https://x"})).is_success
    # A page of another site under a name of its own that resolves to 127.0.0.1 (rebinding):
    rebound = {"Host": f"rebind.example:{daemon.runtime.http.port}"}
    for path in ("/v1/scheduled", "/ui"):
        answer = await daemon.client.get(path, headers=rebound)
        assert answer.status_code == 403, path
    for host in ("localhost", "127.0.0.1", "[::1]", "app.localhost"):
        headers = {"Host": f"{host}:{daemon.runtime.http.port}"}
        assert (await daemon.client.get("/v1/scheduled", headers=headers)).status_code == 200
    assert (await daemon.client.get("/healthz", headers=rebound)).status_code == 200
    # With a token, the name does not matter: the token is what protects the server.
    protected = await with_token(start_daemon)
    headers = {"Host": "payler.internal:8000", "Authorization": f"Bearer {TOKEN}"}
    assert (await protected.client.get("/v1/scheduled", headers=headers)).status_code == 200
