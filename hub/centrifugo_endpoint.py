"""`/connection/websocket` as a plain ASGI app (PROTOCOL §11): the socket is accepted in the
encoding the client asks for (`hub.centrifugo_codecs.codec_for`: JSON unless Protobuf), the
first command must be `connect` (within HUB_AUTH_TIMEOUT), its token is the hub's own;
then a `CentrifugoSession` serves, and one task pings every such connection with `{}`. The
life around it (admission, registration, release) is `hub.lifecycle`'s; `CentrifugoAuth` is
who connects, the same on every Centrifugo transport (this one, the emulation, the one-way
streams).

Refusals use Centrifugo's close classes, so the SDKs know whether to come back: an invalid
token 3500 (they stop), an expired one error 109 (they fetch a new token and reconnect), a
node full or draining 3001 (they reconnect, elsewhere behind a load balancer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hub import __version__
from hub import centrifugo_frames as cf
from hub.auth import AuthFailed, Identity
from hub.centrifugo_codecs import PROTOBUF_SUBPROTOCOL, CentrifugoCodec, codec_for
from hub.centrifugo_session import CentrifugoSession
from hub.commands import ClientCommands
from hub.errors import CloseCode
from hub.hooks import (
    ConnectRequest,
    ConnectResult,
    Context,
    HookDisconnected,
    HookFailed,
    HookRefused,
    hooked_data,
    identity_of,
    payload,
)
from hub.lifecycle import (
    Lifecycle,
    Refused,
    WebSocketLifecycle,
    close_socket,
    dev_identity,
    first_message,
    send_quietly,
)
from hub.node import Node
from hub.session import ASGIReceive
from hub.subscriptions import Joined
from hub.wire import ASGISend, Outbound, WritePath, payload_of

log = logging.getLogger("hub.centrifugo")

CENTRIFUGO_PATH = "/connection/websocket"


class _Refused(Refused):
    """Close with Centrifugo's `code`, counted under the hub's `hub_code`."""

    def __init__(self, code: int, reason: str, hub_code: int) -> None:
        super().__init__(code, reason, hub_code)
        self.hub_code = hub_code


class _ConnectError(Refused):
    """Answer `connect` with this error reply."""

    def __init__(self, reply: cf.Reply) -> None:
        super().__init__(CloseCode.UNAUTHORIZED, "connect refused")
        self.reply = reply


class _Expired(Refused):
    """Error 109: the SDK fetches a new token and connects again."""

    def __init__(self, command_id: int) -> None:
        super().__init__(cf.DisconnectCode.EXPIRED, "token expired", CloseCode.TOKEN_EXPIRED)
        self.command_id = command_id


@dataclass(slots=True)
class CentrifugoConnect:
    """An admitted Centrifugo connection: who, the `connect` command and the commands that
    came with it, its encoding, and `reply`: more fields of the connect reply, by name (an
    emulated session's `session` and `node`)."""

    identity: Identity
    hooked: ConnectResult | None
    context: Context | None
    command: cf.Command
    rest: list[bytes]
    codec: CentrifugoCodec
    reply: dict[str, str] | None = None


S = TypeVar("S", bound=CentrifugoSession)
A = TypeVar("A")


class CentrifugoAuth(Lifecycle[S, A]):
    """Who connects, the same for every Centrifugo transport (PROTOCOL §11, §13): the
    `connect` command's token, or the connect hook. Raises `_Refused`, `_Expired` or
    `_ConnectError`."""

    async def _admit(self, scope: dict[str, Any], command: cf.Command, context: Context | None,
                     client_id: str) -> tuple[Identity, ConnectResult | None]:
        """`_identify` between two looks at the room, for the transports whose handshake
        is one request (the streams): the node may fill up or begin draining while the
        key or the hook answers."""
        self.check_room()
        identity, hooked = await self._identify(scope, command, context, client_id)
        self.check_room()
        return identity, hooked

    def no_room(self, reason: str) -> Refused:
        """Centrifugo's 3001: the SDKs reconnect (elsewhere, behind a load balancer)."""
        return _Refused(cf.DisconnectCode.SHUTDOWN, "try again later",
                        CloseCode.TRY_AGAIN_LATER)

    def _hook_context(self, scope: dict[str, Any], binary: bool, transport: str
                      ) -> Context | None:
        """What the connection keeps for its hook calls, when the node has hooks."""
        hooks = self.node.hooks
        return hooks.context(scope, binary, transport) if hooks.active else None

    async def _identify(
        self, scope: dict[str, Any], command: cf.Command, context: Context | None,
        client_id: str,
    ) -> tuple[Identity, ConnectResult | None]:
        """Who connects (PROTOCOL §13): the connect hook's answer where the node has the
        hook and the connection brings no token (or HUB_HOOK_CONNECT_ALWAYS), else its
        token's."""
        connect = command.connect
        assert connect is not None
        if context is not None and self.node.hooks.wants_connect(bool(connect.token)):
            hooked = await self._connect_hook(context, command, client_id)
            return identity_of(hooked), hooked
        return await self._authenticate(scope, command), None

    async def _connect_hook(
        self, context: Context, command: cf.Command, client_id: str
    ) -> ConnectResult:
        """PROTOCOL §13: an `error` is the connect reply's error (its code and message), a
        `disconnect` closes with its code and reason, a failed call is error 100
        (temporary: the SDKs reconnect with backoff)."""
        connect = command.connect
        assert connect is not None
        request = ConnectRequest(**context.wire, client=client_id, name=connect.name,
                                 version=connect.version, **payload(connect.data, context))
        try:
            return await self.node.hooks.connect(context, request)
        except HookRefused as refused:
            error = refused.error
            raise _ConnectError(cf.Reply(id=command.id, error=cf.Error(
                code=error.code, message=refused.message, temporary=error.temporary))) from None
        except HookDisconnected as disconnect:
            raise _Refused(disconnect.code, disconnect.reason, disconnect.code) from None
        except HookFailed as failed:
            reply = cf.error_reply(command.id, cf.ErrorCode.INTERNAL, failed.message)
            raise _ConnectError(reply) from None

    async def _first_message(self, receive: ASGIReceive) -> dict[str, Any]:
        """The client's first WebSocket message (`hub.lifecycle.first_message`): one that
        sends none in time is refused as stale."""
        node = self.node
        message = await first_message(node, receive)
        if message is None:
            node.metrics.auth_failed("timeout")
            raise _Refused(cf.DisconnectCode.STALE, "stale", CloseCode.UNAUTHORIZED)
        return message

    async def _authenticate(self, scope: dict[str, Any], command: cf.Command) -> Identity:
        node = self.node
        assert command.connect is not None
        token = command.connect.token
        anonymous = node.settings.anonymous
        if not token and node.settings.dev:
            return dev_identity(scope)
        if not token and anonymous:
            return Identity(user="")
        try:
            if not node.authenticator.configured and token:
                raise AuthFailed("invalid", "no token verification key is configured")
            identity = await node.authenticator.verify(token, anonymous=anonymous)
        except AuthFailed as exc:
            node.metrics.auth_failed(exc.reason)
            if exc.code == CloseCode.TOKEN_EXPIRED:
                raise _Expired(command.id) from None
            raise _Refused(cf.DisconnectCode.INVALID_TOKEN, "invalid token",
                           CloseCode.UNAUTHORIZED) from None
        if identity.expires is not None and cf.token_ttl(identity.expires, time.time()) < 1:
            node.metrics.auth_failed("expired")
            raise _Expired(command.id)
        return identity


class CentrifugoEndpoint(CentrifugoAuth[CentrifugoSession, CentrifugoConnect],
                         WebSocketLifecycle[CentrifugoSession, CentrifugoConnect]):
    def __init__(self, node: Node, commands: ClientCommands, write_path: WritePath) -> None:
        super().__init__(node, commands, write_path)
        self.sessions: set[CentrifugoSession] = set()  # whom the pinger pings
        self._pinging = False

    def accept(self, scope: dict[str, Any]) -> dict[str, Any]:
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if PROTOBUF_SUBPROTOCOL in (scope.get("subprotocols") or ()):
            accept["subprotocol"] = PROTOBUF_SUBPROTOCOL
        return accept

    async def handshake(self, scope: dict[str, Any], receive: ASGIReceive, client_id: str
                        ) -> CentrifugoConnect:
        """The `connect` command (within HUB_AUTH_TIMEOUT), in the encoding the client
        asked for, and who it says connects."""
        codec = codec_for(scope)
        context = self._hook_context(scope, codec.binary, "websocket")
        command, rest = await self._first_command(receive, codec)
        identity, hooked = await self._identify(scope, command, context, client_id)
        return CentrifugoConnect(identity, hooked, context, command, rest, codec)

    async def refuse(self, refused: Refused, scope: dict[str, Any], send: ASGISend,
                     receive: ASGIReceive) -> None:
        if isinstance(refused, _Expired):  # error 109: the SDK fetches a new token
            reply = cf.error_reply(refused.command_id, cf.ErrorCode.TOKEN_EXPIRED)
            await self._refuse_connect(send, receive, reply, codec_for(scope))
        elif isinstance(refused, _ConnectError):
            await self._refuse_connect(send, receive, refused.reply, codec_for(scope))
        else:
            await close_socket(send, refused.code, refused.reason)

    async def _first_command(
        self, receive: ASGIReceive, codec: CentrifugoCodec
    ) -> tuple[cf.Command, list[bytes]]:
        """The `connect` command, and the commands that came in its frame after it, in
        the connection's encoding (text frames for JSON, binary for Protobuf)."""
        node = self.node
        message = await self._first_message(receive)
        data = message.get("bytes") if codec.binary else message.get("text")
        messages = codec.split(data.encode() if isinstance(data, str) else data)[0] if data else []
        try:
            command = codec.decode(messages[0]) if messages else None
        except cf.BadCommand:
            command = None
        if command is None or command.connect is None or not command.id:
            node.metrics.auth_failed("missing")
            raise _Refused(cf.DisconnectCode.BAD_REQUEST, "bad request", CloseCode.UNAUTHORIZED)
        return command, messages[1:]

    async def _refuse_connect(
        self, send: ASGISend, receive: ASGIReceive, reply: cf.Reply, codec: CentrifugoCodec
    ) -> None:
        """An error reply to `connect` (109: the SDK fetches a new token; a hook's error: it
        reconnects or stops as the code says). Closing first could reach it before the
        reply, and stop it; so the client closes, or the auth timeout does."""
        frame = payload_of(codec.reply(reply))
        event = {"type": "websocket.send", "bytes": frame} if codec.binary else {
            "type": "websocket.send", "text": frame.decode()}
        await send_quietly(send, event)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.node.settings.auth_timeout):
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                return
        error = reply.error
        if error is not None and error.code != cf.ErrorCode.TOKEN_EXPIRED:
            # a hook's error the client did not act on: reconnect if it was temporary
            code = cf.DisconnectCode.SERVER_ERROR if error.temporary else \
                cf.DisconnectCode.FORCE_NO_RECONNECT
            await close_socket(send, code, cf.reason_for(code))
            return
        await close_socket(send, cf.DisconnectCode.EXPIRED, "connection expired")

    def session(self, admitted: CentrifugoConnect, outbound: Outbound, client_id: str
                ) -> CentrifugoSession:
        session = CentrifugoSession(self.commands, outbound, client_id, admitted.identity,
                                    admitted.codec)
        session.hook = admitted.context
        return session

    def welcome(self, session: CentrifugoSession, admitted: CentrifugoConnect) -> None:
        """The connect reply, with the connect hook's `data` and channels."""
        hooked = admitted.hooked
        session.connected(admitted.command.id, __version__, self.node.settings.ping_interval,
                          hooked_data(hooked), hooked.channels if hooked is not None else [],
                          **(admitted.reply or {}))

    async def started(self, session: CentrifugoSession, admitted: CentrifugoConnect) -> None:
        """The hook's channels (listed in the connect reply: nothing more to tell), then
        the commands that came with `connect`."""
        hooked = admitted.hooked
        if hooked is not None and hooked.channels:
            await self.commands.subscribe_server_side(session, hooked.channels, _told)
        await session.handle_messages(admitted.rest)

    def _opened(self, session: CentrifugoSession) -> None:
        self.sessions.add(session)
        self._start_pinging()

    def _closed(self, session: CentrifugoSession) -> None:
        self.sessions.discard(session)

    def _start_pinging(self) -> None:
        if not self._pinging and self.node.settings.ping_interval:
            self._pinging = True
            self.node.spawn(self._ping_loop())

    async def _ping_loop(self) -> None:
        """`{}` to every connection each HUB_PING_INTERVAL; one that did not answer the
        previous ping is closed with 3012 (centrifuge-python needs the pings themselves:
        other traffic does not count for it)."""
        interval = self.node.settings.ping_interval
        try:
            while self.sessions:
                await asyncio.sleep(interval)
                for session in list(self.sessions):
                    if session.pong_due:
                        session.close(cf.DisconnectCode.NO_PONG, "no pong")
                    else:
                        session.pong_due = True
                        session.push(session.codec.ping_frame)
        finally:
            self._pinging = False


def _told(channel: str) -> Callable[[Joined], None]:
    """A server-side subscription the connect reply announced: nothing more to tell."""
    return _nothing


def _nothing(start: Joined) -> None:
    pass
