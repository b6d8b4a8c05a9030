"""`hub.client` (PROTOCOL §17) against a real node: subscribe as an iterator and with a
handler, publish, presence, history, personal messages, errors, `since` on the first
subscribe, a token refreshed before it expires, reconnect and recovery after the server
closed the connection, and the closes that are final.

Its behaviour through node kills and Redis restarts on a 3-node cluster is in
tests/test_client_cluster.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hub.client import ClientClosed, CommandError, Message, Reset, connect
from tests.support import WAIT, RunningNode, eventually, publish, token


async def next_item(subscription: object, timeout: float = WAIT) -> Message | Reset:
    iterator = subscription.__aiter__()  # type: ignore[attr-defined]
    item: Message | Reset = await asyncio.wait_for(iterator.__anext__(), timeout)
    return item


async def test_subscribe_publish_presence_history(node: RunningNode) -> None:
    async with connect(node.ws_url, token=token("alice")) as alice:
        assert alice.user == "alice" and alice.node == "test-node"
        feed = await alice.subscribe("feed:a")
        chat = await alice.subscribe("chat:a")
        published = await alice.publish("chat:a", {"text": "hi"}, event="say")
        assert published.offset is None
        message = await next_item(chat)
        assert isinstance(message, Message)
        assert (message.channel, message.data, message.event, message.from_) == (
            "chat:a", {"text": "hi"}, "say", "alice")
        await publish(node, "feed:a", 1)
        first = await next_item(feed)
        assert isinstance(first, Message) and (first.data, first.offset) == (1, 1)
        assert feed.position == (1, first.epoch)

        members = await alice.presence("chat:a")
        assert [(m.user, m.client) for m in members] == [("alice", alice.client_id)]
        history = await alice.history("feed:a")
        assert [(m.offset, m.data) for m in history.messages] == [(1, 1)]
        assert history.epoch == first.epoch and history.offset == 1

        with pytest.raises(CommandError) as refused:
            await alice.presence("feed:a")
        assert refused.value.code == "forbidden"
        with pytest.raises(CommandError) as invalid:
            await alice.subscribe("no spaces")
        assert invalid.value.code == "invalid_channel"
        with pytest.raises(CommandError):
            await alice.subscribe("feed:a")  # already

        await node.http.post("/api/send", json={"user": "alice", "data": "psst"})
        personal = await next_item(alice.personal())
        assert isinstance(personal, Message) and personal.data == "psst"

        await chat.unsubscribe()
        with pytest.raises(StopAsyncIteration):
            await next_item(chat)


async def test_handler_form_and_since_on_the_first_subscribe(node: RunningNode) -> None:
    for n in range(1, 6):
        reply = await publish(node, "feed:h", n)
    epoch = reply["epoch"]
    seen: list[Message | Reset] = []
    done = asyncio.Event()

    async def handler(item: Message | Reset) -> None:
        seen.append(item)
        if isinstance(item, Message) and item.data == 7:
            done.set()

    async with connect(node.ws_url, token=token("bob")) as bob:
        await bob.subscribe("feed:h", since=(3, epoch), handler=handler)
        for n in (6, 7):
            await publish(node, "feed:h", n)
        await asyncio.wait_for(done.wait(), WAIT)
        assert [item.data for item in seen if isinstance(item, Message)] == [4, 5, 6, 7]
        # a position of another epoch cannot be recovered: a Reset, then live messages
        stale = await bob.subscribe("feed:s", since=(3, "not-the-epoch"))
        reset = await next_item(stale)
        assert isinstance(reset, Reset) and reset.channel == "feed:s"
        await publish(node, "feed:s", "after")
        message = await next_item(stale)
        assert isinstance(message, Message) and message.data == "after"
        assert message.offset == reset.offset + 1 and message.epoch == reset.epoch


async def test_reconnects_and_recovers_every_missed_message_once(node: RunningNode) -> None:
    async with connect(node.ws_url, token=token("carol"), backoff_min=0.05,
                       backoff_max=0.2) as carol:
        feed = await carol.subscribe("feed:r")
        for n in (1, 2):
            await publish(node, "feed:r", n)
        got = [await next_item(feed), await next_item(feed)]
        first_client = carol.client_id
        # The server closes it (as a restarting node would), messages go on meanwhile.
        node.node.hub.close_user("carol", 1012, "node restarting")
        for n in (3, 4, 5):
            await publish(node, "feed:r", n)
        got += [await next_item(feed) for _ in range(3)]
        await eventually(lambda: carol.connects == 2 and carol.client_id != first_client)
        await publish(node, "feed:r", 6)
        got.append(await next_item(feed))
        assert [(item.data, item.offset) for item in got if isinstance(item, Message)] == [
            (n, n) for n in range(1, 7)]


async def test_a_token_callback_refreshes_before_expiry(node: RunningNode) -> None:
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        return token("dora", ttl=3)

    async with connect(node.ws_url, get_token=get_token) as dora:
        first_expiry = dora.expires
        assert first_expiry is not None
        await eventually(lambda: dora.expires != first_expiry, within=WAIT,
                         what="a refresh before expiry")
        assert calls >= 2 and dora.connects == 1
        await asyncio.sleep(max(0.0, first_expiry - time.time() + 0.5))
        assert (await dora.publish("chat:d", 1)).channel == "chat:d"
        assert dora.connects == 1  # never closed with 4002


async def test_final_closes_end_the_client(node: RunningNode) -> None:
    with pytest.raises(ClientClosed) as refused:
        async with connect(node.ws_url, token="not-a-token"):
            pass
    assert refused.value.code == 4001
    async with connect(node.ws_url, token=token("erin")) as erin:
        feed = await erin.subscribe("feed:e")
        await node.http.post("/api/disconnect", json={"user": "erin"})
        with pytest.raises(ClientClosed) as closed:
            await next_item(feed)
        assert closed.value.code == 4003
        with pytest.raises(ClientClosed):
            await erin.publish("chat:e", 1)


async def test_no_node_answers_in_time() -> None:
    with pytest.raises(TimeoutError):
        async with connect("ws://127.0.0.1:9/ws", token=token("x"), timeout=0.5):
            pass
