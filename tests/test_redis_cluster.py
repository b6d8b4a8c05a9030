"""The hub on a real local Redis Cluster (3 masters, 3 replicas, started by the tests on
free loopback ports) and a Sentinel set (PROTOCOL §6, "Past one Redis"): channels spread
over every shard with sharded pub/sub, history and recovery, cluster-wide reads, a master
killed under numbered streams, a stale replica promoted, HUB_REDIS_MIN_REPLICAS with a
replica that stopped answering, a node started before its Cluster, a Sentinel failover.

Nodes are in-process uvicorn servers (`running_node`); the Redis processes are real, and
killed, paused and promoted for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

from hub.redis.topology import tagged
from tests.conftest import NAMESPACES
from tests.redis_cluster import RedisCluster, RedisSentinel
from tests.support import (
    WAIT,
    Client,
    RunningNode,
    connect,
    eventually,
    make_settings,
    metric,
    publish,
    running_node,
    token,
)

ClusterFactory = Callable[..., RedisCluster]
SentinelFactory = Callable[..., RedisSentinel]


def topic(channel: str) -> bytes:
    return b"hub:c:0:" + tagged(channel)


def channels_on_every_shard(cluster: RedisCluster, prefix: str, each: int = 1) -> list[str]:
    """`each` channel names per master, so a test covers every shard."""
    wanted = {master.port: each for master in cluster.masters()}
    found: list[str] = []
    n = 0
    while any(wanted.values()):
        n += 1
        name = f"{prefix}-{n}"
        owner = cluster.master_for(topic(name)).port
        if wanted[owner]:
            wanted[owner] -= 1
            found.append(name)
    return found


@contextlib.asynccontextmanager
async def nodes_on(url: str, count: int, **settings: Any) -> AsyncIterator[list[RunningNode]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_node(make_settings(
                redis_url=url, namespaces=NAMESPACES, node_id=f"cl-{n}", presence_ttl=3,
                **settings,
            )))
            for n in range(count)
        ]


@dataclass
class Stream:
    """Publishes 1, 2, 3, ... to a channel through a node's API until stopped; records
    what was accepted (with its offset) and what was refused."""

    node: RunningNode
    channel: str
    pause: float = 0.005
    accepted: dict[int, int] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    times: list[float] = field(default_factory=list)  # when each accepted one was answered

    async def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            n += 1
            try:
                response = await self.node.http.post(
                    "/api/publish", json={"channel": self.channel, "data": n}
                )
            except httpx.TimeoutException:
                self.refused.add(n)
                continue
            if response.status_code == 200:
                self.accepted[n] = response.json()["offset"]
                self.times.append(time.monotonic())
            else:
                assert response.status_code == 503, response.text
                self.refused.add(n)
            await asyncio.sleep(self.pause)


@contextlib.asynccontextmanager
async def streaming(streams: list[Stream]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(stream.run()) for stream in streams]
    try:
        yield
    finally:
        for stream in streams:
            stream.stopped.set()
        await asyncio.gather(*tasks)


async def received_through(
    client: Client, channel: str, last: int, kept: dict[str, list[dict[str, Any]]] | None = None
) -> list[dict[str, Any]]:
    """The frames of `channel` up to its message at offset `last` (bounded); frames of
    other channels read meanwhile go to `kept`, and are taken from there first."""
    kept = {} if kept is None else kept
    got = kept.setdefault(channel, [])
    async with asyncio.timeout(3 * WAIT):
        while not any(f["type"] == "message" and f["offset"] == last for f in got):
            frame = await client.recv()
            kept.setdefault(frame.get("channel", ""), []).append(frame)
    return got


def assert_exactly_once(got: list[dict[str, Any]], stream: Stream, last: int) -> None:
    """Offsets 1..last, each once, in order, one epoch; every accepted message there."""
    assert all(frame["type"] == "message" for frame in got), got
    assert [frame["offset"] for frame in got] == list(range(1, last + 1))
    assert len({frame["epoch"] for frame in got}) == 1
    data = {frame["data"] for frame in got}
    assert set(stream.accepted) <= data <= set(stream.accepted) | stream.refused | {"last"}


# the cluster working


async def test_channels_on_every_shard_reach_subscribers_on_another_node(
    redis_cluster: RedisCluster,
) -> None:
    names = channels_on_every_shard(redis_cluster, "feed:spread", each=2)
    async with nodes_on(redis_cluster.url, 2) as (a, b), \
            connect(a.ws_url, token("spread")) as client:
        for name in names:
            assert (await client.subscribe(name))["offset"] == 0
        for master in redis_cluster.masters():
            listed = set(redis_cluster.command(master.port, "PUBSUB", "SHARDCHANNELS"))
            mine = {topic(n).decode() for n in names
                    if redis_cluster.master_for(topic(n)) == master}
            assert len(mine) == 2 and mine <= listed, (master.port, listed)
        for name in names:
            assert (await publish(b, name, name))["offset"] == 1
        got = {(m["channel"], m["data"]) for m in [await client.expect("message")
                                                   for _ in names]}
        assert got == {(name, name) for name in names}
        assert await metric(a, "hub_broker_shards_up") == 3
        assert await metric(a, "hub_broker_up") == 1


async def test_history_and_recovery_on_every_shard(redis_cluster: RedisCluster) -> None:
    names = channels_on_every_shard(redis_cluster, "feed:kept")
    async with nodes_on(redis_cluster.url, 1) as (node,):
        for name in names:
            for n in range(1, 6):
                await publish(node, name, n)
        async with connect(node.ws_url, token("back")) as client:
            for name in names:
                epoch = (await node.http.get(f"/api/history/{name}?limit=0")).json()["epoch"]
                reply = await client.subscribe(name, since={"offset": 2, "epoch": epoch})
                assert (reply["recovered"], reply["offset"]) == (True, 5)
                got = [await client.expect("message") for _ in range(3)]
                assert [(m["offset"], m["data"]) for m in got] == [(3, 3), (4, 4), (5, 5)]
            history = (await node.http.get(f"/api/history/{names[0]}?since=3&epoch={epoch}"))
            assert history.status_code == 200


async def crowd(node: RunningNode, channel: str, count: int) -> None:
    """`count` publishes and `count` history reads of one channel at once, as thousands of
    clients reconnecting to a node ask: each waits for a connection, none is refused."""
    data = msgspec.Raw(b"1")
    positions = await asyncio.gather(*(node.node.publish(channel, data) for _ in range(count)))
    assert sorted(p.offset for p in positions if p is not None) == list(range(1, count + 1))
    pages = await asyncio.gather(*(node.node.history_page(channel, None, 1)
                                   for _ in range(count)))
    assert {page.position.offset for page in pages} == {count}


async def test_a_crowd_of_commands_waits_for_a_connection_on_a_cluster(
    redis_cluster: RedisCluster,
) -> None:
    async with nodes_on(redis_cluster.url, 1) as (node,):
        await crowd(node, channels_on_every_shard(redis_cluster, "feed:crowd")[0], 300)


async def test_a_master_that_hangs_holds_up_only_its_own_channels(
    redis_cluster_factory: ClusterFactory,
) -> None:
    """Commands to a master that stopped answering hold its slots, not the others'."""
    cluster = redis_cluster_factory()
    hung, healthy = channels_on_every_shard(cluster, "feed:hang")[:2]
    async with nodes_on(cluster.url, 1) as (node,):
        for name in (hung, healthy):
            await publish(node, name, 0)
        port = cluster.master_for(topic(hung)).port
        slots = node.node.broker._topology.slots_for(topic(hung))  # type: ignore[attr-defined]
        cluster.pause(port)
        stuck = [asyncio.create_task(node.node.publish(hung, msgspec.Raw(b"1")))
                 for _ in range(100)]
        try:
            await eventually(lambda: slots.full, what="the hung master's slots all held")
            started = time.monotonic()
            assert (await node.node.publish(healthy, msgspec.Raw(b"2"))) is not None
            assert time.monotonic() - started < 1.0
        finally:
            cluster.resume(port)
            await asyncio.gather(*stuck, return_exceptions=True)


