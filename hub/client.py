"""`hub.client`: the hub's own asyncio client for `/ws` (PROTOCOL §3, §5, §17), on
`websockets`.

    from hub.client import connect

    async with connect("ws://host:8000/ws", token=T) as client:   # or get_token=callable
        sub = await client.subscribe("news")                        # since=(offset, epoch)
        async for item in sub:     # a Message, or a Reset: messages were lost, reload
            ...
        await client.publish("chat:x", {"text": "hi"})

What it does for the application, so that a service that consumes the hub writes none of it:

- It reconnects (to the next of its URLs, when given several) with exponential backoff and
  full jitter, and subscribes again to every channel, passing `since` on channels with
  history: the server sends what was missed, in order. Each message of a history channel
  reaches the application once and in order: a message at or below the subscription's
  position in the same epoch (a duplicate across a reconnect) is dropped here.
- When the missed messages cannot be had (history gone, epoch changed), the subscription
  yields a `Reset` where the contract says one happens: a `reset` frame, or a resubscribe
  (or a first subscribe with `since`) answered `recovered: false`. Messages after it are of
  the new position; the application reloads its state at that point.
- With `get_token`, a token is fetched for every connection and a new one sent (`refresh`)
  before the current one expires.
- Back-pressure instead of loss: each subscription has a bounded queue; when the application
  does not keep up, the client stops reading the socket (and the server, in the end, closes
  it as a slow consumer: the client reconnects and recovers).

Closes that say "go away" are final: 4003 (disconnected by the server API), 1008 (policy),
1003/1009 (this client sent what the server refuses), and 4001/4002 without `get_token`.
Then iterators raise `ClientClosed`, as do calls. Any other close is reconnected.
Join/leave events are not surfaced (the presence call answers who is there).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

__all__ = [
    "Client", "ClientClosed", "ClientError", "CommandError", "ConnectionLost", "History",
    "Message", "PresenceMember", "Published", "Reset", "Subscription", "connect",
]

log = logging.getLogger("hub.client")

TokenSource = Callable[[], Awaitable[str] | str]
Handler = Callable[["Message | Reset"], Awaitable[None] | None]

# Close codes after which reconnecting would only be refused again (PROTOCOL §3).
FINAL_CLOSES = frozenset({1003, 1008, 1009, 4003})
AUTH_CLOSES = frozenset({4001, 4002})  # final unless get_token can bring a new token


# what the application gets


class Message(msgspec.Struct, frozen=True):
    """A publication. `offset` and `epoch` on channels with history; `from_` (`from` on
    the wire) is the publishing user of a client publish."""

    channel: str
    data: Any
    ts: int = 0
    event: str | None = None
    offset: int | None = None
    epoch: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")


class Reset(msgspec.Struct, frozen=True):
    """Messages of `channel` were lost for good; the subscription goes on from `offset` in
    `epoch`. Reload the state that the messages build."""

    channel: str
    offset: int
    epoch: str


class Published(msgspec.Struct, frozen=True):
    channel: str
    offset: int | None = None
    epoch: str | None = None


class PresenceMember(msgspec.Struct, frozen=True):
    client: str
    user: str
    info: Any = None


class History(msgspec.Struct, frozen=True):
    channel: str
    epoch: str
    offset: int
    messages: list[Message]


class ClientError(Exception):
    """Base of this module's errors."""


class CommandError(ClientError):
    """The server answered a command with an error frame (`code` as PROTOCOL §3 names it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(ClientError):
    """The connection ended before the reply came: the command may or may not have been
    carried out (a publish, say). Not retried."""


class ClientClosed(ClientError):
    """The client stopped for good: closed by the application, or by a final close code."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"closed ({code}: {reason})" if code is not None else "closed")
        self.code = code
        self.reason = reason


# the wire


class _Frame(msgspec.Struct):
    """Every server frame, read leniently: fields a type does not have stay at their
    default, and unknown fields and types are ignored (a newer server)."""

    type: str
    id: int | None = None
    channel: str | None = None
    data: Any = None
    ts: int = 0
    event: str | None = None
    offset: int | None = None
    epoch: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    recovered: bool | None = None
    client: str | None = None
    user: str | None = None
    node: str | None = None
    expires: int | None = None
    code: str | None = None
    message: str | None = None
    clients: list[PresenceMember] | None = None
    messages: list[dict[str, Any]] | None = None


