"""Centrifugo's one-way transports (PROTOCOL §15), for clients without an SDK: the connect
request once, then a stream of pushes.

- `/connection/uni_sse`: `GET ?cf_connect=<JSON connect request>` (or POST it), SSE events,
  one push per event; a publication of a history channel has its offset as the event `id`,
  and a reconnecting EventSource's `Last-Event-ID` recovers from there.
- `/connection/uni_http_stream`: POST the connect request; one JSON push per line.
- `/connection/uni_websocket`: the connect request as the first message; one push per frame.

The connection's channels are its token's `channels` claim entries without wildcards
(server-side subscriptions), subscribed through the node's ordinary subscribe path, so a
server-side subscription added later reaches it the same way. The first push is
`{"connect": {...}}` with each subscription's start in `subs` (`recoverable`, `epoch`,
`offset`, `recovered`); publications recovered follow it, then what the channels carry.
Keepalive: the framing's (an SSE comment, a `{}` line or frame) every HUB_PING_INTERVAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgspec

from hub import __version__
from hub import centrifugo_frames as cf
from hub import protocol as p
from hub.auth import Identity
from hub.centrifugo_codecs import centrifugo_personal
from hub.centrifugo_endpoint import CentrifugoAuth, _ConnectError, _Refused
from hub.centrifugo_session import CentrifugoSession
from hub.channels import is_personal, is_valid, personal_channel
from hub.commands import ClientCommands
from hub.connections import Origin
from hub.emulation import _error, connect_data, origin_refused
from hub.errors import BrokerUnavailable, CloseCode, HubError
from hub.hooks import ConnectResult, Context, hooked_data
from hub.lifecycle import Refused, WebSocketLifecycle, close_socket, new_client_id
from hub.node import Node
from hub.session import ASGIReceive
from hub.stream_codec import (
    UNI_HTTP_STREAM,
    UNI_SSE,
    UNI_WEBSOCKET,
    StreamCodec,
    UniConnect,
    UniPush,
    UniSubscribe,
)
from hub.streams import (
    STREAM_HEADERS,
    StreamOutbound,
    header,
    plain_response,
    until_disconnect,
)
from hub.subscriptions import Joined, history_options
from hub.wire import ASGISend, Outbound, WritePath

log = logging.getLogger("hub.uni")

UNI_SSE_PATH = "/connection/uni_sse"
UNI_HTTP_STREAM_PATH = "/connection/uni_http_stream"
UNI_WEBSOCKET_PATH = "/connection/uni_websocket"
_WILDCARDS = frozenset("*?[")


def server_side_channels(identity: Identity) -> list[str]:
    """The token's `channels` entries that name one channel (no wildcard), in order."""
    seen: dict[str, None] = {}
    for channel in identity.channels:
        if not _WILDCARDS.intersection(channel):
            seen.setdefault(channel, None)
    return list(seen)


