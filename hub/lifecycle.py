"""A connection's life, written once for every endpoint: admitted (origin, room), its
handshake (who connects: token, connect hook, first message), registered with the hub, run,
released (PROTOCOL §2, §7, §11, §13, §15).

An endpoint brings its protocol: what its handshake reads, how it refuses, the session it
makes, what that session says first (`welcome`) and does once registered (`started`).
`Lifecycle.live` is the registered part, shared by every transport (WebSocket, HTTP
streams, SSE); `WebSocketLifecycle` adds the WebSocket road to it: the socket is always
accepted first, so that every refusal is a close code a browser can read. The endpoints
are plain ASGI apps in front of Starlette's routing, so that they get the server's own
`send` (no per-frame wrappers on the hot path: `hub.wire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs

from hub.auth import Identity
from hub.commands import ClientCommands
from hub.connections import Origin
from hub.errors import CloseCode, close_reason
from hub.hooks import header_of
from hub.metrics import close_code_label
from hub.node import Node
from hub.session import ASGIReceive, Session
from hub.wire import ASGISend, Outbound, WritePath

S = TypeVar("S", bound=Session)
A = TypeVar("A")  # what an endpoint's handshake learnt of one connection


def new_client_id() -> str:
    return secrets.token_urlsafe(12)


class Refused(Exception):
    """Refuse the connection: `code` and `reason` on the wire (the endpoint's protocol may
    say it otherwise), `counted` the hub's close code `hub_disconnections_total` counts it
    under (PROTOCOL §8)."""

    def __init__(self, code: int, reason: str, counted: int | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason
        self.counted = code if counted is None else counted


class Gone(Exception):
    """The client left during the handshake (with this close code)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


def room_refusal(node: Node) -> str | None:
    """Why the node takes no new connection now (PROTOCOL §7: draining; HUB_MAX_CONNECTIONS:
    full), or None."""
    if node.draining:
        return "node draining"
    limit = node.settings.max_connections
    if limit and len(node.hub.sessions) >= limit:
        return "node full"
    return None


async def first_message(node: Node, receive: ASGIReceive) -> dict[str, Any] | None:
    """The client's first WebSocket message within HUB_AUTH_TIMEOUT, None if it sent none
    in time; raises Gone if it left."""
    try:
        async with asyncio.timeout(node.settings.auth_timeout):
            message = await receive()
    except TimeoutError:
        return None
    if message["type"] == "websocket.disconnect":
        raise Gone(message.get("code"))
    return message


async def origin_allowed(node: Node, scope: dict[str, Any], send: ASGISend) -> bool:
    """HUB_ALLOWED_ORIGINS (PROTOCOL §11, §13): an upgrade from another origin is refused
    with 403, before it is accepted and before any hook call."""
    if node.hooks.config.origin_allowed(header_of(scope, b"origin")):
        return True
    node.metrics.auth_failed("origin")
    await send_quietly(send, {"type": "websocket.close", "code": 1008})
    return False


async def close_socket(send: ASGISend, code: int, reason: str) -> None:
    await send_quietly(send, {"type": "websocket.close", "code": int(code),
                              "reason": close_reason(reason)})


async def send_quietly(send: ASGISend, message: dict[str, Any]) -> None:
    """Send during the handshake, when the client may be gone or the server may have closed
    already (a protocol error of the client's, say invalid UTF-8 in the frame after `auth`):
    uvicorn then raises ClientDisconnected (an OSError) or refuses anything after its own
    close (RuntimeError), which is no news to us."""
    with contextlib.suppress(OSError, RuntimeError):
        await send(message)


def query_of(scope: dict[str, Any]) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


def dev_identity(scope: dict[str, Any]) -> Identity:
    """Dev mode's user without a token (PROTOCOL §2): the `user` query parameter, else a
    random id."""
    users = query_of(scope).get("user")
    user = users[0][:128] if users and users[0] else "dev-" + secrets.token_hex(4)
    return Identity(user=user, expires=None)


