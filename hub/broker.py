"""The broker: how a publication reaches every node that has a subscriber, and where history
lives. `Broker` is the interface; `MemoryBroker` is the single-node one (and the fast test
double); `hub.redis.broker.RedisBroker` is the cluster one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Protocol

import msgspec

from hub.protocol import Message, Relayed


class StreamPosition(msgspec.Struct, frozen=True):
    """Latest offset of a channel's history and the generation (epoch) it belongs to."""

    offset: int
    epoch: str


class HistoryOptions(msgspec.Struct, frozen=True):
    size: int
    ttl: float


class HistoryPage(msgspec.Struct, frozen=True):
    """Messages after `since` (or the newest ones), oldest first.

    `complete` is False when `since` was given but messages right after it are no longer
    held, or its epoch is not the current one: the reader missed something for good.
    """

    position: StreamPosition
    messages: list[Message]
    complete: bool = True


class BrokerEvents(Protocol):
    """What the node does with what the broker hears. Called on the event loop."""

    @property
    def channels(self) -> Iterable[str]:
        """The channels the node wants relayed: subscribed anew after every reconnect."""

    def on_relayed(self, channel: str, relayed: list[Relayed]) -> None:
        """What one channel carried, in order: as much as had arrived together."""

    def on_broker_up(self, reconnected: bool, channels: Collection[str]) -> None:
        """A connection to the broker (one shard's, on a Redis Cluster) is subscribed to
        `channels`; after a `reconnected` one they may have missed publications."""

    def on_broker_down(self, channels: Collection[str]) -> None:
        """A connection to the broker was lost: `channels` hear nothing until it is back."""

    def on_broker_ready(self) -> None:
        """Every way to the broker (to one shard, on a Redis Cluster) works again, the
        commands' and the relay's, whichever came back last: what waited for it goes on."""


class Broker(Protocol):
    @property
    def up(self) -> bool:
        """The node can serve: the broker (on a Redis Cluster, at least one shard) is
        reachable."""

    def health(self) -> tuple[int, int]:
        """(shards reachable, shards known): one shard but on a Redis Cluster."""

    async def start(self, events: BrokerEvents) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, channel: str) -> None:
        """Start hearing `channel` on this node (called for its first local subscriber)."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop hearing `channel` (called when its last local subscriber left)."""

    async def publish(
        self, channel: str, relayed: Relayed, history: HistoryOptions | None = None
    ) -> StreamPosition | None:
        """Deliver to every node hearing `channel`; with `history` a `Message` is also
        stored and given the next offset of the channel's current epoch, which is returned.
        Raises BrokerUnavailable when the message could not be handed over."""

    async def history(
        self,
        channel: str,
        history: HistoryOptions,
        since: StreamPosition | None = None,
        limit: int = 1000,
    ) -> HistoryPage:
        """`limit` 0 asks only for the position."""

    async def remove_history(self, channel: str) -> None:
        """Drop the stored messages of `channel`; its epoch and offset stay, so the next
        publication goes on from there and a recovery from before now is not complete
        (Centrifugo's `history_remove`)."""

    async def restart_epoch(
        self, channel: str, history: HistoryOptions, stale: StreamPosition
    ) -> StreamPosition:
        """Start a new epoch (at offset 0) unless the channel has left epoch `stale.epoch`
        already; the position to go on from. For a channel whose history lost what a node
        had delivered (PROTOCOL §5: offsets are never reused within an epoch)."""


class _Stream:
    __slots__ = ("epoch", "expires_at", "messages", "offset")

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(4)
        self.offset = 0
        self.messages: deque[tuple[float, Message]] = deque()
        self.expires_at = 0.0


