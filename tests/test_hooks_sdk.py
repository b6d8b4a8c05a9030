"""Hooks (PROTOCOL §13) with the real SDKs and an embedded hub: centrifuge-python
connecting by the application's cookie (no token), calling `rpc`, publishing through a
rewriting publish hook; centrifuge-js in headless Chromium logging in on the backend's page
and connecting by cookie; and `EmbeddedHub(settings, hooks=...)` whose callables read the
host's `request.session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from centrifuge import (
    Client,
    ClientState,
    PublicationContext,
    SubscriptionEventHandler,
)
from centrifuge.exceptions import ReplyError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from hub.embed import EmbeddedHub
from hub.hooks import (
    ConnectRequest,
    ConnectResult,
    HookError,
    Hooks,
    PublishRequest,
    PublishResult,
    Reply,
    RPCRequest,
    RPCResult,
)
from tests.needs import need
from tests.support import WAIT, eventually, make_settings, metric
from tests.test_centrifugo_js import CHROMIUM, HAVE_CHROMIUM, HAVE_SDK
from tests.test_embed import serving
from tests.test_hooks import Backend, backend_process, centrifugo_url, hooked_node


@pytest.fixture(scope="module")
def backend() -> Any:
    with backend_process() as running:
        yield running


class Publications(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.seen.append(ctx.pub.data)


async def test_centrifuge_python_connects_by_cookie_calls_rpc_and_publishes(
    backend: Backend,
) -> None:
    async with hooked_node(backend) as running:
        client = Client(centrifugo_url(running), headers={"Cookie": backend.login("hana")},
                        data={"from": "python"}, timeout=WAIT, min_reconnect_delay=0.05)
        try:
            await client.connect()
            await client.ready(timeout=WAIT)
            assert backend.stats()["last"]["connect"]["body"]["data"] == {"from": "python"}
            reply = await client.rpc("whoami", {})
            assert reply.data == {"user": "hana", "meta": {"login": "hana"}}
            with pytest.raises(ReplyError) as refused:
                await client.rpc("nope", {})
            assert (refused.value.code, refused.value.message) == (1002, "no method nope")
            events = Publications()
            sub = client.new_subscription("hooked:room", events=events)
            await sub.subscribe()
            await sub.ready(timeout=WAIT)
            await sub.publish({"text": "from python"})
            await eventually(lambda: events.seen, within=WAIT)
            assert events.seen == [{"text": "from python", "checked_by": "hana"}]
            with pytest.raises(ReplyError) as spam:
                await sub.publish({"text": "spam!"})
            assert (spam.value.code, spam.value.message) == (1001, "no spam here")
        finally:
            await client.disconnect()
        # no cookie: the application's error 101 ends it (not temporary: the SDK stops)
        stranger = Client(centrifugo_url(running), timeout=WAIT, min_reconnect_delay=0.05)
        try:
            with contextlib.suppress(Exception):
                await stranger.connect()
            await eventually(lambda: stranger.state == ClientState.DISCONNECTED, within=WAIT)
        finally:
            await stranger.disconnect()


async def test_centrifuge_python_over_protobuf_sends_bytes_through_the_hooks(
    backend: Backend,
) -> None:
    """A Protobuf client's payloads go to the hooks as `b64data` (rpc data may be any
    bytes: they never enter a channel), and a result's `b64data` comes back as bytes."""
    async with hooked_node(backend) as running:
        client = Client(centrifugo_url(running), headers={"Cookie": backend.login("ivo")},
                        use_protobuf=True, timeout=WAIT, min_reconnect_delay=0.05)
        try:
            await client.connect()
            await client.ready(timeout=WAIT)
            connect = backend.stats()["last"]["connect"]["body"]
            assert (connect["protocol"], connect["encoding"]) == ("protobuf", "binary")
            reply = await client.rpc("echo", b"\x00\x01 bytes")  # rpc data: any bytes
            assert reply.data == b"\x00\x01 bytes"
            assert backend.stats()["last"]["rpc"]["body"]["b64data"] == "AAEgYnl0ZXM="
            reply = await client.rpc("whoami", b"")
            assert json.loads(reply.data) == {"user": "ivo", "meta": {"login": "ivo"}}
        finally:
            await client.disconnect()


