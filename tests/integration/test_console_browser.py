"""The web console in a real browser (Debian's Chromium, driven by Playwright) against payler run
as users run it, with RabbitMQ and a SQLite spool: an operator signs in, finds a message by its
correlation id, cancels it (the spool no longer holds it), reschedules another (it arrives),
and replays a dead letter (it arrives on its queue) — without reading any docs.

Screenshots of each page, at a laptop's and a phone's width, go to a temporary folder, or to
``PAYLER_CONSOLE_SCREENSHOTS`` (``docs/console`` refreshes the README's pictures).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aio_pika
import httpx
import pytest

from payler.drivers.storages import storage_from_url
from tests.conftest import AMQP_URL, Rabbit, free_port
from tests.http.conftest import eventually
from tests.integration.conftest import Payler

pytestmark = [pytest.mark.rabbitmq, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
#: The flags the console's tests launch Chromium with: headless, offline, nothing of its own.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
TOKEN = "browser-test-token-0123456789abcdef"
ZONE = "Europe/Paris"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
#: How long a page may take to show what the test waits for (a loaded, shared machine).
UI_TIMEOUT_MS = 20_000
HOUR = 3_600_000


def need_chromium() -> None:
    missing = not Path(CHROMIUM).exists()
    try:
        import playwright.async_api  # noqa: F401, PLC0415 - only these tests need it
    except ImportError:
        missing = True
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} or Playwright is missing: .ci/run installs them")
        pytest.skip(f"needs {CHROMIUM} (apt-get install chromium) and playwright (pip)")


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PAYLER_CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def browser_page(tmp_path: Path) -> AsyncIterator[object]:
    """A page of a fresh headless Chromium (its own user-data dir), in Paris time."""
    need_chromium()
    from playwright.async_api import async_playwright  # noqa: PLC0415

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=LAPTOP,
            timezone_id=ZONE,
            locale="en-GB",
        )
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield context.pages[0] if context.pages else await context.new_page()
        finally:
            await context.close()


def write_config(path: Path, rabbit: Rabbit, port: int) -> dict[str, str]:
    queues = {role: rabbit.queue_name(role) for role in ("jobs", "out", "dlq", "later")}
    path.write_text(
        f"""
workflows:
  - name: ingest
    callable: client.process_queue
    options: {{queue: "{queues["jobs"]}", default_destination: "{queues["out"]}",
               dead_letter_queue: "{queues["dlq"]}"}}
  - name: deliver
    callable: client.watch_storage
    options: {{declare_queues: ["{queues["out"]}"], dead_letter_queue: "{queues["dlq"]}",
               max_poll_interval_ms: 100}}
