"""`create_app(settings)`: the ASGI app of one node. Every object is built here and
carried by the app; the lifespan starts and stops the node."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from hub import admin, endpoints, openapi
from hub.broker import Broker, MemoryBroker
from hub.centrifugo_endpoint import CENTRIFUGO_PATH, CentrifugoEndpoint
from hub.commands import ClientCommands
from hub.connection import WebSocketEndpoint
from hub.metrics import Metrics
from hub.node import Node
from hub.presence import MemoryPresence, Presence
from hub.settings import Settings
from hub.wire import WritePath

log = logging.getLogger("hub.app")
WEBSOCKET_PATH = "/ws"


def create_backends(settings: Settings) -> tuple[Broker, Presence]:
    if settings.redis_url:
        from hub.redis_broker import create_redis_backends

        backends: tuple[Broker, Presence] = create_redis_backends(settings)
        return backends
    return MemoryBroker(), MemoryPresence()


def route_path(scope: Scope) -> str:
    """The path inside this app: under a mount (Starlette's `Mount`, or a server's
    `--root-path`) `scope["path"]` still carries the prefix, which `root_path` names."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path + "/"):
        return path[len(root_path):]
    return path


class WebSocketRouter:
    """Sends the WebSocket paths (`/ws`, `/connection/websocket`) straight to their
    endpoints with the server's own `send`: no per-frame wrappers on the hot path."""

    def __init__(self, app: ASGIApp, endpoints: dict[str, WebSocketApp]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(route_path(scope)) if scope["type"] == "websocket" else None
        if endpoint is not None:
            await endpoint(dict(scope), receive, send)  # type: ignore[arg-type]
        else:
            await self.app(scope, receive, send)


WebSocketApp = WebSocketEndpoint | CentrifugoEndpoint


def create_app(settings: Settings) -> Starlette:
    broker, presence = create_backends(settings)
    metrics = Metrics(settings.node_id)
    node = Node(settings, broker, presence, metrics)
    write_path = WritePath()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metrics.describe_node(write_path=write_path.probe())
        await node.start()
        if settings.dev:
            log.warning("dev mode: no token needed, every channel open, HTTP API without key")
        try:
            yield
        finally:
            await node.stop()

    sockets: dict[str, WebSocketApp] = {WEBSOCKET_PATH: WebSocketEndpoint(node, write_path)}
    if settings.centrifugo:
        sockets[CENTRIFUGO_PATH] = CentrifugoEndpoint(node, ClientCommands(node), write_path)
    middleware = [Middleware(WebSocketRouter, endpoints=sockets)]
    routes = [*endpoints.routes, *openapi.routes, *admin.routes]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.node = node
    app.state.settings = settings
    return app