class UniSession(CentrifugoSession):
    """A one-way Centrifugo connection: it reads nothing but its end. While it connects,
    what its channels carry is held (`_held`), so that the connect push goes first."""

    __slots__ = ("_held", "_subs")
    stream_codec: StreamCodec

    def __init__(self, commands: ClientCommands, outbound: Outbound, client_id: str,
                 identity: Identity) -> None:
        super().__init__(commands, outbound, client_id, identity, self.stream_codec)
        self._held: list[tuple[bytes, int]] | None = []
        self._subs: dict[str, UniSubscribe] = {}

    def push(self, frame: bytes, count: int = 1) -> bool:
        held = self._held
        if held is None:
            return super().push(frame, count)
        if len(held) >= self.commands.settings.queue_limit:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer", flush=False)
            return False
        held.append((frame, count))
        return True

    async def handle(self, text: str) -> None:
        return None  # one way: what the client sends is not read

    async def handle_binary(self, data: bytes) -> None:
        return None

    def reset(self, channel: str, position: Any) -> bool:
        """A channel lost messages its history cannot give back: close with Centrifugo's
        "insufficient state" (the client reconnects and recovers from its position)."""
        self.close(cf.DisconnectCode.INSUFFICIENT_STATE, "insufficient state")
        return False

    async def start(self, channels: dict[str, p.Since | None], ping_interval: float,
                    data: msgspec.Raw | None = None, hooked: Collection[str] = ()) -> None:
        """Subscribe the server-side channels, then write the connect push (with the
        connect hook's `data`, if any) and what was held behind it. `hooked`: the connect
        hook's channels, subscribed as the server API subscribes (no permission check, as
        on /connection/websocket); the token's go through the namespace's rules."""
        commands = self.commands
        for channel, since in channels.items():
            if self.close_code is not None:
                return
            started = self._started(channel, since)
            try:
                if channel not in hooked:
                    await commands.subscribe(self, channel, since, started)
                elif is_valid(channel) and not is_personal(channel):
                    await commands.server_subscribe(self, channel, since, started)
                else:
                    log.warning("connect hook: skipped channel %r (not a client channel)",
                                channel)
            except BrokerUnavailable:
                # Its channels cannot be joined now: come back (to another node, maybe).
                self.close(CloseCode.TRY_AGAIN_LATER, "try again later")
                return
            except HubError as exc:
                log.info("server-side subscription to %s refused: %s", channel, exc.message,
                         extra={"client": self.client_id, "user": self.user})
        # A connection the connect hook let in is refreshed by the server (the refresh
        # hook): its client is told of no expiry.
        by_hook = self.hook is not None and self.hook.hooked
        expires, ttl = (False, 0) if by_hook else self._lifetime(self.identity)
        subs: dict[str, UniSubscribe] = {}
        if self.user:  # the personal channel under both its names, as on the WebSocket
            subs[centrifugo_personal(self.user)] = UniSubscribe()
            subs[personal_channel(self.user)] = UniSubscribe()
        subs.update(self._subs)
        ping = math.ceil(ping_interval) if ping_interval else 0
        connect = UniConnect(client=self.client_id, version=__version__, expires=expires,
                             ttl=ttl, subs=subs, ping=ping, session=self.client_id, data=data)
        held, self._held = self._held or [], None
        super().push(self.codec.push(UniPush(connect=connect)))
        for frame, count in held:
            super().push(frame, count)

    def _started(self, channel: str, since: p.Since | None) -> Any:
        def record(start: Joined) -> None:
            position = start.position
            if position is None:
                self._subs[channel] = UniSubscribe()
                return
            recovered = bool(start.recovered)
            offset = since.offset if recovered and since is not None else position.offset
            self._subs[channel] = UniSubscribe(
                recoverable=True, positioned=True, epoch=position.epoch, offset=offset,
                recovered=recovered, was_recovering=since is not None)
            codec = self.codec
            for message in start.messages:
                self.push(codec.message(message))

        return record


class UniSseSession(UniSession):
    __slots__ = ()
    stream_codec = UNI_SSE


class UniHttpStreamSession(UniSession):
    __slots__ = ()
    stream_codec = UNI_HTTP_STREAM


class UniWebSocketSession(UniSession):
    __slots__ = ()
    stream_codec = UNI_WEBSOCKET


class _BadConnect(Exception):
    pass


def decode_connect(data: bytes) -> cf.ConnectRequest:
    try:
        request: cf.ConnectRequest = msgspec.json.decode(data, type=cf.ConnectRequest)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _BadConnect(f"bad connect request: {exc}") from None
    return request


@dataclass(slots=True)
class UniAdmitted:
    """An admitted one-way connection: who, its connect request, and an EventSource's
    `Last-Event-ID`."""

    identity: Identity
    hooked: ConnectResult | None
    context: Context | None
    request: cf.ConnectRequest
    last_event_id: str | None = None


