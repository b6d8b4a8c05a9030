"""A cluster of real node processes (`python -m hub serve`) on one private redis-server
(PROTOCOL §6): relaying, personal messages, presence and statistics, join/leave,
disconnects, history and recovery across nodes, relay subscriptions only where there is
interest, and a node killed without a word.

Three nodes are shared by the module (starting one costs about a second); every test uses
its own channel and user names. The helpers at the top are also used by
tests/test_cluster_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
import redis.asyncio

from tests.redis_server import RedisServer
from tests.support import (
    API_KEY,
    SECRET,
    WAIT,
    Client,
    NodeProcess,
    connect,
    eventually,
    http_client,
    publish,
    token,
)

T = TypeVar("T")

PRESENCE_TTL = 3  # seconds: heartbeats every second, so cluster reads settle fast
POLL = 0.05

CONFIG = """\
[namespaces.default]
subscribe = "token"
publish = "none"

[namespaces.chat]
subscribe = "any"
publish = "any"
presence = true
join_leave = true

[namespaces.news]
subscribe = "any"
publish = "any"

[namespaces.feed]
subscribe = "any"
publish = "token"
history_size = 1000
history_ttl = 300
"""


# helpers shared with tests/test_cluster_faults.py


def write_config(directory: Path) -> str:
    path = directory / "hub.toml"
    path.write_text(CONFIG)
    return str(path)


def node_env(redis_url: str, node_id: str, config: str, **extra: str) -> dict[str, str]:
    env = {
        "HUB_REDIS_URL": redis_url,
        "HUB_JWT_SECRET": SECRET,
        "HUB_API_KEY": API_KEY,
        "HUB_NODE_ID": node_id,
        "HUB_CONFIG": config,
        "HUB_PRESENCE_TTL": str(PRESENCE_TTL),
        "HUB_DRAIN_DELAY": "0",
        "HUB_DRAIN_SECONDS": "0.5",
    }
    env.update(extra)
    return env


def start_nodes(envs: list[dict[str, str]]) -> list[NodeProcess]:
    """Start the nodes side by side; if one fails, stop those that started."""
    nodes = [NodeProcess(env) for env in envs]
    with ThreadPoolExecutor(len(nodes)) as pool:
        futures = [pool.submit(node.start) for node in nodes]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for node in nodes:
            node.kill()
        raise RuntimeError(f"a node did not start: {errors[0]!r}")
    return nodes


def stop_nodes(nodes: list[NodeProcess]) -> None:
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        list(pool.map(NodeProcess.stop, nodes))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def api_get(http: httpx.AsyncClient, node: NodeProcess, path: str) -> dict[str, Any]:
    response = await http.get(node.url + path)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def getter(
    http: httpx.AsyncClient, node: NodeProcess, path: str
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A probe for `eventually`: GET `path` on `node`."""
    return lambda: api_get(http, node, path)