_decoder = msgspec.json.Decoder(_Frame)
_encoder = msgspec.json.Encoder()


class _End:
    """Put in a subscription's queue when it ends; `error` is raised, or iteration stops."""

    def __init__(self, error: ClientClosed | None) -> None:
        self.error = error


class Subscription:
    """One channel. Iterate it (`async for item in sub`) for `Message` and `Reset` items,
    or give `subscribe` a handler. Its position (`offset`, `epoch`) is that of the last
    message yielded, and what a resubscribe passes as `since`."""

    def __init__(self, client: Client, channel: str, queue_size: int) -> None:
        self.channel = channel
        self.offset: int | None = None
        self.epoch: str | None = None
        self._client = client
        self._queue: asyncio.Queue[Message | Reset | _End] = asyncio.Queue(queue_size)
        self._ended: _End | None = None
        self._handler_task: asyncio.Task[None] | None = None

    @property
    def position(self) -> tuple[int, str] | None:
        if self.offset is None or self.epoch is None:
            return None
        return self.offset, self.epoch

    def __aiter__(self) -> AsyncIterator[Message | Reset]:
        return self

    async def __anext__(self) -> Message | Reset:
        if self._ended is not None and self._queue.empty():
            return self._finish(self._ended)
        item = await self._queue.get()
        if isinstance(item, _End):
            self._ended = item
            return self._finish(item)
        return item

    @staticmethod
    def _finish(end: _End) -> Message | Reset:
        if end.error is not None:
            raise end.error
        raise StopAsyncIteration

    async def unsubscribe(self) -> None:
        await self._client._unsubscribe(self)

    # the client's side

    def _since(self) -> dict[str, Any] | None:
        position = self.position
        return None if position is None else {"offset": position[0], "epoch": position[1]}

    async def _subscribed(self, frame: _Frame, asked_since: bool) -> None:
        """The reply to a subscribe, in frame order: before the messages that follow it."""
        if frame.epoch is None or frame.offset is None:
            return
        if asked_since and not frame.recovered:
            await self._queue.put(Reset(self.channel, frame.offset, frame.epoch))
        if not asked_since or not frame.recovered:
            self.offset, self.epoch = frame.offset, frame.epoch

    async def _message(self, message: Message) -> None:
        if message.offset is not None and message.epoch is not None:
            if message.epoch == self.epoch and self.offset is not None \
                    and message.offset <= self.offset:
                return  # had it already (a duplicate across a reconnect)
            self.offset, self.epoch = message.offset, message.epoch
        await self._queue.put(message)

    async def _reset(self, frame: _Frame) -> None:
        if frame.offset is None or frame.epoch is None:
            return
        self.offset, self.epoch = frame.offset, frame.epoch
        await self._queue.put(Reset(self.channel, frame.offset, frame.epoch))

    def _end(self, error: ClientClosed | None) -> None:
        if self._ended is None:
            end = _End(error)
            try:
                self._queue.put_nowait(end)
            except asyncio.QueueFull:
                self._ended = end  # seen once the queue has been read out
        if self._handler_task is not None and asyncio.current_task() is not self._handler_task:
            self._handler_task.cancel()


