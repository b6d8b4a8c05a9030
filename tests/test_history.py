"""History, offsets, epochs and recovery on the in-process broker (PROTOCOL §5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from hub.broker import MemoryBroker
from tests.support import (
    WAIT,
    Client,
    FakeClock,
    RunningNode,
    connect,
    make_settings,
    publish,
    running_node,
    token,
)

NAMESPACES: dict[str, dict[str, Any]] = {
    "default": {"subscribe": "token", "publish": "none"},
    "chat": {"subscribe": "any", "publish": "any"},
    "feed": {"subscribe": "any", "publish": "token", "history_size": 100, "history_ttl": 300},
    "small": {"subscribe": "any", "publish": "any", "history_size": 3, "history_ttl": 300},
    "big": {"subscribe": "any", "publish": "any", "history_size": 2000, "history_ttl": 300},
    "brief": {"subscribe": "any", "publish": "any", "history_size": 100, "history_ttl": 1},
}


@pytest.fixture
async def hnode() -> AsyncIterator[RunningNode]:
    async with running_node(make_settings(namespaces=NAMESPACES, rate_limit=0)) as running:
        yield running


@pytest.fixture
async def api(hnode: RunningNode) -> AsyncIterator[httpx.AsyncClient]:
    async with hnode.api() as client:
        yield client


async def messages(client: Client, n: int) -> list[dict[str, Any]]:
    """The next `n` frames, each of which must be a `message`."""
    return [await client.expect("message") for _ in range(n)]


async def subscribe_since(
    client: Client, channel: str, offset: int, epoch: str
) -> dict[str, Any]:
    """Subscribe with `since`; the reply must be the very next frame."""
    await client.send({"type": "subscribe", "channel": channel,
                       "since": {"offset": offset, "epoch": epoch}})
    return await client.expect("subscribed")


# offsets and epochs


async def test_offsets_start_at_one_and_grow_by_one(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(hnode.ws_url, token("alice")) as alice:
        await alice.subscribe("feed:o")
        replies = [await publish(api, "feed:o", n) for n in range(5)]
        got = await messages(alice, 5)
    assert [r["offset"] for r in replies] == [1, 2, 3, 4, 5]
    assert len({r["epoch"] for r in replies}) == 1
    assert [m["offset"] for m in got] == [1, 2, 3, 4, 5]
    assert [m["data"] for m in got] == [0, 1, 2, 3, 4]
    assert {m["epoch"] for m in got} == {replies[0]["epoch"]}


async def test_offsets_are_per_channel(api: httpx.AsyncClient) -> None:
    assert (await publish(api, "feed:one", 1))["offset"] == 1
    assert (await publish(api, "feed:two", 1))["offset"] == 1
    assert (await publish(api, "feed:one", 2))["offset"] == 2


async def test_client_publish_answers_offset_and_epoch(hnode: RunningNode) -> None:
    async with connect(hnode.ws_url, token("alice")) as alice:
        first = await alice.request({"type": "publish", "channel": "feed:p", "data": 1})
        second = await alice.request({"type": "publish", "channel": "feed:p", "data": 2})
        plain = await alice.request({"type": "publish", "channel": "chat:p", "data": 3})
    assert first["type"] == "published" and first["channel"] == "feed:p"
    assert (first["offset"], second["offset"]) == (1, 2)
    assert first["epoch"] == second["epoch"]
    assert plain["type"] == "published" and "offset" not in plain and "epoch" not in plain


async def test_subscribed_on_an_empty_channel_has_offset_zero_and_an_epoch(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await alice.subscribe("feed:empty")
        assert reply["offset"] == 0
        assert isinstance(reply["epoch"], str) and reply["epoch"]
        assert "recovered" not in reply
        published = await publish(api, "feed:empty", 1)
        [message] = await messages(alice, 1)
    assert published["epoch"] == reply["epoch"] == message["epoch"]
    assert message["offset"] == 1


async def test_subscribed_carries_the_latest_offset(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    for n in range(3):
        last = await publish(api, "feed:latest", n)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await alice.subscribe("feed:latest")
        await publish(api, "feed:latest", 3)
        [message] = await messages(alice, 1)  # no stored message is replayed without since
    assert (reply["offset"], reply["epoch"]) == (3, last["epoch"])
    assert message["offset"] == 4


async def test_subscribed_on_a_channel_without_history_has_no_offset(hnode: RunningNode) -> None:
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await alice.subscribe("chat:plain")
    assert "offset" not in reply and "epoch" not in reply


# recovery


async def test_recovery_gives_exactly_the_missed_messages_then_live_ones(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(hnode.ws_url, token("alice")) as alice:
        epoch = (await alice.subscribe("feed:r"))["epoch"]
        for n in (1, 2):
            await publish(api, "feed:r", n)
        seen = await messages(alice, 2)
    assert [m["offset"] for m in seen] == [1, 2]
    for n in (3, 4, 5):  # while alice is away
        await publish(api, "feed:r", n, event="e" if n == 4 else None)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await subscribe_since(alice, "feed:r", 2, epoch)
        assert reply["recovered"] is True
        assert (reply["offset"], reply["epoch"]) == (5, epoch)
        missed = await messages(alice, 3)
        await publish(api, "feed:r", 6)
        [live] = await messages(alice, 1)
    assert [(m["offset"], m["data"]) for m in missed] == [(3, 3), (4, 4), (5, 5)]
    assert missed[1]["event"] == "e" and "event" not in missed[0]
    assert all(m["channel"] == "feed:r" and m["epoch"] == epoch for m in missed)
    assert (live["offset"], live["data"]) == (6, 6)


async def test_recovery_with_nothing_missed(hnode: RunningNode, api: httpx.AsyncClient) -> None:
    last = await publish(api, "feed:none", 1)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await subscribe_since(alice, "feed:none", last["offset"], last["epoch"])
        assert reply["recovered"] is True and reply["offset"] == 1
        await publish(api, "feed:none", 2)
        [live] = await messages(alice, 1)
    assert live["offset"] == 2


async def test_recovery_keeps_from_of_client_publishes(hnode: RunningNode) -> None:
    async with connect(hnode.ws_url, token("bob")) as bob:
        published = await bob.request({"type": "publish", "channel": "feed:f", "data": "x"})
    async with connect(hnode.ws_url, token("alice")) as alice:
        await subscribe_since(alice, "feed:f", 0, published["epoch"])
        [message] = await messages(alice, 1)
    assert message["from"] == "bob" and message["offset"] == 1


async def test_recovery_with_another_epoch_is_not_recovered(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    for n in range(3):
        last = await publish(api, "feed:e", n)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await subscribe_since(alice, "feed:e", 1, "not-" + last["epoch"])
        assert reply["recovered"] is False
        assert (reply["offset"], reply["epoch"]) == (3, last["epoch"])
        await publish(api, "feed:e", 3)
        [live] = await messages(alice, 1)  # nothing replayed before the live message
    assert live["offset"] == 4


async def test_recovery_from_an_offset_in_the_future_starts_a_new_epoch(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    """A client that saw offset 5 of an epoch whose history ends at 1: the broker lost
    messages (a failover), and offsets 2.. must not be given to other messages in that
    epoch (PROTOCOL §5)."""
    last = await publish(api, "feed:future", 1)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await subscribe_since(alice, "feed:future", 5, last["epoch"])
        assert reply["recovered"] is False
        assert (reply["offset"], reply["epoch"] != last["epoch"]) == (0, True)
        after = await publish(api, "feed:future", 2)
        assert after == {"offset": 1, "epoch": reply["epoch"]}
        got = await alice.expect("message")
        assert (got["offset"], got["epoch"], got["data"]) == (1, reply["epoch"], 2)


async def test_recovery_older_than_kept_history_is_not_recovered(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    for n in range(1, 7):  # size 3: offsets 4, 5, 6 are kept
        last = await publish(api, "small:k", n)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await subscribe_since(alice, "small:k", 2, last["epoch"])
        assert reply["recovered"] is False and reply["offset"] == 6
        await publish(api, "small:k", 7)
        [live] = await messages(alice, 1)
    assert live["offset"] == 7


async def test_recovery_within_kept_history(hnode: RunningNode, api: httpx.AsyncClient) -> None:
    for n in range(1, 7):
        last = await publish(api, "small:w", n)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await subscribe_since(alice, "small:w", 3, last["epoch"])
        assert reply["recovered"] is True
        missed = await messages(alice, 3)
    assert [m["offset"] for m in missed] == [4, 5, 6]


async def test_recovery_past_recovery_max_is_not_recovered() -> None:
    settings = make_settings(namespaces=NAMESPACES, recovery_max=5)
    async with running_node(settings) as node, node.api() as api:
        for n in range(1, 12):
            last = await publish(api, "feed:max", n)
        epoch = last["epoch"]
        async with connect(node.ws_url, token("alice")) as alice:
            exactly = await subscribe_since(alice, "feed:max", 6, epoch)  # 5 missed
            assert exactly["recovered"] is True
            assert [m["offset"] for m in await messages(alice, 5)] == [7, 8, 9, 10, 11]
        async with connect(node.ws_url, token("alice")) as alice:
            over = await subscribe_since(alice, "feed:max", 5, epoch)  # 6 missed
            assert over["recovered"] is False and over["offset"] == 11
            await publish(api, "feed:max", 12)
            [live] = await messages(alice, 1)
            assert live["offset"] == 12


async def test_publishes_racing_a_recovering_subscribe_arrive_once_in_order(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(hnode.ws_url, token("alice")) as alice:
        epoch = (await alice.subscribe("feed:race"))["epoch"]
        for n in range(3):
            await publish(api, "feed:race", n)
        await messages(alice, 3)
    subscribed, publishing = asyncio.Event(), asyncio.Event()
    sent_after = 0

    async def keep_publishing(publisher: Client) -> int:
        """Publish until well after the subscribe was answered; returns the last offset."""
        nonlocal sent_after
        last = 0
        for n in range(3000):
            reply = await publisher.request({"type": "publish", "channel": "feed:race",
                                             "data": n})
            assert reply["type"] == "published", reply
            last = reply["offset"]
            publishing.set()
            if subscribed.is_set():
                sent_after += 1
                if sent_after == 30:
                    break
        return last

    async with connect(hnode.ws_url, token("pub")) as publisher, \
            connect(hnode.ws_url, token("pub2")) as publisher2:
        pumps = [asyncio.create_task(keep_publishing(p)) for p in (publisher, publisher2)]
        async with connect(hnode.ws_url, token("alice")) as alice:
            await asyncio.wait_for(publishing.wait(), WAIT)
            reply = await subscribe_since(alice, "feed:race", 3, epoch)
            subscribed.set()
            assert reply["recovered"] is True
            last = max(await asyncio.gather(*pumps))
            assert reply["offset"] < last  # some messages were live
            got: list[int] = []
            async with asyncio.timeout(WAIT):
                while not got or got[-1] < last:
                    frame = await alice.expect("message")
                    got.append(frame["offset"])
    assert got == list(range(4, last + 1))


# history requests


async def test_history_without_since_is_the_newest_oldest_first(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    for n in range(1, 11):
        last = await publish(api, "feed:h", n)
    async with connect(hnode.ws_url, token("alice")) as alice:
        everything = await alice.request({"type": "history", "channel": "feed:h"})
        newest = await alice.request({"type": "history", "channel": "feed:h", "limit": 3})
    assert everything["type"] == "history" and everything["channel"] == "feed:h"
    assert (everything["epoch"], everything["offset"]) == (last["epoch"], 10)
    assert [m["offset"] for m in everything["messages"]] == list(range(1, 11))
    assert [m["offset"] for m in newest["messages"]] == [8, 9, 10]
    assert [m["data"] for m in newest["messages"]] == [8, 9, 10]


async def test_history_with_since_is_what_came_after_at_most_limit(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    for n in range(1, 11):
        last = await publish(api, "feed:s", n)
    since = {"offset": 4, "epoch": last["epoch"]}
    async with connect(hnode.ws_url, token("alice")) as alice:
        limited = await alice.request({"type": "history", "channel": "feed:s", "since": since,
                                       "limit": 3})
        rest = await alice.request({"type": "history", "channel": "feed:s", "since": since})
        at_end = await alice.request({"type": "history", "channel": "feed:s",
                                      "since": {"offset": 10, "epoch": last["epoch"]}})
    assert [m["offset"] for m in limited["messages"]] == [5, 6, 7]
    assert limited["offset"] == 10
    assert [m["offset"] for m in rest["messages"]] == [5, 6, 7, 8, 9, 10]
    assert at_end["messages"] == [] and at_end["offset"] == 10


async def test_history_with_since_of_another_epoch_is_empty_with_current_position(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    for n in range(2):
        last = await publish(api, "feed:x", n)
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await alice.request({"type": "history", "channel": "feed:x",
                                     "since": {"offset": 0, "epoch": "other"}})
    assert (reply["epoch"], reply["offset"], reply["messages"]) == (last["epoch"], 2, [])


async def test_history_of_an_unused_channel(hnode: RunningNode) -> None:
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await alice.request({"type": "history", "channel": "feed:unused"})
    assert reply["type"] == "history" and reply["offset"] == 0 and reply["messages"] == []
    assert isinstance(reply["epoch"], str) and reply["epoch"]


async def test_history_items_have_offset_data_ts_and_event_and_from_where_present(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    await publish(api, "feed:i", {"a": 1})
    await publish(api, "feed:i", [1], event="ev")
    async with connect(hnode.ws_url, token("bob")) as bob:
        await bob.request({"type": "publish", "channel": "feed:i", "data": "hi", "event": "say"})
        await bob.request({"type": "publish", "channel": "feed:i", "data": None})
        reply = await bob.request({"type": "history", "channel": "feed:i"})
    plain, with_event, from_client, null_data = reply["messages"]
    assert set(plain) == {"offset", "data", "ts"} and plain["data"] == {"a": 1}
    assert isinstance(plain["ts"], int) and plain["ts"] > 1_600_000_000_000
    assert set(with_event) == {"offset", "data", "ts", "event"} and with_event["event"] == "ev"
    assert from_client == {"offset": 3, "data": "hi", "ts": from_client["ts"], "event": "say",
                           "from": "bob"}
    assert set(null_data) == {"offset", "data", "ts", "from"} and null_data["data"] is None


async def test_history_same_over_http_and_websocket(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    for n in range(1, 6):
        last = await publish(api, "feed:same", n)
    async with connect(hnode.ws_url, token("alice")) as alice:
        frame = await alice.request({"type": "history", "channel": "feed:same", "limit": 2,
                                     "since": {"offset": 1, "epoch": last["epoch"]}})
    http = (await api.get("/api/history/feed:same",
                          params={"since": 1, "epoch": last["epoch"], "limit": 2})).json()
    assert http == {key: frame[key] for key in ("channel", "epoch", "offset", "messages")}


async def test_history_limit_is_capped_at_1000(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    count = 1005
    async with connect(hnode.ws_url, token("alice")) as alice:
        for n in range(count):
            await alice.send({"type": "publish", "channel": "big:cap", "data": n, "id": n + 1})
        async with asyncio.timeout(WAIT):
            for _ in range(count):
                assert (await alice.recv())["type"] == "published"
        default = await alice.request({"type": "history", "channel": "big:cap"})
        asked = await alice.request({"type": "history", "channel": "big:cap", "limit": 5000})
        since = await alice.request({"type": "history", "channel": "big:cap", "limit": 5000,
                                     "since": {"offset": 0, "epoch": default["epoch"]}})
    assert default["offset"] == count
    assert [m["offset"] for m in default["messages"]] == list(range(6, count + 1))
    assert [m["offset"] for m in asked["messages"]] == list(range(6, count + 1))
    assert [m["offset"] for m in since["messages"]] == list(range(1, 1001))
    over_http = (await api.get("/api/history/big:cap", params={"limit": 5000})).json()
    assert len(over_http["messages"]) == 1000


async def test_history_expires_after_history_ttl(
    hnode: RunningNode, api: httpx.AsyncClient
) -> None:
    broker = hnode.node.broker
    assert isinstance(broker, MemoryBroker)
    clock = broker.clock = FakeClock()
    last = await publish(api, "brief:t", 1)
    await publish(api, "brief:t", 2)
    body = (await api.get("/api/history/brief:t")).json()
    assert [m["data"] for m in body["messages"]] == [1, 2]
    clock.advance(0.99)  # history_ttl is 1 s
    body = (await api.get("/api/history/brief:t")).json()
    assert [m["data"] for m in body["messages"]] == [1, 2]
    clock.advance(0.02)
    body = (await api.get("/api/history/brief:t")).json()
    assert body["messages"] == []
    async with connect(hnode.ws_url, token("alice")) as alice:
        reply = await subscribe_since(alice, "brief:t", 0, last["epoch"])
        assert reply["recovered"] is False


async def test_history_on_a_channel_without_history_is_an_error(hnode: RunningNode) -> None:
    async with connect(hnode.ws_url, token("alice", channels=["*"])) as alice:
        for channel in ("chat:nohistory", "room"):
            reply = await alice.request({"type": "history", "channel": channel})
            assert reply["type"] == "error" and reply["code"] == "forbidden", reply
        personal = await alice.request({"type": "history", "channel": "@alice"})
        assert personal["type"] == "error" and personal["code"] == "forbidden"
        bad = await alice.request({"type": "history", "channel": "bad name"})
        assert bad["type"] == "error" and bad["code"] == "invalid_channel"
        assert (await alice.request({"type": "ping"}))["type"] == "pong"


async def test_history_needs_subscribe_permission() -> None:
    """The default namespace subscribes by token: history too."""
    settings = make_settings(namespaces={"default": {"history_size": 10, "history_ttl": 60}})
    async with running_node(settings) as node, \
            connect(node.ws_url, token("alice", channels=["mine"])) as alice:
        denied = await alice.request({"type": "history", "channel": "theirs"})
        allowed = await alice.request({"type": "history", "channel": "mine"})
    assert denied["type"] == "error" and denied["code"] == "forbidden"
    assert allowed["type"] == "history"