class UniBase(CentrifugoAuth[UniSession, UniAdmitted]):
    """What the three one-way endpoints share: authentication, the channels and where
    each starts (`started`, in the life of `hub.lifecycle`), the keepalive."""

    session_class: type[UniSession]

    def __init__(self, node: Node, commands: ClientCommands, write_path: WritePath) -> None:
        super().__init__(node, commands, write_path)
        self.uni_sessions: set[UniSession] = set()
        self._keeping_alive = False

    async def starts(self, identity: Identity, request: cf.ConnectRequest,
                     last_event_id: str | None, hooked: ConnectResult | None = None
                     ) -> dict[str, p.Since | None]:
        """Each server-side channel (the token's, then the connect hook's), and where to
        recover it from: the connect request's `subs`, else (one history channel only) the
        EventSource's `Last-Event-ID`, taken in the channel's current epoch."""
        settings = self.node.settings
        channels = server_side_channels(identity)
        if hooked is not None:
            channels.extend(c for c in dict.fromkeys(hooked.channels) if c not in channels)
        asked = request.subs or {}
        starts: dict[str, p.Since | None] = {c: asked[c].since if c in asked else None
                                             for c in channels}
        history = [c for c in channels if history_options(settings, c) is not None]
        resume = _event_offset(last_event_id)
        if resume is not None and len(history) == 1 and starts[history[0]] is None:
            starts[history[0]] = p.Since(resume, "")
        for channel, since in starts.items():
            if since is not None and not since.epoch and channel in history:
                with contextlib.suppress(HubError, Exception):
                    top = (await self.node.history_page(channel, None, 0)).position
                    starts[channel] = p.Since(since.offset, top.epoch)
        return starts

    async def started(self, session: UniSession, admitted: UniAdmitted) -> None:
        """The server-side channels, then the connect push and what they held."""
        hooked = admitted.hooked
        starts = await self.starts(admitted.identity, admitted.request, admitted.last_event_id,
                                   hooked)
        await session.start(starts, self.node.settings.ping_interval, hooked_data(hooked),
                            hooked.channels if hooked is not None else ())

    def _opened(self, session: UniSession) -> None:
        self.uni_sessions.add(session)
        self._keep_alive()

    def _closed(self, session: UniSession) -> None:
        self.uni_sessions.discard(session)

    def _keep_alive(self) -> None:
        if not self._keeping_alive and self.node.settings.ping_interval:
            self._keeping_alive = True
            self.node.spawn(self._keepalive_loop())

    async def _keepalive_loop(self) -> None:
        """The framing's keepalive to every one-way connection each HUB_PING_INTERVAL, so
        that proxies do not cut an idle stream (no answer is expected)."""
        interval = self.node.settings.ping_interval
        try:
            while self.uni_sessions:
                await asyncio.sleep(interval)
                for session in list(self.uni_sessions):
                    session.push(session.codec.ping_frame)
        finally:
            self._keeping_alive = False