async def when(condition: Callable[[], bool], within: float) -> float:
    """The time at which `condition` was found true (polled by `eventually`)."""
    await eventually(condition, within=within)
    return time.monotonic()


async def test_a_hung_master_is_noticed_within_a_second_and_only_its_channels_wait(
    redis_cluster_factory: ClusterFactory,
) -> None:
    """PROTOCOL §5-§6 per shard: a master that stops answering (SIGSTOP: no RST, nothing)
    is declared down within 1 s, its channels' publishes answer `unavailable` within 1 s,
    the other shards serve on and /readyz stays 200; once it answers again the shard is up
    within moments (resumed before `cluster-node-timeout` would fail it over)."""
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    hung, healthy = channels_on_every_shard(cluster, "feed:probe")[:2]
    async with nodes_on(cluster.url, 1) as (node,):
        broker = node.node.broker
        for name in (hung, healthy):
            await publish(node, name, 0)
        assert broker.health() == (3, 3)
        port = cluster.master_for(topic(hung)).port
        cluster.pause(port)
        paused_at = time.monotonic()
        try:
            noticed = asyncio.create_task(when(lambda: broker.health() == (2, 3), 2))
            started = time.monotonic()
            response = await node.http.post("/api/publish", json={"channel": hung, "data": 1})
            assert response.status_code == 503, response.text
            assert time.monotonic() - started <= 1.0
            detected = await noticed - paused_at
            assert detected <= 1.0, detected
            started = time.monotonic()
            response = await node.http.post("/api/publish", json={"channel": hung, "data": 2})
            assert response.status_code == 503, response.text
            assert time.monotonic() - started <= 0.2  # known down: refused at once
            assert (await publish(node, healthy, 3))["offset"] == 2
            assert (await node.http.get("/readyz")).status_code == 200
        finally:
            cluster.resume(port)
        resumed_at = time.monotonic()
        await eventually(lambda: broker.health() == (3, 3), within=5)
        resumed = time.monotonic() - resumed_at
        assert (await publish(node, hung, 4))["offset"] == 2
    print(f"hung master: down after {detected:.2f} s, up {resumed:.2f} s after it answered")
    assert resumed <= 1.0, resumed


