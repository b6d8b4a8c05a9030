"""One WebSocket connection after it authenticated, whichever wire protocol it speaks.

A reader hands each text frame to the protocol (`handle`, in `hub.ws_session` and
`hub.centrifugo_session`), under a token-bucket rate limit and the token's expiry; `push`
writes straight to the socket when it can and otherwise queues into a bounded queue that a
writer task drains. What the commands do is `hub.commands`' business.
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
from hub.broker import StreamPosition
from hub.channels import Permissions
from hub.commands import HOOK_RETRY_SECONDS, ClientCommands
from hub.connections import UNKNOWN_ORIGIN, Origin
from hub.errors import CloseCode, ErrorCode, HubError, close_reason
from hub.hooks import (
    Context,
    HookDisconnected,
    HookFailed,
    HookRefused,
    RefreshRequest,
)
from hub.hub import Codec
from hub.subscriptions import Joined
from hub.wire import CLOSE_HANDSHAKE_SECONDS, Outbound

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
    """The part of a connection that does not depend on its protocol."""

    codec: Codec
    __slots__ = (
        "_abandoned",
        "_limited_at",
        "_limited_since",
        "_outbound",
        "_queued",
        "_reader",
        "_refilled_at",
        "_tokens",
        "_writer",
        "client_id",
        "close_code",
        "commands",
        "hook",
        "identity",
        "origin",
        "permissions",
        "queue",
        "user",
    )

    def __init__(
        self, commands: ClientCommands, outbound: Outbound, client_id: str, identity: Identity
    ) -> None:
        self.commands = commands
        self._outbound = outbound
        outbound.release_handshake()
        self.client_id = client_id
        self.identity = identity
        self.user = identity.user
        self.origin: Origin = UNKNOWN_ORIGIN  # the endpoint sets it, for /api/connections
        self.permissions = Permissions(commands.settings, identity.channels, identity.publish)
        # Only while the socket pushes back: what waits to be written (each piece with the
        # frames it holds), how many frames that is, and who writes it.
        self.queue: deque[tuple[bytes, int] | _Close] | None = None
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self._tokens = 2 * commands.settings.rate_limit
        self._refilled_at = commands.node.clock()
        self._limited_since = 0.0
        self._limited_at = 0.0
        self._reader: asyncio.Task[Any] | None = None
        self._abandoned = False
        self.hook: Context | None = None  # when the node has hooks (PROTOCOL §13)

    # outbound

    def push(self, frame: bytes, count: int = 1) -> bool:
        """Hand over a frame (or a run of `count`) without awaiting: straight to the socket
        when nothing is queued and it is writable, else into the bounded queue that a
        writer task drains (both exist only while the socket pushes back); frames past the
        queue's limit close the connection with 4008. False: not delivered."""
        if self.close_code is not None:
            return False
        queue = self.queue
        if queue is None:
            if self._outbound.write_now(frame):
                return True
            if self._outbound.closed:
                return False
            queue = self._queue_up()
        elif self._queued + count > self.commands.settings.queue_limit:
            dropped = self._queued + count
            self.commands.metrics.messages_dropped.labels("slow_consumer").inc(dropped)
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer", flush=False)
            return False
        queue.append((frame, count))
        self._queued += count
        return True

    def count_error(self, code: ErrorCode) -> None:
        self.commands.metrics.command_errors.labels(code.value).inc()

    def close(self, code: int, reason: str = "", *, flush: bool = True) -> None:
        """Close after the queued frames (`flush`) or at once, dropping them."""
        if self.close_code is not None:
            return
        self.close_code = code
        queue = self.queue
        if queue is None:
            queue = self._queue_up()
        elif not flush:
            queue.clear()
            self._queued = 0
        queue.append(_Close(code, close_reason(reason)))
        if not flush:  # its queue was dropped: the close goes out now or never
            self._abandon_later()

    def _queue_up(self) -> deque[tuple[bytes, int] | _Close]:
        """The socket pushes back (or a close must go out): from now on frames queue, in
        order, until the writer task has written them all."""
        queue: deque[tuple[bytes, int] | _Close] = deque()
        self.queue = queue
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(queue))
        return queue

    async def _write_loop(self, queue: deque[tuple[bytes, int] | _Close]) -> None:
        """Drains the queue, in order, as the socket allows; once it is empty, `push`
        writes straight to the socket again."""
        outbound = self._outbound
        try:
            while queue:
                await outbound.ready()
                frames: list[bytes] = []
                while queue and type(queue[0]) is tuple:
                    frame, count = queue.popleft()  # type: ignore[misc]
                    frames.append(frame)
                    self._queued -= count
                if frames:
                    await outbound.write(frames)
                    continue
                closing = queue.popleft()
                assert isinstance(closing, _Close)
                await outbound.close(*self.wire_close(closing.code, closing.reason))
                self._abandon_later()
                return
        except OSError:
            return  # the peer is gone; the reader sees the disconnect
        finally:
            if self.queue is queue and not queue:
                self.queue = None
            self._writer = None

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
        self._reader = asyncio.current_task()
        self._arm_expiry()
        code: int = CloseCode.NORMAL
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    text = message.get("text")
                    if self.close_code is not None:
                        continue
                    if text is None:
                        await self.handle_binary(message.get("bytes") or b"")
                    else:
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
            if self.close_code is not None:
                code = self.close_code
            self.close_code = self.close_code or code
            writer = self._writer
            if writer is not None and not writer.done():
                writer.cancel()
        return code

    def allow(self) -> bool:
        """Take a token for one command; False: refuse it (the protocol answers so), and
        past HUB_RATE_LIMIT_GRACE of refusals the connection is closed with 4029."""
        settings = self.commands.settings
        rate = settings.rate_limit
        if not rate:
            return True
        now = self.commands.node.clock()  # no slot of its own: 8 bytes a connection
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
        return False

    # what a protocol adds

    async def handle(self, text: str) -> None:
        """One text frame of the client."""
        raise NotImplementedError

    async def handle_binary(self, data: bytes) -> None:
        """One binary frame of the client: refused, unless the protocol has an encoding
        that uses them."""
        self.close(CloseCode.BINARY_FRAME, "binary frames are not accepted")

    def reset(self, channel: str, position: StreamPosition) -> bool:
        """`Subscriber.reset`."""
        raise NotImplementedError

    def subscription_expired(self, channel: str) -> None:
        """Tell the client that a hooked subscription ended at its `expire_at` (PROTOCOL
        §13)."""
        raise NotImplementedError

    def server_subscribed(self, command: p.ServerSubscribe) -> Callable[[Joined], None]:
        """How the client hears of a subscription the server API made (PROTOCOL §15):
        called with its start, before any message of the channel."""
        raise NotImplementedError

    def server_unsubscribed(self, channel: str) -> None:
        """How the client hears that the server API ended a subscription."""
        raise NotImplementedError

    def server_refreshed(self, identity: Identity) -> None:
        """How the client hears of a new expiry the server API gave it."""
        raise NotImplementedError

    def wire_close(self, code: int, reason: str) -> tuple[int, str]:
        """The close code and reason this protocol sends for one of the hub's (PROTOCOL §3)."""
        return code, reason

    def refreshed(self, identity: Identity) -> None:
        """Take on a new token for the same user: rights and expiry."""
        self.identity = identity
        self.permissions = Permissions(self.commands.settings, identity.channels,
                                       identity.publish)
        self._arm_expiry()

    # what the server API asks (PROTOCOL §15, §16)

    async def server_command(self, command: p.ServerCommand) -> None:
        """`Subscriber.server_command`: a failure for this connection is logged and
        counted, and touches nothing else."""
        if self.close_code is not None:
            return
        commands = self.commands
        try:
            if isinstance(command, p.ServerSubscribe):
                await commands.server_subscribe(
                    self, command.channel, command.since, self.server_subscribed(command)
                )
            elif isinstance(command, p.ServerUnsubscribe):
                # No channel: every one (Centrifugo's server API).
                channels = [command.channel] if command.channel else (
                    commands.node.subscriptions.channels_of(self))
                for channel in channels:
                    if await commands.server_unsubscribe(self, channel):
                        self.server_unsubscribed(channel)
            else:
                self._server_refresh(command)
        except HubError as exc:
            self.count_error(exc.code)
            log.warning("server %s for one connection failed: %s", command.__class__.__name__,
                        exc.message, extra={"client": self.client_id, "user": self.user})
        except Exception:
            log.exception("server %s for one connection failed", command.__class__.__name__,
                          extra={"client": self.client_id, "user": self.user})

    def _server_refresh(self, command: p.ServerRefresh) -> None:
        """Centrifugo's meanings: `expired`, or an `expire_at` already past, closes it as
        expired; no `expire_at` means no expiry from now on."""
        expires = command.expire_at or None
        if command.expired or (expires is not None and expires <= time.time()):
            self.close(CloseCode.TOKEN_EXPIRED, "connection expired")
            return
        info = command.info if len(command.info) else self.identity.info
        identity = msgspec.structs.replace(self.identity, expires=expires, info=info)
        self.refreshed(identity)
        self.server_refreshed(identity)

    # token lifetime

    @property
    def expires(self) -> int | None:
        return self.identity.expires

    def expired(self) -> None:
        """The expiry clock's call at `expires`: a connection the connect hook let in asks
        the refresh hook (when there is one); any other is closed with 4002."""
        hook = self.hook
        hooks = self.commands.node.hooks
        if hook is None or not hook.hooked or not hooks.has("refresh"):
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")
            return
        if not hook.refreshing:
            hook.refreshing = True
            self.commands.node.spawn(self._refresh_by_hook(hook))

    async def _refresh_by_hook(self, hook: Context) -> None:
        """`expired`: close 4002; a later `expire_at` moves the end (0: never); a failed
        call is tried again HOOK_RETRY_SECONDS later, the connection kept meanwhile."""
        hooks = self.commands.node.hooks
        identity = self.identity
        try:
            request = RefreshRequest(**hook.wire, client=self.client_id, user=self.user,
                                     meta=hook.meta)
            result = await hooks.refresh(hook, request)
        except HookDisconnected as disconnect:
            self.close(disconnect.code, disconnect.reason)
            return
        except (HookFailed, HookRefused):
            retry = int(time.time() + HOOK_RETRY_SECONDS)
            self.refreshed(msgspec.structs.replace(identity, expires=retry))
            return
        finally:
            hook.refreshing = False
        if result.expired or (result.expire_at and result.expire_at <= time.time()):
            self.close(CloseCode.TOKEN_EXPIRED, "connection expired")
            return
        info = identity.info if result.info is None else msgspec.Raw(
            msgspec.json.encode(result.info))
        self.refreshed(msgspec.structs.replace(
            identity, expires=result.expire_at or None, info=info))

    def _arm_expiry(self) -> None:
        """The node's expiry clock closes it with 4002 when its token expires (a refresh
        arms it again; the clock looks at the expiry the connection has by then)."""
        expires = self.identity.expires
        if expires is not None:
            self.commands.node.expiries.watch(self.client_id, expires)
