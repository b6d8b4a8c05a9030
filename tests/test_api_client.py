"""`hub.api.HubClient` against a live node: every call, its typed replies, and errors as
`HubApiError` with the contract's code and the HTTP status."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hub.api import (
    BatchItemReply,
    BroadcastItem,
    HubApiError,
    HubClient,
    PresenceClient,
    PublishReply,
    StatsReply,
    broadcast_command,
    publish_command,
    send_command,
)
from hub.api_types import Empty
from tests.support import API_KEY, RunningNode, connect, make_settings, running_node, token


@pytest.fixture
async def hub(node: RunningNode) -> AsyncIterator[HubClient]:
    async with HubClient(node.url, API_KEY) as client:
        yield client


async def test_publish_reaches_a_subscriber_and_answers_the_position(
    node: RunningNode, hub: HubClient
) -> None:
    async with connect(node.ws_url, token("alice")) as alice:
        await alice.subscribe("feed:news")
        reply = await hub.publish("feed:news", {"text": "hello"}, event="note")
        frame = await alice.expect("message")
    assert isinstance(reply, PublishReply) and reply.offset == 1 and reply.epoch
    assert frame["data"] == {"text": "hello"} and frame["event"] == "note"
    assert frame["offset"] == 1 and frame["epoch"] == reply.epoch
    assert await hub.publish("room", [1, 2]) == PublishReply()  # no history: {}


async def test_broadcast_items(hub: HubClient) -> None:
    reply = await hub.broadcast(["room", "bad name", "feed:b"], None)
    good, bad, history = reply.results
    assert good == BroadcastItem("room")
    assert bad.channel == "bad name" and bad.error is not None
    assert bad.error.code == "invalid_channel" and bad.error.message
    assert history.offset == 1 and history.epoch and history.error is None


async def test_batch_of_publish_broadcast_and_send(node: RunningNode, hub: HubClient) -> None:
    async with connect(node.ws_url, token("bob")) as bob:
        await bob.subscribe("feed:x")
        reply = await hub.batch([
            publish_command("feed:x", {"n": 1}, event="e"),
            broadcast_command(["feed:x", "bad name"], {"n": 2}),
            send_command("bob", "hi"),
            publish_command("no good", 1),
        ])
        first, both, sent, refused = reply.replies
        assert first.publish is not None and first.publish.offset == 1
        assert both.broadcast is not None
        assert [item.offset for item in both.broadcast.results] == [2, None]
        assert sent == BatchItemReply(send=Empty())
        assert refused.error is not None and refused.error.code == "invalid_channel"
        frames = [await bob.expect("message") for _ in range(3)]
    # each channel in order; different channels have no order between them (PROTOCOL §5)
    assert sorted((f["channel"], f.get("offset", 0)) for f in frames) == [
        ("@bob", 0), ("feed:x", 1), ("feed:x", 2)]
    assert [f["data"] for f in frames if f["channel"] == "feed:x"] == [{"n": 1}, {"n": 2}]


async def test_send_and_disconnect(node: RunningNode, hub: HubClient) -> None:
    async with connect(node.ws_url, token("bob")) as bob:
        await hub.send("bob", {"hi": 1}, event="poke")
        frame = await bob.expect("message")
        assert frame["channel"] == "@bob" and frame["data"] == {"hi": 1}
        await hub.disconnect("bob", code=4500, reason="bye")
        assert await bob.closed() == 4500
    await hub.send("nobody", 1)  # no connection anywhere is fine too


async def test_presence_channels_and_stats(node: RunningNode, hub: HubClient) -> None:
    async with connect(node.ws_url, token("alice", info={"name": "Alice"})) as alice:
        await alice.subscribe("chat:lobby")
        presence = await hub.presence("chat:lobby")
        assert presence.clients == [
            PresenceClient(alice.welcome["client"], "alice", "test-node", {"name": "Alice"})
        ]
        assert (await hub.channels()).channels == {"chat:lobby": 1}
        assert (await hub.channels(prefix="feed:")).channels == {}
        stats = await hub.stats()
    assert isinstance(stats, StatsReply)
    assert [n.node for n in stats.nodes] == ["test-node"]
    assert stats.total.connections == 1 and stats.total.channels == 1


async def test_history_with_since_and_limit(hub: HubClient) -> None:
    for n in range(1, 5):
        await hub.publish("feed:h", n, event=f"e{n}")
    everything = await hub.history("feed:h")
    assert [m.data for m in everything.messages] == [1, 2, 3, 4]
    assert everything.messages[0].event == "e1" and everything.messages[0].from_ is None
    after = await hub.history("feed:h", since=(1, everything.epoch), limit=2)
    assert [m.offset for m in after.messages] == [2, 3]
    newest = await hub.history("feed:h", limit=1)
    assert [m.data for m in newest.messages] == [4] and newest.offset == 4


@pytest.mark.parametrize("channel", ["feed:a/b=c.d", "feed:.", "feed:..", "feed:./../x"])
async def test_channel_names_that_look_like_paths(hub: HubClient, channel: str) -> None:
    """`/`, `.` and `..` reach the node as they are, not as path segments."""
    await hub.publish(channel, channel)
    reply = await hub.history(channel)
    assert reply.channel == channel and [m.data for m in reply.messages] == [channel]


@pytest.mark.parametrize("channel", [".", ".."])
async def test_dot_channels_are_not_dot_segments(hub: HubClient, channel: str) -> None:
    with pytest.raises(HubApiError) as raised:  # the default namespace keeps no history
        await hub.history(channel)
    assert (raised.value.status, raised.value.code) == (403, "forbidden")


async def test_personal_channel_with_odd_characters(node: RunningNode, hub: HubClient) -> None:
    user = "ann lee?#%/\n"
    await hub.send(user, 1)
    with pytest.raises(HubApiError) as raised:
        await hub.presence("@" + user)  # a personal channel has no presence
    assert raised.value.code == "forbidden"


async def test_errors_carry_code_and_status(node: RunningNode, hub: HubClient) -> None:
    cases = [
        (hub.publish("bad name", 1), 400, "invalid_channel"),
        (hub.send("", 1), 400, "bad_request"),
        (hub.disconnect("bob", code=999), 400, "bad_request"),
        (hub.presence("room"), 403, "forbidden"),
        (hub.history("feed:h", since=(1, "e"), limit=-1), 400, "bad_request"),
    ]
    for call, status, code in cases:
        with pytest.raises(HubApiError) as raised:
            await call
        assert (raised.value.status, raised.value.code) == (status, code), raised.value
        assert raised.value.message
    async with HubClient(node.url, "wrong key") as wrong:
        with pytest.raises(HubApiError) as raised:
            await wrong.stats()
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")
    assert str(raised.value) == "401 unauthorized: missing or wrong API key"


async def test_no_key_in_dev_mode_and_403_without_a_configured_key() -> None:
    async with running_node(make_settings(api_key=None, dev=True)) as dev, \
            HubClient(dev.url) as hub:
        assert (await hub.stats()).total.nodes == 1
    async with running_node(make_settings(api_key=None)) as closed, \
            HubClient(closed.url, "anything") as hub:
        with pytest.raises(HubApiError) as raised:
            await hub.stats()
    assert (raised.value.status, raised.value.code) == (403, "forbidden")