async def test_a_crowd_of_commands_waits_for_a_connection_on_one_server(
    redis_url: str,
) -> None:
    async with nodes_on(redis_url, 1) as (node,):
        await crowd(node, "feed:crowd-one", 300)


async def test_a_crowd_of_commands_waits_for_a_connection_on_sentinel(
    redis_sentinel_factory: SentinelFactory,
) -> None:
    async with nodes_on(redis_sentinel_factory().url, 1) as (node,):
        await crowd(node, "feed:crowd", 300)


async def test_stats_channels_and_presence_are_cluster_wide(
    redis_cluster: RedisCluster,
) -> None:
    names = channels_on_every_shard(redis_cluster, "chat:wide")
    async with nodes_on(redis_cluster.url, 2) as (a, b), \
            connect(a.ws_url, token("wa")) as on_a, connect(b.ws_url, token("wb")) as on_b:
        for name in names:
            await on_a.subscribe(name)
            await on_b.subscribe(name)

        async def view() -> tuple[Any, Any, Any]:
            stats = (await b.http.get("/api/stats")).json()
            channels = (await b.http.get("/api/channels?prefix=chat:wide")).json()
            presence = (await a.http.get(f"/api/presence/{names[-1]}")).json()
            return stats, channels, presence

        # Another node's numbers are its last heartbeat's (every HUB_PRESENCE_TTL / 3 s).
        stats, channels, presence = await eventually(
            view, lambda v: v[0]["total"]["connections"] == 2, within=WAIT, what="both nodes"
        )
        assert stats["total"]["nodes"] == 2
        assert channels["channels"] == dict.fromkeys(names, 2)
        assert sorted(c["user"] for c in presence["clients"]) == ["wa", "wb"]


