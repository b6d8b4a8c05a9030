"""Subscriptions end to end: replies, duplicates, limits, unsubscribing, join/leave and
presence frames, and the statistics of /api/stats and /api/channels."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from hub.broker import MemoryBroker, StreamPosition
from hub.metrics import Metrics
from hub.node import Node
from hub.presence import MemoryPresence
from hub.protocol import Message
from hub.ws_session import WsCodec
from tests.support import (
    WAIT,
    Client,
    RunningNode,
    api,
    connect,
    eventually,
    make_settings,
    next_message,
    publish,
    running_node,
    token,
)


async def wait_for_frame(receiver: Client, kind: str, **fields: Any) -> dict[str, Any]:
    """Skip frames until one of `kind` with these fields (bounded)."""
    def wanted(frame: dict[str, Any]) -> bool:
        return frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items())

    return await eventually(receiver.recv, wanted, WAIT, f"a {kind} frame {fields}", every=0)


async def api_get(running: RunningNode, path: str) -> Any:
    http = api(running)
    response = await http.get(path)
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for_stats(running: RunningNode, **expected: int) -> dict[str, Any]:
    """Poll /api/stats until its total has these values (disconnects are processed
    asynchronously after the socket closes)."""
    async def total() -> dict[str, Any]:
        found: dict[str, Any] = (await api_get(running, "/api/stats"))["total"]
        return found

    return await eventually(total, lambda got: all(got[k] == v for k, v in expected.items()),
                            within=WAIT, what=f"stats {expected}")


async def test_subscribe_and_unsubscribe_replies_echo_id(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.send({"type": "subscribe", "channel": "room1", "id": 41})
        assert await client.expect("subscribed") == {
            "type": "subscribed", "channel": "room1", "id": 41,
        }
        await client.send({"type": "unsubscribe", "channel": "room1", "id": 42})
        assert await client.expect("unsubscribed") == {
            "type": "unsubscribed", "channel": "room1", "id": 42,
        }
        await client.send({"type": "subscribe", "channel": "room1"})
        assert await client.expect("subscribed") == {"type": "subscribed", "channel": "room1"}


async def test_duplicate_subscribe_is_already_subscribed_and_delivers_one_copy(
    node: RunningNode,
) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe("room1")
        reply = await client.request({"type": "subscribe", "channel": "room1"})
        assert reply["type"] == "error"
        assert reply["code"] == "already_subscribed"
        await publish(node, "room1", 1)
        await publish(node, "room1", 2)
        # A second copy of 1 would come before 2.
        assert (await next_message(client))["data"] == 1
        assert (await next_message(client))["data"] == 2
        http = api(node)
        channels = (await http.get("/api/channels")).json()["channels"]
        assert channels == {"room1": 1}


async def test_unsubscribe_from_a_channel_never_subscribed_is_not_subscribed(
    node: RunningNode,
) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe("room1")
        reply = await client.request({"type": "unsubscribe", "channel": "room2"})
        assert (reply["type"], reply["code"]) == ("error", "not_subscribed")
        await publish(node, "room1", "still here")
        assert (await next_message(client))["data"] == "still here"


async def test_unsubscribe_twice_is_not_subscribed_the_second_time(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe("room1")
        assert (await client.request({"type": "unsubscribe", "channel": "room1"}))["type"] == (
            "unsubscribed"
        )
        reply = await client.request({"type": "unsubscribe", "channel": "room1"})
        assert reply["code"] == "not_subscribed"


async def test_one_connection_on_several_channels_gets_each_tagged(node: RunningNode) -> None:
    channels = ["room1", "room2", "chat:room3", "feed:room4"]
    async with connect(node.ws_url, token("alice")) as client:
        for channel in channels:
            await client.subscribe(channel)
            if channel.startswith("chat:"):
                await wait_for_frame(client, "join", channel=channel)  # our own join
        for index, channel in enumerate(channels):
            await publish(node, channel, {"n": index})
        for index, channel in enumerate(channels):
            message = await next_message(client)
            assert message["channel"] == channel
            assert message["data"] == {"n": index}


async def test_max_subscriptions_gives_too_many_subscriptions() -> None:
    async with (
        running_node(make_settings(max_subscriptions=2)) as running,
        connect(running.ws_url, token("alice")) as client,
    ):
        # The personal channel @alice is already subscribed and does not count.
        await client.subscribe("room1")
        await client.subscribe("room2")
        reply = await client.request({"type": "subscribe", "channel": "room3"})
        assert (reply["type"], reply["code"]) == ("error", "too_many_subscriptions")
        # The refused subscription did not happen; the others go on.
        await publish(running, "room3", "not for us")
        await publish(running, "room2", "for us")
        assert (await next_message(client))["data"] == "for us"
        # Room is made by unsubscribing.
        await client.request({"type": "unsubscribe", "channel": "room1"})
        await client.subscribe("room3")
        http = api(running)
        response = await http.post("/api/send", json={"user": "alice", "data": "personal"})
        assert response.status_code == 200
        assert (await next_message(client))["channel"] == "@alice"


async def test_limit_is_per_connection() -> None:
    async with (
        running_node(make_settings(max_subscriptions=1)) as running,
        connect(running.ws_url, token("alice")) as first,
        connect(running.ws_url, token("alice")) as second,
    ):
        await first.subscribe("room1")
        await second.subscribe("room1")
        reply = await second.request({"type": "subscribe", "channel": "room2"})
        assert reply["code"] == "too_many_subscriptions"


async def test_unsubscribed_connection_stops_receiving(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe("room1")
        await client.subscribe("room2")
        await publish(node, "room1", "before")
        assert (await next_message(client))["data"] == "before"
        reply = await client.request({"type": "unsubscribe", "channel": "room1"})
        assert reply["type"] == "unsubscribed"
        await publish(node, "room1", "after")
        await publish(node, "room2", "barrier")
        message = await next_message(client)
        assert (message["channel"], message["data"]) == ("room2", "barrier")


async def test_unsubscribe_of_one_connection_leaves_the_others_subscribed(
    node: RunningNode,
) -> None:
    async with (
        connect(node.ws_url, token("alice")) as leaving,
        connect(node.ws_url, token("alice")) as staying,
    ):
        await leaving.subscribe("room1")
        await staying.subscribe("room1")
        await leaving.request({"type": "unsubscribe", "channel": "room1"})
        await publish(node, "room1", "still")
        assert (await next_message(staying))["data"] == "still"


async def test_join_and_leave_are_seen_by_other_subscribers(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as watcher:
        await watcher.subscribe("chat:room")
        async with connect(node.ws_url, token("bob")) as joiner:
            await joiner.subscribe("chat:room")
            bob = joiner.welcome["client"]
            join = await wait_for_frame(watcher, "join", client=bob)
            assert join == {"type": "join", "channel": "chat:room", "user": "bob", "client": bob}
            reply = await joiner.request({"type": "unsubscribe", "channel": "chat:room"})
            assert reply["type"] == "unsubscribed"
            leave = await watcher.expect("leave")
            assert leave == {"type": "leave", "channel": "chat:room", "user": "bob", "client": bob}


async def test_leave_is_sent_when_a_subscriber_disconnects(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as watcher:
        await watcher.subscribe("chat:room")
        async with connect(node.ws_url, token("bob")) as joiner:
            await joiner.subscribe("chat:room")
            bob = joiner.welcome["client"]
            await wait_for_frame(watcher, "join", client=bob)
        leave = await watcher.expect("leave")
        assert leave == {"type": "leave", "channel": "chat:room", "user": "bob", "client": bob}


async def test_no_join_or_leave_where_the_namespace_has_them_off(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice")) as watcher,
        connect(node.ws_url, token("bob")) as joiner,
    ):
        await watcher.subscribe("room1")
        await joiner.subscribe("room1")
        await joiner.request({"type": "unsubscribe", "channel": "room1"})
        await publish(node, "room1", "barrier")
        assert (await next_message(watcher))["data"] == "barrier"


async def test_presence_frame_lists_clients_without_node(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice", info={"color": "red"})) as alice,
        connect(node.ws_url, token("bob")) as bob,
    ):
        await alice.subscribe("chat:room")
        await bob.subscribe("chat:room")
        await wait_for_frame(alice, "join", client=bob.welcome["client"])
        reply = await alice.request({"type": "presence", "channel": "chat:room"})
        assert reply["type"] == "presence"
        assert reply["channel"] == "chat:room"
        clients = sorted(reply["clients"], key=lambda c: str(c["user"]))
        assert clients == [
            {"client": alice.welcome["client"], "user": "alice", "info": {"color": "red"}},
            {"client": bob.welcome["client"], "user": "bob"},
        ]
        # The HTTP API shows the node as well.
        presence = await api_get(node, "/api/presence/chat:room")
        assert {c["node"] for c in presence["clients"]} == {"test-node"}
        # Unsubscribing leaves presence.
        await bob.request({"type": "unsubscribe", "channel": "chat:room"})
        reply = await alice.request({"type": "presence", "channel": "chat:room"})
        assert [c["user"] for c in reply["clients"]] == ["alice"]


async def test_presence_where_the_namespace_has_it_off_is_forbidden(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        reply = await client.request({"type": "presence", "channel": "room1"})
        assert reply["code"] == "forbidden"


async def test_stats_follow_connects_and_disconnects(node: RunningNode) -> None:
    await wait_for_stats(node, connections=0, users=0, subscriptions=0, channels=0)
    async with connect(node.ws_url, token("alice")) as first:
        await first.subscribe("room1")
        async with connect(node.ws_url, token("alice")) as second:
            await second.subscribe("room1")
            await second.subscribe("room2")
            async with connect(node.ws_url, token("bob")):
                stats = await api_get(node, "/api/stats")
                assert stats["total"] == {
                    "nodes": 1, "connections": 3, "users": 2, "subscriptions": 3, "channels": 2,
                }
                [local] = stats["nodes"]
                assert local["node"] == "test-node"
                assert local["connections"] == 3
                assert isinstance(local["started"], int)
                assert isinstance(local["updated"], int)
            await wait_for_stats(node, connections=2, users=1, subscriptions=3, channels=2)
        await wait_for_stats(node, connections=1, users=1, subscriptions=1, channels=1)
    await wait_for_stats(node, connections=0, users=0, subscriptions=0, channels=0)


async def test_api_channels_counts_subscribers(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice")) as alice,
        connect(node.ws_url, token("bob")) as bob,
    ):
        await alice.subscribe("room1")
        await bob.subscribe("room1")
        await bob.subscribe("chat:lobby")
        channels = (await api_get(node, "/api/channels"))["channels"]
        assert channels == {"room1": 2, "chat:lobby": 1}  # personal channels are not listed
        assert (await api_get(node, "/api/channels?prefix=chat:"))["channels"] == {
            "chat:lobby": 1
        }
        await bob.request({"type": "unsubscribe", "channel": "room1"})
        assert (await api_get(node, "/api/channels"))["channels"] == {
            "room1": 1, "chat:lobby": 1,
        }


async def test_a_heartbeats_counts_are_built_again_only_after_a_change(
    node: RunningNode,
) -> None:
    """An idle node's heartbeat reuses what it built (a walk of every channel and user is a
    fifth of an idle 100,000-connection node's CPU); any change of membership shows."""
    hub_node = node.node
    async with connect(node.ws_url, token("alice")) as alice:
        await alice.subscribe("room1")
        first = hub_node.snapshot()
        again = hub_node.snapshot()
        assert again.subscribers_by_channel is first.subscribers_by_channel
        assert again.users is first.users and first.users == {"alice"}
        async with connect(node.ws_url, token("bob")) as bob:
            await bob.subscribe("room1")
            joined = hub_node.snapshot()
            assert joined.subscribers_by_channel == {"room1": 2}
            assert joined.users == {"alice", "bob"}
        await eventually(lambda: hub_node.snapshot().users == {"alice"}, what="bob gone")
        assert hub_node.snapshot().subscribers_by_channel == {"room1": 1}


