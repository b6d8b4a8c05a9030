"""The real centrifuge-js SDK (npm, tests/js) against `/connection/websocket`: its JSON and
its Protobuf builds in Node 20 with `ws` (driven over stdin/stdout by tests/js/driver.mjs),
fossil deltas in both, and in headless Chromium (Debian's chromium driven by Playwright, no
browser download) the example chat page and the Protobuf build with deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from hub.centrifugo_session import CentrifugoSession
from tests.conftest import NAMESPACES
from tests.needs import need
from tests.redis_server import RedisServer
from tests.support import (
    WAIT,
    RunningNode,
    connect,
    eventually,
    make_settings,
    publish,
    running_node,
    token,
)
from tests.test_centrifugo_protobuf import delta_node, document

JS = Path(__file__).parent / "js"
SDK_BUILD = JS / "node_modules" / "centrifuge" / "dist" / "centrifuge.js"
PROTOBUF_BUILD = JS / "node_modules" / "centrifuge" / "dist" / "centrifuge.protobuf.js"
EXAMPLE_PAGE = Path(__file__).parent.parent / "examples" / "chat" / "index.html"
CHROMIUM = "/usr/bin/chromium"
HAVE_SDK = SDK_BUILD.exists()
HAVE_CHROMIUM = Path(CHROMIUM).exists()
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
Factory = Callable[..., RedisServer]


def address(ws_url: str) -> str:
    return ws_url.removesuffix("/ws") + "/connection/websocket"


class Driver:
    """centrifuge-js in a Node process: commands in, the app's events out."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def next(self, event: str, **fields: Any) -> dict[str, Any]:
        """The first event of that kind (and those fields) not taken yet (bounded)."""
        assert self.process.stdout is not None
        async with asyncio.timeout(WAIT):
            while True:
                for seen in self.events:
                    if seen["event"] == event and all(seen.get(k) == v for k, v in fields.items()):
                        self.events.remove(seen)
                        return seen
                line = await self.process.stdout.readline()
                assert line, "the SDK process ended"
                self.events.append(json.loads(line))

    async def publications(self, channel: str, count: int) -> list[tuple[int, Any]]:
        return [
            (got["offset"], got["data"])
            for got in [await self.next("publication", channel=channel) for _ in range(count)]
        ]