# faults


@pytest.mark.parametrize("full_coverage", [False, True], ids=["coverage-no", "coverage-yes"])
async def test_a_killed_master_costs_its_channels_an_outage_and_the_others_nothing(
    redis_cluster_factory: ClusterFactory, full_coverage: bool
) -> None:
    """With `cluster-require-full-coverage yes` the whole Cluster refuses commands until
    the failover is over, so every channel has an outage; nothing is lost either way."""
    cluster = redis_cluster_factory(require_full_coverage=full_coverage)
    doomed, spared = channels_on_every_shard(cluster, "feed:killed")[:2]
    victim = cluster.master_for(topic(doomed)).port
    assert cluster.master_for(topic(spared)).port != victim
    async with nodes_on(cluster.url, 2) as (a, b), \
            connect(a.ws_url, token("ka")) as on_a, connect(b.ws_url, token("kb")) as on_b:
        for client in (on_a, on_b):
            for name in (doomed, spared):
                await client.subscribe(name)
        streams = [Stream(b, doomed), Stream(a, spared)]
        async with streaming(streams):
            await eventually(lambda: all(len(s.accepted) >= 20 for s in streams))
            await asyncio.to_thread(cluster.kill, victim)
            killed_at = time.monotonic()
            await eventually(lambda: metric(a, "hub_broker_shards_up"), lambda n: n == 2,
                             what="the node to see the shard down")
            assert (await a.http.get("/readyz")).status_code == 200  # one shard is enough
            assert await metric(a, "hub_broker_up") == 0
            took = await asyncio.to_thread(cluster.wait_for_failover, victim)
            assert cluster.last_failover is not None
            promoted = killed_at + cluster.last_failover.promoted_after
            await eventually(lambda: metric(a, "hub_broker_shards_up"), lambda n: n == 3,
                             what="the promoted replica served")
            accepted_before = len(streams[0].accepted)
            await eventually(lambda: len(streams[0].accepted) > accepted_before + 10,
                             what="publishes to the failed-over shard accepted again")
            served_again = streams[0].times[accepted_before] - promoted
            assert served_again < 5, served_again
        if not full_coverage:  # the spared shard's stream never paused for the outage
            times = streams[1].times
            gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
            assert max(gaps) < 1.0, max(gaps)
        lasts = [(await publish(s.node, s.channel, "last"))["offset"] for s in streams]
        for client in (on_a, on_b):
            kept: dict[str, list[dict[str, Any]]] = {}
            for stream, last in zip(streams, lasts, strict=True):
                got = await received_through(client, stream.channel, last, kept)
                assert_exactly_once(got, stream, last)
    print(f"failover {took:.2f} s; served again {served_again:.2f} s after the promotion")


async def test_a_stale_replica_promoted_starts_a_new_epoch_and_reuses_no_offset(
    redis_cluster_factory: ClusterFactory,
) -> None:
    cluster = redis_cluster_factory()
    channel = channels_on_every_shard(cluster, "feed:stale")[0]
    master = cluster.master_for(topic(channel)).port
    (replica,) = cluster.replicas_of(master)
    async with nodes_on(cluster.url, 1) as (node,), \
            connect(node.ws_url, token("st")) as client:
        epoch = (await client.subscribe(channel))["epoch"]
        for n in (1, 2):
            await publish(node, channel, n)
        assert [(await client.expect("message"))["offset"] for _ in range(2)] == [1, 2]
        await asyncio.to_thread(cluster.pause_replication, replica.port)
        for n in (3, 4):  # on the master only: lost with it
            await publish(node, channel, n)
        assert [(await client.expect("message"))["offset"] for _ in range(2)] == [3, 4]
        await asyncio.to_thread(cluster.kill, master)
        await asyncio.to_thread(cluster.promote, replica.port, takeover=True)
        reset = await client.expect("reset", timeout=3 * WAIT)
        assert reset["epoch"] != epoch and reset["offset"] == 0
        after = await publish(node, channel, "after")
        assert after == {"offset": 1, "epoch": reset["epoch"]}
        got = await client.expect("message")
        assert (got["offset"], got["epoch"], got["data"]) == (1, reset["epoch"], "after")


