"""An application that signs its users in with a session cookie, and lets the hub ask it
who is connecting (PROTOCOL §13): no token endpoint, no JWT.

    npm install --prefix examples/chat          # centrifuge-js for the page (once)
    python examples/session_app.py --port 8080
    HUB_CONFIG=examples/session_app.toml HUB_ALLOWED_ORIGINS=http://127.0.0.1:8080 hub serve

Open http://127.0.0.1:8080, sign in with any name, and chat in `chat:lobby`: the page
connects to the hub with no token; the browser's cookie goes along with the upgrade, the
hub forwards it to POST /hooks/connect, and `request.session` here says who it is. What a
user publishes goes through POST /hooks/publish first (refused or stamped with the user),
and the page's "time" button is an rpc answered by POST /hooks/rpc.

The hook bodies are Centrifugo's proxy format, typed by `hub.hooks`; a backend written for
Centrifugo's proxy works unchanged. examples/session_app_embedded.py is the same app with
the hub inside it and the hooks as plain async functions.
"""

from __future__ import annotations

import argparse
import html
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from hub.hooks import (
    ConnectRequest,
    ConnectResult,
    HookError,
    PublishRequest,
    PublishResult,
    Reply,
    RPCRequest,
    RPCResult,
)

SESSION_KEY = "change-me: sign the session cookie with a real secret"
HOOK_SECRET = "change-me"  # the hub sends it (HUB_HOOK_STATIC_HEADERS); see the TOML file
SDK = Path(__file__).parent / "chat" / "node_modules" / "centrifuge" / "dist" / "centrifuge.js"

# What the application decides, whoever calls it: HTTP hooks here, callables when embedded.


def connect_result(user: str | None) -> ConnectResult | Reply[ConnectResult]:
    if not user:
        return Reply(error=HookError(101, "sign in first"))
    return ConnectResult(user=user, info={"name": user}, data={"welcome": f"hello {user}"})


def publish_result(user: str, request: PublishRequest) -> PublishResult | Reply[PublishResult]:
    text = request.data.get("text") if isinstance(request.data, dict) else None
    if not isinstance(text, str) or not 0 < len(text) <= 500:
        return Reply(error=HookError(1000, "a message is a text of 1-500 characters"))
    return PublishResult(data={"text": text, "user": user})


def rpc_result(user: str, request: RPCRequest) -> RPCResult | Reply[RPCResult]:
    if request.method == "time":
        return RPCResult(data={"user": user, "time": time.strftime("%H:%M:%S")})
    return Reply(error=HookError(1001, f"no method {request.method}"))


# Pages


LOGIN = """<!doctype html><meta charset="utf-8"><title>sign in</title>
<form method="post" action="/login"><input name="user" placeholder="your name" autofocus>
<button>sign in</button></form>"""

CHAT = """<!doctype html><meta charset="utf-8"><title>chat</title>
<p>signed in as <b>{user}</b> (<a href="/logout">sign out</a>)
<button id="time">time</button></p>
<pre id="log"></pre><input id="text" placeholder="say something, Enter sends">
<script src="/centrifuge.js"></script>
<script>
const log = (line) => {{ document.getElementById("log").textContent += line + "\\n"; }};
const client = new Centrifuge({hub});  // no token: the hub asks this application
client.on("connected", (ctx) => log(JSON.stringify(ctx.data)));
client.on("disconnected", (ctx) => log("disconnected: " + ctx.reason));
const sub = client.newSubscription("chat:lobby");
sub.on("publication", (ctx) => log(ctx.data.user + ": " + ctx.data.text));
sub.subscribe();
client.connect();
const input = document.getElementById("text");
input.addEventListener("keydown", async (event) => {{
  if (event.key !== "Enter") return;
  try {{ await sub.publish({{text: input.value}}); input.value = ""; }}
  catch (err) {{ log("refused: " + err.message); }}
}});
document.getElementById("time").onclick = async () => {{
  const reply = await client.rpc("time", {{}});
  log("rpc time: " + JSON.stringify(reply.data));
}};
</script>"""


def pages(hub_url: str) -> list[Route]:
    async def home(request: Request) -> Response:
        user = request.session.get("user")
        if not user:
            return HTMLResponse(LOGIN)
        return HTMLResponse(CHAT.format(user=html.escape(user), hub=msgspec.json.encode(
            hub_url).decode()))

    async def login(request: Request) -> Response:
        # (a form without python-multipart: Starlette's request.form() needs it)
        form = parse_qs((await request.body()).decode())
        user = form.get("user", [""])[0].strip()[:64]
        if user:
            request.session["user"] = user
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/", status_code=303)

    async def sdk(request: Request) -> Response:
        if not SDK.exists():
            return Response("run: npm install --prefix examples/chat", status_code=404)
        return FileResponse(SDK, media_type="application/javascript")

    return [Route("/", home), Route("/login", login, methods=["POST"]),
            Route("/logout", logout), Route("/centrifuge.js", sdk)]


# The hooks over HTTP


def answer(reply: Any) -> Response:
    if not isinstance(reply, Reply):
        reply = Reply(result=reply)
    return Response(msgspec.json.encode(reply), media_type="application/json")


def from_the_hub(request: Request) -> bool:
    return request.headers.get("x-hook-secret") == HOOK_SECRET


async def connect_hook(request: Request) -> Response:
    if not from_the_hub(request):
        return Response(status_code=403)
    msgspec.json.decode(await request.body(), type=ConnectRequest)
    return answer(connect_result(request.session.get("user")))  # the forwarded Cookie


async def publish_hook(request: Request) -> Response:
    if not from_the_hub(request):
        return Response(status_code=403)
    hook = msgspec.json.decode(await request.body(), type=PublishRequest)
    return answer(publish_result(hook.user, hook))


async def rpc_hook(request: Request) -> Response:
    if not from_the_hub(request):
        return Response(status_code=403)
    hook = msgspec.json.decode(await request.body(), type=RPCRequest)
    return answer(rpc_result(hook.user, hook))


def build_app(hub_url: str = "ws://127.0.0.1:8000/connection/websocket") -> Starlette:
    hooks = [Route("/hooks/connect", connect_hook, methods=["POST"]),
             Route("/hooks/publish", publish_hook, methods=["POST"]),
             Route("/hooks/rpc", rpc_hook, methods=["POST"])]
    return Starlette(routes=[*pages(hub_url), *hooks],
                     middleware=[Middleware(SessionMiddleware, secret_key=SESSION_KEY)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--hub", default="ws://127.0.0.1:8000/connection/websocket")
    args = parser.parse_args()
    uvicorn.run(build_app(args.hub), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
