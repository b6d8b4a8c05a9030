"""`GET /api/connections` (PROTOCOL §9) and what `/api/stats` tells of each node, on one
node and on two nodes sharing a real Redis: the filters, the pages and their cursor, bad
input, a node that does not answer, and `/api/disconnect` of one connection (`client`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import websockets

from hub import __version__
from hub.api import HubClient
from hub.presence import NodeSnapshot, NodeStats
from hub.redis.presence import RedisPresence
from hub.redis.topology import create_server_client
from tests.support import (
    API_KEY,
    WAIT,
    Client,
    RunningNode,
    connect,
    eventually,
    make_settings,
    running_node,
    token,
)

NAMESPACES = {"chat": {"subscribe": "any", "publish": "any"}}


async def listing(running: RunningNode, /, **params: Any) -> dict[str, Any]:
    response = await running.http.get("/api/connections", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def every_page(running: RunningNode, /, **params: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(50):
        page = await listing(running, **params, **({"after": after} if after else {}))
        found.extend(page["connections"])
        after = page.get("next")
        if after is None:
            return found
    raise AssertionError("the pages did not end")


@contextlib.asynccontextmanager
async def agent(url: str, user: str, agent_name: str) -> AsyncIterator[Client]:
    connection = await websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token(user)}",
                                 "User-Agent": agent_name}, open_timeout=WAIT)
    client = Client(connection)
    try:
        client.welcome = await client.expect("welcome")
        yield client
    finally:
        await connection.close()


async def test_one_node_lists_filters_and_pages_its_connections() -> None:
    settings = make_settings(namespaces=NAMESPACES, node_id="solo")
    async with running_node(settings) as node, \
            agent(node.ws_url, "alice", "alice-agent/1.0") as alice, \
            connect(node.ws_url, token("bob")) as bob, \
            connect(node.ws_url, token("bob")) as bob2:
        await alice.subscribe("chat:a")
        await bob.subscribe("chat:a")
        await bob.subscribe("chat:b")

        everyone = (await listing(node))["connections"]
        assert [c["client"] for c in everyone] == sorted(
            c.welcome["client"] for c in (alice, bob, bob2))
        mine = next(c for c in everyone if c["user"] == "alice")
        assert mine["node"] == "solo"
        assert mine["user_agent"] == "alice-agent/1.0"
        assert mine["remote"].startswith("127.0.0.1:")
        assert mine["protocol"] == "ws"
        assert mine["subscriptions"] == ["chat:a"]  # the personal channel is not listed
        assert abs(mine["since"] - time.time()) < 60

        by_user = (await listing(node, user="bob"))["connections"]
        assert {c["client"] for c in by_user} == {bob.welcome["client"], bob2.welcome["client"]}
        by_channel = (await listing(node, channel="chat:a"))["connections"]
        assert {c["user"] for c in by_channel} == {"alice", "bob"}
        both = (await listing(node, user="bob", channel="chat:b"))["connections"]
        assert [c["client"] for c in both] == [bob.welcome["client"]]
        assert (await listing(node, node="elsewhere"))["connections"] == []
        assert (await listing(node, user="nobody"))["connections"] == []

        first = await listing(node, limit=2)
        assert len(first["connections"]) == 2 and first["next"]
        paged = await every_page(node, limit=1)
        assert [c["client"] for c in paged] == [c["client"] for c in everyone]

        async with HubClient(node.url, API_KEY) as hub:
            page = await hub.connections(user="alice")
            assert [c.client for c in page.connections] == [alice.welcome["client"]]
            assert page.next is None


async def test_bad_queries_are_answered_bad_request(node: RunningNode) -> None:
    for params in ({"limit": "x"}, {"limit": "1001"}, {"limit": "-1"}, {"after": "garbage!"},
                   {"after": ""}, {"after": "no-node@"}, {"after": "@no-client"},
                   {"user": ""}, {"channel": ""}):
        response = await node.http.get("/api/connections", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["code"] == "bad_request"
    async with node.api() as http:
        response = await http.get("/api/connections", headers={"X-API-Key": "wrong"})
    assert response.status_code == 401


async def test_disconnect_one_connection_of_a_user(node: RunningNode) -> None:
    async with connect(node.ws_url, token("carol")) as first, \
            connect(node.ws_url, token("carol")) as second:
        async with HubClient(node.url, API_KEY) as hub:
            await hub.disconnect("carol", client=first.welcome["client"])
        assert await first.closed() == 4003
        assert (await second.request({"type": "ping"}))["type"] == "pong"
        response = await node.http.post("/api/disconnect", json={"user": "carol", "client": ""})
        assert response.status_code == 400


async def test_node_stats_say_what_the_operator_needs(node: RunningNode) -> None:
    async with HubClient(node.url, API_KEY) as hub:
        stats = await hub.stats()
    (mine,) = stats.nodes
    assert mine.version == __version__
    assert mine.address == node.url.removeprefix("http://")
    assert mine.state == "ready"
    assert mine.rss > 10 * 1024 * 1024
    assert mine.cpu >= 0
    assert mine.published >= 0 and mine.delivered >= 0 and mine.accepted >= 0


async def test_two_nodes_list_the_cluster_in_pages(redis_url: str) -> None:
    def settings(name: str) -> Any:
        return make_settings(namespaces=NAMESPACES, node_id=name, redis_url=redis_url,
                             presence_ttl=3)

    async with running_node(settings("node-a")) as a, running_node(settings("node-b")) as b, \
            connect(a.ws_url, token("ann")) as ann, connect(b.ws_url, token("ben")) as ben, \
            connect(b.ws_url, token("bea")) as bea:
        await ben.subscribe("chat:x")
        await eventually(lambda: listing(a), lambda page: len(page["connections"]) == 3,
                         what="three connections seen from node-a")
        everyone = await every_page(a, limit=1)
        assert [(c["node"], c["user"]) for c in everyone] == sorted(
            [("node-a", "ann"), ("node-b", "bea"), ("node-b", "ben")],
            key=lambda item: (item[0], next(
                c.welcome["client"] for c in (ann, ben, bea)
                if c.welcome["user"] == item[1])))
        assert [c["user"] for c in (await listing(a, channel="chat:x"))["connections"]] == ["ben"]
        assert [c["user"] for c in (await listing(b, user="ann"))["connections"]] == ["ann"]
        assert {c["user"] for c in (await listing(a, node="node-b"))["connections"]} == {
            "ben", "bea"}
        async def address_of_b() -> str:
            stats = (await a.http.get("/api/stats")).json()
            return str({n["node"]: n["address"] for n in stats["nodes"]}["node-b"])

        await eventually(address_of_b, lambda seen: seen == b.url.removeprefix("http://"),
                         what="node-b's address in its heartbeat")

        # A node in presence that does not answer (it died without a word) is named.
        ghost = RedisPresence(create_server_client(redis_url), "node-c", 3)
        now = int(time.time())
        await ghost.heartbeat(NodeSnapshot(NodeStats("node-c", 1, 1, 0, 0, now, now), {},
                                           frozenset({"ghost"})), {})
        started = asyncio.get_running_loop().time()
        page = await listing(a)
        assert page["unanswered"] == ["node-c"]
        assert len(page["connections"]) == 3
        assert asyncio.get_running_loop().time() - started < 2 * WAIT
        await ghost.close()

        # disconnect one connection, through a node that does not hold it
        async with HubClient(a.url, API_KEY) as hub:
            await hub.disconnect("ben", client=ben.welcome["client"])
        assert await ben.closed() == 4003


async def test_history_removal_for_the_page(node: RunningNode) -> None:
    """`DELETE /api/history/{channel}` (for the operator's page; Centrifugo's history_remove
    over the hub's API): the messages are gone, epoch and offset stay, a recovery from
    before is not recovered, and a live subscriber goes on undisturbed."""
    async with connect(node.ws_url, token("dora")) as dora:
        first = (await node.http.post("/api/publish", json={"channel": "feed:a", "data": 1}))
        epoch = first.json()["epoch"]
        await dora.subscribe("feed:a")
        response = await node.http.delete("/api/history/feed:a")
        assert response.status_code == 200 and response.json() == {}
        after = (await node.http.get("/api/history/feed:a")).json()
        assert (after["messages"], after["epoch"], after["offset"]) == ([], epoch, 1)
        await node.http.post("/api/publish", json={"channel": "feed:a", "data": 2})
        message = await dora.expect("message")
        assert (message["data"], message["offset"], message["epoch"]) == (2, 2, epoch)
        async with connect(node.ws_url, token("eve")) as eve:
            reply = await eve.subscribe("feed:a", since={"offset": 0, "epoch": epoch})
            assert reply["recovered"] is False
        async with HubClient(node.url, API_KEY) as hub:
            await hub.remove_history("feed:a")
            assert (await hub.history("feed:a")).messages == []
            assert (await hub.namespaces()).namespaces["feed"].history_size == 100
    for channel, code in (("chat:a", "forbidden"), ("bad name", "invalid_channel")):
        response = await node.http.delete(f"/api/history/{channel}")
        assert response.json()["error"]["code"] == code
    namespaces = (await node.http.get("/api/namespaces")).json()["namespaces"]
    assert namespaces["feed"]["history_size"] == 100 and namespaces["chat"]["presence"]
    assert "default" in namespaces


async def test_a_connection_through_a_trusted_proxy_is_listed_with_its_clients_address(
) -> None:
    """uvicorn's X-Forwarded-For handling (from 127.0.0.1, trusted by default) runs flat
    (`hub.proxy_headers`: no frame of its own in each connection's chain) and still gives
    the connection the client's address."""
    from hub.proxy_headers import FlatProxyHeaders

    settings = make_settings(namespaces=NAMESPACES, node_id="proxied")
    async with running_node(settings) as node:
        assert isinstance(node.server.config.loaded_app, FlatProxyHeaders)
        connection = await websockets.connect(
            node.ws_url, additional_headers={"Authorization": f"Bearer {token('carol')}",
                                             "X-Forwarded-For": "203.0.113.7"},
            open_timeout=WAIT)
        try:
            client = Client(connection)
            client.welcome = await client.expect("welcome")
            (listed,) = (await listing(node, user="carol"))["connections"]
            assert listed["remote"].startswith("203.0.113.7:")
        finally:
            await connection.close()
