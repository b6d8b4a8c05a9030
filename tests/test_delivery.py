"""Delivery end to end: fan-out to every subscriber and only to them, personal messages,
application events carried intact and in order, `from` and `ts`, clients that vanish or
stop reading, and /api/disconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from hub.session import Session
from tests.support import (
    WAIT,
    RunningNode,
    api,
    connect,
    eventually,
    make_settings,
    metric,
    next_message,
    publish,
    running_node,
    token,
)

NAMESPACES: dict[str, dict[str, Any]] = {
    "default": {"subscribe": "token", "publish": "none"},
    "agent": {"subscribe": "any", "publish": "token"},
    "canvas": {"subscribe": "any", "publish": "any"},
    "device": {"subscribe": "token", "publish": "token"},
    "room": {"subscribe": "any", "publish": "any"},
    "feed": {"subscribe": "any", "publish": "any", "history_size": 10000, "history_ttl": 300},
}


@pytest.fixture
async def node() -> AsyncIterator[RunningNode]:
    """Overrides conftest's `node`: namespaces for the application events below."""
    async with running_node(make_settings(namespaces=NAMESPACES)) as running:
        yield running


async def api_post(running: RunningNode, path: str, body: dict[str, Any]) -> Any:
    http = api(running)
    response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# Fan-out


async def test_broadcast_reaches_every_subscriber(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("u0")) as c0, connect(node.ws_url, token("u1")) as c1,
        connect(node.ws_url, token("u2")) as c2, connect(node.ws_url, token("u3")) as c3,
        connect(node.ws_url, token("u4")) as c4,
    ):
        clients = [c0, c1, c2, c3, c4]
        for client in clients:
            await client.subscribe("news")
        for n in range(3):
            assert await publish(node, "news", {"n": n}) == {}
        for client in clients:
            for n in range(3):
                message = await next_message(client)
                assert message["channel"] == "news"
                assert message["data"] == {"n": n}
                assert "from" not in message  # API publications carry no `from`


