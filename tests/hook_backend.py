"""The application behind the hooks in tests (PROTOCOL §13), run in its own uvicorn process
by `tests.test_hooks`: a login page that sets a session cookie (Starlette's
SessionMiddleware), the hook endpoints in Centrifugo's proxy format (typed with
`hub.hooks`), endpoints that fail in each way a backend can, and `/stats` with the most
hook calls it saw in flight at once.

Every hook endpoint wants the static header `X-Hook-Secret: s3cret` (403 without it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from hub.hooks import (
    ConnectRequest,
    ConnectResult,
    HookDisconnect,
    HookError,
    PublishRequest,
    PublishResult,
    RefreshRequest,
    RefreshResult,
    Reply,
    RPCRequest,
    RPCResult,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeRequest,
    SubscribeResult,
)

SECRET_HEADER = ("x-hook-secret", "s3cret")
SDK = Path(__file__).parent / "js" / "node_modules" / "centrifuge" / "dist" / "centrifuge.js"


class Stats:
    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: dict[str, int] = {}
        self.last: dict[str, Any] = {}


stats = Stats()


def answer(reply: Reply[Any]) -> Response:
    return Response(msgspec.json.encode(reply), media_type="application/json")


async def body_of(request: Request, kind: type[Any]) -> Any:
    name = request.url.path.strip("/")
    stats.calls[name] = stats.calls.get(name, 0) + 1
    decoded = msgspec.json.decode(await request.body(), type=kind)
    stats.last[name] = {"body": msgspec.to_builtins(decoded),
                        "cookie": request.headers.get("cookie"),
                        "authorization": request.headers.get("authorization"),
                        "content_type": request.headers.get("content-type")}
    return decoded


def refused(request: Request) -> Response | None:
    if request.headers.get(SECRET_HEADER[0]) != SECRET_HEADER[1]:
        return Response("no secret", status_code=403)
    return None


async def connect(request: Request) -> Response:
    if (failure := refused(request)) is not None:
        return failure
    hook = await body_of(request, ConnectRequest)
    data = hook.data if isinstance(hook.data, dict) else {}
    user = request.session.get("user")
    bearer = request.headers.get("authorization", "")
    if bearer.startswith("Bearer let-me-in:"):
        user = bearer.removeprefix("Bearer let-me-in:")
    if data.get("refuse") == "disconnect":
        return answer(Reply(disconnect=HookDisconnect(4501, "go away")))
    if not user:
        return answer(Reply(error=HookError(101, "log in first")))
    ttl = data.get("ttl")
    return answer(Reply(result=ConnectResult(
        user=user,
        expire_at=int(time.time() + ttl) if ttl else 0,
        info={"name": user.title()},
        data={"hello": user, "client": hook.client},
        channels=data.get("channels", []),
        meta={"login": user},
    )))


async def refresh(request: Request) -> Response:
    if (failure := refused(request)) is not None:
        return failure
    hook = await body_of(request, RefreshRequest)
    if hook.user.startswith("short"):
        return answer(Reply(result=RefreshResult(expired=True)))
    return answer(Reply(result=RefreshResult(expire_at=int(time.time()) + 2)))


async def subscribe(request: Request) -> Response:
    if (failure := refused(request)) is not None:
        return failure
    hook = await body_of(request, SubscribeRequest)
    channel = hook.channel
    if channel.startswith("hooked:secret") and hook.user != "admin":
        return answer(Reply(error=HookError(103, "not for you")))
    if channel == "hooked:kick":
        return answer(Reply(disconnect=HookDisconnect(4502, "kicked")))
    if channel.startswith("hooked:brief"):
        return answer(Reply(result=SubscribeResult(expire_at=int(time.time()) + 1)))
    return answer(Reply(result=SubscribeResult()))


async def sub_refresh(request: Request) -> Response:
    if (failure := refused(request)) is not None:
        return failure
    await body_of(request, SubRefreshRequest)
    return answer(Reply(result=SubRefreshResult(expired=True)))


async def publish(request: Request) -> Response:
    if (failure := refused(request)) is not None:
        return failure
    hook = await body_of(request, PublishRequest)
    data = hook.data
    if isinstance(data, dict) and "spam" in str(data.get("text", "")):
        return answer(Reply(error=HookError(1001, "no spam here")))
    if hook.channel == "hooked:plain":
        return answer(Reply(result=PublishResult()))
    rewritten = {**data, "checked_by": hook.user} if isinstance(data, dict) else data
    return answer(Reply(result=PublishResult(data=rewritten)))


async def rpc(request: Request) -> Response:
    if (failure := refused(request)) is not None:
        return failure
    hook = await body_of(request, RPCRequest)
    if hook.method == "whoami":
        return answer(Reply(result=RPCResult(data={"user": hook.user, "meta": hook.meta})))
    if hook.method == "echo":  # b64data: a Protobuf client's bytes
        return answer(Reply(result=RPCResult(data=hook.data, b64data=hook.b64data)))
    if hook.method == "slow":
        await asyncio.sleep(3)
    return answer(Reply(error=HookError(1002, f"no method {hook.method}")))


async def rpc_b(request: Request) -> Response:
    hook = await body_of(request, RPCRequest)
    return answer(Reply(result=RPCResult(data={"route": "b", "method": hook.method})))


# Failures, one kind each


async def slow(request: Request) -> Response:
    await asyncio.sleep(3)
    return answer(Reply(result=ConnectResult(user="late")))


async def status500(request: Request) -> Response:
    return Response("boom", status_code=500)


async def bad_json(request: Request) -> Response:
    return Response(b'{"result": {"user": ', media_type="application/json")


async def bad_shape(request: Request) -> Response:
    return JSONResponse({"result": ["not", "an", "object"]})


async def huge(request: Request) -> Response:
    body = b'{"result": {"user": "big", "data": "' + b"x" * (2 << 20) + b'"}}'
    return Response(body, media_type="application/json")


async def storm(request: Request) -> Response:
    """A connect hook that takes 200 ms and counts how many calls it has at once."""
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    stats.calls["storm"] = stats.calls.get("storm", 0) + 1
    try:
        hook = msgspec.json.decode(await request.body(), type=ConnectRequest)
        await asyncio.sleep(0.2)
        return answer(Reply(result=ConnectResult(user="storm-" + hook.client[:8])))
    finally:
        stats.in_flight -= 1


async def get_stats(request: Request) -> Response:
    if request.method == "POST":
        stats.__init__()  # type: ignore[misc]
        return JSONResponse({})
    return JSONResponse({"max_in_flight": stats.max_in_flight, "calls": stats.calls,
                         "last": stats.last})


# The page a browser logs in with


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>hooked</title></head>
<body><pre id="log"></pre>
<script src="/centrifuge.js"></script>
<script>
const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
const params = new URLSearchParams(location.search);
const hub = params.get("hub"), transport = params.get("transport");
// No token: the hub asks this app, by cookie. With `transport` (http_stream), the SDK uses
// only that emulated transport, its fetches sending the cookie to the hub's other origin.
const client = transport ? new Centrifuge([{transport, endpoint: hub}], {
  emulationEndpoint: params.get("emulation"),
  fetch: (url, options) => fetch(url, {...options, credentials: "include"}),
}) : new Centrifuge(hub);
client.on("connected", async (ctx) => {
  log("connected " + JSON.stringify(ctx.data));
  const sub = client.newSubscription("hooked:room");
  sub.on("publication", (p) => log("publication " + JSON.stringify(p.data)));
  sub.on("subscribed", async () => {
    log("subscribed hooked:room");
    await sub.publish({text: "hi from the browser"});
    const reply = await client.rpc("whoami", {});
    log("rpc " + JSON.stringify(reply.data));
  });
  sub.subscribe();
});
client.on("disconnected", (ctx) => log("disconnected " + ctx.code + " " + ctx.reason));
client.on("error", (ctx) => log("error " + JSON.stringify(ctx.error)));
client.connect();
</script></body></html>
"""


