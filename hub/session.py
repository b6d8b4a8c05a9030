"""One `/ws` connection after it authenticated: its frames in and out (PROTOCOL §3).

A reader runs commands in order, under a token-bucket rate limit and the token's expiry;
`push` writes straight to the socket when it can and otherwise queues into a bounded
queue that a writer task drains. What the commands do is `hub.commands`' business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from hub import protocol as p
from hub.auth import Identity
from hub.channels import Permissions
from hub.commands import ClientCommands
from hub.errors import CloseCode, ErrorCode, HubError, close_reason
from hub.subscriptions import Joined
from hub.wire import CLOSE_HANDSHAKE_SECONDS, Outbound, frame_of

log = logging.getLogger("hub.session")

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]

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
        "_abandoned",
        "_commands",
        "_expiry_timer",
        "_limited_at",
        "_limited_since",
        "_outbound",
        "_reader",
        "_refilled_at",
        "_tokens",
        "_waiter",
        "client_id",
        "close_code",
        "identity",
        "permissions",
        "queue",
        "user",
    )

    def __init__(
        self, commands: ClientCommands, outbound: Outbound, client_id: str, identity: Identity
    ) -> None:
        self._commands = commands
        self._outbound = outbound
        self.client_id = client_id
        self.identity = identity
        self.user = identity.user
        self.permissions = Permissions(commands.settings, identity.channels, identity.publish)
        self.queue: deque[bytes | _Close] = deque()
        self.close_code: int | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._tokens = 2 * commands.settings.rate_limit
        self._refilled_at = time.monotonic()
        self._limited_since = 0.0
        self._limited_at = 0.0
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._abandoned = False

    # outbound

    def push(self, frame: bytes) -> bool:
        """Hand over a frame without awaiting: straight to the socket when nothing is
        queued and it is writable, else into the bounded queue for the writer task; a
        queue past its limit closes the connection with 4008. False: not delivered."""
        if self.close_code is not None:
            return False
        queue = self.queue
        if not queue and self._outbound.write_now(frame):
            return True
        if self._outbound.closed:
            return False
        if len(queue) >= self._commands.settings.queue_limit:
            self._commands.metrics.messages_dropped.labels("slow_consumer").inc(len(queue) + 1)
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer", flush=False)
            return False
        queue.append(frame)
        self._wake_writer()
        return True

    def reply(self, frame: msgspec.Struct) -> None:
        self.push(frame_of(frame))

    def error(self, code: ErrorCode, message: str, frame_id: int | None) -> None:
        self._commands.metrics.command_errors.labels(code.value).inc()
        self.reply(p.Error(code=code.value, message=message, id=frame_id))

    def close(self, code: int, reason: str = "", *, flush: bool = True) -> None:
        """Close after the queued frames (`flush`) or at once, dropping them."""
        if self.close_code is not None:
            return
        self.close_code = code
        if not flush:
            self.queue.clear()
        self.queue.append(_Close(code, close_reason(reason)))
        self._wake_writer()
        if not flush:  # its queue was dropped: the close goes out now or never
            self._abandon_later()

    def _wake_writer(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

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
                await outbound.close(closing.code, closing.reason)
                self._abandon_later()
                return
        except OSError:
            return  # the peer is gone; the reader sees the disconnect

    def _abandon_later(self) -> None:
        """A close handshake gets CLOSE_HANDSHAKE_SECONDS; then the connection is dropped
        and the session ends, whether or not the peer ever read its close frame."""
        asyncio.get_running_loop().call_later(CLOSE_HANDSHAKE_SECONDS, self._abandon)

    def _abandon(self) -> None:
        reader = self._reader
        if reader is None or reader.done():
            return
        self._outbound.abort()
        self._abandoned = True
        reader.cancel()

    # inbound

    async def run(self, receive: ASGIReceive) -> int:
        """Serve until the connection closes (or is abandoned); returns the close code."""
        writer = asyncio.create_task(self._write_loop())
        self._reader = asyncio.current_task()
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
        except asyncio.CancelledError:
            if not self._abandoned:
                raise
            if self._reader is not None:
                self._reader.uncancel()
        finally:
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()
            if self.close_code is not None:
                code = self.close_code
            self.close_code = self.close_code or code
            if not writer.done():
                writer.cancel()
        return code

    def _allow(self, text: str) -> bool:
        settings = self._commands.settings
        rate = settings.rate_limit
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
        elif now - self._limited_since >= settings.rate_limit_grace:
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
        commands = self._commands
        match command:
            case p.Subscribe(id=frame_id, channel=channel, since=since):
                await commands.subscribe(self, channel, since, self._joined(channel, frame_id))
            case p.Unsubscribe(id=frame_id, channel=channel):
                await commands.unsubscribe(self, channel)
                self.reply(p.Unsubscribed(channel=channel, id=frame_id))
            case p.Publish(id=frame_id, channel=channel, data=data, event=event):
                position = await commands.publish(self, channel, data, event)
                self.reply(p.Published(
                    channel=channel, id=frame_id,
                    offset=position.offset if position else None,
                    epoch=position.epoch if position else None,
                ))
            case p.PresenceRequest(id=frame_id, channel=channel):
                clients = await commands.presence(self, channel)
                self.reply(p.PresenceReply(channel=channel, clients=clients, id=frame_id))
            case p.HistoryRequest(id=frame_id, channel=channel, since=since, limit=limit):
                reply = await commands.history(self, channel, since, limit)
                reply.id = frame_id
                self.reply(reply)
            case p.Refresh(id=frame_id, token=token):
                identity = await commands.refresh(self, token)
                self.identity = identity
                self.permissions = Permissions(
                    commands.settings, identity.channels, identity.publish
                )
                self._arm_expiry()
                self.reply(p.Refreshed(expires=identity.expires, id=frame_id))
            case p.Ping(id=frame_id):
                self.reply(p.Pong(id=frame_id))
            case p.Auth(id=frame_id):
                raise HubError(ErrorCode.BAD_REQUEST, "already authenticated; use refresh")

    def _joined(self, channel: str, frame_id: int | None) -> Callable[[Joined], None]:
        """The `subscribed` reply, then the recovered messages."""

        def reply(start: Joined) -> None:
            position = start.position
            self.reply(p.Subscribed(
                channel=channel, id=frame_id,
                offset=position.offset if position else None,
                epoch=position.epoch if position else None,
                recovered=start.recovered,
            ))
            for message in start.messages:
                self.reply(message)

        return reply

    # token lifetime

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
