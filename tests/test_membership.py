"""hub.membership on its own: presence and join/leave follow Subscriptions in order,
whatever the store and the broker do meanwhile (a heartbeat in flight, an outage), and the
node-level transitions are told once each. In process, with the in-process broker and a
presence store that can be held up or made to fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence

from hub import protocol as p
from hub.broker import HistoryOptions, MemoryBroker, StreamPosition
from hub.errors import BrokerUnavailable
from hub.hub import Subscriber
from hub.metrics import Metrics
from hub.node import Node
from hub.presence import Departure, MemoryPresence, NodeSnapshot
from hub.settings import Namespace
from tests.support import eventually, make_settings
from tests.test_subscriptions import Listener

NAMESPACES = {"room": Namespace(subscribe="any", presence=True, join_leave=True)}


class Store(MemoryPresence):
    """The in-process store, which can fail (Redis away) or hold a heartbeat up."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.beat_started = asyncio.Event()
        self.beat_release: asyncio.Event | None = None

    async def update(
        self, added: Sequence[tuple[str, p.ClientInfo]], removed: Sequence[Departure]
    ) -> None:
        if self.down:
            raise BrokerUnavailable("store down")
        await super().update(added, removed)

    async def heartbeat(
        self,
        local: NodeSnapshot,
        members: Mapping[str, Sequence[p.ClientInfo]],
        removed: Sequence[Departure] = (),
    ) -> None:
        if self.down:
            raise BrokerUnavailable("store down")
        self.beat_started.set()
        if self.beat_release is not None:
            await self.beat_release.wait()
        for channel, listed in members.items():  # a store shared by nodes: writes, forgets
            await super().update([(channel, m) for m in listed], removed)
        await super().update([], removed)


class Broker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def publish(self, channel: str, relayed: p.Relayed,
                      history: HistoryOptions | None = None) -> StreamPosition | None:
        if self.down:
            raise BrokerUnavailable("broker down")
        return await super().publish(channel, relayed, history)


class Transitions:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def admitted(self, subscriber: Subscriber, channel: str) -> None:
        self.seen.append(("admitted", f"{subscriber.client_id}@{channel}"))

    def dropped(self, subscriber: Subscriber, channel: str) -> None:
        self.seen.append(("dropped", f"{subscriber.client_id}@{channel}"))

    def occupied(self, channel: str) -> None:
        self.seen.append(("occupied", channel))

    def vacated(self, channel: str) -> None:
        self.seen.append(("vacated", channel))


async def started(store: Store, broker: Broker) -> Node:
    node = Node(make_settings(namespaces=NAMESPACES, presence_ttl=30), broker, store,
                Metrics("test-node"))
    await node.start()
    return node


async def listed(store: Store, channel: str = "room:a") -> list[str]:
    return sorted(member.client for member in await store.members(channel))


def events_of(listener: Listener) -> list[tuple[str, str]]:
    """The join and leave frames it was pushed (WebSocket text frames), in order."""
    found = []
    for frame in listener.frames:
        length, start = frame[1] & 0x7F, 2
        if length == 126:
            start = 4
        body = json.loads(frame[start:])
        if body["type"] in ("join", "leave"):
            found.append((body["type"], body["client"]))
    return found


async def join(node: Node, listener: Listener, channel: str = "room:a") -> None:
    assert await node.subscriptions.join(listener, channel, None, lambda joined: None)
    await node.membership.settled()


async def test_a_member_removed_while_a_heartbeat_is_in_flight_stays_removed() -> None:
    store, broker = Store(), Broker()
    node = await started(store, broker)
    try:
        alice = Listener("alice")
        await join(node, alice)
        store.beat_release = asyncio.Event()
        store.beat_started.clear()
        node.membership.beat_soon()
        await asyncio.wait_for(store.beat_started.wait(), 5)  # it holds alice's entry
        assert await node.subscriptions.leave(alice, "room:a")
        store.beat_release.set()
        await node.membership.settled()
        await eventually(lambda: listed(store), lambda got: got == [], within=5)
    finally:
        await node.stop()


async def test_what_failed_during_an_outage_is_written_after_it_in_order() -> None:
    store, broker = Store(), Broker()
    node = await started(store, broker)
    try:
        watcher, alice, bob = Listener("watcher"), Listener("alice"), Listener("bob")
        await join(node, watcher)
        await join(node, alice)
        store.down = broker.down = True
        await node.subscriptions.leave_all(alice)  # her departure cannot be written
        await join(node, bob)  # nor his arrival
        assert await listed(store) == ["alice", "watcher"]
        store.down = broker.down = False
        node.on_broker_ready()
        await eventually(lambda: listed(store), lambda got: got == ["bob", "watcher"], within=5)
        expected = [("join", "watcher"), ("join", "alice"), ("leave", "alice"), ("join", "bob")]
        got = await eventually(lambda: events_of(watcher),
                               lambda got: sorted(got) == sorted(expected), within=5)
        # One member's events in order; different members' may interleave.
        assert got.index(("join", "alice")) < got.index(("leave", "alice"))
    finally:
        await node.stop()


async def test_transitions_are_told_once_each_in_order() -> None:
    store, broker = Store(), Broker()
    node = await started(store, broker)
    seen = Transitions()
    node.subscriptions.watchers.append(seen)
    try:
        one, two = Listener("one"), Listener("two")
        await join(node, one)
        await join(node, two)
        await node.subscriptions.join_personal(one, "@one")
        assert await node.subscriptions.leave(one, "room:a")
        await node.subscriptions.leave_all(two)
        await node.subscriptions.leave_all(one)
    finally:
        await node.stop()
    assert seen.seen == [
        ("occupied", "room:a"), ("admitted", "one@room:a"), ("admitted", "two@room:a"),
        ("occupied", "@one"), ("admitted", "one@@one"),
        ("dropped", "one@room:a"), ("dropped", "two@room:a"), ("vacated", "room:a"),
        ("dropped", "one@@one"), ("vacated", "@one"),
    ]
