"""`create_app(settings)`: the ASGI app of one node. Every object is built here and
carried by the app; the lifespan starts and stops the node."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from hub.broker import Broker, MemoryBroker
from hub.connection import WebSocketEndpoint
from hub.endpoints import routes
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


class WebSocketRouter:
    """Sends `/ws` straight to the hub's endpoint with the server's own `send`."""

    def __init__(self, app: ASGIApp, endpoint: WebSocketEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WEBSOCKET_PATH:
            await self.endpoint(dict(scope), receive, send)  # type: ignore[arg-type]
        else:
            await self.app(scope, receive, send)


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

    middleware = [Middleware(WebSocketRouter, endpoint=WebSocketEndpoint(node, write_path))]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.node = node
    app.state.settings = settings
    return app

