"""uvicorn's websockets-sansio protocol with leaner state per connection.

Each connection of the stock protocol holds an `asyncio.Queue` (three deques and an Event
with a fourth) for what it hands the app, and an `asyncio.Event` (a fifth deque) for flow
control: about 3.7 KiB before a single frame. Here both are replaced by objects with the
same methods that hold a list or a future only while one is in use. Nothing else of uvicorn
changes. `server.uvicorn_config` uses this class when it can be built, else the stock
protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class LeanQueue:
    """The part of `asyncio.Queue` uvicorn uses, for its one consumer (the ASGI app)."""

    __slots__ = ("_getter", "_items")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._getter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        getter, self._getter = self._getter, None
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            getter = self._getter = asyncio.get_running_loop().create_future()
            await getter
        item = self._items.pop(0)
        if not self._items:
            self._items = None
        return item

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()  # type: ignore[assignment]
        writable = LeanEvent()
        writable.set()
        self.writable = writable  # type: ignore[assignment]