class Listener:
    """The least a Subscriber is: it keeps what it is pushed."""

    codec = WsCodec()
    expires = None

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.user = client_id
        self.frames: list[bytes] = []

    def push(self, frame: bytes, count: int = 1) -> bool:
        self.frames.append(frame)
        return True

    def close(self, code: int, reason: str = "") -> None:
        pass

    def reset(self, channel: str, position: StreamPosition) -> bool:
        return True


async def test_a_join_while_a_disconnect_releases_the_channel_keeps_it() -> None:
    """A disconnect releases the channels it emptied in tasks; one joined before those ran
    (another connection, same loop turn) stays, relayed, and its member hears it."""
    broker = MemoryBroker()
    node = Node(make_settings(), broker, MemoryPresence(), Metrics("test-node"))
    await broker.start(node)
    subscriptions = node.subscriptions
    leaving, joining = Listener("a"), Listener("b")
    assert await subscriptions.join(leaving, "room1", None, lambda joined: None)
    left = asyncio.ensure_future(subscriptions.leave_all(leaving))
    joined = asyncio.ensure_future(subscriptions.join(joining, "room1", None, lambda j: None))
    assert await left == ["room1"]
    assert await joined
    assert list(subscriptions.members("room1")) == [joining]
    assert "room1" in subscriptions.channels
    await broker.publish("room1", Message(channel="room1", data=msgspec.Raw(b"1"), ts=1))
    await eventually(lambda: joining.frames != [])
    assert await subscriptions.leave_all(joining) == ["room1"]
    assert subscriptions.channels == []