async def test_centrifuge_python_retries_while_the_connect_hook_fails(backend: Backend) -> None:
    """Error 100 is temporary: the SDK keeps trying, with its backoff."""
    async with hooked_node(backend, hook_connect_url=backend.url + "/status500") as running:
        client = Client(centrifugo_url(running), timeout=WAIT, min_reconnect_delay=0.05,
                        max_reconnect_delay=0.2)
        try:
            await client.connect()
            await eventually(lambda: metric(running, "hub_hook_calls_total", hook="connect",
                                            outcome="status"),
                             lambda calls: calls >= 3, within=WAIT)
            assert client.state == ClientState.CONNECTING
        finally:
            await client.disconnect()


async def test_centrifuge_js_in_chromium_logs_in_and_connects_by_cookie(
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
            await page.goto(f"{backend.url}/login?user=iris&hub={centrifugo_url(running)}")
            log = page.locator("#log")
            await log.get_by_text('"hello":"iris"').wait_for(timeout=WAIT * 1000)
            await log.get_by_text('publication {"text":"hi from the browser","checked_by":'
                                  '"iris"}').wait_for(timeout=WAIT * 1000)
            await log.get_by_text('rpc {"user":"iris","meta":{"login":"iris"}}').wait_for(
                timeout=WAIT * 1000)
            assert backend.stats()["last"]["connect"]["cookie"].startswith("session=")
        finally:
            await browser.close()


# embedded, with callables


async def connect_callable(conn: HTTPConnection, request: ConnectRequest) -> Any:
    user = conn.session.get("user")
    if user is None:
        return Reply[ConnectResult](error=HookError(101, "log in first"))
    return ConnectResult(user=user, data={"path": conn.url.path})


async def publish_callable(conn: HTTPConnection, request: PublishRequest) -> PublishResult:
    return PublishResult(data={"said": request.data, "by": conn.session["user"]})


async def rpc_callable(conn: HTTPConnection, request: RPCRequest) -> RPCResult:
    if request.method == "boom":
        raise RuntimeError("a bug in the application")
    return RPCResult(data={"user": request.user, "cookie_user": conn.session.get("user")})


@contextlib.asynccontextmanager
async def embedded_site() -> AsyncIterator[str]:
    settings = make_settings(allowed_origins="http://127.0.0.1:*",
                             namespaces={"room": {"subscribe": "any", "publish": "proxy"}})
    realtime = EmbeddedHub(settings, hooks=Hooks(connect=connect_callable,
                                                 publish=publish_callable, rpc=rpc_callable))

    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/login", login), realtime.mount("/realtime")],
                    middleware=[Middleware(SessionMiddleware, secret_key="k")],
                    lifespan=realtime.lifespan)
    async with serving(app) as url:
        yield url.removeprefix("http://")


