"""PROTOCOL §15 through a real load balancer: three nodes sharing a private Redis behind the
repo's nginx config (deploy/nginx.conf.template, least_conn, so a session's POSTs land on
other nodes than its stream), and headless Chromium (Debian's, driven by Playwright):
centrifuge-js with only its `http_stream` or `sse` transport (its JSON build, and its Protobuf
build on `http_stream`, beside a JSON emulated client in the channel), and a plain
`EventSource` on `/connection/uni_sse`, each cut off mid-stream and coming back without a
gap."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.streams import StreamOutbound
from tests.conftest import NAMESPACES
from tests.needs import need
from tests.redis_server import free_port
from tests.support import (
    WAIT,
    RunningNode,
    eventually,
    http_client,
    make_settings,
    metric,
    publish,
    running_node,
    token,
)
from tests.test_centrifugo_js import (
    CHROMIUM,
    HAVE_CHROMIUM,
    HAVE_SDK,
    PROTOBUF_BUILD,
    SDK_BUILD,
    page_server,
)
from tests.test_streams import emulated

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf.template"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"]

SDK_PAGE = """<!doctype html><meta charset="utf-8"><script src="centrifuge.js"></script><script>
const q = new URLSearchParams(location.search);
const lb = q.get("lb"), transports = q.get("transport").split(",");
// The Protobuf build (centrifuge.js is then dist/centrifuge.protobuf.js) carries bytes.
const binary = q.get("build") === "protobuf";
const decode = (data) => binary ? JSON.parse(new TextDecoder().decode(data)) : data;
const encode = (data) => binary ? new TextEncoder().encode(JSON.stringify(data)) : data;
window.events = [];
const say = (event) => window.events.push(event);
// Only the fallbacks are listed: the SDK never tries a WebSocket.
const client = new Centrifuge(transports.map(
  (transport) => ({transport, endpoint: lb + "/connection/" + transport})), {
  token: q.get("token"), emulationEndpoint: lb + "/emulation",
  minReconnectDelay: 800, maxReconnectDelay: 1200,
});
client.on("connected", (ctx) => say({event: "connected", transport: ctx.transport}));
client.on("disconnected", (ctx) => say({event: "disconnected", code: ctx.code}));
const sub = client.newSubscription(q.get("channel"));
sub.on("subscribed", (ctx) => say({event: "subscribed", recovered: ctx.recovered,
                                   wasRecovering: ctx.wasRecovering}));
sub.on("publication", (ctx) => say({event: "publication", data: decode(ctx.data),
                                     offset: ctx.offset}));
window.publish = (data) => sub.publish(encode(data)).then(() => say({event: "published"}),
                                                  (e) => say({event: "failed", code: e.code}));
sub.subscribe();
client.connect();
</script>"""

EVENTSOURCE_PAGE = """<!doctype html><meta charset="utf-8"><script>
const q = new URLSearchParams(location.search);
window.events = [];
const connect = JSON.stringify({token: q.get("token")});
const source = new EventSource(q.get("lb") + "/connection/uni_sse?cf_connect="
                               + encodeURIComponent(connect));
