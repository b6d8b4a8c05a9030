"""One WebSocket connection after it authenticated: a reader that runs commands in order,
a writer task that drains a bounded queue, a token-bucket rate limit and the token's expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from hub import protocol as p
from hub.auth import AuthFailed, Identity
from hub.channels import Permissions
from hub.errors import CloseCode, ErrorCode, HubError, close_reason
from hub.wire import ASGISend, frame_of, outbound_for

if TYPE_CHECKING:
    from hub.node import Node

log = logging.getLogger("hub.session")

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
# A close handshake gets this long once our close frame is out (PROTOCOL §5: 5 s), then the
# TCP connection is dropped.
CLOSE_HANDSHAKE_SECONDS = 5.0

# Refusals closer together than this are one stretch of abuse; a stretch that lasts
# HUB_RATE_LIMIT_GRACE closes the connection with 4029.
RATE_LIMIT_STRETCH_GAP = 1.0



class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class Session:
    __slots__ = (
        "_expiry_timer",
        "_limited_at",
        "_limited_since",
        "_outbound",
        "_refilled_at",
        "_send",
        "_tokens",
        "_waiter",
        "_writer",
        "client_id",
        "close_code",
        "identity",
        "joining",
        "node",
        "permissions",
        "queue",
        "queue_limit",
        "subscriptions",
        "user",
    )

    def __init__(self, node: Node, send: ASGISend, client_id: str, identity: Identity) -> None:
        self.node = node
        self._send = send
        self.client_id = client_id
        self.identity = identity
        self.user = identity.user
        self.permissions = Permissions(node.settings, identity.channels, identity.publish)
        self.subscriptions: set[str] = set()
        self.joining: set[str] = set()
        self.queue: deque[bytes | _Close] = deque()
        self._outbound = outbound_for(send)
        self.queue_limit = node.settings.queue_limit
        self.close_code: int | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._tokens = 2 * node.settings.rate_limit
        self._refilled_at = time.monotonic()
        self._limited_since = 0.0
        self._limited_at = 0.0
        self._expiry_timer: asyncio.TimerHandle | None = None

    # outbound

    def push(self, frame: bytes) -> bool:
        """Hand over a frame without awaiting: straight to the socket when nothing is
        queued and it is writable, else into the bounded queue for the writer task; a
        queue past its limit closes the connection with 4008. False: not delivered."""
        if self.close_code is not None:
            return False
        queue = self.queue
        if not queue:
            if self._outbound.write_now(frame):
                return True
        elif len(queue) >= self.queue_limit:
            self.node.metrics.messages_dropped.labels("slow_consumer").inc(len(queue) + 1)
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer", flush=False)
            return False
        queue.append(frame)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return True

    def reply(self, frame: msgspec.Struct) -> None:
        self.push(frame_of(frame))

    def error(self, code: ErrorCode, message: str, frame_id: int | None) -> None:
        self.node.metrics.command_errors.labels(code.value).inc()
        self.reply(p.Error(code=code.value, message=message, id=frame_id))

    def close(self, code: int, reason: str = "", *, flush: bool = True) -> None:
        """Close after the queued frames (`flush`) or at once, dropping them."""
        if self.close_code is not None:
            return
        self.close_code = code
        if not flush:
            self.queue.clear()
        self.queue.append(_Close(code, close_reason(reason)))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if not flush:  # its queue was dropped: the close goes out now or never
            self._outbound.abort_later(CLOSE_HANDSHAKE_SECONDS)

    async def _write_loop(self) -> None:
        """Drains what `push` could not write at once, in order, as the socket allows."""
        queue, outbound = self.queue, self._outbound
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not queue:
                    self._waiter = loop.create_future()
                    await self._waiter
                    continue
                await outbound.ready()
                frames: list[bytes] = []
                while queue and type(queue[0]) is bytes:
                    frames.append(queue.popleft())  # type: ignore[arg-type]
                if frames:
                    await outbound.write(frames)
                    continue
                closing = queue.popleft()
                assert isinstance(closing, _Close)
                await self._send(
                    {"type": "websocket.close", "code": closing.code, "reason": closing.reason}
                )
                outbound.abort_later(CLOSE_HANDSHAKE_SECONDS)
                return
        except OSError:
            return  # the peer is gone; the reader sees the disconnect

    # inbound

    async def run(self, receive: ASGIReceive) -> int:
        """Serve until the connection closes; returns the close code."""
        self._writer = asyncio.create_task(self._write_loop())
        self._arm_expiry()
        code: int = CloseCode.NORMAL
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    text = message.get("text")
                    if text is None:
                        self.close(CloseCode.BINARY_FRAME, "binary frames are not accepted")
                        continue
                    if self.close_code is None and self._allow(text):
                        await self.handle(text)
                elif kind == "websocket.disconnect":
                    code = int(message.get("code", CloseCode.NORMAL))
                    break
        finally:
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()
            if self.close_code is not None:
                code = self.close_code
            self.close_code = self.close_code or code
            writer = self._writer
            if writer is not None and not writer.done():
                writer.cancel()
        return code

    def _allow(self, text: str) -> bool:
        rate = self.node.settings.rate_limit
        if not rate:
            return True
        now = time.monotonic()
        self._tokens = min(2 * rate, self._tokens + (now - self._refilled_at) * rate)
        self._refilled_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        # A client over its rate gets a command through now and then as tokens trickle
        # back; that does not end the stretch, only a pause in refusals does.
        if not self._limited_since or now - self._limited_at > RATE_LIMIT_STRETCH_GAP:
            self._limited_since = now
        elif now - self._limited_since >= self.node.settings.rate_limit_grace:
            self.close(CloseCode.TOO_MANY_COMMANDS, "too many commands", flush=False)
            return False
        self._limited_at = now
        self.error(ErrorCode.RATE_LIMITED, "too many commands, slow down", p.frame_id_of(text))
        return False

    async def handle(self, text: str) -> None:
        frame_id: int | None = None
        try:
            command = p.decode_command(text)
            frame_id = command.id
            await self.dispatch(command)
        except p.BadFrame as exc:
            self.error(exc.code, exc.message, exc.frame_id)
        except HubError as exc:
            self.error(exc.code, exc.message, frame_id)
        except Exception:
            log.exception("command failed", extra={"client": self.client_id, "user": self.user})
            self.error(ErrorCode.INTERNAL, "internal error", frame_id)

    async def dispatch(self, command: p.Command) -> None:
        node = self.node
        match command:
            case p.Subscribe(id=frame_id, channel=channel, since=since):
                await node.subscribe(self, channel, since, frame_id)
            case p.Unsubscribe(id=frame_id, channel=channel):
                await node.unsubscribe(self, channel)
                self.reply(p.Unsubscribed(channel=channel, id=frame_id))
            case p.Publish(id=frame_id, channel=channel, data=data, event=event):
                position = await node.publish_from_client(self, channel, data, event)
                self.reply(p.Published(
                    channel=channel, id=frame_id,
                    offset=position.offset if position else None,
                    epoch=position.epoch if position else None,
                ))
            case p.PresenceRequest(id=frame_id, channel=channel):
                self.permissions.check_subscribe(channel)
                clients = await node.presence_of(channel)
                anonymous = [p.ClientInfo(c.client, c.user, None, c.info) for c in clients]
                self.reply(p.PresenceReply(channel=channel, clients=anonymous, id=frame_id))
            case p.HistoryRequest(id=frame_id, channel=channel, since=since, limit=limit):
                self.permissions.check_subscribe(channel)
                reply = await node.history(channel, since, limit)
                reply.id = frame_id
                self.reply(reply)
            case p.Refresh(id=frame_id, token=token):
                await self.refresh(token, frame_id)
            case p.Ping(id=frame_id):
                self.reply(p.Pong(id=frame_id))
            case p.Auth(id=frame_id):
                raise HubError(ErrorCode.BAD_REQUEST, "already authenticated; use refresh")

    # token lifetime

    async def refresh(self, token: str, frame_id: int | None) -> None:
        try:
            identity = await self.node.authenticator.verify(token)
        except AuthFailed as exc:
            raise HubError(ErrorCode.FORBIDDEN, f"refresh refused: {exc}") from None
        if identity.user != self.user:
            raise HubError(ErrorCode.FORBIDDEN, "refresh token is for another user")
        self.identity = identity
        self.permissions = Permissions(self.node.settings, identity.channels, identity.publish)
        self._arm_expiry()
        self.reply(p.Refreshed(expires=identity.expires, id=frame_id))

    def _arm_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        expires = self.identity.expires
        if expires is None:
            return
        delay = max(0.0, expires - time.time())
        self._expiry_timer = asyncio.get_running_loop().call_later(
            delay, self.close, CloseCode.TOKEN_EXPIRED, "token expired"
        )
