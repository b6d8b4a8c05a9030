"""examples/session_app.py with the hub inside it: the same sign-in page and the same
decisions, but the hooks are async functions that get the upgrade request as Starlette's
`HTTPConnection` (`conn.session` is the signed-in user), and nothing goes over HTTP.

    npm install --prefix examples/chat          # centrifuge-js for the page (once)
    python examples/session_app_embedded.py --port 8080

Open http://127.0.0.1:8080 and sign in. The hub is at /realtime (ws://…/realtime/connection/
websocket for the page, /realtime/ws for the hub's own protocol, /realtime/admin).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection

sys.path.insert(0, str(Path(__file__).parent))
from session_app import (
    SESSION_KEY,
    connect_result,
    pages,
    publish_result,
    rpc_result,
)

from hub.embed import EmbeddedHub
from hub.hooks import (
    ConnectRequest,
    ConnectResult,
    Hooks,
    PublishRequest,
    PublishResult,
    Reply,
    RPCRequest,
    RPCResult,
)
from hub.settings import Namespace, load_settings


async def connect(conn: HTTPConnection, request: ConnectRequest) -> ConnectResult | Reply[
        ConnectResult]:
    return connect_result(conn.session.get("user"))


async def publish(conn: HTTPConnection, request: PublishRequest) -> PublishResult | Reply[
        PublishResult]:
    return publish_result(request.user, request)


async def rpc(conn: HTTPConnection, request: RPCRequest) -> RPCResult | Reply[RPCResult]:
    return rpc_result(request.user, request)


def build_app(port: int = 8080) -> Starlette:
    origin = f"http://127.0.0.1:{port}"
    settings = msgspec.structs.replace(
        load_settings({"allowed_origins": origin, "port": port}),
        namespaces={"chat": Namespace(subscribe="any", publish="proxy")},
    )
    realtime = EmbeddedHub(settings, hooks=Hooks(connect=connect, publish=publish, rpc=rpc))
    hub_url = f"ws://127.0.0.1:{port}/realtime/connection/websocket"
    return Starlette(routes=[*pages(hub_url), realtime.mount("/realtime")],
                     middleware=[Middleware(SessionMiddleware, secret_key=SESSION_KEY)],
                     lifespan=realtime.lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    uvicorn.run(build_app(args.port), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