async def login(request: Request) -> Response:
    request.session["user"] = request.query_params["user"]
    return HTMLResponse(PAGE)


async def anonymous_page(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def sdk(request: Request) -> Response:
    return FileResponse(SDK, media_type="application/javascript")


async def healthz(request: Request) -> Response:
    return Response("ok")


app = Starlette(
    routes=[
        Route("/connect", connect, methods=["POST"]),
        Route("/refresh", refresh, methods=["POST"]),
        Route("/subscribe", subscribe, methods=["POST"]),
        Route("/sub_refresh", sub_refresh, methods=["POST"]),
        Route("/publish", publish, methods=["POST"]),
        Route("/rpc", rpc, methods=["POST"]),
        Route("/rpc-b", rpc_b, methods=["POST"]),
        Route("/slow", slow, methods=["POST"]),
        Route("/status500", status500, methods=["POST"]),
        Route("/bad_json", bad_json, methods=["POST"]),
        Route("/bad_shape", bad_shape, methods=["POST"]),
        Route("/huge", huge, methods=["POST"]),
        Route("/storm", storm, methods=["POST"]),
        Route("/stats", get_stats, methods=["GET", "POST"]),
        Route("/login", login),
        Route("/page", anonymous_page),
        Route("/centrifuge.js", sdk),
        Route("/healthz", healthz),
    ],
    middleware=[Middleware(SessionMiddleware, secret_key="test-session-key")],
)
