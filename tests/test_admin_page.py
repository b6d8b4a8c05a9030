"""`GET /admin` (PROTOCOL §12) in headless Chromium: Debian's `chromium` driven by
Playwright's Python package (`executable_path`; no browser is ever downloaded).

An operator signs in with the API key, sees the connections this test opened, picks a
channel (presence, history), publishes from the console and sends to a user, and this
test's WebSocket clients receive both. Then acts: finds a connection by user and channel,
disconnects it (confirmed) and the client is closed with the API's code, unsubscribes one
(where the hub has `/api/unsubscribe`), removes a channel's history, watches the rate
charts draw, and the page stays within a phone's width and logs no console error on a
namespace without presence or history. `HUB_UPDATE_SCREENSHOT=1` writes the screenshots
to docs/admin.png (1280 px wide) and docs/admin-phone.png (420 px) (else to the test's
temp dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
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
DOCS = Path(__file__).resolve().parents[1] / "docs"
NAMESPACES = {
    "chat": {"subscribe": "any", "publish": "any", "presence": True, "history_size": 50,
             "history_ttl": 600},
    "orders": {"subscribe": "any", "presence": True},
    "plain": {"subscribe": "any"},
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
        await expect(node_row.locator("td").nth(4)).to_have_text("2")
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


def screenshot_path(tmp_path: Path, name: str) -> Path:
    return DOCS / name if os.environ.get("HUB_UPDATE_SCREENSHOT") == "1" else tmp_path / name


async def test_operator_acts_on_connections_and_watches_rates(tmp_path: Path) -> None:
    settings = make_settings(namespaces=NAMESPACES, node_id="node-a")
    async with running_node(settings) as node, \
            connect(node.ws_url, token("alice", info={"name": "Alice"})) as alice, \
            connect(node.ws_url, token("bob")) as bob, \
            connect(node.ws_url, token("carol")) as carol, \
            browser(tmp_path / "profile") as context:
        for client, channel in ((alice, "chat:lobby"), (bob, "chat:lobby"), (bob, "orders:eu"),
                                (carol, "plain:room")):
            await client.subscribe(channel)
        page = await context.new_page()
        await page.set_viewport_size({"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text)
                if message.type in ("error", "warning") else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        await sign_in(page, node.url)

        # the connections, each with where it came from and what it is subscribed to
        rows = page.locator("#connections tbody tr")
        await expect(rows).to_have_count(3)
        bob_row = page.locator(f"#connections tbody tr[data-client='{bob.welcome['client']}']")
        await expect(bob_row).to_contain_text("127.0.0.1:")
        await expect(bob_row).to_contain_text("websockets")  # its user agent
        await expect(bob_row.locator(".chip")).to_have_count(2)
        await expect(page.locator("#nodes tbody tr", has_text="node-a")).to_contain_text(
            "ready")

        # search by user, then by channel
        await page.fill("#conn-user", "alice")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text(alice.welcome["client"])
        await page.fill("#conn-user", "")
        await page.fill("#conn-channel", "orders:eu")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("bob")
        await page.fill("#conn-channel", "")
        await expect(rows).to_have_count(3)

        # disconnect, cancelled: nothing happens
        await bob_row.locator("button.disconnect").click()
        await expect(page.locator("#confirm")).to_be_visible()
        await expect(page.locator("#confirm-text")).to_contain_text(bob.welcome["client"])
        await page.click("#confirm-no")
        await expect(page.locator("#confirm")).to_be_hidden()
        assert (await bob.request({"type": "ping"}))["type"] == "pong"

        # disconnect, confirmed: the client is closed with the API's code
        alice_row = page.locator(f"#connections tbody tr[data-client='{alice.welcome['client']}']")
        await alice_row.locator("button.disconnect").click()
        await page.click("#confirm-yes")
        assert await alice.closed() == 4003
        await expect(rows).to_have_count(2)
        await expect(page.locator("#action-result")).to_contain_text("disconnected")

        # unsubscribe one connection from one channel (confirmed): the client is told
        await bob_row.locator(".chip[data-channel='orders:eu'] button").click()
        await expect(page.locator("#confirm-text")).to_contain_text("orders:eu")
        await page.click("#confirm-yes")
        await expect(bob_row.locator(".chip")).to_have_count(1)
        async with asyncio.timeout(WAIT):
            while (frame := await bob.recv())["type"] != "unsubscribed":
                pass
        assert frame == {"type": "unsubscribed", "channel": "orders:eu"}
        await expect(page.locator("#action-result")).to_contain_text("unsubscribed")

        # the rate charts draw what was published and delivered
        for number in range(30):
            await publish(node, "chat:lobby", {"n": number})
        await expect(page.locator("#rate-published")).not_to_have_text("0.00", timeout=10_000)
        await expect(page.locator("#chart-published")).to_have_attribute(
            "data-points", re.compile(r"^([3-9]|\d\d+)$"))
        for chart in ("published", "delivered", "connections"):
            painted = await page.locator(f"#chart-{chart}").evaluate(
                """canvas => {
                    const data = canvas.getContext("2d")
                        .getImageData(0, 0, canvas.width, canvas.height).data;
                    let painted = 0;
                    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
                    return painted;
                }""")
            assert painted > 200, chart

        # a namespace without presence or history: no request that fails, so no console noise
        await page.fill("#inspect-channel", "plain:room")
        await page.click("#inspect-form button")
        await expect(page.locator("#presence-note")).to_have_text(
            "Off for this channel's namespace.")
        await expect(page.locator("#history-remove")).to_be_hidden()
        before = await page.locator("#status-text").text_content()
        await expect(page.locator("#status-text")).not_to_have_text(before or "")
        await expect(page.locator("#status-text")).not_to_have_text(
            await page.locator("#status-text").text_content() or "")

        # history removal (confirmed)
        await page.locator("#channels tbody tr", has_text="chat:lobby").click()
        await expect(page.locator("#history tbody tr")).to_have_count(20)
        await page.click("#history-remove")
        await page.click("#confirm-yes")
        await expect(page.locator("#history tbody tr")).to_have_count(0)
        await expect(page.locator("#action-result")).to_contain_text("removed the history")
        history = (await node.http.get("/api/history/chat:lobby")).json()
        assert history["messages"] == []

        await page.locator("#action-result").evaluate("node => node.textContent = ''")
        wide = screenshot_path(tmp_path, "admin.png")
        await page.screenshot(path=str(wide), full_page=True)
        assert wide.stat().st_size > 10_000

        # a phone's width: nothing wider than the screen (tables scroll inside their cards)
        await page.set_viewport_size({"width": 420, "height": 900})
        await expect(page.locator("#status-text")).to_contain_text("live")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 420, width
        for card in await page.locator("section.card").all():
            box = await card.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 420
        narrow = screenshot_path(tmp_path, "admin-phone.png")
        await page.screenshot(path=str(narrow), full_page=True)
        assert problems == [], problems
