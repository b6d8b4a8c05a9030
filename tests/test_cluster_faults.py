"""Redis faults under a cluster of real node processes (PROTOCOL §5, §6): Redis stopped and
restarted with its data or empty, a node's pub/sub connection cut while messages go on,
and a frozen Redis (half-open connections).

Every test has its own redis-server (`redis_factory`) and its own two nodes, and ends
them itself. Connections to the nodes must survive every fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis.asyncio

from tests.redis_server import RedisServer
from tests.support import (
    WAIT,
    Client,
    NodeProcess,
    connect,
    eventually,
    http_client,
    publish,
    token,
)
from tests.test_cluster import (
    alive,
    api_post,
    getter,
    messages,
    metric,
    next_message,
    node_env,
    readyz,
    start_nodes,
    subscribe_since,
    unique,
    wait_ready,
    write_config,
)

Factory = Callable[..., RedisServer]
T = TypeVar("T")


@contextlib.asynccontextmanager
async def nodes_on(
    server: RedisServer, directory: Path, count: int
) -> AsyncIterator[list[NodeProcess]]:
    config = write_config(directory)
    envs = [node_env(server.url, f"fault-{'abcdefgh'[n]}", config) for n in range(count)]
    nodes = await asyncio.to_thread(start_nodes, envs)
    try:
        yield nodes
    finally:
        for node in nodes:  # a frozen node is killed just the same
            await asyncio.to_thread(node.kill)


@contextlib.asynccontextmanager
async def two_nodes(
    server: RedisServer, directory: Path
) -> AsyncIterator[tuple[NodeProcess, NodeProcess]]:
    async with nodes_on(server, directory, 2) as (a, b):
        yield a, b


async def both_ready(http: httpx.AsyncClient, nodes: tuple[NodeProcess, ...], status: int,
                     timeout: float = 10.0) -> None:
    for node in nodes:
        await wait_ready(http, node, status, timeout)


async def assert_commands_unavailable(
    http: httpx.AsyncClient, node: NodeProcess, client: Client, channel: str
) -> None:
    """While the broker is down: API publish 503, client publish and subscribe errors."""
    response = await http.post(node.url + "/api/publish", json={"channel": channel, "data": 0})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    reply = await client.request({"type": "publish", "channel": channel, "data": 0})
    assert (reply["type"], reply.get("code")) == ("error", "unavailable"), reply
    reply = await client.request({"type": "subscribe", "channel": unique("news:down")})
    assert (reply["type"], reply.get("code")) == ("error", "unavailable"), reply


@dataclass
class Stream:
    """Publishes 1, 2, 3, ... to a channel through the API every 20 ms until stopped, and
    records what was accepted and what was refused (and when the refused one was sent)."""

    http: httpx.AsyncClient
    node: NodeProcess
    channel: str
    accepted: dict[int, int] = field(default_factory=dict)  # data → offset
    refused: list[tuple[int, float]] = field(default_factory=list)  # data, sent at
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while not self.stopped.is_set():
            n += 1
            sent_at = loop.time()
            response = await self.http.post(
                self.node.url + "/api/publish", json={"channel": self.channel, "data": n}
            )
            if response.status_code == 200:
                self.accepted[n] = response.json()["offset"]
            else:
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "unavailable"
                self.refused.append((n, sent_at))
            await asyncio.sleep(0.02)


async def receive_stream(client: Client, until_offset: int) -> list[dict[str, Any]]:
    """Every frame up to the message with `until_offset`; each must be a message."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["offset"] < until_offset:
        got.append(await next_message(client))
    return got