class MemoryBroker:
    """Single process: what is published in one turn of the event loop is handed to the
    node together at its end (so a burst reaches each socket in one write); history in
    deques."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # history expiry's; a test moves it instead of sleeping
        self._events: BrokerEvents | None = None
        self._relaying: dict[str, list[Relayed]] | None = None  # this turn's, by channel
        self._channels: set[str] = set()
        self._streams: dict[str, _Stream] = {}
        self._created = 0

    @property
    def up(self) -> bool:
        return True

    def health(self) -> tuple[int, int]:
        return 1, 1

    async def start(self, events: BrokerEvents) -> None:
        self._events = events
        events.on_broker_up(False, [])

    async def close(self) -> None:
        self._events = None
        self._channels.clear()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(
        self, channel: str, relayed: Relayed, history: HistoryOptions | None = None
    ) -> StreamPosition | None:
        position = None
        if history is not None and isinstance(relayed, Message):
            stream = self._live_stream(channel, history, create=True)
            assert stream is not None
            stream.offset += 1
            relayed.offset, relayed.epoch = stream.offset, stream.epoch
            now = self.clock()
            stream.messages.append((now + history.ttl, relayed))
            stream.expires_at = now + history.ttl
            while len(stream.messages) > history.size:
                stream.messages.popleft()
            position = StreamPosition(stream.offset, stream.epoch)
        if self._events is not None and channel in self._channels:
            self._relay(channel, relayed)
        return position

    def _relay(self, channel: str, relayed: Relayed) -> None:
        relaying = self._relaying
        if relaying is None:
            relaying = self._relaying = {}
            asyncio.get_running_loop().call_soon(self._hand_over)
        relaying.setdefault(channel, []).append(relayed)

    def _hand_over(self) -> None:
        relaying, self._relaying = self._relaying or {}, None
        events = self._events
        for channel, relayed in relaying.items():
            if events is not None:
                events.on_relayed(channel, relayed)

    async def history(
        self,
        channel: str,
        history: HistoryOptions,
        since: StreamPosition | None = None,
        limit: int = 1000,
    ) -> HistoryPage:
        stream = self._live_stream(channel, history, create=True)
        assert stream is not None
        position = StreamPosition(stream.offset, stream.epoch)
        now = self.clock()
        while stream.messages and stream.messages[0][0] <= now:
            stream.messages.popleft()
        held = [message for _, message in stream.messages]
        if since is None:
            return HistoryPage(position, held[len(held) - limit :] if limit else [])
        if since.epoch != stream.epoch or since.offset > stream.offset:
            return HistoryPage(position, [], complete=False)
        first_held = held[0].offset if held else stream.offset + 1
        assert first_held is not None
        complete = since.offset + 1 >= first_held
        after = [message for message in held if (message.offset or 0) > since.offset]
        return HistoryPage(position, after[:limit], complete=complete)

    async def remove_history(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is not None:
            stream.messages.clear()

    async def restart_epoch(
        self, channel: str, history: HistoryOptions, stale: StreamPosition
    ) -> StreamPosition:
        stream = self._live_stream(channel, history, create=True)
        assert stream is not None
        if stream.epoch == stale.epoch:
            stream = self._streams[channel] = _Stream()
            stream.expires_at = self.clock() + history.ttl
        return StreamPosition(stream.offset, stream.epoch)

    def _live_stream(self, channel: str, history: HistoryOptions, create: bool) -> _Stream | None:
        """A stream whose every message expired is forgotten: its epoch ends with it."""
        stream = self._streams.get(channel)
        if stream is not None and stream.expires_at and stream.expires_at <= self.clock():
            del self._streams[channel]
            stream = None
        if stream is None and create:
            self._sweep()
            stream = self._streams[channel] = _Stream()
            stream.expires_at = self.clock() + history.ttl
        return stream

    def _sweep(self) -> None:
        """Forget expired streams now and then, so names read once do not pile up."""
        self._created += 1
        if self._created % 1024:
            return
        now = self.clock()
        for channel in [c for c, s in self._streams.items() if s.expires_at <= now]:
            del self._streams[channel]
