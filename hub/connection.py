"""The `/ws` endpoint as a plain ASGI app: handshake, authentication, then a Session.

It sits in front of Starlette's routing so that it gets the server's own `send` (no
per-frame wrappers on the hot path) and so that every refusal can be a close code a
browser can read: the socket is always accepted first (PROTOCOL §2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any
from urllib.parse import parse_qs

from hub import protocol as p
from hub.auth import AuthFailed, Identity
from hub.commands import ClientCommands
from hub.connections import Origin
from hub.errors import CloseCode, close_reason
from hub.hooks import (
    ConnectRequest,
    ConnectResult,
    Context,
    HookDisconnected,
    HookFailed,
    HookRefused,
    header_of,
    identity_of,
    raw_json,
)
from hub.metrics import close_code_label
from hub.node import Node
from hub.session import ASGIReceive
from hub.wire import ASGISend, WritePath
from hub.ws_session import WsSession

log = logging.getLogger("hub.connection")


def new_client_id() -> str:
    return secrets.token_urlsafe(12)


class WebSocketEndpoint:
    def __init__(self, node: Node, write_path: WritePath) -> None:
        self.node = node
        self.commands = ClientCommands(node)
        self.write_path = write_path

    async def __call__(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        node = self.node
        if not await origin_allowed(node, scope, send):
            return
        await send({"type": "websocket.accept"})
        if await self._refused(send):
            return
        hooked: ConnectResult | None = None
        context = node.hooks.context(scope) if node.hooks.active else None
        client_id = new_client_id()
        try:
            if context is not None and node.hooks.wants_connect(
                _token_from_handshake(scope) is not None
            ):
                hooked = await self._connect_hook(context, client_id)
                identity, auth_id = identity_of(hooked), None
            else:
                identity, auth_id = await self._authenticate(scope, receive)
        except HookRefusal as refusal:
            node.metrics.disconnections.labels(close_code_label(refusal.code)).inc()
            await close_socket(send, refusal.code, refusal.reason)
            return
        except AuthFailed as exc:
            node.metrics.auth_failed(exc.reason)
            node.metrics.disconnections.labels(str(int(exc.code))).inc()
            await close_socket(send, exc.code, str(exc))
            return
        except Gone as gone:
            node.metrics.protocol_errors.count_close(gone.code)
            return
        except _BinaryFrame:
            code = CloseCode.BINARY_FRAME
            node.metrics.disconnections.labels(str(int(code))).inc()
            node.metrics.protocol_errors.count_close(code)
            await close_socket(send, code, "binary frames are not accepted")
            return
        # Again: the node may have filled up or begun draining while this one authenticated
        # (an `auth` frame takes a while). From here to the session's registration nothing
        # awaits, so the limit holds.
        if await self._refused(send):
            return
        node.noticed_address(scope)
        await self._serve(identity, auth_id, send, receive, Origin.of_scope(scope), context,
                          hooked, client_id)

    async def _connect_hook(self, context: Context, client_id: str) -> ConnectResult:
        """PROTOCOL §13 on `/ws`: `error` closes 4001 with its message, `disconnect` with
        its code and reason, a failed call 1011."""
        request = ConnectRequest(**context.wire, client=client_id)
        try:
            return await self.node.hooks.connect(context, request)
        except HookRefused as refused:
            raise HookRefusal(CloseCode.UNAUTHORIZED, refused.message) from None
        except HookDisconnected as disconnect:
            raise HookRefusal(disconnect.code, disconnect.reason) from None
        except HookFailed as failed:
            raise HookRefusal(CloseCode.INTERNAL_ERROR, failed.message) from None

    async def _refused(self, send: ASGISend) -> bool:
        """Close with 1013 when the node is full or draining."""
        node = self.node
        limit = node.settings.max_connections
        if not (node.draining or (limit and len(node.hub.sessions) >= limit)):
            return False
        reason = "node draining" if node.draining else "node full"
        await close_socket(send, CloseCode.TRY_AGAIN_LATER, reason)
        node.metrics.disconnections.labels(str(int(CloseCode.TRY_AGAIN_LATER))).inc()
        return True

    async def _serve(
        self, identity: Identity, auth_id: int | None, send: ASGISend, receive: ASGIReceive,
        origin: Origin, context: Context | None = None, hooked: ConnectResult | None = None,
        client_id: str | None = None,
    ) -> None:
        node, commands = self.node, self.commands
        outbound = self.write_path.outbound_for(send)
        session = WsSession(commands, outbound, client_id or new_client_id(), identity)
        session.origin = origin
        session.hook = context
        interval = node.settings.ping_interval
        session.reply(p.Welcome(
            client=session.client_id,
            user=identity.user,
            node=node.node_id,
            expires=identity.expires,
            ping_interval=int(interval) if interval == int(interval) else interval,
            id=auth_id,
            data=p.NO_RAW if hooked is None or hooked.data is None else raw_json(hooked.data),
        ))
        code: int = CloseCode.INTERNAL_ERROR
        try:
            await commands.connect(session)
            if hooked is not None and hooked.channels:
                await commands.subscribe_server_side(session, hooked.channels,
                                                     session.hook_subscribed)
            code = await session.run(receive)
        finally:
            node.metrics.protocol_errors.count_close(code)
            await commands.disconnect(session, code)

    async def _authenticate(
        self, scope: dict[str, Any], receive: ASGIReceive
    ) -> tuple[Identity, int | None]:
        """The identity, and the `id` of the `auth` frame that carried the token (if one
        did), for the welcome to echo."""
        node = self.node
        token = _token_from_handshake(scope)
        if token is None and node.settings.dev:
            return dev_identity(scope), None
        auth_id = None
        if token is None:
            token, auth_id = await self._token_from_first_frame(receive)
        if not node.authenticator.configured:
            raise AuthFailed("invalid", "no token verification key is configured")
        return await node.authenticator.verify(token), auth_id

    async def _token_from_first_frame(self, receive: ASGIReceive) -> tuple[str, int | None]:
        try:
            async with asyncio.timeout(self.node.settings.auth_timeout):
                message = await receive()
        except TimeoutError:
            raise AuthFailed("timeout", "no auth frame in time") from None
        if message["type"] == "websocket.disconnect":
            raise Gone(message.get("code"))
        text = message.get("text")
        if text is None:  # the frame rule holds before authentication too
            raise _BinaryFrame
        try:
            command = p.decode_command(text)
        except p.BadFrame as exc:
            raise AuthFailed("invalid", f"expected an auth frame: {exc.message}") from None
        if not isinstance(command, p.Auth):
            raise AuthFailed("missing", "the first frame must be auth")
        return command.token, command.id


class HookRefusal(Exception):
    """The connect hook refused the connection: close with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


async def origin_allowed(node: Node, scope: dict[str, Any], send: ASGISend) -> bool:
    """HUB_ALLOWED_ORIGINS (PROTOCOL §11, §13): an upgrade from another origin is refused
    with 403, before it is accepted and before any hook call."""
    if node.hooks.config.origin_allowed(header_of(scope, b"origin")):
        return True
    node.metrics.auth_failed("origin")
    await send_quietly(send, {"type": "websocket.close", "code": 1008})
    return False


class _BinaryFrame(Exception):
    """The first frame was binary."""


class Gone(Exception):
    """The client left during the handshake (with this close code)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


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


def _token_from_handshake(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    tokens = _query(scope).get("token")
    return str(tokens[0]) if tokens else None


def _query(scope: dict[str, Any]) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


def dev_identity(scope: dict[str, Any]) -> Identity:
    users = _query(scope).get("user")
    user = users[0][:128] if users and users[0] else "dev-" + secrets.token_hex(4)
    return Identity(user=user, expires=None)

