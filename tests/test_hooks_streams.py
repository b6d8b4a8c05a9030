"""The connect hook on Centrifugo's HTTP-stream transports (PROTOCOL §13, §15), against the
real application (tests/hook_backend.py in its own uvicorn process): a one-way stream and
an emulated session let in by the application's cookie, the hook's channels as server-side
subscriptions, the refresh hook at `expire_at`, each transport's refusal of a hook error or
failure, and HUB_ALLOWED_ORIGINS's one rule on every stream endpoint and in their CORS.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import websockets

from tests.needs import need
from tests.support import WAIT, publish
from tests.test_centrifugo_js import CHROMIUM, HAVE_CHROMIUM, HAVE_SDK
from tests.test_hooks import Backend, backend_process, closed_with, hooked_node
from tests.test_streams import Events, uni_stream

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def backend() -> Any:
    with backend_process() as running:
        yield running


async def test_a_uni_sse_stream_connects_by_cookie_and_gets_the_hooks_channels(
    backend: Backend,
) -> None:
    cookie = backend.login("uma")
    async with hooked_node(backend, allowed_origins="http://127.0.0.1:*") as running:
        # "feed" (the default namespace: subscribe by token only) is the hook's to give
        connect = {"data": {"channels": ["news:uni", "feed"]}}
        headers = {"Cookie": cookie, "Origin": backend.url}
        async with uni_stream(running.url, connect, headers=headers) as events:
            # CORS with credentials: the allowed origin (a glob's match) is echoed
            assert events.response.headers["access-control-allow-origin"] == backend.url
            assert events.response.headers["access-control-allow-credentials"] == "true"
            first = (await events.next())["connect"]
            assert first["data"] == {"hello": "uma", "client": first["client"]}
            assert {"news:uni", "feed"} <= first["subs"].keys() and "expires" not in first
            hooked = backend.stats()["last"]["connect"]
            assert hooked["cookie"] == cookie
            assert hooked["body"]["transport"] == "uni_sse"
            assert hooked["body"]["client"] == first["client"]
            await publish(running, "news:uni", {"n": 1})
            push = await events.next()
            assert (push["channel"], push["pub"]["data"]) == ("news:uni", {"n": 1})
            await publish(running, "feed", {"n": 2})
            push = await events.next()
            assert (push["channel"], push["pub"]["data"]) == ("feed", {"n": 2})


async def test_a_hooked_stream_is_refreshed_at_its_expire_at(backend: Backend) -> None:
    """The refresh hook ends "shorty" at its first expire_at: the stream's last push."""
    async with hooked_node(backend) as running:
        connect = {"data": {"ttl": 1}}
        async with uni_stream(running.url, connect, sse=False,
                              headers={"Cookie": backend.login("shorty")}) as events:
            assert "connect" in await events.next()
            last = await events.next(timeout=WAIT + 2)
            assert last["disconnect"]["code"] == 3005
        assert backend.stats()["last"]["refresh"]["body"]["user"] == "shorty"


async def test_each_stream_transport_refuses_a_hook_error_in_its_own_terms(
    backend: Backend,
) -> None:
    async with hooked_node(backend) as running, \
            httpx.AsyncClient(base_url=running.url, timeout=WAIT) as http:
        # one-way HTTP streams: the application's error is 403 with it; its disconnect 401
        no_cookie = await http.get("/connection/uni_sse", params={"cf_connect": "{}"})
        assert no_cookie.status_code == 403
        assert no_cookie.json() == {"error": {"code": 101, "message": "log in first"}}
        gone = await http.post("/connection/uni_http_stream",
                               json={"data": {"refuse": "disconnect"}})
        assert gone.status_code == 401
        assert gone.json() == {"disconnect": {"code": 4501, "reason": "go away"}}
        # the emulation: the connect reply's error, then the stream ends
        answer = await http.post("/connection/http_stream",
                                 content=json.dumps({"id": 1, "connect": {}}))
        assert [json.loads(line) for line in answer.text.splitlines()] == [
            {"id": 1, "error": {"code": 101, "message": "log in first"}}]
        kicked = await http.post("/connection/http_stream", content=json.dumps(
            {"id": 1, "connect": {"data": {"refuse": "disconnect"}}}))
        assert json.loads(kicked.text) == {"push": {"disconnect": {
            "code": 4501, "reason": "go away"}}}  # reconnect: false, omitted
        # the one-way WebSocket: closed as a client that did not act on the error
        socket = await websockets.connect(running.ws_url.removesuffix("/ws")
                                          + "/connection/uni_websocket", open_timeout=WAIT)
        await socket.send("{}")
        assert await closed_with(socket) == (3503, "force disconnect")