async def test_redis_restart_with_its_data_keeps_connections_epoch_and_order(
    redis_factory: Factory, tmp_path: Path
) -> None:
    server = redis_factory(durable=True)
    feed, news = unique("feed:kept"), unique("news:kept")
    async with http_client() as http, two_nodes(server, tmp_path) as (a, b), \
            connect(a.ws_url, token(unique("ka"))) as stream_a, \
            connect(b.ws_url, token(unique("kb"))) as stream_b, \
            connect(a.ws_url, token(unique("kp"))) as plain_a, \
            connect(b.ws_url, token(unique("kq"))) as plain_b:
        epoch = (await stream_a.subscribe(feed))["epoch"]
        await stream_b.subscribe(feed)
        for client in (plain_a, plain_b):
            await client.subscribe(news)
        await publish(http, news, "before", url=a.url)
        for client in (plain_a, plain_b):
            assert (await next_message(client))["data"] == "before"

        stream = Stream(http, b, feed)
        publisher = asyncio.create_task(stream.run())
        try:
            await eventually(lambda: len(stream.accepted), lambda n: n >= 5,
                             what="messages before the outage")
            await asyncio.to_thread(server.stop)
            await both_ready(http, (a, b), 503, timeout=5)
            down_at = asyncio.get_running_loop().time()
            await assert_commands_unavailable(http, a, plain_a, news)
            await assert_commands_unavailable(http, b, plain_b, news)
            await eventually(
                lambda: sum(t > down_at for _, t in stream.refused),
                lambda n: n >= 3, what="publications refused during the outage",
            )
            for client in (plain_a, plain_b):
                await alive(client)

            await asyncio.to_thread(server.start, keep_data=True)
            await both_ready(http, (a, b), 200)
            before = len(stream.accepted)
            await eventually(lambda: len(stream.accepted),
                             lambda n: n >= before + 5, what="messages after the restart")
        finally:
            stream.stopped.set()
            await publisher

        top = max(stream.accepted.values())
        for client in (stream_a, stream_b):
            got = await receive_stream(client, top)
            # one epoch, offsets 1..top without gap or duplicate, in publication order
            assert {m["epoch"] for m in got} == {epoch}
            assert [m["offset"] for m in got] == list(range(1, top + 1))
            data = [m["data"] for m in got]
            assert data == sorted(data)
            assert set(stream.accepted) <= set(data)
            refused_while_down = {n for n, t in stream.refused if t > down_at}
            assert not refused_while_down & set(data)
            assert all(stream.accepted[m["data"]] == m["offset"]
                       for m in got if m["data"] in stream.accepted)

        await publish(http, news, "after", url=b.url)
        for client in (plain_a, plain_b):
            assert (await next_message(client))["data"] == "after"

        # a client that comes back with `since` recovers across the restart
        async with connect(a.ws_url, token(unique("kr"))) as again:
            reply = await subscribe_since(again, feed, 2, epoch)
            assert (reply["recovered"], reply["epoch"], reply["offset"]) == (True, epoch, top)
            assert [m["offset"] for m in await messages(again, top - 2)] == list(
                range(3, top + 1)
            )


async def test_redis_restart_without_its_data_resets_history_subscribers(
    redis_factory: Factory, tmp_path: Path
) -> None:
    server = redis_factory()
    feed, news, chat = unique("feed:empty"), unique("news:empty"), unique("chat:empty")
    user, member, latecomer = unique("ea"), unique("em"), unique("el")
    async with http_client() as http, two_nodes(server, tmp_path) as (a, b), \
            connect(a.ws_url, token(user)) as on_a, \
            connect(b.ws_url, token(unique("eb"))) as on_b, \
            connect(a.ws_url, token(unique("ep"))) as plain_a, \
            connect(b.ws_url, token(member)) as in_chat:
        old_epoch = (await on_a.subscribe(feed))["epoch"]
        await on_b.subscribe(feed)
        await plain_a.subscribe(news)
        await in_chat.subscribe(chat)
        for n in (1, 2, 3):
            await publish(http, feed, n, url=a.url)
        for client in (on_a, on_b):
            assert [m["offset"] for m in await messages(client, 3)] == [1, 2, 3]

        await asyncio.to_thread(server.kill)
        await both_ready(http, (a, b), 503, timeout=5)
        await assert_commands_unavailable(http, a, plain_a, news)
        for path in ("/api/stats", f"/api/presence/{chat}", "/api/channels"):
            response = await http.get(a.url + path)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"]["code"] == "unavailable"
        async with connect(a.ws_url, token(latecomer)) as late:  # accepted while Redis is down
            await asyncio.to_thread(server.start, keep_data=False)
            await both_ready(http, (a, b), 200)
            await api_post(http, b, "/api/send", {"user": latecomer, "data": "welcome back"})
            assert (await next_message(late))["data"] == "welcome back"

        # presence and node heartbeats are written again by the nodes
        await eventually(
            getter(http, a, f"/api/presence/{chat}"),
            lambda body: [(m["user"], m["node"]) for m in body["clients"]] == [
                (member, "fault-b")
            ],
            what="presence rewritten after the empty restart",
        )
        await eventually(
            getter(http, b, "/api/stats"),
            lambda body: [n["node"] for n in body["nodes"]] == ["fault-a", "fault-b"],
            what="both nodes in the stats after the empty restart",
        )

        # PROTOCOL §5: within 3 s of /readyz 200
        resets = [await client.expect("reset", timeout=3) for client in (on_a, on_b)]
        new_epoch = resets[0]["epoch"]
        assert new_epoch != old_epoch
        for reset in resets:
            assert reset == {"type": "reset", "channel": feed, "epoch": new_epoch, "offset": 0}

        assert await publish(http, feed, "new", url=b.url) == {"offset": 1, "epoch": new_epoch}
        for client in (on_a, on_b):
            got = await next_message(client)
            assert (got["offset"], got["epoch"], got["data"]) == (1, new_epoch, "new")
        await publish(http, news, "plain", url=b.url)
        assert (await next_message(plain_a))["data"] == "plain"  # no reset: no history

        async with connect(b.ws_url, token(user)) as again:
            reply = await subscribe_since(again, feed, 3, old_epoch)
            assert (reply["recovered"], reply["epoch"], reply["offset"]) == (False, new_epoch, 1)
            await publish(http, feed, "live", url=a.url)
            got = await next_message(again)  # nothing of the old epoch comes first
            assert (got["offset"], got["data"]) == (2, "live")