async def api_post(
    http: httpx.AsyncClient, node: NodeProcess, path: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    response = await http.post(node.url + path, json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


async def readyz(http: httpx.AsyncClient, node: NodeProcess) -> int:
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get(node.url + "/readyz", timeout=1.0)).status_code
    return 0


async def wait_ready(
    http: httpx.AsyncClient, node: NodeProcess, status: int, timeout: float = 10.0
) -> None:
    await eventually(
        lambda: readyz(http, node), lambda code: code == status, timeout,
        f"/readyz {status} on {node.url}",
    )


async def next_message(client: Client, timeout: float = WAIT) -> dict[str, Any]:
    return await client.expect("message", timeout)


async def messages(client: Client, n: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    return [await next_message(client, timeout) for _ in range(n)]


async def subscribe_since(client: Client, channel: str, offset: int, epoch: str) -> dict[str, Any]:
    """Subscribe with `since`; the reply must be the very next frame."""
    since = {"offset": offset, "epoch": epoch}
    await client.send({"type": "subscribe", "channel": channel, "since": since})
    return await client.expect("subscribed")


async def alive(client: Client) -> None:
    """The connection still answers a command (the reply skips other frames)."""
    assert (await client.request({"type": "ping"}))["type"] == "pong"


def metric(text: str, name: str) -> float:
    """The sum of every sample of `name` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or head.startswith(name + "{"):
            total += float(value)
    return total


# the cluster


@dataclass
class Cluster:
    a: NodeProcess
    b: NodeProcess
    c: NodeProcess
    ids: dict[str, str]  # node url → node id
    redis_url: str
    config: str

    @property
    def nodes(self) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
        return self.a, self.b, self.c

    def id_of(self, node: NodeProcess) -> str:
        return self.ids[node.url]


@pytest.fixture(scope="module")
def cluster(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if not redis_server.running:  # a test stopped it and did not start it again
        redis_server.start(keep_data=False)
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    config = write_config(tmp_path_factory.mktemp("cluster"))
    names = ["cl-a", "cl-b", "cl-c"]
    nodes = start_nodes([node_env(redis_server.url, name, config) for name in names])
    try:
        ids = {node.url: name for node, name in zip(nodes, names, strict=True)}
        a, b, c = nodes
        yield Cluster(a, b, c, ids=ids, redis_url=redis_server.url, config=config)
    finally:
        stop_nodes(nodes)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with http_client() as client:
        yield client


@pytest.fixture
async def rds(cluster: Cluster) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(cluster.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# relaying


async def test_api_publish_on_one_node_reaches_subscribers_on_the_others(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    channel = unique("news:relay")
    async with connect(cluster.a.ws_url, token(unique("ra"))) as on_a, \
            connect(cluster.c.ws_url, token(unique("rc"))) as on_c:
        await on_a.subscribe(channel)
        await on_c.subscribe(channel)
        assert await publish(http, channel, {"n": 1}, url=cluster.b.url) == {}
        for client in (on_a, on_c):
            got = await next_message(client)
            assert got["channel"] == channel and got["data"] == {"n": 1}
            assert isinstance(got["ts"], int) and "from" not in got
            assert "offset" not in got and "epoch" not in got


async def test_client_publish_on_one_node_reaches_another_with_from(cluster: Cluster) -> None:
    channel = unique("news:relay")
    publisher = unique("pub")
    async with connect(cluster.a.ws_url, token(unique("ra"))) as on_a, \
            connect(cluster.b.ws_url, token(publisher)) as on_b:
        await on_a.subscribe(channel)
        reply = await on_b.request({"type": "publish", "channel": channel, "data": "hi"})
        assert reply["type"] == "published" and reply["channel"] == channel, reply
        got = await next_message(on_a)
        assert (got["channel"], got["data"], got["from"]) == (channel, "hi", publisher)


async def test_messages_of_one_publisher_arrive_in_order_across_nodes(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    channel = unique("news:order")
    async with connect(cluster.a.ws_url, token(unique("oa"))) as on_a:
        await on_a.subscribe(channel)
        for n in range(50):
            await publish(http, channel, n, url=cluster.b.url)
        assert [m["data"] for m in await messages(on_a, 50)] == list(range(50))


# personal messages


async def test_send_reaches_every_connection_of_a_user_on_any_node(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    user, other = unique("pm-user"), unique("pm-other")
    async with connect(cluster.a.ws_url, token(user)) as user_a, \
            connect(cluster.c.ws_url, token(user)) as user_c, \
            connect(cluster.a.ws_url, token(other)) as other_a, \
            connect(cluster.c.ws_url, token(other)) as other_c:
        assert await api_post(http, cluster.b, "/api/send",
                              {"user": user, "data": {"hello": 1}, "event": "note"}) == {}
        for client in (user_a, user_c):
            got = await next_message(client)
            assert got["channel"] == f"@{user}"
            assert (got["data"], got["event"]) == ({"hello": 1}, "note")
            assert "from" not in got
        # /api/publish to an @ channel is /api/send
        await publish(http, f"@{user}", "second", url=cluster.c.url)
        for client in (user_a, user_c):
            assert (await next_message(client))["data"] == "second"
        # barrier: the other user's next frame is what was sent to it, nothing before
        await api_post(http, cluster.b, "/api/send", {"user": other, "data": "barrier"})
        for client in (other_a, other_c):
            got = await next_message(client)
            assert (got["channel"], got["data"]) == (f"@{other}", "barrier")


# presence, statistics, channels


async def test_presence_from_either_node_lists_members_of_every_node(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    channel = unique("chat:presence")
    users = [unique("pa"), unique("pb"), unique("pc")]
    async with connect(cluster.a.ws_url, token(users[0], info={"name": "A"})) as on_a, \
            connect(cluster.b.ws_url, token(users[1])) as on_b, \
            connect(cluster.c.ws_url, token(users[2])) as on_c:
        clients = (on_a, on_b, on_c)
        for client in clients:
            await client.subscribe(channel)
        expected = {
            (client.welcome["client"], user, cluster.id_of(node))
            for client, user, node in zip(clients, users, cluster.nodes, strict=True)
        }

        def members(body: dict[str, Any]) -> set[tuple[str, str, str]]:
            return {(m["client"], m["user"], m["node"]) for m in body["clients"]}

        for reader in (cluster.a, cluster.b):
            body = await eventually(
                getter(http, reader, f"/api/presence/{channel}"),
                lambda body: members(body) == expected, what=f"presence on {reader.url}",
            )
            assert body["channel"] == channel
            info = {m["user"]: m.get("info") for m in body["clients"]}
            assert info == {users[0]: {"name": "A"}, users[1]: None, users[2]: None}

        await on_b.request({"type": "unsubscribe", "channel": channel})
        remaining = expected - {(on_b.welcome["client"], users[1], cluster.id_of(cluster.b))}
        for reader in (cluster.a, cluster.c):
            await eventually(
                getter(http, reader, f"/api/presence/{channel}"),
                lambda body: members(body) == remaining, what=f"presence on {reader.url}",
            )


async def test_stats_and_channels_from_either_node_are_cluster_wide(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    prefix = unique("news:stats") + "-"
    one, two, three = prefix + "1", prefix + "2", prefix + "3"
    first, second = unique("st-first"), unique("st-second")
    async with connect(cluster.a.ws_url, token(first)) as first_a, \
            connect(cluster.b.ws_url, token(first)) as first_b, \
            connect(cluster.c.ws_url, token(second)) as second_c:
        await first_a.subscribe(one)
        await first_a.subscribe(two)
        await first_b.subscribe(one)
        await second_c.subscribe(three)
        expected_nodes = {
            "cl-a": {"connections": 1, "users": 1, "subscriptions": 2, "channels": 2},
            "cl-b": {"connections": 1, "users": 1, "subscriptions": 1, "channels": 1},
            "cl-c": {"connections": 1, "users": 1, "subscriptions": 1, "channels": 1},
        }
        expected_total = {
            "nodes": 3, "connections": 3, "users": 2, "subscriptions": 4, "channels": 3,
        }

        def settled(body: dict[str, Any]) -> bool:
            nodes = {
                n["node"]: {k: n[k] for k in ("connections", "users", "subscriptions",
                                                 "channels")}
                for n in body["nodes"]
            }
            return nodes == expected_nodes and body["total"] == expected_total

        for reader in (cluster.a, cluster.c):
            body = await eventually(
                getter(http, reader, "/api/stats"), settled,
                what=f"stats on {reader.url}",
            )
            for entry in body["nodes"]:
                assert isinstance(entry["started"], int) and isinstance(entry["updated"], int)
                assert entry["started"] <= entry["updated"]

        expected_channels = {one: 2, two: 1, three: 1}
        for reader in (cluster.a, cluster.b):
            body = await eventually(
                getter(http, reader, f"/api/channels?prefix={prefix}"),
                lambda body: body == {"channels": expected_channels},
                what=f"channels on {reader.url}",
            )


# join and leave


async def next_event(client: Client, kind: str, user: str) -> dict[str, Any]:
    """The next `kind` frame about `user`. Other join/leave frames may come between: the
    client's own, and that of a subscriber who joined just before it (a join is published
    right after the `subscribed` reply, so it may reach a subscription made meanwhile)."""
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.recv()
            if frame["type"] == kind and frame["user"] == user:
                return frame
            assert frame["type"] == "join", frame


async def test_join_and_leave_reach_subscribers_on_every_node(cluster: Cluster) -> None:
    channel = unique("chat:joins")
    ua, ub, uc = unique("ja"), unique("jb"), unique("jc")
    async with connect(cluster.a.ws_url, token(ua)) as on_a, \
            connect(cluster.b.ws_url, token(ub)) as on_b:
        await on_a.subscribe(channel)
        await on_b.subscribe(channel)
        joined = await next_event(on_a, "join", ub)
        assert joined == {"type": "join", "channel": channel, "user": ub,
                          "client": on_b.welcome["client"]}
        async with connect(cluster.c.ws_url, token(uc)) as on_c:
            await on_c.subscribe(channel)
            for client in (on_a, on_b):
                joined = await next_event(client, "join", uc)
                assert joined["client"] == on_c.welcome["client"]
            await on_c.request({"type": "unsubscribe", "channel": channel})
            for client in (on_a, on_b):
                left = await next_event(client, "leave", uc)
                assert left == {"type": "leave", "channel": channel, "user": uc,
                                "client": on_c.welcome["client"]}
        await on_b.close()  # a subscriber that disconnects leaves too
        left = await next_event(on_a, "leave", ub)
        assert left["client"] == on_b.welcome["client"]


# disconnect


async def test_api_disconnect_on_one_node_closes_the_user_on_every_node(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    user, bystander = unique("dc-user"), unique("dc-bystander")
    async with connect(cluster.a.ws_url, token(user)) as user_a, \
            connect(cluster.c.ws_url, token(user)) as user_c, \
            connect(cluster.a.ws_url, token(bystander)) as other_a:
        assert await api_post(http, cluster.b, "/api/disconnect", {"user": user}) == {}
        assert await user_a.closed() == 4003
        assert await user_c.closed() == 4003
        await alive(other_a)


# history and recovery


async def test_offsets_form_one_sequence_whichever_node_publishes(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    channel = unique("feed:seq")
    async with connect(cluster.c.ws_url, token(unique("sq"))) as watcher, \
            connect(cluster.a.ws_url, token(unique("sqa"))) as pub_a, \
            connect(cluster.b.ws_url, token(unique("sqb"))) as pub_b:
        first = await watcher.subscribe(channel)
        assert first["offset"] == 0
        epoch = first["epoch"]
        answers: list[dict[str, Any]] = []
        for n in range(8):
            if n % 4 in (0, 1):
                node = cluster.a if n % 4 == 0 else cluster.b
                answers.append(await publish(http, channel, n, url=node.url))
            else:
                client = pub_a if n % 4 == 2 else pub_b
                reply = await client.request({"type": "publish", "channel": channel, "data": n})
                assert reply["type"] == "published", reply
                answers.append({"offset": reply["offset"], "epoch": reply["epoch"]})
        assert answers == [{"offset": n, "epoch": epoch} for n in range(1, 9)]
        got = await messages(watcher, 8)
        assert [(m["offset"], m["epoch"], m["data"]) for m in got] == [
            (n + 1, epoch, n) for n in range(8)
        ]
        history = await api_get(http, cluster.b, f"/api/history/{channel}")
        assert (history["epoch"], history["offset"]) == (epoch, 8)
        assert [item["offset"] for item in history["messages"]] == list(range(1, 9))


async def test_recovery_on_another_node_after_reconnecting(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    channel = unique("feed:recover")
    user = unique("rec")
    async with connect(cluster.a.ws_url, token(user)) as first:
        await first.subscribe(channel)
        await publish(http, channel, "one", url=cluster.b.url)
        await publish(http, channel, "two", url=cluster.c.url)
        seen = await messages(first, 2)
    last = seen[-1]
    assert last["offset"] == 2
    for data in ("three", "four", "five"):  # missed while away
        await publish(http, channel, data, url=cluster.a.url)
    async with connect(cluster.b.ws_url, token(user)) as again:
        reply = await subscribe_since(again, channel, last["offset"], last["epoch"])
        assert reply["recovered"] is True
        assert (reply["offset"], reply["epoch"]) == (5, last["epoch"])
        missed = await messages(again, 3)
        assert [(m["offset"], m["data"]) for m in missed] == [
            (3, "three"), (4, "four"), (5, "five")
        ]
        await publish(http, channel, "six", url=cluster.a.url)
        live = await next_message(again)
        assert (live["offset"], live["data"]) == (6, "six")


async def test_recovery_with_a_foreign_epoch_is_not_recovered(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    channel = unique("feed:epoch")
    await publish(http, channel, "x", url=cluster.a.url)
    async with connect(cluster.c.ws_url, token(unique("ep"))) as client:
        reply = await subscribe_since(client, channel, 0, "not-the-epoch")
        assert reply["recovered"] is False and reply["offset"] == 1
        await publish(http, channel, "y", url=cluster.b.url)
        live = await next_message(client)
        assert (live["offset"], live["data"]) == (2, "y")


# relay subscriptions follow local interest


def topic_of(channel: str) -> bytes:
    """The pub/sub topic of a channel: hub/redis/broker.py, prefix `hub:`, db 0."""
    return b"hub:c:0:{" + channel.encode() + b"}"


async def numsub(rds: redis.asyncio.Redis, channel: str) -> int:
    counts: list[tuple[bytes | str, int]] = await rds.pubsub_numsub(topic_of(channel))
    return int(counts[0][1])


async def commands(rds: redis.asyncio.Redis, name: str) -> int:
    stats: dict[str, Any] = await rds.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_a_node_subscribes_a_topic_only_while_it_has_local_subscribers(
    cluster: Cluster, http: httpx.AsyncClient, rds: redis.asyncio.Redis
) -> None:
    prefix = unique("news:interest")
    channel, marker = prefix + "-x", unique("news:marker")
    pattern = topic_of(prefix)[:-1] + b"*"  # the topics of every channel named so, and more
    user_b = unique("ib")
    async with connect(cluster.a.ws_url, token(unique("ia1"))) as a1, \
            connect(cluster.a.ws_url, token(unique("ia2"))) as a2, \
            connect(cluster.b.ws_url, token(user_b)) as b1:
        assert await numsub(rds, f"@{user_b}") == 1  # a connection's personal channel
        assert await numsub(rds, channel) == 0
        await rds.config_resetstat()
        await a1.subscribe(channel)  # `subscribed` comes after Redis confirmed
        assert await numsub(rds, channel) == 1
        await a2.subscribe(channel)  # node A is subscribed already
        assert await numsub(rds, channel) == 1
        assert await commands(rds, "subscribe") == 1
        await b1.subscribe(channel)
        assert await numsub(rds, channel) == 2
        assert await commands(rds, "subscribe") == 2
        assert await rds.pubsub_channels(pattern) == [topic_of(channel)]

        # one publication reaches each interested node once and every local subscriber
        await publish(http, channel, "x", url=cluster.c.url)
        for client in (a1, a2, b1):
            assert (await next_message(client))["data"] == "x"

        await a1.request({"type": "unsubscribe", "channel": channel})
        # barrier: A's next SUBSCRIBE is confirmed after any UNSUBSCRIBE it sent before
        await a1.subscribe(marker)
        assert await numsub(rds, channel) == 2

        await a2.request({"type": "unsubscribe", "channel": channel})
        await eventually(lambda: numsub(rds, channel), lambda n: n == 1, what="A unsubscribed")
        await b1.close()  # the last subscriber anywhere disconnects
        await eventually(lambda: numsub(rds, channel), lambda n: n == 0, what="B unsubscribed")
        await eventually(lambda: numsub(rds, f"@{user_b}"), lambda n: n == 0,
                         what="personal channel released")
        assert await rds.pubsub_channels(pattern) == []


# a node killed without a word


async def test_a_killed_node_drops_out_of_stats_presence_and_channels(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    node_id = unique("cl-doomed")
    channel = unique("chat:doomed")
    (doomed,) = await asyncio.to_thread(
        start_nodes, [node_env(cluster.redis_url, node_id, cluster.config)]
    )
    try:
        async with connect(doomed.ws_url, token(unique("dd"))) as victim, \
                connect(cluster.a.ws_url, token(unique("ds"))) as survivor:
            await victim.subscribe(channel)
            await survivor.subscribe(channel)

            async def view() -> tuple[set[str], set[str], int]:
                stats = await api_get(http, cluster.a, "/api/stats")
                presence = await api_get(http, cluster.a, f"/api/presence/{channel}")
                counts = await api_get(http, cluster.a, f"/api/channels?prefix={channel}")
                return (
                    {n["node"] for n in stats["nodes"]},
                    {m["node"] for m in presence["clients"]},
                    counts["channels"].get(channel, 0),
                )

            await eventually(
                view, lambda v: node_id in v[0] and v[1] == {node_id, "cl-a"} and v[2] == 2,
                what="the doomed node in the cluster view",
            )
            await asyncio.to_thread(doomed.kill)
            killed_at = asyncio.get_running_loop().time()
            assert await victim.closed() == 1006  # dropped without a close frame
            await alive(survivor)
            await eventually(
                view, lambda v: node_id not in v[0] and v[1] == {"cl-a"} and v[2] == 1,
                within=PRESENCE_TTL + 3, what="the killed node gone from the cluster view",
            )
            elapsed = asyncio.get_running_loop().time() - killed_at
            assert elapsed <= PRESENCE_TTL + 2, elapsed
    finally:
        await asyncio.to_thread(doomed.kill)