async def test_a_failed_connect_hook_tells_stream_clients_to_come_back(
    backend: Backend,
) -> None:
    async with hooked_node(backend, hook_connect_url=backend.url + "/status500") as running, \
            httpx.AsyncClient(base_url=running.url, timeout=WAIT) as http:
        cookie = {"Cookie": backend.login("vic")}
        uni = await http.get("/connection/uni_sse", params={"cf_connect": "{}"}, headers=cookie)
        assert uni.status_code == 200  # an EventSource reconnects after the stream's end
        disconnect = json.loads(uni.text.split("data: ", 1)[1])["disconnect"]
        assert (disconnect["code"], disconnect["reconnect"]) == (3004, True)
        emulated = await http.post("/connection/http_stream", headers=cookie,
                                   content=json.dumps({"id": 1, "connect": {}}))
        assert json.loads(emulated.text) == {"id": 1, "error": {
            "code": 100, "message": "connect hook failed: status", "temporary": True}}
        socket = await websockets.connect(
            running.ws_url.removesuffix("/ws") + "/connection/uni_websocket",
            additional_headers=cookie, open_timeout=WAIT)
        await socket.send("{}")
        assert (await closed_with(socket))[0] == 3004


async def test_another_origin_gets_403_on_every_stream_endpoint_before_any_hook_call(
    backend: Backend,
) -> None:
    cookie = backend.login("wes")
    async with hooked_node(backend) as running, \
            httpx.AsyncClient(base_url=running.url, timeout=WAIT) as http:
        backend.reset()
        headers = {"Origin": EVIL, "Cookie": cookie}
        connect = json.dumps({"id": 1, "connect": {}})
        answers = [
            await http.get("/connection/uni_sse", params={"cf_connect": "{}"}, headers=headers),
            await http.post("/connection/uni_http_stream", content="{}", headers=headers),
            await http.post("/connection/http_stream", content=connect, headers=headers),
            await http.get("/connection/sse", params={"cf_connect": connect}, headers=headers),
            await http.post("/emulation", json={"session": "s", "node": "n", "data": "{}"},
                            headers=headers),
        ]
        assert [a.status_code for a in answers] == [403] * 5
        assert all("access-control-allow-origin" not in a.headers for a in answers)
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(running.ws_url.removesuffix("/ws")
                                     + "/connection/uni_websocket", origin=EVIL,  # type: ignore[arg-type]
                                     additional_headers={"Cookie": cookie},
                                     open_timeout=WAIT)
        assert refused.value.response.status_code == 403
        assert backend.stats()["calls"].get("connect") is None
        # CORS: a preflight from the allowed origin may send credentials; another's is not
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}
        allowed = await http.options("/connection/http_stream",
                                     headers={"Origin": backend.url.upper(), **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == backend.url.upper()
        assert allowed.headers["access-control-allow-credentials"] == "true"
        other = await http.options("/connection/http_stream", headers={"Origin": EVIL,
                                                                       **preflight})
        assert other.status_code == 400


async def test_centrifuge_js_over_http_stream_connects_by_cookie_with_no_token(
    backend: Backend,
) -> None:
    need(HAVE_CHROMIUM and HAVE_SDK, "chromium and tests/js/node_modules")
    from playwright.async_api import async_playwright

    async with hooked_node(backend) as running, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            page = await browser.new_page()
            hub = running.url
            await page.goto(f"{backend.url}/login?user=iris&transport=http_stream"
                            f"&hub={hub}/connection/http_stream&emulation={hub}/emulation")
            log = page.locator("#log")
            await log.get_by_text('"hello":"iris"').wait_for(timeout=WAIT * 1000)
            await log.get_by_text('publication {"text":"hi from the browser","checked_by":'
                                  '"iris"}').wait_for(timeout=WAIT * 1000)
            await log.get_by_text('rpc {"user":"iris","meta":{"login":"iris"}}').wait_for(
                timeout=WAIT * 1000)
            hooked = backend.stats()["last"]["connect"]
            assert hooked["cookie"].startswith("session=")
            assert hooked["body"]["transport"] == "http_stream"
        finally:
            await browser.close()


async def test_an_embedded_hubs_callables_connect_an_emulated_session_by_the_hosts_session(
) -> None:
    from tests.test_hooks_sdk import embedded_site

    async with embedded_site() as host, \
            httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as http:
        login = await http.get(f"http://{host}/login", params={"user": "jun"})
        cookie = f"session={login.cookies['session']}"
        base = f"http://{host}/realtime"
        request = http.build_request("POST", base + "/connection/http_stream",
                                     content=json.dumps({"id": 1, "connect": {}}),
                                     headers={"Cookie": cookie})
        response = await http.send(request, stream=True)
        try:
            events = Events(response, sse=False)
            reply = (await events.next())["connect"]
            assert reply["data"] == {"path": "/realtime/connection/http_stream"}
            posted = await http.post(base + "/emulation", json={
                "session": reply["session"], "node": reply["node"],
                "data": json.dumps({"id": 2, "rpc": {"method": "who", "data": {}}})})
            assert posted.status_code == 204
            assert (await events.next())["rpc"]["data"] == {"user": "jun", "cookie_user": "jun"}
        finally:
            await response.aclose()
