"""Presence follows membership on every path (issue 20): two real nodes on one real Redis,
a presence namespace with a short TTL. Whoever is listed is exactly who is connected, on
every node, within TTL + 1 s, whatever happened to Redis meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio
import websockets
from websockets.asyncio.client import ClientConnection

from hub.settings import Namespace
from tests.redis_server import RedisServer
from tests.support import (
    WAIT,
    Client,
    RunningNode,
    connect,
    eventually,
    make_settings,
    running_node,
    token,
)

TTL = 3.0
ROOM = "room:lobby"
HISTORY_ROOM = "kept:lobby"
NAMESPACES = {
    "room": Namespace(subscribe="any", publish="any", presence=True, join_leave=True),
    "kept": Namespace(subscribe="any", publish="any", presence=True, join_leave=True,
                      history_size=10, history_ttl=60),
}


@contextlib.asynccontextmanager
async def node_on(url: str, node_id: str) -> AsyncIterator[RunningNode]:
    settings = make_settings(redis_url=url, node_id=node_id, presence_ttl=TTL,
                             namespaces=NAMESPACES)
    async with running_node(settings) as running:
        yield running


async def listed(node: RunningNode, channel: str = ROOM) -> set[str]:
    response = await node.http.get(f"/api/presence/{channel}")
    if response.status_code != 200:
        return {f"<{response.status_code}>"}
    return {member["client"] for member in response.json()["clients"]}


async def ready(node: RunningNode) -> int:
    return (await node.http.get("/readyz")).status_code


async def settles(nodes: list[RunningNode], expected: Callable[[], set[str]],
                  within: float, channel: str = ROOM) -> None:
    for node in nodes:
        await eventually(functools.partial(listed, node, channel),
                         lambda got: got == expected(), within=within,
                         what=f"presence on {node.node.node_id}")


async def beat_now(node: RunningNode) -> None:
    """One heartbeat of `node`, asked for as a broker reconnect does (`beat_soon`) and
    awaited, instead of sleeping until the next one is due (presence_ttl / 3)."""
    presence = node.node.presence
    real = presence.heartbeat
    beats: list[None] = []

    async def counted(*args: Any, **kwargs: Any) -> None:
        await real(*args, **kwargs)
        beats.append(None)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(presence, "heartbeat", counted)
        node.node.membership.beat_soon()
        await eventually(lambda: beats, within=WAIT, what=f"a heartbeat of {node.node.node_id}")


async def test_clients_that_leave_while_redis_is_down_are_not_listed_after_it_is_back(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(durable=True)
    async with node_on(server.url, "a") as a, node_on(server.url, "b") as b, \
            contextlib.AsyncExitStack() as stack:
        on_a: list[Client] = []
        for n in range(4):
            on_a.append(await stack.enter_async_context(connect(a.ws_url, token(f"a{n}"))))
        on_b = await stack.enter_async_context(connect(b.ws_url, token("b0")))
        for client in [*on_a, on_b]:
            assert (await client.subscribe(ROOM))["type"] == "subscribed"
        everyone = {client.welcome["client"] for client in [*on_a, on_b]}
        await settles([a, b], lambda: everyone, within=TTL)

        await asyncio.to_thread(server.stop)
        await eventually(lambda: ready(a), lambda code: code == 503, within=5)
        for client in on_a[:2]:
            await client.close()
        await eventually(lambda: a.node.subscriptions.subscription_count == 2, within=5)
        await asyncio.to_thread(server.start, keep_data=True)
        await eventually(lambda: ready(a), lambda code: code == 200, within=5)

        connected = {client.welcome["client"] for client in [*on_a[2:], on_b]}
        await settles([a, b], lambda: connected, within=TTL + 1)
        for node in (a, b):  # a heartbeat later: no ghost written back
            await beat_now(node)
        for node in (a, b):
            assert await listed(node) == connected


async def test_a_reset_that_ends_a_subscription_removes_it_from_presence_and_says_leave(
    redis_url: str,
) -> None:
    """Centrifugo's clients end a subscription at a `reset` (they subscribe again): the
    node drops the member, and presence and join/leave follow. The reset is a real one: the
    channel's history is deleted in Redis, so the next publication is of a new epoch."""
    async with node_on(redis_url, "a") as a, node_on(redis_url, "b") as b, \
            connect(b.ws_url, token("watcher")) as watcher, \
            centrifugo_subscriber(a, HISTORY_ROOM) as centrifugo:
        assert (await watcher.subscribe(HISTORY_ROOM))["type"] == "subscribed"
        while (await next_of_type(watcher, "join"))["client"] != watcher.welcome["client"]:
            pass  # the other's join may come first
        both = {watcher.welcome["client"], centrifugo.client_id}
        await settles([a, b], lambda: both, within=TTL, channel=HISTORY_ROOM)
        rds = redis.asyncio.Redis.from_url(redis_url)
        try:
            await rds.delete(f"hub:s:{{{HISTORY_ROOM}}}", f"hub:m:{{{HISTORY_ROOM}}}")
        finally:
            await rds.aclose()
        response = await b.http.post("/api/publish", json={"channel": HISTORY_ROOM, "data": 1})
        assert response.status_code == 200, response.text
        assert await centrifugo.unsubscribed(HISTORY_ROOM)
        leave = await next_of_type(watcher, "leave")
        assert leave["client"] == centrifugo.client_id, (leave, watcher.welcome)
        await settles([a, b], lambda: {watcher.welcome["client"]}, within=TTL,
                      channel=HISTORY_ROOM)


