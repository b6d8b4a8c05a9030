"""`/ws`, the hub's own protocol (PROTOCOL §2, §3) on the shared WebSocket lifecycle
(`hub.lifecycle`): its handshake (a token in the header or query, else the connect hook,
else an `auth` frame), its refusals (4001, 4002, the hook's code), the `welcome`, and a
`WsSession`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hub import protocol as p
from hub.auth import AuthFailed, Identity
from hub.commands import ClientCommands
from hub.errors import CloseCode
from hub.hooks import (
    ConnectRequest,
    ConnectResult,
    Context,
    HookDisconnected,
    HookFailed,
    HookRefused,
    identity_of,
    raw_json,
)
from hub.lifecycle import (
    Refused,
    WebSocketLifecycle,
    dev_identity,
    first_message,
    query_of,
)
from hub.node import Node
from hub.session import ASGIReceive
from hub.wire import Outbound, WritePath
from hub.ws_session import WsSession

log = logging.getLogger("hub.connection")


@dataclass(slots=True)
class WsConnect:
    """What `/ws`'s handshake learnt: who, the `id` of the `auth` frame that carried the
    token (for the welcome to echo), the hook's context and its connect result."""

    identity: Identity
    auth_id: int | None
    context: Context | None
    hooked: ConnectResult | None


class WebSocketEndpoint(WebSocketLifecycle[WsSession, WsConnect]):
    def __init__(self, node: Node, write_path: WritePath) -> None:
        super().__init__(node, ClientCommands(node), write_path)

    async def handshake(self, scope: dict[str, Any], receive: ASGIReceive, client_id: str
                        ) -> WsConnect:
        node = self.node
        context = node.hooks.context(scope) if node.hooks.active else None
        if context is not None and node.hooks.wants_connect(
            _token_from_handshake(scope) is not None
        ):
            hooked = await self._connect_hook(context, client_id)
            return WsConnect(identity_of(hooked), None, context, hooked)
        try:
            identity, auth_id = await self._authenticate(scope, receive)
        except AuthFailed as exc:
            node.metrics.auth_failed(exc.reason)
            raise Refused(exc.code, str(exc)) from None
        return WsConnect(identity, auth_id, context, None)

    async def _connect_hook(self, context: Context, client_id: str) -> ConnectResult:
        """PROTOCOL §13 on `/ws`: `error` closes 4001 with its message, `disconnect` with
        its code and reason, a failed call 1011."""
        request = ConnectRequest(**context.wire, client=client_id)
        try:
            return await self.node.hooks.connect(context, request)
        except HookRefused as refused:
            raise Refused(CloseCode.UNAUTHORIZED, refused.message) from None
        except HookDisconnected as disconnect:
            raise Refused(disconnect.code, disconnect.reason) from None
        except HookFailed as failed:
            raise Refused(CloseCode.INTERNAL_ERROR, failed.message) from None

    async def _authenticate(
        self, scope: dict[str, Any], receive: ASGIReceive
    ) -> tuple[Identity, int | None]:
        """The identity, and the `id` of the `auth` frame that carried the token (if one
        did). Raises AuthFailed."""
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
        message = await first_message(self.node, receive)
        if message is None:
            raise AuthFailed("timeout", "no auth frame in time")
        text = message.get("text")
        if text is None:  # the frame rule holds before authentication too
            code = CloseCode.BINARY_FRAME
            self.node.metrics.protocol_errors.count_close(code)
            raise Refused(code, "binary frames are not accepted")
        try:
            command = p.decode_command(text)
        except p.BadFrame as exc:
            raise AuthFailed("invalid", f"expected an auth frame: {exc.message}") from None
        if not isinstance(command, p.Auth):
            raise AuthFailed("missing", "the first frame must be auth")
        return command.token, command.id

    def session(self, admitted: WsConnect, outbound: Outbound, client_id: str) -> WsSession:
        session = WsSession(self.commands, outbound, client_id, admitted.identity)
        session.hook = admitted.context
        return session

    def welcome(self, session: WsSession, admitted: WsConnect) -> None:
        """PROTOCOL §2: one `welcome` before anything else (with the connect hook's `data`)."""
        interval = self.node.settings.ping_interval
        identity, hooked = admitted.identity, admitted.hooked
        session.reply(p.Welcome(
            client=session.client_id,
            user=identity.user,
            node=self.node.node_id,
            expires=identity.expires,
            ping_interval=int(interval) if interval == int(interval) else interval,
            id=admitted.auth_id,
            data=p.NO_RAW if hooked is None or hooked.data is None else raw_json(hooked.data),
        ))

    async def started(self, session: WsSession, admitted: WsConnect) -> None:
        """The connect hook's channels, each told with a `subscribed` without an id."""
        hooked = admitted.hooked
        if hooked is not None and hooked.channels:
            await self.commands.subscribe_server_side(session, hooked.channels,
                                                      session.hook_subscribed)


def _token_from_handshake(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    tokens = query_of(scope).get("token")
    return str(tokens[0]) if tokens else None