@contextlib.asynccontextmanager
async def sdk(ws_url: str, jwt: str, encoding: str = "json") -> AsyncIterator[Driver]:
    """centrifuge-js in Node; `encoding` "protobuf" takes its Protobuf build."""
    node = shutil.which("node")
    need(node is not None and HAVE_SDK, "node and tests/js/node_modules")
    assert node is not None
    process = await asyncio.create_subprocess_exec(
        node, str(JS / "driver.mjs"), address(ws_url), jwt, encoding, cwd=JS,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield Driver(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
async def test_centrifuge_js_in_node_connects_subscribes_and_publishes(
    node: RunningNode, encoding: str
) -> None:
    async with sdk(node.ws_url, token("jo"), encoding) as js, \
            connect(node.ws_url, token("wsu")) as ws, \
            sdk(node.ws_url, token("kim"), encoding) as other:
        await js.next("connected")
        await js.send(op="subscribe", channel="feed:js")
        subscribed = await js.next("subscribed", channel="feed:js")
        assert subscribed["recoverable"] and subscribed["offset"] == 0
        await ws.subscribe("feed:js")
        await publish(node, "feed:js", {"n": 1})
        await ws.request({"type": "publish", "channel": "feed:js", "data": {"n": 2}})
        assert await js.publications("feed:js", 2) == [(1, {"n": 1}), (2, {"n": 2})]
        await js.send(op="publish", channel="feed:js", data={"n": 3})
        async with asyncio.timeout(WAIT):
            while (got := await ws.expect("message"))["offset"] < 3:
                pass
        assert (got["data"], got["from"]) == ({"n": 3}, "jo")
        await js.send(op="history", channel="feed:js", limit=10)
        assert (await js.next("history"))["data"] == [{"n": 1}, {"n": 2}, {"n": 3}]

        await js.send(op="subscribe", channel="chat:js")
        await js.next("subscribed", channel="chat:js")
        await other.next("connected")
        await other.send(op="subscribe", channel="chat:js")
        await js.next("join", user="kim")
        await js.send(op="presence", channel="chat:js")
        assert (await js.next("presence"))["users"] == ["jo", "kim"]
        await other.send(op="unsubscribe", channel="chat:js")
        await js.next("leave", user="kim")

        await node.http.post("/api/send", json={"user": "jo", "data": "to jo"})
        personal = await js.next("personal")
        assert (personal["channel"], personal["data"]) == ("@jo", "to jo")


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
async def test_centrifuge_js_recovers_after_a_drop_and_reloads_after_a_reset(
    redis_factory: Factory, encoding: str
) -> None:
    server = redis_factory()
    settings = make_settings(redis_url=server.url, namespaces=NAMESPACES)
    async with running_node(settings) as running, \
            sdk(running.ws_url, token("rec"), encoding) as js:
        await js.send(op="subscribe", channel="feed:jsrec")
        await js.next("subscribed", channel="feed:jsrec")
        await publish(running, "feed:jsrec", 1)
        assert await js.publications("feed:jsrec", 1) == [(1, 1)]
        (session,) = [s for s in running.node.hub.sessions.values()
                      if isinstance(s, CentrifugoSession)]
        session._outbound.abort()
        await js.next("connecting")
        for n in (2, 3):
            await publish(running, "feed:jsrec", n)
        again = await js.next("subscribed", channel="feed:jsrec")
        assert (again["wasRecovering"], again["recovered"]) == (True, True)
        assert await js.publications("feed:jsrec", 2) == [(2, 2), (3, 3)]

        admin = redis.asyncio.Redis.from_url(server.url)
        try:
            await admin.flushall()  # history gone: the node resets the channel
            await admin.client_kill_filter(_type="pubsub")
        finally:
            await admin.aclose()
        await js.next("subscribing", channel="feed:jsrec", code=2500)
        reloaded = await js.next("subscribed", channel="feed:jsrec")
        assert (reloaded["wasRecovering"], reloaded["recovered"]) == (True, False)


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
async def test_centrifuge_js_stops_on_a_bad_token_and_on_api_disconnect(
    node: RunningNode, encoding: str
) -> None:
    async with sdk(node.ws_url, "not-a-jwt", encoding) as bad:
        stopped = await bad.next("disconnected")
        assert (stopped["code"], stopped["reason"]) == (3500, "invalid token")
    async with sdk(node.ws_url, token("gone"), encoding) as js:
        await js.next("connected")
        await node.http.post("/api/disconnect", json={"user": "gone"})
        assert (await js.next("disconnected"))["code"] == 3503


async def test_centrifuge_js_json_and_protobuf_clients_with_fossil_deltas() -> None:
    """Both builds in one channel, two with `delta: 'fossil'`: a changing 10 KB document
    arrives equal to what was published, live, through a recovery, and live again; the
    delta subscriptions counted deltas, the plain one none."""
    async with delta_node() as running, \
            sdk(running.ws_url, token("dj"), "json") as json_js, \
            sdk(running.ws_url, token("dp"), "protobuf") as pb_js, \
            sdk(running.ws_url, token("pp"), "protobuf") as plain:
        clients = [(json_js, "fossil"), (pb_js, "fossil"), (plain, None)]
        for js, delta in clients:
            await js.next("connected")
            await js.send(op="subscribe", channel="doc:js", delta=delta)
            await js.next("subscribed", channel="doc:js")
        for version in (1, 2, 3):
            await publish(running, "doc:js", document(version))
        for js, _ in clients:
            got = await js.publications("doc:js", 3)
            assert [data for _, data in got] == [document(v) for v in (1, 2, 3)]
        for session in list(running.node.hub.sessions.values()):
            if isinstance(session, CentrifugoSession):
                session._outbound.abort()
        for js, _ in clients:
            await js.next("connecting")
        for version in (4, 5, 6):
            await publish(running, "doc:js", document(version))
        for js, _ in clients:
            again = await js.next("subscribed", channel="doc:js")
            assert again["recovered"]
            got = await js.publications("doc:js", 3)
            assert [data for _, data in got] == [document(v) for v in (4, 5, 6)]
        await publish(running, "doc:js", document(7))
        for js, delta in clients:
            assert (await js.publications("doc:js", 1))[0][1] == document(7)
            await js.send(op="stats", channel="doc:js")
            stats = await js.next("stats")
            assert (stats["numDeltaPayloads"] > 0) == bool(delta), stats


@contextlib.asynccontextmanager
async def page_server(directory: Path) -> AsyncIterator[str]:
    app = Starlette(routes=[Mount("/", StaticFiles(directory=directory, html=True))])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, within=WAIT, what="the page server")
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)