async def next_of_type(client: Client, kind: str) -> dict[str, Any]:
    """The next frame of `kind`, others (reset, message) skipped."""
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.recv()
            if frame["type"] == kind:
                return frame


class CentrifugoClient:
    """Just enough of Centrifugo's JSON protocol to connect, subscribe and see a push."""

    def __init__(self, connection: ClientConnection, client_id: str) -> None:
        self.connection = connection
        self.client_id = client_id

    async def command(self, command_id: int, **command: Any) -> dict[str, Any]:
        await self.connection.send(json.dumps({"id": command_id, **command}))
        async with asyncio.timeout(WAIT):
            while True:
                frame: dict[str, Any] = json.loads(await self.connection.recv())
                if frame.get("id") == command_id:
                    return frame

    async def unsubscribed(self, channel: str) -> bool:
        async with asyncio.timeout(WAIT):
            while True:
                raw = await self.connection.recv()
                for line in str(raw).splitlines():
                    push = json.loads(line).get("push", {})
                    if push.get("channel") == channel and "unsubscribe" in push:
                        return True


@contextlib.asynccontextmanager
async def centrifugo_subscriber(node: RunningNode, channel: str) -> AsyncIterator[CentrifugoClient]:
    url = node.ws_url.removesuffix("/ws") + "/connection/websocket"
    async with websockets.connect(url, open_timeout=WAIT) as connection:
        client = CentrifugoClient(connection, "")
        reply = await client.command(1, connect={"token": token("cf")})
        client.client_id = reply["connect"]["client"]
        reply = await client.command(2, subscribe={"channel": channel})
        assert "subscribe" in reply, reply
        yield client


async def test_a_drained_node_says_leave_for_its_members_and_leaves_presence(
    redis_url: str,
) -> None:
    async with node_on(redis_url, "a") as a, node_on(redis_url, "b") as b, \
            connect(b.ws_url, token("watcher")) as watcher, \
            connect(a.ws_url, token("drained")) as drained:
        assert (await watcher.subscribe(ROOM))["type"] == "subscribed"
        assert (await drained.subscribe(ROOM))["type"] == "subscribed"
        both = {watcher.welcome["client"], drained.welcome["client"]}
        await settles([a, b], lambda: both, within=TTL)
        draining = asyncio.create_task(a.node.drain())
        assert await drained.closed() == 1012
        leave = await next_of_type(watcher, "leave")
        assert leave["client"] == drained.welcome["client"]
        await asyncio.wait_for(draining, WAIT)
        assert await listed(b) == {watcher.welcome["client"]}  # at once, not by the TTL
