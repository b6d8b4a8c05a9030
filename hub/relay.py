"""Keeps the broker subscribed to exactly the channels this node has local interest in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from hub.broker import Broker


class RelaySubscriptions:
    """First local subscriber → `broker.subscribe`; last one gone → `broker.unsubscribe`.

    Calls for one channel are serialised by a lock that lives only while in use, and the
    "still wanted?" question is asked under it, so a subscribe racing an unsubscribe never
    leaves the node deaf to a channel it has subscribers on.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._subscribed: set[str] = set()
        self._locks: dict[str, _ChannelLock] = {}

    @property
    def channels(self) -> set[str]:
        return self._subscribed

    async def ensure(self, channel: str) -> None:
        if channel in self._subscribed:
            return
        async with self._serialised(channel):
            if channel not in self._subscribed:
                await self._broker.subscribe(channel)
                self._subscribed.add(channel)

    async def release(self, channel: str, still_wanted: Callable[[], bool]) -> None:
        if channel not in self._subscribed:
            return
        async with self._serialised(channel):
            if channel in self._subscribed and not still_wanted():
                self._subscribed.discard(channel)
                await self._broker.unsubscribe(channel)

    @contextlib.asynccontextmanager
    async def _serialised(self, channel: str) -> AsyncIterator[None]:
        entry = self._locks.get(channel)
        if entry is None:
            entry = self._locks[channel] = _ChannelLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[channel]


class _ChannelLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
