"""uvicorn's websockets-sansio protocol with leaner state per connection.

Each connection of the stock protocol holds an `asyncio.Queue` (three deques and an Event
with a fourth) for what it hands the app, and an `asyncio.Event` (a fifth deque) for flow
control: about 3.7 KiB before a single frame. Here both are replaced by objects with the
same methods that hold a list or a future only while one is in use. Its attributes live in
slots, and its protocol pings run on one timer per node (`Keepalive`) instead of a timer per
connection: one constant empty ping frame, whose lone pong is read without websockets'
parser. `receive` is a future rather than a coroutine (no frames of its own in the
connection's task), and once the connection is accepted and authenticated
(`release_handshake`) the scope, the address tuples and websockets' handshake parser go.
An empty `Sec-WebSocket-Protocol` header counts as none. Nothing else of uvicorn changes.
`server.uvicorn_config` uses `lean_protocol`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State

log = logging.getLogger("hub.keepalive")

# A server ping as every connection gets it: FIN + ping, unmasked (server frames are never
# masked), empty. Written straight to the transport, not built by websockets each time.
PING_FRAME = b"\x89\x00"
# A client's answer to it: FIN + pong, masked, empty: two bytes and the four of its mask.
_PONG_HEAD = 0x8A
_PONG_LENGTH = 0x80  # the mask bit, length 0
_PONG_SIZE = 6


def _parser_probe() -> tuple[Any, Any] | None:
    """What the keepalive's and the handshake's shortcuts need of websockets' parser: the
    code of the point at which it waits between frames (`StreamReader.at_eof`), and the
    frames-only parser (`Protocol.parse`); None (no shortcut) if this websockets has not
    both."""
    try:
        from websockets.streams import StreamReader

        return StreamReader.at_eof.__code__, Protocol.parse
    except (ImportError, AttributeError):
        return None


_PARSER = _parser_probe()


class LeanQueue:
    """The part of `asyncio.Queue` uvicorn uses, for its one consumer (the ASGI app).

    `next_item` hands the consumer a future rather than a coroutine: a connection that
    waits for its next message then holds that future only, not the frames of uvicorn's
    `receive` and of `Queue.get` (about 0.4 KiB each connection, all its idle life). An
    item put while the consumer waits goes straight into its future."""

    __slots__ = ("_getter", "_items")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._getter: asyncio.Future[Any] | None = None

    def put_nowait(self, item: Any) -> None:
        getter, self._getter = self._getter, None
        if getter is not None and not getter.done():
            getter.set_result(item)
        elif self._items is None:
            self._items = [item]
        else:
            self._items.append(item)

    def next_item(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """A future of the next item: done already if one is queued."""
        future = loop.create_future()
        items = self._items
        if items:
            future.set_result(items.pop(0))
            if not items:
                self._items = None
        else:
            self._getter = future
        return future

    async def get(self) -> Any:
        return await self.next_item(asyncio.get_running_loop())

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0


class LeanEvent:
    """The part of `asyncio.Event` uvicorn uses, with waiters only while some wait."""

    __slots__ = ("_is_set", "_waiters")

    def __init__(self) -> None:
        self._is_set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        if self._is_set:
            return
        self._is_set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> None:
        if self._is_set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        await waiter


class Keepalive:
    """The protocol pings of every WebSocket of a node, on one timer instead of uvicorn's
    two per connection (ping and pong deadline, about 0.5 KiB of each connection).

    Connections are dealt in turn into `TICKS` groups, and every interval / TICKS the next
    group has its turn, so that 10,000 pings do not go out in one burst that every message
    then waits behind, and a connection's turn comes every `interval`. At its turn a
    connection that answered its last ping gets the next, and one whose ping is unanswered
    is closed as uvicorn closes it, 1011 "keepalive ping timeout". So a connection is pinged every
    interval, its first ping comes within one, and a ping it does not answer closes it one
    interval later."""

    TICKS = 10

    __slots__ = ("_groups", "_next", "_task", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._groups: list[dict[LeanWebSocketsProtocol, None]] = [{} for _ in range(self.TICKS)]
        self._next = 0  # the group the next connection joins
        self._task: asyncio.Task[None] | None = None

    def add(self, protocol: LeanWebSocketsProtocol) -> None:
        self._groups[self._next][protocol] = None
        self._next = (self._next + 1) % self.TICKS
        task = self._task
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, protocol: LeanWebSocketsProtocol) -> None:
        for group in self._groups:
            if protocol in group:
                del group[protocol]
                break
        if self._task is not None and not any(self._groups):
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        step = self.interval / self.TICKS
        turn = 0
        while True:
            await asyncio.sleep(step)
            # Its turn came an interval ago as well (a little less: timers run late).
            answer_by = asyncio.get_running_loop().time() - self.interval + step / 2
            for protocol in list(self._groups[turn]):
                if protocol.close_sent or protocol.transport.is_closing():
                    continue
                try:
                    if protocol.pending_ping_payload is None:
                        protocol.send_ping()
                    elif protocol.ping_sent_at <= answer_by:
                        protocol.keepalive_timeout()
                except Exception:  # one connection's fault must not stop the pings
                    log.exception("a keepalive ping failed")
            turn = (turn + 1) % self.TICKS


class LeanWebSocketsProtocol(WebSocketsSansIOProtocol):
    # Every attribute uvicorn's protocol sets, as a slot: its 37 overflow the keys an
    # instance dict may share with its class (30), so each connection held a dict of its
    # own, 1.5 KiB. Slots cost 8 bytes each; a name uvicorn adds later lands in the
    # instance dict as before (it still exists), so nothing breaks, it only costs again.
    __slots__ = (
        "app", "app_state", "asgi_version", "client", "close_sent", "close_timeout",
        "close_timer", "config", "conn", "connections", "curr_msg_data_type",
        "default_headers", "disconnected", "frames", "handshake_complete",
        "handshake_initiated", "initial_response", "last_ping_rtt", "logger", "loop",
        "pending_ping_payload", "ping_interval", "ping_sent_at", "ping_timeout", "ping_timer",
        "pong_timer", "queue", "read_paused", "request", "response", "root_path", "scheme",
        "scope", "server", "tasks", "transport", "writable",
    )

    keepalive: Keepalive | None = None  # the node's, on the class `lean_protocol` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()  # type: ignore[assignment]
        writable = LeanEvent()
        writable.set()
        self.writable = writable  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        """A `Sec-WebSocket-Protocol` header that is present but empty (centrifuge-python
        0.5 sends one) is taken as absent, as Centrifugo does; websockets would answer 400."""
        headers = event.headers
        offered = headers.get_all("Sec-WebSocket-Protocol")
        if offered and not all(value.strip() for value in offered):
            del headers["Sec-WebSocket-Protocol"]
            for value in offered:
                if value.strip():
                    headers["Sec-WebSocket-Protocol"] = value
        super().handle_connect(event)

    def start_keepalive(self) -> None:
        if self.keepalive is not None:  # (uvicorn's own has no interval: it pings not)
            self.keepalive.add(self)

    def stop_keepalive(self) -> None:
        super().stop_keepalive()
        if self.keepalive is not None:
            self.keepalive.discard(self)

    def send_ping(self) -> None:
        """A keepalive ping, without uvicorn's timers (the node's `Keepalive` looks at the
        answer): the constant empty ping straight to the transport, which an empty pong
        answers (`handle_pong` matches the payload, b""; so does `data_received`)."""
        self.pending_ping_payload = b""
        self.ping_sent_at = self.loop.time()
        conn = self.conn
        if conn.state is State.OPEN:
            self.transport.write(PING_FRAME)
        else:  # closing: websockets decides (it may refuse, and the keepalive logs it)
            conn.send_ping(b"")
            self.transport.write(b"".join(conn.data_to_send()))

    def data_received(self, data: bytes) -> None:
        """The answer to a keepalive ping, alone in its read and with websockets' parser
        between frames, is taken here: it changes nothing of websockets' state (a pong
        only ends up in its event list, which uvicorn reads to match the payload), and
        parsing it costs more than the rest of a ping's round. Anything else goes to
        uvicorn; and an event that went straight to the app, which was waiting for it,
        lets reading resume (uvicorn's `receive` did so, which `receive` here does not
        run)."""
        if (len(data) == _PONG_SIZE and data[0] == _PONG_HEAD and data[1] == _PONG_LENGTH
                and self._between_frames()):
            if self.pending_ping_payload == b"":
                self.last_ping_rtt = self.loop.time() - self.ping_sent_at
                self.pending_ping_payload = None
            return  # an unsolicited pong: websockets and uvicorn ignore it too
        super().data_received(data)
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()

    def receive(self) -> asyncio.Future[Any]:  # type: ignore[override]
        """uvicorn's `receive` as a future, not a coroutine (see `LeanQueue`): reading
        resumes once nothing waits for the app, as uvicorn's does."""
        queue: Any = self.queue
        future: asyncio.Future[Any] = queue.next_item(self.loop)
        if self.read_paused and queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return future

    def release_handshake(self) -> None:
        """The connection is accepted and authenticated: what uvicorn keeps for the
        handshake and its log lines goes (`hub.wire.DirectOutbound.release_handshake`
        lets go of the request, response and headers first). The scope is emptied: nothing
        reads it after the accept (uvicorn's log lines that do are the refusals'), and the
        hub took what it keeps (`Origin`) before; the peer's and our address, which only
        uvicorn's trace log reads; and websockets' handshake parser, which holds the
        request to the end, is swapped for the frames-only parser it runs by then, when it
        waits between frames with nothing buffered (else it stays: nothing is lost)."""
        scope: Any = self.scope
        if isinstance(scope, dict):
            scope.clear()
        self.client = self.server = None
        conn = self.conn
        if _PARSER is not None and conn.state is State.OPEN and self._between_frames():
            parser = _PARSER[1](conn)
            next(parser)
            conn.parser = parser

    def _between_frames(self) -> bool:
        """websockets' parser waits for the first byte of a frame, with nothing buffered."""
        conn = self.conn
        if _PARSER is None or conn.reader.buffer or conn.state is not State.OPEN:
            return False
        parser: Any = conn.parser
        inner = parser.gi_yieldfrom
        while inner is not None:
            parser, inner = inner, inner.gi_yieldfrom
        return parser.gi_code is _PARSER[0]


def lean_protocol(ping_interval: float) -> type[LeanWebSocketsProtocol]:
    """The protocol class for one node: pings every `ping_interval` seconds on the node's
    one timer (none when 0); give uvicorn no ping interval of its own with it."""
    keepalive = Keepalive(ping_interval) if ping_interval else None
    return type("HubWebSocketsProtocol", (LeanWebSocketsProtocol,),
                {"__slots__": (), "keepalive": keepalive})