async def test_an_embedded_hubs_callables_see_the_hosts_session() -> None:
    async with embedded_site() as host, httpx.AsyncClient() as http:
        response = await http.get(f"http://{host}/login", params={"user": "jun"})
        cookie = f"session={response.cookies['session']}"
        ws = await websockets.connect(f"ws://{host}/realtime/ws", open_timeout=WAIT,
                                      additional_headers={"Cookie": cookie})
        welcome = json.loads(await ws.recv())
        assert welcome["user"] == "jun" and welcome["data"] == {"path": "/realtime/ws"}
        await ws.send(json.dumps({"type": "rpc", "id": 1, "method": "who"}))
        assert json.loads(await ws.recv())["data"] == {"user": "jun", "cookie_user": "jun"}
        await ws.send(json.dumps({"type": "rpc", "id": 2, "method": "boom"}))
        assert json.loads(await ws.recv()) == {
            "type": "error", "id": 2, "code": "internal", "message": "rpc hook failed: exception"}
        await ws.send(json.dumps({"type": "subscribe", "id": 3, "channel": "room:a"}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        await ws.send(json.dumps({"type": "publish", "id": 4, "channel": "room:a",
                                  "data": "hi"}))
        frames = [json.loads(await ws.recv()) for _ in range(2)]
        message = next(f for f in frames if f["type"] == "message")
        assert message["data"] == {"said": "hi", "by": "jun"}
        await ws.close()
        anonymous = await websockets.connect(f"ws://{host}/realtime/ws", open_timeout=WAIT)
        with pytest.raises(websockets.ConnectionClosed):
            await anonymous.recv()
        assert anonymous.close_code == 4001


def test_a_connect_callable_needs_allowed_origins() -> None:
    from hub.settings import SettingsError

    with pytest.raises(SettingsError, match="HUB_ALLOWED_ORIGINS"):
        EmbeddedHub(make_settings(), hooks=Hooks(connect=connect_callable))


async def test_wrong_answers_of_callables_are_failures_of_their_kind() -> None:
    """A callable's result is checked as a body is: no user, nothing at all, the wrong
    type, an exception, too slow; each a HookFailed of its kind, counted."""
    from prometheus_client import CollectorRegistry

    from hub.hooks import (
        WEBSOCKET_JSON,
        Context,
        HookConfig,
        HookFailed,
        HookMetrics,
        HookRunner,
    )

    answers: list[Any] = [ConnectResult(user=""), Reply[ConnectResult](), RPCResult(),
                          RuntimeError("bug"), "slow"]

    async def connect(conn: HTTPConnection, request: ConnectRequest) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer == "slow":
            await asyncio.sleep(5)
        return answer

    registry = CollectorRegistry()
    runner = HookRunner(HookConfig.of(make_settings(allowed_origins="https://a.example",
                                                    hook_timeout=0.2)),
                        HookMetrics(registry), Hooks(connect=connect))
    kinds = []
    for _ in range(5):
        with pytest.raises(HookFailed) as failed:
            await runner.connect(Context([], {"type": "websocket", "headers": []}),
                                 ConnectRequest(**WEBSOCKET_JSON, client="c"))
        kinds.append(failed.value.kind)
    assert kinds == ["bad_shape", "bad_shape", "exception", "exception", "timeout"]
    assert registry.get_sample_value("hub_hook_calls_total",
                                     {"hook": "connect", "outcome": "bad_shape"}) == 2
    await runner.aclose()


async def test_a_storm_spends_slots_on_callers_that_can_still_be_answered() -> None:
    """One slot, calls of 100 ms, a 300 ms timeout, a caller every 20 ms (five times what
    the slot serves): the waiters left with less time than a call takes fail at once
    instead of spending the slot on an answer nobody waits for, so nearly every call made
    answers its caller; after the storm a caller is answered again."""
    from prometheus_client import CollectorRegistry

    from hub.hooks import WEBSOCKET_JSON, Context, HookConfig, HookFailed, HookMetrics, HookRunner

    calls = 0

    async def connect(conn: HTTPConnection, request: ConnectRequest) -> ConnectResult:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return ConnectResult(user="u")

    runner = HookRunner(HookConfig.of(make_settings(allowed_origins="https://a.example",
                                                    hook_timeout=0.3, hook_concurrency=1)),
                        HookMetrics(CollectorRegistry()), Hooks(connect=connect))

    async def one(delay: float = 0) -> str:
        await asyncio.sleep(delay)
        try:
            await runner.connect(Context([], {"type": "websocket", "headers": []}),
                                 ConnectRequest(**WEBSOCKET_JSON, client="c"))
        except HookFailed as failed:
            return failed.kind
        return "ok"

    outcomes = await asyncio.gather(*(one(0.02 * n) for n in range(30)))
    answered = outcomes.count("ok")
    assert answered >= 3 and set(outcomes) == {"ok", "timeout"}
    assert calls <= answered + 2, (calls, answered)  # FIFO alone wastes nearly every call
    assert await one() == "ok"
    await runner.aclose()
