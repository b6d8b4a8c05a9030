"""`create_app(settings)`: the ASGI app of one node. Every object is built here and
carried by the app; the lifespan starts and stops the node."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hub import admin, centrifugo_api, check, endpoints, openapi, user_api
from hub.broker import Broker, MemoryBroker
from hub.centrifugo_endpoint import CENTRIFUGO_PATH, CentrifugoEndpoint
from hub.commands import ClientCommands
from hub.connection import WebSocketEndpoint
from hub.emulation import (
    EMULATION_PATH,
    HTTP_STREAM_PATH,
    SSE_PATH,
    EmulationEndpoint,
    EmulationPost,
    EmulationRouter,
    HttpStreamSession,
    SseSession,
)
from hub.events import EventsCallable, LedgerFactory, attach, create_events
from hub.hooks import Hooks
from hub.metrics import Metrics
from hub.node import Node
from hub.origins import OriginCORS
from hub.presence import MemoryPresence, Presence
from hub.redis import create_redis_backends, create_redis_ledger
from hub.settings import Settings
from hub.uni import (
    UNI_HTTP_STREAM_PATH,
    UNI_SSE_PATH,
    UNI_WEBSOCKET_PATH,
    UniHttpStreamSession,
    UniSseSession,
    UniStreamEndpoint,
    UniWebSocketEndpoint,
)
from hub.wire import WritePath

log = logging.getLogger("hub.app")
WEBSOCKET_PATH = "/ws"
_F = TypeVar("_F", bound=Callable[..., Any])


def create_backends(settings: Settings) -> tuple[Broker, Presence, LedgerFactory | None]:
    """The in-process broker and presence, or Redis's and the ledger of events that goes
    with them (None: this node is the cluster)."""
    if settings.redis_url:
        broker, presence = create_redis_backends(settings)
        ledger = functools.partial(create_redis_ledger, broker.topology, settings)
        return broker, presence, ledger
    return MemoryBroker(), MemoryPresence(), None


def route_path(scope: Scope) -> str:
    """The path inside this app: under a mount (Starlette's `Mount`, or a server's
    `--root-path`) `scope["path"]` still carries the prefix, which `root_path` names."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path + "/"):
        return path[len(root_path):]
    return path


def _says_coroutine_function(function: _F) -> _F:
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12
    if mark is not None:
        return mark(function)  # type: ignore[no-any-return]
    function._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return function


class HubApp(Starlette):
    """The node's Starlette app, which hands its WebSocket paths (`/ws`,
    `/connection/websocket`) straight to their endpoints, before any middleware: they get
    the server's own `send` (no per-frame wrappers on the hot path), and a connection's
    call stack, which lives as long as it does, stays short (memory per connection)."""

    sockets: dict[str, WebSocketApp]
    # The HTTP-stream transports and `/emulation` (PROTOCOL §15), handed the server's own
    # `send` for the same reasons, behind CORS.
    streams: dict[str, ASGIApp]
    # The calls backends make most, by (method, path): taken before Starlette's router and
    # middleware too, which cost a publish a fifth of its CPU. Their handlers answer
    # every error themselves (`endpoints.api`).
    shortcuts: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]

    def __call__(self, scope: Scope, receive: Receive, send: Send
                 ) -> Coroutine[Any, Any, None]:
        """A WebSocket endpoint's own coroutine is what the server awaits: no frame of this
        call stays in each connection's chain for its whole life (memory per connection)."""
        if scope["type"] == "websocket":
            endpoint = self.sockets.get(route_path(scope))
            if endpoint is not None:
                return endpoint(scope, receive, send)  # type: ignore[arg-type]
        return self._serve(scope, receive, send)

    # Servers tell ASGI 3 from 2 by "is `__call__` a coroutine function", which this plain
    # function returning one is not: it says so (`hub.server` names the interface too).
    __call__ = _says_coroutine_function(__call__)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.shortcuts.get((scope["method"], route_path(scope)))
            if handler is not None:
                scope["app"] = self
                response = await handler(Request(scope, receive))
                await response(scope, receive, send)
                return
            stream = self.streams.get(route_path(scope))
            if stream is not None:
                await stream(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


WebSocketApp = WebSocketEndpoint | CentrifugoEndpoint | UniWebSocketEndpoint


def stream_routes(node: Node, write_path: WritePath) -> dict[str, ASGIApp]:
    """Centrifugo's HTTP-stream transports (PROTOCOL §15), each behind CORS: the origins
    of HUB_ALLOWED_ORIGINS (`hub.origins`, the endpoints' own rule) with credentials, or
    any origin without."""
    origins = node.hooks.config.allowed_origins
    commands = ClientCommands(node)
    apps: dict[str, Any] = {
        UNI_SSE_PATH: UniStreamEndpoint(node, commands, write_path, UniSseSession),
        UNI_HTTP_STREAM_PATH: UniStreamEndpoint(node, commands, write_path,
                                                UniHttpStreamSession),
    }
    if node.settings.emulation:
        router = EmulationRouter(node)
        for path, session_class in ((SSE_PATH, SseSession),
                                    (HTTP_STREAM_PATH, HttpStreamSession)):
            apps[path] = EmulationEndpoint(node, commands, write_path, router, session_class)
        apps[EMULATION_PATH] = EmulationPost(router)
    return {path: OriginCORS(app, origins) for path, app in apps.items()}


def create_app(
    settings: Settings, *, hooks: Hooks | None = None, on_events: EventsCallable | None = None
) -> Starlette:
    """`hooks`: callables for the hooks of PROTOCOL §13; `on_events`: a callable that gets
    the events of PROTOCOL §14 instead of `HUB_EVENTS_URL` (both an embedded hub's)."""
    broker, presence, ledger = create_backends(settings)
    metrics = Metrics(settings.node_id)
    node = Node(settings, broker, presence, metrics, hooks)
    attach(node, create_events(settings, metrics, on_events, ledger=ledger))
    write_path = WritePath()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metrics.describe_node(write_path=write_path.probe())
        await node.start()
        if settings.dev:
            log.warning("dev mode: no token needed, every channel open, HTTP API without key")
        for problem in check.warnings(settings):
            log.warning(problem)
        try:
            yield
        finally:
            await node.stop()

    sockets: dict[str, WebSocketApp] = {WEBSOCKET_PATH: WebSocketEndpoint(node, write_path)}
    if settings.centrifugo:
        sockets[CENTRIFUGO_PATH] = CentrifugoEndpoint(node, ClientCommands(node), write_path)
    streams: dict[str, ASGIApp] = {}
    if settings.centrifugo:
        streams = stream_routes(node, write_path)
        sockets[UNI_WEBSOCKET_PATH] = UniWebSocketEndpoint(node, ClientCommands(node), write_path)
    routes = [*endpoints.routes, *user_api.routes, *openapi.routes, *admin.routes,
              *centrifugo_api.routes(settings)]
    app = HubApp(routes=routes, lifespan=lifespan)
    app.sockets = sockets
    app.streams = streams
    app.shortcuts = {**endpoints.shortcuts, **centrifugo_api.shortcuts(settings)}
    app.state.node = node
    app.state.settings = settings
    return app

