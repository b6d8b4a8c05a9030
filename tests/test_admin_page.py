"""`GET /admin` (PROTOCOL §12) in headless Chromium: Debian's `chromium` driven by
Playwright's Python package (`executable_path`; no browser is ever downloaded).

An operator signs in with the API key, sees the connections this test opened, picks a
channel (presence, history), publishes from the console and sends to a user, and this
test's WebSocket clients receive both. `HUB_UPDATE_SCREENSHOT=1` writes the screenshot to
docs/admin.png (else to the test's temp dir).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from tests.needs import need
from tests.support import (
    API_KEY,
    WAIT,
    RunningNode,
    connect,
    make_settings,
    next_message,
    publish,
    running_node,
    token,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "admin.png"
NAMESPACES = {
    "chat": {"subscribe": "any", "publish": "any", "presence": True, "history_size": 50,
             "history_ttl": 600},
    "orders": {"subscribe": "any", "presence": True},
}
UI_WAIT_MS = WAIT * 1000


def check_chromium() -> None:
    """Skip without Debian's chromium; in CI (HUB_REQUIRE_REDIS=1, where .ci/run installs
    it) its absence is a failure."""
    need(CHROMIUM.exists(), "/usr/bin/chromium (Debian package chromium)")


@contextlib.asynccontextmanager
async def browser(profile: Path) -> AsyncIterator[BrowserContext]:
    check_chromium()
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 900}, timeout=30_000,
        )
        try:
            context.set_default_timeout(UI_WAIT_MS)
            yield context
        finally:
            await context.close()


async def sign_in(page: Page, url: str) -> None:
    await page.goto(url + "/admin")
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#login-key", API_KEY)
    await page.click("#login-submit")
    await expect(page.locator("#main")).to_be_visible()


async def test_operator_signs_in_watches_and_publishes(tmp_path: Path) -> None:
    settings = make_settings(namespaces=NAMESPACES, node_id="node-a")
    async with running_node(settings) as node, \
            connect(node.ws_url, token("alice", info={"name": "Alice"})) as alice, \
            connect(node.ws_url, token("bob")) as bob, \
            browser(tmp_path / "profile") as context:
        await alice.subscribe("chat:lobby")
        await bob.subscribe("chat:lobby")
        await bob.subscribe("orders:eu")
        for text in ("good morning", "standup in 5"):
            await publish(node, "chat:lobby", {"text": text}, event="say")
        for client in (alice, bob):
            for _ in range(2):
                await next_message(client, "chat:lobby")

        page = await context.new_page()
        await sign_in(page, node.url)
        assert await page.evaluate("sessionStorage.getItem('hub.apiKey')") == API_KEY

        # the two connections this test opened, on the one node
        await expect(page.locator("#total-connections")).to_have_text("2")
        node_row = page.locator("#nodes tbody tr", has_text="node-a")
        await expect(node_row.locator("td").nth(1)).to_have_text("2")
        channels = page.locator("#channels tbody tr")
        await expect(channels).to_have_count(2)
        await expect(page.locator("#channels tbody tr", has_text="chat:lobby")).to_contain_text(
            "2")

        # the prefix filter
        await page.fill("#channel-prefix", "orders")
        await expect(channels).to_have_count(1)
        await expect(channels.first).to_contain_text("orders:eu")
        await page.fill("#channel-prefix", "")
        await expect(channels).to_have_count(2)

        # presence and history of a chosen channel
        await page.locator("#channels tbody tr", has_text="chat:lobby").click()
        await expect(page.locator("#selected-name")).to_have_text("chat:lobby")
        presence = page.locator("#presence tbody tr")
        await expect(presence).to_have_count(2)
        await expect(page.locator("#presence tbody")).to_contain_text('{"name":"Alice"}')
        await expect(page.locator("#history tbody tr")).to_have_count(2)

        # the console: publish to the channel, the test's clients receive it
        await page.fill("#publish-channel", "chat:lobby")
        await page.fill("#publish-event", "announce")
        await page.fill("#publish-data", '{"text": "hello from the console"}')
        await page.click("#publish-submit")
        frame = await next_message(alice, "chat:lobby")
        assert frame["data"] == {"text": "hello from the console"}
        assert frame["event"] == "announce" and "from" not in frame
        assert (await next_message(bob, "chat:lobby"))["offset"] == frame["offset"]
        await expect(page.locator("#publish-result")).to_contain_text(
            f"published to chat:lobby at offset {frame['offset']}")
        await expect(page.locator("#history tbody tr")).to_have_count(3)
        await expect(page.locator("#history tbody tr").first).to_contain_text("announce")

        # ... and send to one user
        await page.fill("#send-user", "alice")
        await page.fill("#send-data", '{"text": "just for you"}')
        await page.click("#send-submit")
        personal = await next_message(alice, "@alice")
        assert personal["data"] == {"text": "just for you"}
        await expect(page.locator("#send-result")).to_have_text("sent to alice")

        # a console error is shown, not swallowed
        await page.fill("#publish-channel", "no spaces allowed")
        await page.click("#publish-submit")
        await expect(page.locator("#publish-result")).to_contain_text("400 invalid_channel")
        await page.fill("#publish-channel", "chat:lobby")
        await page.fill("#publish-event", "")
        await page.fill("#publish-data", '{"text": "hello from the console"}')
        await expect(page.locator("#status-text")).to_contain_text("live")

        await page.locator("#publish-result").evaluate("node => node.textContent = ''")
        shot = SCREENSHOT if os.environ.get("HUB_UPDATE_SCREENSHOT") == "1" \
            else tmp_path / "admin.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


async def test_a_wrong_key_is_refused_and_signing_out_forgets_the_key(tmp_path: Path) -> None:
    async with running_node(make_settings()) as node, browser(tmp_path / "profile") as context:
        page = await context.new_page()
        await page.goto(node.url + "/admin")
        await page.fill("#login-key", "not the key")
        await page.click("#login-submit")
        await expect(page.locator("#login-error")).to_have_text("Wrong API key.")
        await expect(page.locator("#main")).to_be_hidden()
        await page.fill("#login-key", API_KEY)
        await page.click("#login-submit")
        await expect(page.locator("#main")).to_be_visible()
        await page.reload()  # the key lives in the tab's session storage
        await expect(page.locator("#main")).to_be_visible()
        await page.click("#logout")
        await expect(page.locator("#login")).to_be_visible()
        assert await page.evaluate("sessionStorage.getItem('hub.apiKey')") is None


async def test_dev_mode_needs_no_key_and_the_root_page_links_here(tmp_path: Path) -> None:
    async with running_node(make_settings(dev=True, api_key=None)) as node, \
            connect(node.ws_url, query="user=carol") as carol, \
            browser(tmp_path / "profile") as context:
        page = await context.new_page()
        await page.goto(node.url + "/")
        await page.click("text=Admin page")
        await expect(page.locator("#main")).to_be_visible()
        await expect(page.locator("#login")).to_be_hidden()
        await expect(page.locator("#mode")).to_have_text("dev mode")
        await expect(page.locator("#total-connections")).to_have_text("1")
        await page.fill("#send-user", "carol")
        await page.click("#send-submit")
        assert (await next_message(carol, "@carol"))["data"] == {"text": "hi"}
        await page.goto(node.url + "/")
        async with page.expect_response("**/openapi.json") as response_info:
            await page.click("text=HTTP API (OpenAPI 3.1)")
        document = json.loads(await (await response_info.value).body())
        assert document["openapi"] == "3.1.0"


async def test_page_and_assets_are_self_contained(node: RunningNode) -> None:
    """No external asset: every URL the page names is relative, and a strict CSP says so."""
    async with httpx.AsyncClient(base_url=node.url, timeout=WAIT) as bare:
        page = await bare.get("/admin")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace('http-equiv', '')
        for asset, kind in (("admin.js", "text/javascript"), ("admin.css", "text/css")):
            response = await bare.get(f"/admin/{asset}")
            assert response.status_code == 200, asset
            assert response.headers["content-type"].startswith(kind)
            assert "://" not in response.text, asset
        assert (await bare.get("/admin/admin.html")).status_code == 404
        assert (await bare.get("/admin/secrets.txt")).status_code == 404
        assert (await bare.get("/")).status_code == 404  # the link page is for dev mode