source.onopen = () => window.events.push({open: true});
source.onmessage = (e) => window.events.push({id: e.lastEventId, push: JSON.parse(e.data)});
</script>"""


@dataclass
class Balanced:
    url: str
    nodes: list[RunningNode]


@contextlib.contextmanager
def nginx(state: Path, ports: list[int]) -> Iterator[str]:
    """The repo's nginx config in front of `ports`, as deploy/local-cluster.sh renders it."""
    assert NGINX is not None
    listen = free_port()
    (state / "tmp").mkdir(parents=True)
    servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=2 fail_timeout=5s;"
                        for port in ports)
    conf = (TEMPLATE.read_text().replace("@STATE_DIR@/nginx", str(state))
            .replace("@UPSTREAM_SERVERS@", servers).replace("@LISTEN@", f"127.0.0.1:{listen}"))
    (state / "nginx.conf").write_text(conf)
    process = subprocess.Popen(
        [NGINX, "-p", str(state), "-c", str(state / "nginx.conf"), "-e",
         str(state / "error.log"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{listen}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
async def balanced(redis_url: str, tmp_path: Path) -> AsyncIterator[Balanced]:
    need(NGINX, "nginx (apt-get install nginx)")
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(running_node(make_settings(
                redis_url=redis_url, node_id=f"node-{i}", namespaces=NAMESPACES)))
            for i in range(3)
        ]
        ports = [int(node.url.rsplit(":", 1)[1]) for node in nodes]
        url = stack.enter_context(nginx(tmp_path / "nginx", ports))
        async with httpx.AsyncClient(timeout=1) as http:
            async def up() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get(url + "/healthz")).status_code == 200
                return False

            await eventually(up, within=WAIT, what="nginx")
        yield Balanced(url, nodes)


@contextlib.asynccontextmanager
async def browser_page(site_dir: Path, html: str, build: Path = SDK_BUILD
                       ) -> AsyncIterator[tuple[Any, str]]:
    need(HAVE_CHROMIUM and HAVE_SDK, "chromium and tests/js/node_modules")
    from playwright.async_api import async_playwright

    (site_dir / "page.html").write_text(html)
    shutil.copy(build, site_dir / "centrifuge.js")
    async with page_server(site_dir) as site, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield await browser.new_page(), site + "/page.html"
        finally:
            await browser.close()


async def events_until(page: Any, done: Any, within: float = WAIT) -> list[dict[str, Any]]:
    """The page's events, once `done(events)` holds."""
    events: list[dict[str, Any]] = await eventually(
        lambda: page.evaluate("window.events"), done, within, "the page's events", every=0.05)
    return events


def holder(cluster: Balanced, user: str) -> tuple[RunningNode, Any]:
    """The node holding `user`'s one connection, and the connection."""
    for node in cluster.nodes:
        sessions = node.node.hub.sessions_of(user)
        if sessions:
            return node, sessions[0]
    raise AssertionError(f"no node holds {user}")


async def cut(cluster: Balanced, user: str) -> None:
    """Drop the stream's TCP connection on the node (nginx then ends the browser's), and
    wait until that node let the session go."""
    node, session = holder(cluster, user)
    outbound = session._outbound
    assert isinstance(outbound, StreamOutbound)
    outbound.abort()
    await eventually(lambda: not node.node.hub.sessions_of(user), within=WAIT,
                     what="the cut session to end")


@pytest.mark.parametrize(("transport", "build"), [
    ("http_stream", "json"), ("sse", "json"), ("http_stream", "protobuf"),
    # SSE carries JSON only (the Protobuf build sends its bytes stringified, refused 400):
    # the SDK goes on to its next transport.
    ("sse,http_stream", "protobuf"),
], ids=["http_stream", "sse", "http_stream-protobuf", "sse-then-http_stream-protobuf"])
async def test_centrifuge_js_falls_back_and_recovers_through_nginx(
    balanced: Balanced, tmp_path: Path, transport: str, build: str
) -> None:
    user = f"browser-{build}-{transport.replace(',', '-')}"
    channel = f"feed:{build}-{transport.replace(',', '-')}"
    api = http_client(balanced.nodes[0].url)
    query = (f"?lb={balanced.url}&transport={transport}&token={token(user)}&channel={channel}"
             f"&build={build}")
    sdk_build = PROTOBUF_BUILD if build == "protobuf" else SDK_BUILD
    async with api, browser_page(tmp_path, SDK_PAGE, sdk_build) as (page, url), \
            emulated(balanced.url, balanced.url, token(f"json-{user}")) as json_client:
        # A JSON emulated client in the same channel, through the balancer too.
        await json_client.command(subscribe={"channel": channel})
        await page.goto(url + query)
        events = await events_until(page, lambda e: any(x["event"] == "subscribed" for x in e),
                                    within=3 * WAIT)
        assert events[0] == {"event": "connected", "transport": transport.rpartition(",")[2]}
        await publish(api, channel, {"n": 1})
        await page.evaluate("window.publish({n: 2})")
        await events_until(page, lambda e: sum(x["event"] == "publication" for x in e) == 2)
        seen = [(await json_client.events.next())["push"]["pub"] for _ in range(2)]
        assert [(pub["data"], pub["offset"]) for pub in seen] == [({"n": 1}, 1), ({"n": 2}, 2)]
        # The stream is on one node; its commands were POSTed to others and routed.
        routed = [await metric(n, "hub_emulation_requests_total", outcome="routed")
                  for n in balanced.nodes]
        assert sum(routed) > 0, routed

        await cut(balanced, user)
        for n in (3, 4, 5):
            await publish(api, channel, {"n": n})
        events = await events_until(
            page, lambda e: sum(x["event"] == "publication" for x in e) == 5, within=3 * WAIT)
        subscribed = [x for x in events if x["event"] == "subscribed"]
        assert subscribed[-1] == {"event": "subscribed", "recovered": True,
                                  "wasRecovering": True}
        publications = [x for x in events if x["event"] == "publication"]
        assert [x["data"]["n"] for x in publications] == [1, 2, 3, 4, 5]
        assert [x["offset"] for x in publications] == [1, 2, 3, 4, 5]
        await publish(api, channel, {"n": 6})
        await events_until(page, lambda e: sum(x["event"] == "publication" for x in e) == 6)


async def test_an_eventsource_resumes_without_a_gap_through_nginx(
    balanced: Balanced, tmp_path: Path
) -> None:
    user, channel = "dashboard", "feed:board"
    api = http_client(balanced.nodes[0].url)
    query = f"?lb={balanced.url}&token={token(user, channels=[channel])}"

    def pubs(events: list[dict[str, Any]]) -> list[Any]:
        return [e["push"]["pub"]["data"] for e in events
                if "push" in e and "pub" in e["push"] and e["push"].get("channel") == channel]

    async with api, browser_page(tmp_path, EVENTSOURCE_PAGE) as (page, url):
        await page.goto(url + query)
        await events_until(page, lambda e: any("connect" in x.get("push", {}) for x in e))
        for n in (1, 2):
            await publish(api, channel, n)
        await events_until(page, lambda e: pubs(e) == [1, 2])
        await cut(balanced, user)
        for n in (3, 4):
            await publish(api, channel, n)
        events = await events_until(page, lambda e: len(pubs(e)) >= 4, within=3 * WAIT)
        connects = [e["push"]["connect"] for e in events if "connect" in e.get("push", {})]
        assert len(connects) == 2
        assert connects[1]["subs"][channel]["recovered"] is True
        await publish(api, channel, 5)
        events = await events_until(page, lambda e: len(pubs(e)) >= 5)
        assert pubs(events) == [1, 2, 3, 4, 5]
        assert [e["id"] for e in events if "push" in e and "pub" in e["push"]] == [
            "1", "2", "3", "4", "5"]
        assert json.dumps(events)  # what the page saw, for a failure's message


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[list[RunningNode]]:
    """Two nodes sharing a private Redis, no balancer: a test picks where each request goes."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_node(make_settings(
            redis_url=redis_url, node_id=f"pair-{i}", namespaces=NAMESPACES, drain_seconds=0)))
            for i in range(2)]


async def test_emulation_posts_are_routed_to_the_sessions_node(pair: list[RunningNode]) -> None:
    """The stream on one node, every POST to the other: commands run, replies come down the
    stream; a POST for a session or node that does not exist gets 404 from wherever it
    lands; once the session's node has left the cluster, 404 too."""
    holder_node, other = pair
    async with emulated(holder_node.url, other.url, token("rou")) as client:
        assert client.node == "pair-0"
        reply = await client.command(subscribe={"channel": "feed:routed", "recover": True})
        assert reply["subscribe"]["recoverable"] is True
        await publish(other, "feed:routed", "x")
        push = await client.events.next()
        assert push["push"]["pub"]["data"] == "x"
        assert await metric(other, "hub_emulation_requests_total", outcome="routed") == 1
        async with httpx.AsyncClient(base_url=other.url, timeout=WAIT) as http:
            unknown = await http.post("/emulation", json={
                "session": "not-a-session", "node": "pair-0", "data": "{}"})
            assert unknown.status_code == 404
            assert await metric(other, "hub_emulation_requests_total",
                                outcome="unknown_session") == 1
            nowhere = await http.post("/emulation", json={
                "session": client.session, "node": "no-such-node", "data": "{}"})
            assert nowhere.status_code == 404
            await holder_node.node.drain()  # the stream ends; the node leaves presence

            async def gone() -> bool:
                answer = await http.post("/emulation", json={
                    "session": client.session, "node": "pair-0", "data": "{}"})
                assert answer.status_code in (404, 504), answer.text
                return answer.status_code == 404

            await eventually(gone, within=3 * WAIT, what="404 for the node that left")