async def test_min_replicas_refuses_what_no_replica_confirmed(
    redis_cluster_factory: ClusterFactory,
) -> None:
    cluster = redis_cluster_factory()
    channel = channels_on_every_shard(cluster, "feed:replicated")[0]
    master = cluster.master_for(topic(channel)).port
    (replica,) = cluster.replicas_of(master)
    async with nodes_on(cluster.url, 1, redis_min_replicas=1) as (node,), \
            connect(node.ws_url, token("mr")) as client:
        await client.subscribe(channel)
        assert (await publish(node, channel, 1))["offset"] == 1
        await asyncio.to_thread(cluster.pause, replica.port)
        try:
            response = await node.http.post("/api/publish",
                                            json={"channel": channel, "data": 2})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "unavailable"
            assert "replicas" in response.json()["error"]["message"]
        finally:
            await asyncio.to_thread(cluster.resume, replica.port)
        last = await eventually(
            lambda: node.http.post("/api/publish", json={"channel": channel, "data": 3}),
            lambda r: r.status_code == 200, what="confirmed again once the replica is back",
        )
        offset = last.json()["offset"]
        got = [await client.expect("message") for _ in range(offset)]
        assert [m["offset"] for m in got] == list(range(1, offset + 1))


async def test_a_node_started_before_its_cluster_becomes_ready_when_it_forms() -> None:
    cluster = RedisCluster()
    try:
        async with nodes_on(cluster.url, 1) as (node,):
            assert (await node.http.get("/readyz")).status_code == 503
            await asyncio.to_thread(cluster.start)
            await eventually(lambda: node.http.get("/readyz"), lambda r: r.status_code == 200,
                             within=15, what="ready once the cluster answers")
            async with connect(node.ws_url, token("late")) as client:
                name = channels_on_every_shard(cluster, "feed:late")[0]
                await client.subscribe(name)
                await publish(node, name, "hello")
                assert (await client.expect("message"))["data"] == "hello"
    finally:
        await asyncio.to_thread(cluster.cleanup)


async def test_a_sentinel_failover_is_followed_and_loses_nothing_answered(
    redis_sentinel_factory: SentinelFactory,
) -> None:
    sentinel = redis_sentinel_factory()
    async with nodes_on(sentinel.url, 2) as (a, b), \
            connect(a.ws_url, token("sa")) as on_a, connect(b.ws_url, token("sb")) as on_b:
        for client in (on_a, on_b):
            await client.subscribe("feed:sentinel")
        stream = Stream(b, "feed:sentinel")
        async with streaming([stream]):
            await eventually(lambda: len(stream.accepted) >= 20)
            old = sentinel.master()
            await asyncio.to_thread(sentinel.kill_master)
            took = await asyncio.to_thread(sentinel.wait_for_failover)
            assert sentinel.master() != old
            before = len(stream.accepted)
            await eventually(lambda: len(stream.accepted) > before + 10, within=15,
                             what="publishes accepted on the new master")
        last = (await publish(b, "feed:sentinel", "last"))["offset"]
        for client in (on_a, on_b):
            got = await received_through(client, "feed:sentinel", last)
            assert_exactly_once(got, stream, last)
    print(f"sentinel failover {took:.2f} s")