http: {{port: {port}, token: "{TOKEN}", sample_interval_seconds: 0.5}}
"""
    )
    return queues


async def publish(rabbit: Rabbit, queue: str, body: bytes, **fields: object) -> None:
    await rabbit.publish(queue, aio_pika.Message(body, **fields))  # type: ignore[arg-type]


async def test_an_operator_finds_cancels_reschedules_and_replays(
    rabbit: Rabbit, browser_page: object, shots: Path, tmp_path: Path
) -> None:
    from playwright.async_api import Page, expect  # noqa: PLC0415

    page = browser_page
    assert isinstance(page, Page)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    port = free_port()
    queues = write_config(tmp_path / "configuration.yaml", rabbit, port)
    storage_url = f"sqlite:///{tmp_path}/spool.db"
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": storage_url}
    payler = await (await Payler.start(tmp_path / "configuration.yaml", env, tmp_path)).running()
    base = f"http://127.0.0.1:{port}"
    api = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    async def shoot(name: str) -> None:
        for width, size in (("laptop", LAPTOP), ("phone", PHONE)):
            await page.set_viewport_size(size)
            # A laptop's page whole; a phone's first screen, as a person holding it sees it.
            await page.screenshot(
                path=str(shots / f"{name}-{width}.png"), full_page=width == "laptop"
            )
        await page.set_viewport_size(LAPTOP)

    try:
        # Orders due over the next day, one of them with a binary body; two bad messages.
        for n, hours in enumerate([0.4, 1, 1.5, 2, 2.2, 3, 5, 5.5, 6, 9, 13, 20]):
            body = json.dumps({"order": 40 + n, "total": 19.5 + n}).encode()
            await publish(rabbit, queues["jobs"], body, message_id=f"m-{40 + n}",
                          correlation_id=f"order-{40 + n}", content_type="application/json",
                          headers={"x-delay": int(hours * HOUR), "tenant": "acme"})  # fmt: skip
        await publish(rabbit, queues["jobs"], bytes(range(40)), message_id="m-binary",
                      correlation_id="blob-1", headers={"x-delay": 7_200_000})  # fmt: skip
        await publish(rabbit, queues["jobs"], b'{"order": 99}', message_id="m-lost",
                      correlation_id="order-99",
                      headers={"x-delay": 0, "x-destination": queues["later"]})  # fmt: skip
        await publish(rabbit, queues["jobs"], b'{"order": 98}', message_id="m-soon",
                      correlation_id="order-98", headers={"x-delay": "soon"})  # fmt: skip

        async def settled() -> bool:
            count = (await api.get("/v1/scheduled/count")).json()
            reasons = (await api.get("/v1/dead-letters/reasons")).json()
            return bool(count["pending"] == 13 and reasons["total"] == 2)

        await eventually(settled, 30)

        # Sign in: the console asks for a token once.
        await page.goto(f"{base}/ui")
        await expect(page).to_have_url(re.compile(r"/ui/login\?next="))
        await expect(page.get_by_role("heading", name="Sign in to the console")).to_be_visible()
        await shoot("login")
        await page.get_by_label("Token").fill(TOKEN)
        await page.get_by_role("button", name="Sign in").click()

        # Overview: every workflow ready, the backlog, rates.
        await expect(page.get_by_text("All workflows ready")).to_be_visible()
        await expect(page.locator(".tile", has_text="Scheduled")).to_contain_text("13")
        await expect(page.get_by_role("cell", name="deliver")).to_be_visible()
        await shoot("overview")

        # Scheduled: the chart and the list; find one by its correlation id.
        await page.get_by_role("link", name="Scheduled").first.click()
        await expect(page.locator(".bar")).to_have_count(24)
        await expect(page.locator("table.entries tbody tr")).to_have_count(13)
        await expect(page.get_by_text("13 pending")).to_be_visible()
        await shoot("scheduled")
        await page.get_by_label("Search by").select_option("correlation_id")
        await page.get_by_label("Search term").fill("order-42")
        await page.get_by_role("button", name="Search").click()
        rows = page.locator("table.entries tbody tr")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("m-42")
        # Times are the browser's (Paris), with UTC on hover.
        due = rows.first.locator("time")
        assert (await due.get_attribute("title") or "").endswith(" UTC")
        await rows.first.get_by_role("link").click()

        # Message: its body, headers and properties; cancel it.
        await expect(page.get_by_role("heading", name="Headers")).to_be_visible()
        await expect(page.locator("pre.body")).to_contain_text('"order": 42')
        await expect(page.get_by_role("cell", name="tenant")).to_be_visible()
        cancelled_id = page.url.rsplit("/", 1)[1]
        await shoot("message")
        await page.get_by_role("button", name="Hex").click()
        await expect(page.locator("pre.body")).to_contain_text("00000000  7b 22 6f 72")
        await page.get_by_role("button", name="Cancel message…").click()
        dialog = page.locator("dialog[open]")
        await expect(dialog).to_contain_text("Cancel this message?")
        await dialog.get_by_role("button", name="Cancel it").click()
        await expect(page.locator(".notice-ok")).to_contain_text("Cancelled")
        await expect(page.get_by_text("Cancelled", exact=True)).to_be_visible()
        async with storage_from_url(storage_url) as storage:
            assert await storage.get(httpx.URL(f"/{cancelled_id}").path[1:]) is None
            assert await storage.get("amqp:" + queues["jobs"] + ":m-42") is None
            assert await storage.count() == 12

        # Reschedule another to a few seconds from now with the date-time picker: it arrives.
        await page.get_by_role("link", name="← Scheduled").click()
        await page.get_by_label("Search term").fill("order-41")
        await page.get_by_role("button", name="Search").click()
        await expect(page.locator("table.entries tbody tr")).to_have_count(1)
        await page.locator("table.entries tbody tr").first.get_by_role("link").click()
        soon = datetime.now(ZoneInfo(ZONE)) + timedelta(seconds=3)
        await page.get_by_label(re.compile("Reschedule to")).fill(
            soon.strftime("%Y-%m-%dT%H:%M:%S")
        )
        await page.get_by_role("button", name="Reschedule", exact=True).click()
        dialog = page.locator("dialog[open]")
        await expect(dialog).to_contain_text("Reschedule at")
        await dialog.get_by_role("button", name="Reschedule").click()
        await expect(page.locator(".notice-ok")).to_contain_text("Rescheduled: due")
        [(_, delivered)] = await rabbit.collect(queues["out"], 1, timeout_s=30)
        assert (delivered.body, delivered.correlation_id) == (b'{"order": 41, "total": 20.5}',
                                                              "order-41")  # fmt: skip
        assert "x-delay" not in (delivered.headers or {})
        await page.reload()
        await expect(page.get_by_text("This message is no longer scheduled")).to_be_visible()

        # Dead letters: grouped by reason; replay the unroutable one once its queue exists.
        await page.get_by_role("link", name="Dead letters").click()
        await expect(page.locator(".reason")).to_have_count(3)  # all, unroutable, invalid
        await expect(page.locator("table.dead tbody tr")).to_have_count(2)
        await shoot("dead-letters")
        await page.get_by_role("link", name=re.compile("^Unroutable")).click()
        await expect(page.locator("table.dead tbody tr")).to_have_count(1)
        await expect(page.locator(".hint")).to_contain_text("Create it, then replay")
        await shoot("dead-letters-reason")
        await expect(page.locator("table.dead")).to_contain_text("m-lost")
        await rabbit.channel.declare_queue(queues["later"], durable=True)
        await page.locator("table.dead tbody tr").first.get_by_role("button", name="Replay").click()
        dialog = page.locator("dialog[open]")
        await dialog.get_by_role("button", name="Replay").click()
        await expect(page.locator(".notice-ok")).to_contain_text("Replayed 1 message.")
        [(_, replayed)] = await rabbit.collect(queues["later"], 1, timeout_s=30)
        assert (replayed.body, replayed.message_id) == (b'{"order": 99}', "m-lost")
        assert not any(k.startswith("x-payler-dead-letter") for k in replayed.headers or {})
        await expect(page.get_by_text("No dead letters for this reason")).to_be_visible()
        assert await rabbit.count(queues["dlq"]) == 1  # the invalid one waits

        # Keyboard: "/" goes to the search box; Escape closes a confirmation without acting.
        await page.get_by_role("link", name="Scheduled").first.click()
        await expect(page.locator("table.entries tbody tr")).to_have_count(11)
        await page.keyboard.press("/")
        await expect(page.get_by_label("Search term")).to_be_focused()
        await page.locator("table.entries tbody tr").first.get_by_role("link").click()
        await page.get_by_role("button", name="Deliver now").focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("dialog[open]")).to_be_visible()
        await page.keyboard.press("Escape")
        await expect(page.locator("dialog[open]")).to_have_count(0)
        await expect(page.locator(".notice")).to_have_count(0)

        # Sign out: back to the login form.
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("heading", name="Sign in to the console")).to_be_visible()
    finally:
        await api.aclose()
        assert await payler.stop() == 0, payler.log
    # The token never travelled in a URL, and payler never logged it.
    assert not [url for url in requested if TOKEN in url]
    assert TOKEN not in payler.log
    assert not [url for url in requested if not url.startswith(base)]  # nothing from elsewhere