async def test_the_example_chat_page_works_in_headless_chromium(
    node: RunningNode, tmp_path: Path
) -> None:
    """examples/chat/index.html with the SDK file of the npm package, as a user serves it:
    it joins a room, shows what the HTTP API publishes, and sends what is typed."""
    need(HAVE_CHROMIUM and HAVE_SDK, "chromium and tests/js/node_modules")
    from playwright.async_api import async_playwright

    shutil.copy(EXAMPLE_PAGE, tmp_path / "index.html")
    (tmp_path / "node_modules" / "centrifuge" / "dist").mkdir(parents=True)
    shutil.copy(SDK_BUILD, tmp_path / "node_modules" / "centrifuge" / "dist" / "centrifuge.js")
    async with page_server(tmp_path) as site, async_playwright() as playwright, \
            connect(node.ws_url, token("listener")) as listener:
        await listener.subscribe("chat:lobby")
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = await browser.new_page()
            query = f"?url={address(node.ws_url)}&room=chat:lobby&who={token('browser')}"
            await page.goto(site + "/index.html" + query)
            log = page.locator("#log")
            await log.get_by_text("joined chat:lobby").wait_for(timeout=WAIT * 1000)
            await publish(node, "chat:lobby", {"text": "hello from the API"})
            await log.get_by_text("hello from the API").wait_for(timeout=WAIT * 1000)
            await page.fill("#text", "hello from chromium")
            await page.press("#text", "Enter")
            async with asyncio.timeout(WAIT):
                while (got := await listener.recv()).get("from") != "browser":
                    pass
            assert got["data"] == {"text": "hello from chromium"}
        finally:
            await browser.close()


PROTOBUF_PAGE = """<!doctype html><meta charset="utf-8"><title>protobuf</title>
<script src="centrifuge.protobuf.js"></script>
<script>
  const query = new URLSearchParams(location.search);
  window.received = [];
  const client = new Centrifuge(query.get("url"), {token: query.get("token")});
  const sub = client.newSubscription("doc:page", {delta: "fossil"});
  sub.on("publication", (ctx) => {
    window.received.push(JSON.parse(new TextDecoder().decode(ctx.data)));
  });
  sub.on("subscribed", () => { window.subscribed = true; });
  window.say = (value) => sub.publish(new TextEncoder().encode(JSON.stringify(value)));
  sub.subscribe();
  client.connect();
</script>"""


async def test_the_protobuf_build_with_fossil_deltas_in_headless_chromium(
    tmp_path: Path,
) -> None:
    """dist/centrifuge.protobuf.js in a page: deltas of a 10 KB document applied by the
    browser equal what was published, and what it publishes reaches a JSON client."""
    need(HAVE_CHROMIUM and PROTOBUF_BUILD.exists(), "chromium and tests/js/node_modules")
    from playwright.async_api import async_playwright

    (tmp_path / "index.html").write_text(PROTOBUF_PAGE)
    shutil.copy(PROTOBUF_BUILD, tmp_path / "centrifuge.protobuf.js")
    async with delta_node() as running, page_server(tmp_path) as site, \
            async_playwright() as playwright, \
            sdk(running.ws_url, token("jl"), "json") as listener:
        await listener.send(op="subscribe", channel="doc:page")
        await listener.next("subscribed", channel="doc:page")
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = await browser.new_page()
            query = f"?url={address(running.ws_url)}&token={token('chrome')}"
            await page.goto(site + "/index.html" + query)
            await page.wait_for_function("window.subscribed === true", timeout=WAIT * 1000)
            for version in (1, 2, 3):
                await publish(running, "doc:page", document(version))
            await page.wait_for_function("window.received.length === 3", timeout=WAIT * 1000)
            assert await page.evaluate("window.received") == [document(v) for v in (1, 2, 3)]
            await page.evaluate("window.say({from: 'chromium'})")
            got = await listener.publications("doc:page", 4)
            assert got[-1][1] == {"from": "chromium"}
        finally:
            await browser.close()