class Client:
    """Use `connect(...)`. One supervised connection at a time, replaced when it ends."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        backoff_min: float = 0.1,
        backoff_max: float = 10.0,
        timeout: float = 10.0,
        queue_size: int = 10_000,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("connect needs at least one URL")
        self._token = token
        self._get_token = get_token
        self._backoff = (backoff_min, backoff_max)
        self.timeout = timeout
        self._queue_size = queue_size
        self._headers = headers or {}
        self._subscriptions: dict[str, Subscription] = {}
        self._waiting: dict[int, asyncio.Future[_Frame]] = {}
        self._subscribing: dict[int, tuple[Subscription, bool]] = {}
        self._next_id = 0
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed: ClientClosed | None = None
        self._url_index = 0
        # What the latest welcome said.
        self.client_id: str | None = None
        self.user: str | None = None
        self.node: str | None = None
        self.expires: int | None = None
        self.connects = 0  # welcomes received: 1 + reconnects

    # lifecycle

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, and return once welcomed (within `timeout`); `ClientClosed` when the
        server refused for good (a bad token), TimeoutError when no node answered."""
        self._supervisor = asyncio.create_task(self._run(), name="hub.client")
        waiting = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait({waiting, self._supervisor}, timeout=self.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if self._closed is not None:
            raise self._closed
        if not self._connected.is_set():
            await self.close()
            raise TimeoutError(f"no node welcomed this client within {self.timeout} s")

    async def close(self) -> None:
        """Close the connection and end every subscription (their iterators stop)."""
        self._stop(None)
        ws = self._ws  # taken first: the supervisor forgets it when cancelled
        task, self._supervisor = self._supervisor, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if ws is not None:
            await ws.close()

    def _stop(self, error: ClientClosed | None) -> None:
        if self._closed is None:
            self._closed = error or ClientClosed()
        for subscription in list(self._subscriptions.values()):
            subscription._end(error)
        self._subscriptions.clear()
        self._fail_waiting(self._closed)

    def _fail_waiting(self, error: ClientError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()
        self._subscribing.clear()

    # the calls

    async def subscribe(
        self,
        channel: str,
        *,
        since: tuple[int, str] | None = None,
        handler: Handler | None = None,
    ) -> Subscription:
        """Subscribe (again after every reconnect, until `unsubscribe`). With `since`, the
        messages after it come first (or a `Reset` if they cannot). With `handler`, each
        item is given to it (awaited if it is a coroutine function) in order; a handler that
        raises is logged and the next item goes on. `CommandError` when refused."""
        if channel in self._subscriptions:
            raise CommandError("already_subscribed", f"already subscribed to {channel}")
        subscription = Subscription(self, channel, self._queue_size)
        if since is not None:
            subscription.offset, subscription.epoch = since
        self._subscriptions[channel] = subscription
        try:
            async with asyncio.timeout(self.timeout):
                await self._subscribe_first(subscription)
        except BaseException:
            if self._subscriptions.get(channel) is subscription:
                del self._subscriptions[channel]
            raise
        if handler is not None:
            subscription._handler_task = asyncio.create_task(self._handle(subscription, handler))
        return subscription

    async def _subscribe_first(self, subscription: Subscription) -> None:
        """The first subscribe; a connection lost meanwhile is not its failure: the next
        connection's resubscribe (or this, again) does it, whichever comes first."""
        while True:
            try:
                await self._send_subscribe(subscription)
                return
            except CommandError as exc:
                if exc.code != "already_subscribed":  # else: the resubscribe was first
                    raise
                return
            except ConnectionLost:
                continue

    def personal(self) -> Subscription:
        """The messages sent to this client's user (`/api/send`): every connection is on
        its `@user` channel from the start, so this subscribes nothing."""
        assert self.user is not None
        channel = "@" + self.user
        found = self._subscriptions.get(channel)
        if found is None:
            found = self._subscriptions[channel] = Subscription(self, channel, self._queue_size)
        return found

    async def publish(self, channel: str, data: Any, event: str | None = None) -> Published:
        frame: dict[str, Any] = {"type": "publish", "channel": channel, "data": data}
        if event is not None:
            frame["event"] = event
        reply = await self._request(frame)
        return Published(channel, reply.offset, reply.epoch)

    async def presence(self, channel: str) -> list[PresenceMember]:
        reply = await self._request({"type": "presence", "channel": channel})
        return reply.clients or []

    async def history(
        self, channel: str, *, since: tuple[int, str] | None = None, limit: int | None = None
    ) -> History:
        frame: dict[str, Any] = {"type": "history", "channel": channel}
        if since is not None:
            frame["since"] = {"offset": since[0], "epoch": since[1]}
        if limit is not None:
            frame["limit"] = limit
        reply = await self._request(frame)
        messages = [msgspec.convert({**item, "channel": channel}, Message)
                    for item in reply.messages or []]
        return History(channel, reply.epoch or "", reply.offset or 0, messages)

    async def _unsubscribe(self, subscription: Subscription) -> None:
        if self._subscriptions.get(subscription.channel) is not subscription:
            return
        del self._subscriptions[subscription.channel]
        subscription._end(None)
        if self._connected.is_set() and not subscription.channel.startswith("@"):
            with contextlib.suppress(ConnectionLost, CommandError):
                await self._request({"type": "unsubscribe", "channel": subscription.channel})

    # requests

    def _frame_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _request(self, frame: dict[str, Any]) -> _Frame:
        """Send a command on the current connection (waiting up to `timeout` for one) and
        return its reply; CommandError for an error frame."""
        if self._closed is not None:
            raise self._closed
        async with asyncio.timeout(self.timeout):
            await self._connected.wait()
            ws = self._ws
            if ws is None:
                raise ConnectionLost("not connected")
            frame_id = self._frame_id()
            future: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
            self._waiting[frame_id] = future
            try:
                await ws.send(_encoder.encode({**frame, "id": frame_id}).decode())
            except ConnectionClosed:
                self._waiting.pop(frame_id, None)
                raise ConnectionLost("the connection closed") from None
            try:
                reply = await future
            finally:
                self._waiting.pop(frame_id, None)
        if reply.type == "error":
            raise CommandError(reply.code or "internal", reply.message or "")
        return reply

    async def _send_subscribe(self, subscription: Subscription) -> None:
        """Subscribe on the current connection. The reply's position is applied by the
        reader, in frame order (`_subscribing`), before the messages that follow it."""
        frame: dict[str, Any] = {"type": "subscribe", "channel": subscription.channel}
        since = subscription._since()
        if since is not None:
            frame["since"] = since
        if self._closed is not None:
            raise self._closed
        async with asyncio.timeout(self.timeout):
            await self._connected.wait()
            ws = self._ws
            if ws is None:
                raise ConnectionLost("not connected")
            frame_id = self._frame_id()
            future: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
            self._waiting[frame_id] = future
            self._subscribing[frame_id] = (subscription, since is not None)
            try:
                await ws.send(_encoder.encode({**frame, "id": frame_id}).decode())
                reply = await future
            except ConnectionClosed:
                raise ConnectionLost("the connection closed") from None
            finally:
                self._waiting.pop(frame_id, None)
                self._subscribing.pop(frame_id, None)
        if reply.type == "error":
            raise CommandError(reply.code or "internal", reply.message or "")

    async def _handle(self, subscription: Subscription, handler: Handler) -> None:
        async for item in subscription:
            try:
                result = handler(item)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("handler of %s failed", subscription.channel)

    # the connection

    async def _token_now(self) -> str | None:
        if self._get_token is None:
            return self._token
        token = self._get_token()
        return await token if inspect.isawaitable(token) else token

    async def _run(self) -> None:
        """Connect, serve, and reconnect with backoff until closed or refused for good."""
        attempt = 0
        while self._closed is None:
            url = self.urls[self._url_index % len(self.urls)]
            code: int | None = None
            reason = ""
            try:
                ws = await self._open(url)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                log.info("cannot connect to %s: %s", url, exc)
                self._url_index += 1
            except ConnectionClosed as exc:  # closed before its welcome: refused
                code, reason = _close_of(exc)
            else:
                attempt = 0
                code, reason = await self._serve(ws)
            if self._closed is not None:
                return
            if code is not None and self._final(code):
                log.warning("closed for good by the server: %s %s", code, reason)
                self._stop(ClientClosed(code, reason))
                return
            if code in (1006, 1011, 1012, 1013):
                self._url_index += 1  # that node is going or gone: try the next one
            attempt += 1
            low, high = self._backoff
            await asyncio.sleep(random.uniform(low, min(high, low * 2**attempt)))

    def _final(self, code: int) -> bool:
        return code in FINAL_CLOSES or (code in AUTH_CLOSES and self._get_token is None)

    async def _open(self, url: str) -> ClientConnection:
        token = await self._token_now()
        headers = dict(self._headers)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        ws = await websockets.connect(
            url, additional_headers=headers, open_timeout=self.timeout, max_size=None,
            close_timeout=self.timeout,
        )
        try:
            async with asyncio.timeout(self.timeout):
                welcome = _decoder.decode(await ws.recv())
        except BaseException:
            await ws.close()
            raise
        if welcome.type != "welcome":
            await ws.close()
            raise ConnectionClosed(None, None)
        self.client_id, self.user, self.node = welcome.client, welcome.user, welcome.node
        self.expires = welcome.expires
        return ws

    async def _serve(self, ws: ClientConnection) -> tuple[int | None, str]:
        """Subscribe again, then read until the connection ends; its close code."""
        self._ws = ws
        self.connects += 1
        self._connected.set()
        tasks = [asyncio.create_task(self._resubscribe(s))
                 for s in list(self._subscriptions.values()) if not s.channel.startswith("@")]
        if self._get_token is not None:
            tasks.append(asyncio.create_task(self._refresh_loop()))
        try:
            async for raw in ws:
                await self._dispatch(_decode(raw))
        except ConnectionClosed:
            pass
        finally:
            self._connected.clear()
            self._ws = None
            for task in tasks:
                task.cancel()
            self._fail_waiting(ConnectionLost("the connection closed"))
        return ws.close_code, ws.close_reason or ""

    async def _resubscribe(self, subscription: Subscription) -> None:
        """After a reconnect: subscribe with `since`; `unavailable` (the node's broker is
        down) is tried again with backoff while the connection lasts."""
        low, high = self._backoff
        for attempt in range(1, 1_000_000):
            if self._subscriptions.get(subscription.channel) is not subscription:
                return
            try:
                await self._send_subscribe(subscription)
                return
            except CommandError as exc:
                if exc.code == "already_subscribed":
                    return
                if exc.code not in ("unavailable", "rate_limited", "internal"):
                    log.warning("resubscribing to %s refused: %s", subscription.channel, exc)
                    if self._subscriptions.get(subscription.channel) is subscription:
                        del self._subscriptions[subscription.channel]
                    subscription._end(ClientClosed(None, str(exc)))
                    return
            except (ConnectionLost, TimeoutError):
                return  # the next connection subscribes again
            await asyncio.sleep(random.uniform(low, min(high, low * 2**attempt)))

    async def _refresh_loop(self) -> None:
        """Send a new token before the current one expires (a fifth of its life before, at
        most 30 s and at least 1 s)."""
        while self.expires is not None:
            left = self.expires - time.time()
            await asyncio.sleep(max(0.0, left - min(30.0, max(1.0, left / 5))))
            try:
                token = await self._token_now()
                reply = await self._request({"type": "refresh", "token": token})
            except (ClientError, TimeoutError) as exc:
                log.warning("token refresh failed (%s); the server closes at expiry and the "
                            "client reconnects with a new token", exc)
                return
            self.expires = reply.expires

    async def _dispatch(self, frame: _Frame | None) -> None:
        if frame is None:
            return
        kind = frame.type
        if kind == "message" and frame.channel is not None:
            subscription = self._subscriptions.get(frame.channel)
            if subscription is not None:
                await subscription._message(Message(
                    frame.channel, frame.data, frame.ts, frame.event, frame.offset,
                    frame.epoch, frame.from_,
                ))
            return
        if kind == "reset" and frame.channel is not None:
            subscription = self._subscriptions.get(frame.channel)
            if subscription is not None:
                await subscription._reset(frame)
            return
        if frame.id is None:
            return
        if kind == "subscribed":
            pending = self._subscribing.pop(frame.id, None)
            if pending is not None:
                subscription, asked_since = pending
                await subscription._subscribed(frame, asked_since)
        future = self._waiting.pop(frame.id, None)
        if future is not None and not future.done():
            future.set_result(frame)


def _decode(raw: str | bytes) -> _Frame | None:
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        log.warning("ignored a frame that is not one of the protocol's: %.200r", raw)
        return None


def _close_of(exc: ConnectionClosed) -> tuple[int | None, str]:
    close = exc.rcvd
    return (close.code, close.reason) if close is not None else (None, "")


def connect(
    url: str | Sequence[str],
    *,
    token: str | None = None,
    get_token: TokenSource | None = None,
    backoff_min: float = 0.1,
    backoff_max: float = 10.0,
    timeout: float = 10.0,
    queue_size: int = 10_000,
    headers: dict[str, str] | None = None,
) -> Client:
    """A client for `/ws` at `url` (or the first of several that answers, in turn), to use
    as `async with connect(...) as client`. `token` is a JWT; `get_token` (sync or async)
    returns one for every connection and before each expiry. `timeout` bounds the first
    connection and every command."""
    return Client(url, token=token, get_token=get_token, backoff_min=backoff_min,
                  backoff_max=backoff_max, timeout=timeout, queue_size=queue_size,
                  headers=headers)