# a node's pub/sub connection cut while publications go on


def socket_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` holds (Linux /proc)."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (`T` when stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


async def pubsub_client_of(rds: redis.asyncio.Redis, node: NodeProcess) -> str:
    """The Redis client id of the node's pub/sub connection."""
    assert node.process is not None
    ports = await asyncio.to_thread(socket_ports, node.process.pid)
    listed: list[dict[str, str]] = await rds.client_list()
    found = [
        entry["id"] for entry in listed
        if "P" in entry["flags"] and int(entry["addr"].rsplit(":", 1)[1]) in ports
    ]
    assert len(found) == 1, listed
    return found[0]


async def test_a_node_that_lost_its_pubsub_connection_fills_the_gap_from_history(
    redis_factory: Factory, tmp_path: Path
) -> None:
    server = redis_factory()
    feed = unique("feed:gap")
    rds = redis.asyncio.Redis.from_url(server.url)
    async with http_client() as http, two_nodes(server, tmp_path) as (a, b), \
            connect(a.ws_url, token(unique("ga"))) as watcher:
        assert a.process is not None
        pid = a.process.pid
        try:
            await watcher.subscribe(feed)
            for n in range(1, 4):
                await publish(http, feed, n, url=b.url)
            assert [m["offset"] for m in await messages(watcher, 3)] == [1, 2, 3]
            pubsub = await pubsub_client_of(rds, a)

            # Freeze A, cut its pub/sub connection, publish what A cannot hear, thaw A.
            os.kill(pid, signal.SIGSTOP)
            await eventually(lambda: asyncio.to_thread(process_state, pid),
                             lambda state: state == "T", within=WAIT, what="node A stopped")
            assert await rds.client_kill_filter(_id=pubsub) == 1
            for n in range(4, 9):
                await publish(http, feed, n, url=b.url)
            os.kill(pid, signal.SIGCONT)

            # Live publications go on while A reconnects and refills.
            async def more() -> None:
                for n in range(9, 16):
                    await publish(http, feed, n, url=b.url)
                    await asyncio.sleep(0.02)

            publisher = asyncio.create_task(more())
            await wait_ready(http, a, 200)
            ready_at = asyncio.get_running_loop().time()
            await publisher
            async with asyncio.timeout(3):  # PROTOCOL §5: within 3 s of /readyz 200
                got = [await next_message(watcher) for _ in range(12)]
            assert asyncio.get_running_loop().time() - ready_at < 3
            assert [(m["offset"], m["data"]) for m in got] == [(n, n) for n in range(4, 16)]
            await publish(http, feed, 16, url=b.url)  # barrier: nothing else came in between
            assert (await next_message(watcher))["offset"] == 16

            reconnects = metric((await http.get(a.url + "/metrics")).text,
                                "hub_broker_reconnects_total")
            assert reconnects >= 1
            await alive(watcher)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            await rds.aclose()


async def test_a_frozen_redis_is_noticed_within_ten_seconds_and_survived(
    redis_factory: Factory, tmp_path: Path
) -> None:
    server = redis_factory()
    news = unique("news:frozen")
    async with http_client() as http, two_nodes(server, tmp_path) as (a, b), \
            connect(a.ws_url, token(unique("fa"))) as on_a, \
            connect(b.ws_url, token(unique("fb"))) as on_b:
        for client in (on_a, on_b):
            await client.subscribe(news)
        try:
            server.pause()
            paused_at = asyncio.get_running_loop().time()
            await both_ready(http, (a, b), 503, timeout=11)
            assert asyncio.get_running_loop().time() - paused_at <= 10
            for client in (on_a, on_b):
                await alive(client)
        finally:
            server.resume()
        await both_ready(http, (a, b), 200)
        await publish(http, news, "thawed", url=a.url)
        for client in (on_a, on_b):
            assert (await next_message(client))["data"] == "thawed"
        assert await readyz(http, b) == 200


async def test_a_publish_refused_while_redis_is_frozen_reaches_nobody(
    redis_factory: Factory, tmp_path: Path
) -> None:
    server = redis_factory()
    feed = unique("feed:frozen")
    async with http_client() as http, two_nodes(server, tmp_path) as (a, b), \
            connect(a.ws_url, token(unique("fz"))) as watcher:
        await watcher.subscribe(feed)
        await publish(http, feed, "before", url=b.url)
        assert (await next_message(watcher))["offset"] == 1
        try:
            server.pause()
            response = await http.post(b.url + "/api/publish",
                                       json={"channel": feed, "data": "refused"})
            assert response.status_code == 503, response.text
        finally:
            server.resume()
        await both_ready(http, (a, b), 200)
        await eventually(
            lambda: http.post(b.url + "/api/publish", json={"channel": feed, "data": "after"}),
            lambda response: response.status_code == 200, what="a publish after the thaw",
        )
        got = await next_message(watcher)
        assert (got["offset"], got["data"]) == (2, "after"), got


async def test_connections_killed_again_and_again_lose_and_repeat_nothing(
    redis_factory: Factory, tmp_path: Path
) -> None:
    """Three nodes carry a numbered stream while Redis's client connections (pub/sub and
    command connections alike) are killed about every 20 ms for 1.6 s. Every subscriber
    gets every accepted message exactly once, in offset order; a refused one (its answer
    lost with its connection) may have been published, then it too arrives once."""
    server = redis_factory()
    feed = unique("feed:killed")
    admin = redis.asyncio.Redis.from_url(server.url)
    async with http_client() as http, nodes_on(server, tmp_path, 3) as nodes, \
            contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(connect(node.ws_url, token(unique("kw"))))
            for node in nodes for _ in range(2)
        ]
        starts = [(await watcher.subscribe(feed))["offset"] for watcher in watchers]
        assert starts == [0] * len(watchers)
        accepted: dict[int, int] = {}  # data → offset
        refused: set[int] = set()
        done = asyncio.Event()

        async def stream() -> None:
            n = 0
            while not done.is_set():
                n += 1
                node = nodes[n % len(nodes)]
                response = await http.post(node.url + "/api/publish",
                                           json={"channel": feed, "data": n})
                if response.status_code == 200:
                    accepted[n] = response.json()["offset"]
                else:
                    assert response.status_code == 503, response.text
                    refused.add(n)
                await asyncio.sleep(0.002)

        async def kill_again_and_again() -> int:
            kills = 0
            for round_ in range(80):
                kind = "pubsub" if round_ % 2 else "normal"
                kills += await admin.client_kill_filter(_type=kind, skipme=True)
                await asyncio.sleep(0.02)
            return kills

        publisher = asyncio.create_task(stream())
        try:
            await eventually(lambda: len(accepted) >= 50, what="a stream before the kills")
            kills = await kill_again_and_again()
            before = len(accepted)  # the stream goes on while the nodes catch up
            await eventually(lambda: len(accepted) >= before + 100,
                             what="a stream after the kills")
        finally:
            done.set()
            await publisher
            await admin.aclose()
        assert kills >= 40, kills
        await both_ready(http, tuple(nodes), 200)
        last = await publish(http, feed, "last", url=nodes[0].url)
        for watcher in watchers:
            got = await receive_stream(watcher, last["offset"])
            offsets = [m["offset"] for m in got]
            assert offsets == list(range(1, last["offset"] + 1)), offsets
            data = {m["data"] for m in got[:-1]}
            assert set(accepted) <= data <= set(accepted) | refused
            assert len({m["epoch"] for m in got}) == 1
        assert sorted(accepted.values()) == sorted(set(accepted.values()))