def _event_offset(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 20 else None


class UniStreamEndpoint(UniBase):
    """`/connection/uni_sse` and `/connection/uni_http_stream`. Refusals before the
    stream: 400 malformed connect request, 401 invalid or expired token or the connect
    hook's `disconnect` (the body says which, as Centrifugo's disconnect), 403 origin or
    the connect hook's non-temporary `error` (the body: that error); a node full or
    draining, or the connect hook failed or answered a temporary error, streams one
    disconnect push with `reconnect: true` (an EventSource comes back)."""

    def __init__(self, node: Node, commands: ClientCommands, write_path: WritePath,
                 session_class: type[UniSession]) -> None:
        super().__init__(node, commands, write_path)
        self.session_class = session_class

    async def __call__(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        if await origin_refused(self.node, scope, send):
            return
        data, why = await connect_data(scope, receive, 2 * self.node.settings.max_frame_bytes)
        if data is None:
            status = 405 if why == "method not allowed" else 413 if "large" in why else 400
            await _error(send, status, why)
            return
        codec = self.session_class.stream_codec
        outbound = StreamOutbound(send, codec.disconnect)
        headers = [(b"content-type", codec.framing.content_type), *STREAM_HEADERS]
        context = self._hook_context(scope, False, "uni_" + codec.framing.name)
        client_id = new_client_id()
        try:
            request = decode_connect(data)
            identity, hooked = await self._admit(scope, cf.Command(id=1, connect=request),
                                                 context, client_id)
        except _BadConnect as exc:
            await _disconnect_response(send, 400, cf.DisconnectCode.BAD_REQUEST, str(exc))
            return
        except Refused as refused:
            self.count_refusal(refused)
            await self._refuse(refused, send, outbound, headers, codec)
            return
        await outbound.start(200, headers, codec.framing.prelude)
        last_event_id = header(scope, b"last-event-id")
        origin = Origin.of_scope(scope)
        session = self.session_class(self.commands, outbound, client_id, identity)
        session.origin = origin
        session.hook = context
        reader = functools.partial(until_disconnect, receive)
        try:
            await self.live(session, UniAdmitted(identity, hooked, context, request,
                                                last_event_id), reader)
        finally:
            await outbound.finish()


    async def _refuse(self, refused: Refused, send: ASGISend, outbound: StreamOutbound,
                      headers: list[tuple[bytes, bytes]], codec: StreamCodec) -> None:
        """Before the stream, where the client should not come back: 401 with Centrifugo's
        disconnect (a token, the hook's `disconnect`), 403 with the hook's error; a stream
        of one disconnect push where it should (full or draining, a failed hook call or a
        temporary error), for an EventSource gives up on anything but 200."""
        code: int
        if isinstance(refused, _ConnectError):
            error = refused.reply.error
            assert error is not None
            if not error.temporary:
                body = msgspec.json.encode({"error": {"code": error.code,
                                                      "message": error.message}})
                await plain_response(send, 403, body)
                return
            code, reason = cf.DisconnectCode.SERVER_ERROR, cf.reason_for(
                cf.DisconnectCode.SERVER_ERROR)
        elif refused.counted == CloseCode.TRY_AGAIN_LATER:
            code, reason = refused.code, refused.reason
        else:  # _Refused, or _Expired (3005 "token expired")
            await _disconnect_response(send, 401, refused.code, refused.reason)
            return
        await outbound.start(200, headers, codec.framing.prelude)
        await outbound.close(code, reason)
        await outbound.finish()


async def _disconnect_response(send: ASGISend, status: int, code: int, reason: str) -> None:
    body = msgspec.json.encode({"disconnect": {"code": int(code), "reason": reason}})
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


class UniWebSocketEndpoint(UniBase, WebSocketLifecycle[UniSession, UniAdmitted]):
    """`/connection/uni_websocket`: the connect request as the first message (within
    HUB_AUTH_TIMEOUT); refusals close with Centrifugo's codes, as on
    `/connection/websocket`."""

    session_class = UniWebSocketSession

    async def handshake(self, scope: dict[str, Any], receive: ASGIReceive, client_id: str
                        ) -> UniAdmitted:
        context = self._hook_context(scope, False, "uni_websocket")
        request = await self._first_request(receive)
        identity, hooked = await self._identify(scope, cf.Command(id=1, connect=request),
                                                context, client_id)
        return UniAdmitted(identity, hooked, context, request)

    async def refuse(self, refused: Refused, scope: dict[str, Any], send: ASGISend,
                     receive: ASGIReceive) -> None:
        if isinstance(refused, _ConnectError):
            # No reply to carry the error: closed as /connection/websocket closes a client
            # that did not act on it (3004 reconnect if temporary, else 3503).
            error = refused.reply.error
            code = cf.DisconnectCode.SERVER_ERROR if error is not None and error.temporary \
                else cf.DisconnectCode.FORCE_NO_RECONNECT
            await close_socket(send, code, cf.reason_for(code))
        else:  # _Refused, or _Expired (3005 "token expired")
            await close_socket(send, refused.code, refused.reason)

    def session(self, admitted: UniAdmitted, outbound: Outbound, client_id: str
                ) -> UniSession:
        session = UniWebSocketSession(self.commands, outbound, client_id, admitted.identity)
        session.hook = admitted.context
        return session

    async def _first_request(self, receive: ASGIReceive) -> cf.ConnectRequest:
        node = self.node
        message = await self._first_message(receive)
        text = message.get("text")
        data = text.encode() if text is not None else message.get("bytes") or b""
        try:
            return decode_connect(data)
        except _BadConnect:
            node.metrics.auth_failed("missing")
            raise _Refused(cf.DisconnectCode.BAD_REQUEST, "bad request",
                           CloseCode.UNAUTHORIZED) from None

