"""Centrifugo's server HTTP API (PROTOCOL §16), driven by the real `cent` SDK from PyPI, and
the hub's own `/api/subscribe` / `/api/unsubscribe` (§15): every method against a real
node; the moves (subscribe, unsubscribe, refresh, disconnect) reaching `/ws` clients and
the real centrifuge-python SDK, also on the other node of a two-node cluster on a real
Redis; and every kind of bad input answered with Centrifugo's codes, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    RefreshRequest,
    StreamPosition,
    SubscribeRequest,
    UnsubscribeRequest,
)
from cent.dto import Disconnect
from cent.exceptions import CentApiResponseError, CentTransportError, CentUnauthorizedError
from centrifuge import (
    Client as SdkClient,
)
from centrifuge import (
    ClientEventHandler,
    ServerPublicationContext,
    ServerSubscribedContext,
    ServerUnsubscribedContext,
)

from hub.api import HubApiError, HubClient
from tests.conftest import NAMESPACES
from tests.support import (
    API_KEY,
    WAIT,
    Client,
    RunningNode,
    connect,
    eventually,
    make_settings,
    publish,
    running_node,
    token,
)

PREFIX = "/centrifugo/api"


@contextlib.asynccontextmanager
async def cent(running: RunningNode, key: str = API_KEY) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(running.url + PREFIX, key, timeout=WAIT)
    try:
        yield client
    finally:
        await client.close()


async def frame_of(client: Client, kind: str, channel: str) -> dict[str, Any]:
    """The next frame of `kind` on `channel` (others are skipped)."""
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.recv()
            if frame.get("type") == kind and frame.get("channel") == channel:
                return frame


# every method, one node


async def test_publish_broadcast_history_and_history_remove(node: RunningNode) -> None:
    async with cent(node) as api, connect(node.ws_url, token("reader")) as reader:
        await reader.subscribe("feed:a")
        first = await api.publish(PublishRequest(channel="feed:a", data={"n": 1},
                                                 tags={"event": "tick"}))
        assert first.offset == 1 and first.epoch
        message = await reader.expect("message")
        assert (message["data"], message["event"], message["offset"]) == ({"n": 1}, "tick", 1)
        b64 = base64.b64encode(b'{"n":2}').decode()
        await api.publish(PublishRequest(channel="feed:a", data=None, b64data=b64))
        assert (await reader.expect("message"))["data"] == {"n": 2}
        skipped = await api.publish(PublishRequest(channel="feed:a", data={"n": 0},
                                                   skip_history=True))
        assert skipped.offset == 0 and skipped.epoch == ""
        assert (await reader.expect("message"))["data"] == {"n": 0}

        result = await api.broadcast(BroadcastRequest(channels=["feed:a", "bad channel", "chat:b"],
                                                      data={"n": 3}))
        ok, bad, plain = result.responses
        assert ok.result is not None and ok.result.offset == 3
        assert bad.error is not None and bad.error.code == 102
        assert plain.result is not None and plain.error is None

        # Centrifugo's history: oldest first without since; newest first with reverse;
        # after since; limit 0 is the position only.
        oldest = await api.history(HistoryRequest(channel="feed:a", limit=2))
        assert [pub.data for pub in oldest.publications] == [{"n": 1}, {"n": 2}]
        assert (oldest.offset, oldest.epoch) == (3, first.epoch)
        assert oldest.publications[0].tags is not None
        assert oldest.publications[0].tags["event"] == "tick"
        newest = await api.history(HistoryRequest(channel="feed:a", limit=2, reverse=True))
        assert [pub.offset for pub in newest.publications] == [3, 2]
        after = await api.history(HistoryRequest(
            channel="feed:a", limit=-1, since=StreamPosition(offset=1, epoch=first.epoch)))
        assert [pub.offset for pub in after.publications] == [2, 3]
        before = await api.history(HistoryRequest(
            channel="feed:a", limit=10, reverse=True,
            since=StreamPosition(offset=3, epoch="")))
        assert [pub.offset for pub in before.publications] == [2, 1]
        position = await api.history(HistoryRequest(channel="feed:a"))
        assert (position.publications, position.offset) == ([], 3)

        await api.history_remove(HistoryRemoveRequest(channel="feed:a"))
        emptied = await api.history(HistoryRequest(channel="feed:a", limit=-1))
        assert (emptied.publications, emptied.offset, emptied.epoch) == ([], 3, first.epoch)
        # The position stays, so a recovery from before the removal is not recovered.
        async with connect(node.ws_url, token("late")) as late:
            reply = await late.subscribe("feed:a", since={"offset": 1, "epoch": first.epoch})
            assert reply["recovered"] is False and reply["offset"] == 3
        again = await api.publish(PublishRequest(channel="feed:a", data={"n": 4}))
        assert (again.offset, again.epoch) == (4, first.epoch)


async def test_presence_channels_info_and_batch(node: RunningNode) -> None:
    async with (
        cent(node) as api,
        connect(node.ws_url, token("ann", info={"name": "Ann"})) as ann,
        connect(node.ws_url, token("bob")) as bob,
    ):
        await ann.subscribe("chat:room")
        await bob.subscribe("chat:room")
        presence = await api.presence(PresenceRequest(channel="chat:room"))
        assert {info.user for info in presence.presence.values()} == {"ann", "bob"}
        assert presence.presence[ann.welcome["client"]].conn_info == {"name": "Ann"}
        stats = await api.presence_stats(PresenceStatsRequest(channel="chat:room"))
        assert (stats.num_clients, stats.num_users) == (2, 2)

        channels = await api.channels(ChannelsRequest(pattern="chat:*"))
        assert channels.channels["chat:room"].num_clients == 2
        assert (await api.channels(ChannelsRequest(pattern="feed:*"))).channels == {}
        assert "chat:room" in (await api.channels(ChannelsRequest())).channels

        (info,) = (await api.info(InfoRequest())).nodes
        assert (info.uid, info.name, info.num_clients, info.num_users) == (
            "test-node", "test-node", 2, 2)
        assert info.num_subs == 2 and info.num_channels == 1

        batch = await api.batch(BatchRequest(requests=[
            PublishRequest(channel="chat:room", data={"x": 1}),
            PresenceStatsRequest(channel="chat:room"),
        ], parallel=True))
        _, counted = batch.replies
        assert counted.num_clients == 2  # type: ignore[attr-defined]
        assert (await frame_of(bob, "message", "chat:room"))["data"] == {"x": 1}


async def test_batch_items_fail_on_their_own(node: RunningNode) -> None:
    body = {"commands": [
        {"publish": {"channel": "chat:x", "data": 1}},
        {"publish": {"channel": ""}},
        {"presence": {"channel": 5}},
        {"no_such_method": {}},
        {"history": {"channel": "chat:x"}},
    ]}
    reply = await node.http.post(PREFIX + "/batch", json=body)
    assert reply.status_code == 200
    assert reply.json() == {"replies": [
        {"publish": {}},
        {"error": {"code": 107, "message": "bad request: channel required"}},
        {"error": {"code": 107, "message": reply.json()["replies"][2]["error"]["message"]}},
        {"error": {"code": 104, "message": "not found"}},
        {"error": {"code": 108, "message": reply.json()["replies"][4]["error"]["message"]}},
    ]}


# server-side subscriptions: /ws and the centrifuge-python SDK


class ServerEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.subscribed: list[ServerSubscribedContext] = []
        self.unsubscribed: list[str] = []
        self.publications: list[tuple[str, Any, int]] = []

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self.subscribed.append(ctx)

    def moved_in(self, channel: str) -> list[ServerSubscribedContext]:
        return [ctx for ctx in self.subscribed if ctx.channel == channel]

    async def on_unsubscribed(self, ctx: ServerUnsubscribedContext) -> None:
        self.unsubscribed.append(ctx.channel)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.publications.append((ctx.channel, ctx.pub.data, ctx.pub.offset))


@contextlib.asynccontextmanager
async def sdk(running: RunningNode, user: str) -> AsyncIterator[tuple[SdkClient, ServerEvents]]:
    events = ServerEvents()
    address = running.ws_url.removesuffix("/ws") + "/connection/websocket"
    client = SdkClient(address, events=events, token=token(user, channels=[]), timeout=WAIT)
    try:
        await client.connect()
        await client.ready(timeout=WAIT)
        yield client, events
    finally:
        await client.disconnect()


async def test_api_subscribe_moves_every_connection_of_the_user(node: RunningNode) -> None:
    """One user on /ws (twice) and on Centrifugo's endpoint, with no right to subscribe:
    the backend subscribes them all, each hears it its way, and messages follow."""
    async with (
        HubClient(node.url, API_KEY) as hub,
        connect(node.ws_url, token("sam", channels=[])) as ws1,
        connect(node.ws_url, token("sam", channels=[])) as ws2,
        connect(node.ws_url, token("other")) as other,
        sdk(node, "sam") as (_, events),
    ):
        before = await publish(node, "feed:moved", {"n": 1})
        await hub.subscribe("sam", "feed:moved", since=(0, before["epoch"]))
        for ws in (ws1, ws2):
            subscribed = await ws.expect("subscribed")
            assert "id" not in subscribed
            assert subscribed == {"type": "subscribed", "channel": "feed:moved", "offset": 1,
                                  "epoch": before["epoch"], "recovered": True}
            assert (await ws.expect("message"))["data"] == {"n": 1}
        await eventually(lambda: events.moved_in("feed:moved"), what="the subscribe push")
        (pushed,) = events.moved_in("feed:moved")
        assert pushed.recoverable and pushed.stream_position is not None
        assert pushed.stream_position.epoch == before["epoch"]
        await eventually(lambda: events.publications, what="the recovered publication")
        assert events.publications == [("feed:moved", {"n": 1}, 1)]

        await publish(node, "feed:moved", {"n": 2})
        for ws in (ws1, ws2):
            assert (await ws.expect("message"))["offset"] == 2
        await eventually(lambda: len(events.publications) == 2, what="a live publication")

        # Subscribing again changes nothing: one subscription, one copy of each message.
        await hub.subscribe("sam", "feed:moved")
        await hub.unsubscribe("sam", "feed:moved", client=ws1.welcome["client"])
        assert await ws1.expect("unsubscribed") == {"type": "unsubscribed",
                                                    "channel": "feed:moved"}
        await hub.unsubscribe("sam", "feed:moved")
        assert (await ws2.expect("unsubscribed"))["channel"] == "feed:moved"
        await eventually(lambda: events.unsubscribed == ["feed:moved"], what="the push")
        await publish(node, "feed:moved", {"n": 3})
        ping = await ws1.request({"type": "ping"})
        assert ping["type"] == "pong"  # nothing of the channel came before it
        assert node.node.subscriptions.subscription_count == 0
        await other.request({"type": "ping"})


async def test_api_subscribe_and_unsubscribe_refuse_bad_input(node: RunningNode) -> None:
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/api/subscribe", {"user": "u", "channel": "bad channel"}, 400, "invalid_channel"),
        ("/api/subscribe", {"user": "u", "channel": "@u"}, 403, "forbidden"),
        ("/api/subscribe", {"user": "", "channel": "chat:x"}, 400, "bad_request"),
        ("/api/subscribe", {"user": "u"}, 400, "bad_request"),
        ("/api/subscribe", {"user": "u", "channel": "chat:x", "since": {"offset": -1,
                                                                         "epoch": "e"}},
         400, "bad_request"),
        ("/api/unsubscribe", {"user": "u", "channel": ""}, 400, "invalid_channel"),
        ("/api/unsubscribe", {"user": "u", "channel": 7}, 400, "bad_request"),
    ]
    for path, body, status, code in cases:
        reply = await node.http.post(path, json=body)
        assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), body
    async with HubClient(node.url, "wrong") as hub:
        with pytest.raises(HubApiError) as refused:
            await hub.subscribe("u", "chat:x")
        assert refused.value.status == 401


async def test_refresh_and_disconnect_of_chosen_connections(node: RunningNode) -> None:
    async with (
        cent(node) as api,
        connect(node.ws_url, token("kim", ttl=60)) as first,
        connect(node.ws_url, token("kim", ttl=60)) as second,
        connect(node.ws_url, token("kim", ttl=60)) as kept,
        sdk(node, "kim") as (_, events),
    ):
        later = int(time.time()) + 3600
        await api.refresh(RefreshRequest(user="kim", client=first.welcome["client"],
                                         expire_at=later))
        assert await first.expect("refreshed") == {"type": "refreshed", "expires": later}
        await api.refresh(RefreshRequest(user="kim", client=second.welcome["client"],
                                         expired=True))
        assert await second.closed() == 4002
        await api.disconnect(DisconnectRequest(
            user="kim", whitelist=[kept.welcome["client"]],
            disconnect=Disconnect(code=4100, reason="bye")))
        assert await first.closed() == 4100
        await eventually(lambda: node.node.hub.sessions_of("kim") == [
            node.node.hub.sessions[kept.welcome["client"]]], what="the others closed")
        assert (await kept.request({"type": "ping"}))["type"] == "pong"
        assert sorted(ctx.channel for ctx in events.subscribed) == ["#kim", "@kim"]


# errors


async def test_keys_bodies_and_methods_refused_as_centrifugo_does(node: RunningNode) -> None:
    async with cent(node, key="wrong") as api:
        with pytest.raises(CentUnauthorizedError):
            await api.info(InfoRequest())
    async with httpx.AsyncClient(base_url=node.url + PREFIX, timeout=WAIT) as http:
        ok = await http.post("/info", json={}, headers={"Authorization": f"apikey {API_KEY}"})
        assert ok.status_code == 200 and "nodes" in ok.json()["result"]
        bearer = await http.post("/info", json={}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert bearer.status_code == 401
        keyed = {"X-API-Key": API_KEY}
        for body in (b"{", b"[]", b'{"channel": 5}', b'{"channel": "chat:x", "limit": "a"}',
                     b"[" * 5000 + b"]" * 5000, b"\xff\xfe"):
            reply = await http.post("/history", content=body, headers=keyed)
            assert reply.status_code == 400, body[:20]
            assert reply.json()["error"]["code"] == 107
        too_big = await http.post("/publish", content=b" " * (1024 * 1024 + 1), headers=keyed)
        assert (too_big.status_code, too_big.json()["error"]["code"]) == (413, 107)
        unknown = await http.post("/rpc", json={}, headers=keyed)
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, 104)
        transport = await http.post("/publish", json={"channel": "bad channel", "data": 1},
                                    headers={**keyed, "X-Centrifugo-Error-Mode": "transport"})
        assert (transport.status_code, transport.json()["error"]["code"]) == (404, 102)
        # centrifuge-js's getState helpers: a plain POST of the history call.
        state = await http.post("/history", json={"channel": "feed:s", "limit": 10},
                                headers=keyed)
        assert state.json()["result"] == {"publications": [], "epoch": state.json()[
            "result"]["epoch"], "offset": 0}

    expected: list[tuple[Any, int]] = [
        (PublishRequest(channel="", data=1), 107),
        (PublishRequest(channel="bad channel", data=1), 102),
        (PublishRequest(channel="chat:x", data=None), 107),
        (PublishRequest(channel="chat:x", data=1, tags={"colour": "red"}), 107),
        (PublishRequest(channel="chat:x", data=1, idempotency_key="k"), 107),
        (PublishRequest(channel="chat:x", data=None, b64data="%%%"), 107),
        (PublishRequest(channel="chat:x", data=None, b64data="AP8="), 107),
        (BroadcastRequest(channels=[], data=1), 107),
        (SubscribeRequest(user="u", channel="@u"), 107),
        (SubscribeRequest(user="", channel="chat:x"), 107),
        (SubscribeRequest(user="u", channel="chat:x", session="s"), 107),
        (UnsubscribeRequest(user="u", channel="bad channel"), 102),
        (DisconnectRequest(user="u", disconnect=Disconnect(code=1000, reason="")), 107),
        (RefreshRequest(user="u", info=[1]), 107),  # type: ignore[call-arg]
        (PresenceRequest(channel="feed:x"), 108),
        (PresenceStatsRequest(channel=""), 107),
        (HistoryRequest(channel="chat:x"), 108),
        (HistoryRequest(channel="feed:x", since=StreamPosition(offset=0, epoch="old")), 112),
        (HistoryRemoveRequest(channel="chat:x"), 108),
    ]
    async with cent(node) as api:
        for request, code in expected:
            call = getattr(api, request.__api_method__)
            with pytest.raises(CentApiResponseError) as failed:
                await call(request)
            assert failed.value.code == code, (request, failed.value)
    # Nothing broke: the node still serves.
    assert (await node.http.get("/readyz")).status_code == 200


async def test_no_key_configured_and_dev_mode() -> None:
    async with running_node(make_settings(api_key=None)) as closed, cent(closed) as api:
        with pytest.raises(CentTransportError) as refused:
            await api.info(InfoRequest())
        assert refused.value.status_code == 403
    dev_settings = make_settings(api_key=None, dev=True, centrifugo_api_prefix="/api/v2")
    async with (
        running_node(dev_settings) as dev,
        httpx.AsyncClient(base_url=dev.url, timeout=WAIT) as http,
    ):
        reply = await http.post("/api/v2/publish", json={"channel": "x", "data": 1})
        assert reply.json() == {"result": {}}
        assert (await http.post(PREFIX + "/publish", json={})).status_code == 404


# two nodes on a real Redis: the moves reach a connection on the other node


async def test_moves_reach_connections_on_the_other_node(redis_url: str) -> None:
    settings = {"redis_url": redis_url, "namespaces": NAMESPACES}
    async with (
        running_node(make_settings(node_id="n-a", **settings)) as a,
        running_node(make_settings(node_id="n-b", **settings)) as b,
        cent(a) as api,
        connect(b.ws_url, token("far", channels=[], ttl=60)) as ws,
        connect(b.ws_url, token("far", channels=[], ttl=60)) as spared,
        sdk(b, "far") as (_, events),
    ):
        await api.subscribe(SubscribeRequest(user="far", channel="chat:far"))
        assert (await ws.expect("subscribed"))["channel"] == "chat:far"
        await eventually(lambda: events.moved_in("chat:far"), what="the push on node b")
        await api.publish(PublishRequest(channel="chat:far", data={"via": "a"}))
        assert (await frame_of(ws, "message", "chat:far"))["data"] == {"via": "a"}
        await eventually(lambda: events.publications, what="the publication on node b")

        await api.unsubscribe(UnsubscribeRequest(user="far", channel="chat:far",
                                                 client=ws.welcome["client"]))
        assert (await frame_of(ws, "unsubscribed", "chat:far"))["channel"] == "chat:far"
        later = int(time.time()) + 600
        await api.refresh(RefreshRequest(user="far", client=ws.welcome["client"],
                                         expire_at=later))
        assert (await ws.expect("refreshed"))["expires"] == later
        await api.disconnect(DisconnectRequest(user="far", client=ws.welcome["client"]))
        assert await ws.closed() == 4003
        assert (await spared.request({"type": "ping"}))["type"] == "pong"
        # An empty channel: out of every channel (Centrifugo's meaning).
        await api.unsubscribe(UnsubscribeRequest(user="far", channel=""))
        await eventually(lambda: events.unsubscribed == ["chat:far"], what="the push")


async def test_history_remove_on_redis_keeps_the_epoch(redis_url: str) -> None:
    settings = make_settings(redis_url=redis_url, namespaces=NAMESPACES)
    async with running_node(settings) as running, cent(running) as api:
        first = await api.publish(PublishRequest(channel="feed:kept", data=1))
        await api.publish(PublishRequest(channel="feed:kept", data=2))
        await api.history_remove(HistoryRemoveRequest(channel="feed:kept"))
        emptied = await api.history(HistoryRequest(channel="feed:kept", limit=-1))
        assert (emptied.publications, emptied.offset, emptied.epoch) == ([], 2, first.epoch)
        again = await api.publish(PublishRequest(channel="feed:kept", data=3))
        assert (again.offset, again.epoch) == (3, first.epoch)
        since = StreamPosition(offset=1, epoch=first.epoch)
        after = await api.history(HistoryRequest(channel="feed:kept", limit=-1, since=since))
        assert [pub.data for pub in after.publications] == [3]