async def test_message_ts_is_unix_ms_set_at_publish(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe("news")
        before = time.time() * 1000
        await publish(node, "news", "x")
        after = time.time() * 1000
        message = await next_message(client)
        assert type(message["ts"]) is int
        assert before - 5 <= message["ts"] <= after + 5


async def test_channel_isolation(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice")) as alice,
        connect(node.ws_url, token("bob")) as bob,
    ):
        await alice.subscribe("news:a")
        await bob.subscribe("news:b")
        await bob.subscribe("news:barrier")
        await publish(node, "news:a", "for alice")
        await publish(node, "news:barrier", "barrier")
        assert (await next_message(alice))["data"] == "for alice"
        message = await next_message(bob)
        assert (message["channel"], message["data"]) == ("news:barrier", "barrier")


async def test_publish_to_a_channel_nobody_listens_to_is_ok(node: RunningNode) -> None:
    assert await publish(node, "nobody:here", {"x": 1}) == {}
    async with connect(node.ws_url, token("alice")) as client:
        reply = await client.request({"type": "publish", "channel": "room:empty", "data": 1})
        assert reply == {"type": "published", "channel": "room:empty", "id": reply["id"]}


# Personal messages


async def test_send_reaches_every_connection_of_the_user_and_no_other(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice")) as tab1,
        connect(node.ws_url, token("alice")) as tab2,
        connect(node.ws_url, token("bob")) as bob,
    ):
        body = {"user": "alice", "data": {"text": "hello"}, "event": "note"}
        assert await api_post(node, "/api/send", body) == {}
        for tab in (tab1, tab2):
            message = await next_message(tab)
            assert message["channel"] == "@alice"
            assert message["data"] == {"text": "hello"}
            assert message["event"] == "note"
            assert "from" not in message
        await api_post(node, "/api/send", {"user": "bob", "data": "barrier"})
        message = await next_message(bob)
        assert (message["channel"], message["data"]) == ("@bob", "barrier")


async def test_api_publish_to_a_personal_channel_is_a_send(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        assert await publish(node, "@alice", "direct") == {}
        message = await next_message(client)
        assert (message["channel"], message["data"]) == ("@alice", "direct")


async def test_send_to_a_user_without_connection_is_ok(node: RunningNode) -> None:
    assert await api_post(node, "/api/send", {"user": "nobody", "data": 1}) == {}


# Application events


RICH: dict[str, Any] = {
    "text": "h\u00e9llo \u4e16\u754c \U0001f680 \"quoted\" \\ back\nslash",
    "nested": {"list": [1, [2, [3, {"deep": True}]], {"k": None}], "empty": {}, "none": []},
    "numbers": [0, -1, 3.5, 1e-7, 2**53, -(2**31)],
    "null": None,
    "flag": False,
}


async def test_agent_streaming_events_reach_exactly_the_run_subscribers(
    node: RunningNode,
) -> None:
    events = [
        ("streaming:update", {"run": "run1", "delta": "Hel", "index": 0}),
        ("streaming:update", {"run": "run1", "delta": "lo \u2603", "index": 1, "meta": RICH}),
        ("streaming:error", {"run": "run1", "error": {"code": 429, "retry": None}}),
        ("streaming:update", {"run": "run1", "delta": "!", "index": 2}),
        ("streaming:complete", {"run": "run1", "usage": {"tokens": [12, 34]}, "ok": True}),
    ]
    async with (
        connect(node.ws_url, token("viewer1")) as viewer1,
        connect(node.ws_url, token("viewer2")) as viewer2,
        connect(node.ws_url, token("other")) as other,
        connect(node.ws_url, token("agent", publish=["agent:run1"])) as agent,
    ):
        await viewer1.subscribe("agent:run1")
        await viewer2.subscribe("agent:run1")
        await other.subscribe("agent:run2")
        for event, data in events:
            reply = await agent.request(
                {"type": "publish", "channel": "agent:run1", "event": event, "data": data}
            )
            assert reply["type"] == "published"
        for viewer in (viewer1, viewer2):
            for event, data in events:
                message = await next_message(viewer)
                assert message["channel"] == "agent:run1"
                assert message["event"] == event
                assert message["data"] == data
                assert message["from"] == "agent"
        await publish(node, "agent:run2", "barrier", event="streaming:complete")
        message = await next_message(other)
        assert (message["channel"], message["data"]) == ("agent:run2", "barrier")


async def test_canvas_events_reach_exactly_the_canvas_subscribers(node: RunningNode) -> None:
    events = [
        ("canvas:present", {"id": "c1", "html": "<h1>\u00c7a va?</h1>", "size": [800, 600]}),
        ("canvas:update", {"id": "c1", "patch": [{"op": "replace", "path": "/a", "value": RICH}]}),
        ("canvas:update", {"id": "c1", "patch": []}),
        ("canvas:close", {"id": "c1", "reason": None}),
    ]
    async with (
        connect(node.ws_url, token("viewer")) as viewer,
        connect(node.ws_url, token("elsewhere")) as elsewhere,
    ):
        await viewer.subscribe("canvas:session1")
        await elsewhere.subscribe("canvas:session2")
        for event, data in events:
            await publish(node, "canvas:session1", data, event=event)
        for event, data in events:
            message = await next_message(viewer)
            assert (message["channel"], message["event"], message["data"]) == (
                "canvas:session1", event, data,
            )
            assert "from" not in message
        await publish(node, "canvas:session2", "barrier")
        assert (await next_message(elsewhere))["data"] == "barrier"


async def test_device_events_reach_exactly_the_device_subscribers(node: RunningNode) -> None:
    events = [
        ("device:registered", {"device": "d1", "model": "Pixel \u00b7 8", "caps": ["cam", "gps"]}),
        ("device:command", {"command": "record", "args": {"seconds": 2.5, "hd": True}}),
        ("device:camera:ready", {"stream": None, "resolution": [1920, 1080]}),
        ("device:recording:complete", {"file": "rec-\u00e9t\u00e9.mp4", "bytes": 2**40}),
        ("device:location:update", {"lat": 52.520008, "lon": 13.404954, "acc": 4.0}),
        ("device:notification:sent", {"title": "\U0001f514 Ping", "data": RICH}),
    ]
    owner = token("owner", channels=["device:d1"], publish=["device:d1"])
    async with (
        connect(node.ws_url, owner) as controller,
        connect(node.ws_url, token("owner", channels=["device:d1"])) as phone,
        connect(node.ws_url, token("someone", channels=["device:*"])) as stranger,
    ):
        await phone.subscribe("device:d1")
        await stranger.subscribe("device:d2")
        denied = await controller.request({"type": "subscribe", "channel": "device:d2"})
        assert denied["code"] == "forbidden"
        for index, (event, data) in enumerate(events):
            if index % 2:  # from the server API and from a client, interleaved
                await publish(node, "device:d1", data, event=event)
            else:
                reply = await controller.request(
                    {"type": "publish", "channel": "device:d1", "event": event, "data": data}
                )
                assert reply["type"] == "published"
        for index, (event, data) in enumerate(events):
            message = await next_message(phone)
            assert (message["channel"], message["event"], message["data"]) == (
                "device:d1", event, data,
            )
            assert message.get("from") == (None if index % 2 else "owner")
        await publish(node, "device:d2", "barrier")
        assert (await next_message(stranger))["data"] == "barrier"


async def test_message_without_event_has_no_event_field(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe("room:1")
        await publish(node, "room:1", [1, 2, 3])
        message = await next_message(client)
        assert set(message) == {"type", "channel", "data", "ts"}


async def test_client_publish_carries_from_and_api_publish_does_not(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice")) as alice,
        connect(node.ws_url, token("bob")) as bob,
    ):
        await bob.subscribe("room:1")
        reply = await alice.request({"type": "publish", "channel": "room:1", "data": "hi"})
        assert reply["type"] == "published"
        message = await next_message(bob)
        assert (message["data"], message["from"]) == ("hi", "alice")
        await publish(node, "room:1", "from the server")
        message = await next_message(bob)
        assert message["data"] == "from the server"
        assert "from" not in message


async def test_publisher_subscribed_to_the_channel_gets_its_own_message(
    node: RunningNode,
) -> None:
    async with connect(node.ws_url, token("alice")) as alice:
        await alice.subscribe("room:1")
        await alice.send({"type": "publish", "channel": "room:1", "data": "echo", "id": 5})
        frames = [await alice.recv(), await alice.recv()]
        kinds = sorted(frame["type"] for frame in frames)
        assert kinds == ["message", "published"]
        message = next(frame for frame in frames if frame["type"] == "message")
        assert (message["data"], message["from"]) == ("echo", "alice")


# Faults


async def test_client_vanishing_without_close_does_not_affect_others(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice")) as survivor,
        connect(node.ws_url, token("ghost")) as ghost,
    ):
        await survivor.subscribe("news")
        await ghost.subscribe("news")
        await publish(node, "news", 0)
        assert (await next_message(ghost))["data"] == 0
        ghost.connection.transport.abort()  # no close handshake
        for n in range(20):
            await publish(node, "news", n)
        for n in [0, *range(20)]:
            assert (await next_message(survivor))["data"] == n

        async def ghost_gone() -> bool:
            http = api(node)
            stats = (await http.get("/api/stats")).json()
            return bool(stats["total"]["connections"] == 1)

        await eventually(ghost_gone, within=WAIT * 2, what="the ghost gone")
        await publish(node, "news", "after")
        assert (await next_message(survivor))["data"] == "after"


async def test_slow_consumer_is_closed_4008_and_others_get_everything_in_order() -> None:
    settings = make_settings(namespaces=NAMESPACES, queue_limit=10, rate_limit=0)
    payload = "x" * 1000
    async with (
        running_node(settings) as running,
        connect(running.ws_url, token("fast")) as fast,
        connect(running.ws_url, token("slow")) as slow,
        connect(running.ws_url, token("publisher")) as publisher,
    ):
        await fast.subscribe("feed:firehose")
        await slow.subscribe("feed:firehose")
        slow.connection.transport.pause_reading()
        closed_before = await metric(running, "hub_disconnections_total", code="4008")

        async def dropped() -> float:
            return await metric(running, "hub_messages_dropped_total", reason="slow_consumer")

        dropped_before = await dropped()
        received: list[int] = []

        async def read_fast() -> None:
            while (message := await next_message(fast))["data"] != "end":
                received.append(message["data"]["n"])

        reader = asyncio.create_task(read_fast())
        # 5000 messages of 1 KB, and more if the socket buffers of this machine swallow
        # them all before the slow client's queue overflows.
        published = 0
        while published < 5000 or (await dropped() == dropped_before and published < 30000):
            for n in range(published, published + 1000):
                reply = await publisher.request(
                    {"type": "publish", "channel": "feed:firehose", "data": {"n": n, "p": payload}}
                )
                assert reply["offset"] == n + 1
            published += 1000
        await publisher.request({"type": "publish", "channel": "feed:firehose", "data": "end"})
        await asyncio.wait_for(reader, WAIT * 2)
        assert received == list(range(published))
        # The hub gave up on the slow client while it was not reading.
        assert await dropped() > dropped_before

        # Its queued frames were discarded: reading again, it gets the close frame after
        # what the socket buffers held (not reading, it would be dropped after 5 s).
        slow.connection.transport.resume_reading()
        assert await slow.closed(timeout=WAIT * 2) == 4008

        async def slow_counted() -> bool:
            closed = await metric(running, "hub_disconnections_total", code="4008")
            return closed == closed_before + 1

        await eventually(slow_counted, within=WAIT * 2, what="the slow consumer counted")


async def test_the_queue_limit_counts_frames_not_writes() -> None:
    """Publications that arrive together go to a subscriber in one piece; while its socket
    pushes back, that piece counts as the frames it holds, so a burst cannot slip past
    HUB_QUEUE_LIMIT in a few large pieces."""
    settings = make_settings(namespaces=NAMESPACES, queue_limit=10, rate_limit=0)
    async with (
        running_node(settings) as running,
        connect(running.ws_url, token("fast")) as fast,
        connect(running.ws_url, token("slow")) as slow,
    ):
        for client in (fast, slow):
            await client.subscribe("feed:burst")
        node = running.node
        (session,) = [s for s in node.hub.sessions.values() if s.user == "slow"]
        assert isinstance(session, Session)
        slow.connection.transport.pause_reading()
        got: list[dict[str, Any]] = []
        while session.queue is None:  # fill the slow socket until the session queues
            assert len(got) < 10_000
            await node.publish("feed:burst", msgspec.Raw(b'"%s"' % (b"x" * 10_000)))
            got.append(await next_message(fast))  # delivered to both by now
        assert session.close_code is None
        # Ten more in one turn of the loop: one piece of ten frames, past the limit with
        # the one queued.
        await asyncio.gather(*(node.publish("feed:burst", msgspec.Raw(b"%d" % n))
                               for n in range(10)))
        got += [await next_message(fast) for _ in range(10)]
        assert session.close_code == 4008
        assert [m["offset"] for m in got] == list(range(1, len(got) + 1))
        slow.connection.transport.resume_reading()
        assert await slow.closed(timeout=WAIT * 2) == 4008


async def test_delivered_metric_moves_by_messages_times_subscribers(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("u1")) as c1, connect(node.ws_url, token("u2")) as c2,
        connect(node.ws_url, token("u3")) as c3, connect(node.ws_url, token("u4")) as c4,
    ):
        clients = [c1, c2, c3, c4]
        for client in clients:
            await client.subscribe("news")
        before = await metric(node, "hub_messages_delivered_total")
        published_before = await metric(node, "hub_messages_published_total", source="api")
        for n in range(3):
            await publish(node, "news", n)
        for client in clients:
            for n in range(3):
                assert (await next_message(client))["data"] == n
        assert await metric(node, "hub_messages_delivered_total") == before + 3 * 4
        assert await metric(
            node, "hub_messages_published_total", source="api"
        ) == published_before + 3


async def test_api_disconnect_closes_every_connection_of_the_user_with_4003(
    node: RunningNode,
) -> None:
    async with (
        connect(node.ws_url, token("alice")) as tab1,
        connect(node.ws_url, token("alice")) as tab2,
        connect(node.ws_url, token("bob")) as bob,
    ):
        await bob.subscribe("news")
        assert await api_post(node, "/api/disconnect", {"user": "alice"}) == {}
        assert await tab1.closed() == 4003
        assert await tab2.closed() == 4003
        await publish(node, "news", "bob stays")
        assert (await next_message(bob))["data"] == "bob stays"


async def test_api_disconnect_with_custom_code_and_reason(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        body = {"user": "alice", "code": 4100, "reason": "banned"}
        assert await api_post(node, "/api/disconnect", body) == {}
        assert await client.closed() == 4100
        assert client.connection.close_reason == "banned"


async def test_api_disconnect_of_a_user_without_connection_is_ok(node: RunningNode) -> None:
    assert await api_post(node, "/api/disconnect", {"user": "nobody"}) == {}