class Lifecycle(Generic[S, A]):
    """Registration, run and release of an authenticated session, on any transport."""

    def __init__(self, node: Node, commands: ClientCommands, write_path: WritePath) -> None:
        self.node = node
        self.commands = commands
        self.write_path = write_path

    async def live(self, session: S, admitted: A, source: ASGIReceive) -> int:
        """The session's first words, then it is registered (counted, its personal channel
        joined), started, and serves `source` until it ends; it is released (unregistered,
        its close code counted, its subscriptions left) however it ends. The close code."""
        commands = self.commands
        self.welcome(session, admitted)
        code: int = CloseCode.INTERNAL_ERROR
        self._opened(session)
        try:
            await commands.connect(session)
            await self.started(session, admitted)
            code = await session.run(source)
        finally:
            self._closed(session)
            self.node.metrics.protocol_errors.count_close(code)
            await commands.disconnect(session, code)
        return code

    def count_refusal(self, refused: Refused) -> None:
        """Every refusal is counted once, under the hub's close code (PROTOCOL §8)."""
        self.node.metrics.disconnections.labels(close_code_label(refused.counted)).inc()

    def check_room(self) -> None:
        """Admission: raises the protocol's refusal when the node is full or draining."""
        reason = room_refusal(self.node)
        if reason is not None:
            raise self.no_room(reason)

    # what a protocol adds

    def no_room(self, reason: str) -> Refused:
        """The refusal of a node full or draining (PROTOCOL §3, §7: 1013)."""
        return Refused(CloseCode.TRY_AGAIN_LATER, reason)

    def welcome(self, session: S, admitted: A) -> None:
        """What the session says first, before it is registered (`welcome`, the connect
        reply): nothing of a channel can get ahead of it."""

    async def started(self, session: S, admitted: A) -> None:
        """What the session does once registered, before it reads: its server-side
        channels, the commands that came with its handshake."""

    def _opened(self, session: S) -> None:
        """A transport's own registration of a session that starts (pings, routing)."""

    def _closed(self, session: S) -> None:
        """... and of one that ended."""


class WebSocketLifecycle(Lifecycle[S, A]):
    """The WebSocket road: origin, accept, room, handshake, room again, then `live`."""

    async def __call__(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        node = self.node
        if not await origin_allowed(node, scope, send):
            return
        await send(self.accept(scope))
        client_id = new_client_id()
        try:
            self.check_room()
            admitted = await self.handshake(scope, receive, client_id)
            # Again: the node may have filled up or begun draining meanwhile (a first frame
            # takes a while). From here to the session's registration nothing awaits, so
            # the limit holds.
            self.check_room()
        except Refused as refused:
            self.count_refusal(refused)
            await self.refuse(refused, scope, send, receive)
            return
        except Gone as gone:
            node.metrics.protocol_errors.count_close(gone.code)
            return
        node.noticed_address(scope)
        origin = Origin.of_scope(scope)  # before the session: it lets go of the scope's headers
        session = self.session(admitted, self.write_path.outbound_for(send), client_id)
        session.origin = origin
        await self.live(session, admitted, receive)

    # what a protocol adds

    def accept(self, scope: dict[str, Any]) -> dict[str, Any]:
        """The accept event (a protocol may choose a subprotocol)."""
        return {"type": "websocket.accept"}

    async def handshake(self, scope: dict[str, Any], receive: ASGIReceive, client_id: str) -> A:
        """Who connects, or Refused / Gone."""
        raise NotImplementedError

    async def refuse(self, refused: Refused, scope: dict[str, Any], send: ASGISend,
                     receive: ASGIReceive) -> None:
        """Tell the client, once its refusal is counted: a close with the code."""
        await close_socket(send, refused.code, refused.reason)

    def session(self, admitted: A, outbound: Outbound, client_id: str) -> S:
        """The protocol's session for an admitted connection."""
        raise NotImplementedError
