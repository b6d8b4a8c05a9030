"""RedisPresence: channel members and node heartbeats in Redis with TTLs. Logic against
fakeredis; expiry of a node that stops heartbeating against a private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import fakeredis
import msgspec
import pytest

from hub.errors import BrokerUnavailable
from hub.presence import NodeSnapshot, NodeStats
from hub.protocol import ClientInfo
from hub.redis.presence import RedisPresence
from hub.redis.topology import create_server_client
from tests.redis_server import free_port
from tests.support import eventually


def snapshot(
    node: str, channels: dict[str, int], users: set[str], updated: int = 1
) -> NodeSnapshot:
    stats = NodeStats(
        node=node,
        connections=len(users),
        users=len(users),
        subscriptions=sum(channels.values()),
        channels=len(channels),
        started=0,
        updated=updated,
    )
    return NodeSnapshot(stats, channels, frozenset(users))


def member(client: str, user: str, info: bytes | None = None) -> ClientInfo:
    return ClientInfo(client, user, None, msgspec.Raw(info) if info else None)


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    pytest.importorskip("lupa", reason="fakeredis runs Lua scripts only with lupa installed")
    return fakeredis.FakeServer()


@contextlib.asynccontextmanager
async def presence_on(
    server: fakeredis.FakeServer, node: str, ttl: float = 30
) -> AsyncIterator[RedisPresence]:
    presence = RedisPresence(fakeredis.FakeAsyncRedis(server=server), node, ttl)
    await presence.start()
    try:
        yield presence
    finally:
        await presence.close()


async def test_members_are_added_listed_and_removed(fake_server: fakeredis.FakeServer) -> None:
    async with presence_on(fake_server, "n1") as n1, presence_on(fake_server, "n2") as n2:
        await n1.add("room", member("c1", "alice", b'{"name":"Alice"}'))
        await n2.add("room", ClientInfo("c2", "bob", "n2"))
        await n2.add("other", member("c3", "carol"))
        assert await n2.members("nobody") == []
        listed = sorted(await n2.members("room"), key=lambda m: m.client)
        await n1.remove("room", "c1")
        await n1.remove("room", "c1")  # idempotent
        after = await n1.members("room")

    assert [(m.client, m.user, m.node) for m in listed] == [
        ("c1", "alice", "n1"),
        ("c2", "bob", "n2"),
    ]
    assert listed[0].info is not None and bytes(listed[0].info) == b'{"name":"Alice"}'
    assert [m.client for m in after] == ["c2"]


async def test_cluster_reads_merge_live_nodes_with_the_local_snapshot(
    fake_server: fakeredis.FakeServer,
) -> None:
    async with presence_on(fake_server, "n1") as n1, presence_on(fake_server, "n2") as n2:
        await n2.heartbeat(snapshot("n2", {"chat:a": 2, "feed:x": 1, "gone": 0}, {"bob", "ann"}),
                           {})
        await n1.heartbeat(snapshot("n1", {"chat:a": 9}, {"old"}, updated=1), {})
        local = snapshot("n1", {"chat:a": 1, "chat:b": 3}, {"ann", "cy"}, updated=2)
        nodes = await n1.nodes(local)
        users = await n1.distinct_users(local)
        everything = await n1.channels(local)
        chat = await n1.channels(local, "chat:")

    n2_stats = snapshot("n2", {"chat:a": 2, "feed:x": 1, "gone": 0}, {"bob", "ann"}).stats
    assert nodes == [local.stats, n2_stats]  # this node as `local` says, not its last beat
    assert users == 3  # ann, cy (local) and bob
    assert everything == {"chat:a": 3, "chat:b": 3, "feed:x": 1}
    assert chat == {"chat:a": 3, "chat:b": 3}


async def test_leave_removes_the_node_and_its_members_at_once(
    fake_server: fakeredis.FakeServer,
) -> None:
    async with presence_on(fake_server, "n1") as n1, presence_on(fake_server, "n2") as n2:
        await n1.heartbeat(snapshot("n1", {"room": 2}, {"alice"}), {})
        await n1.add("room", member("c1", "alice"))
        await n1.add("lobby", member("c2", "alice"))
        await n2.add("room", member("c3", "bob"))
        await n1.leave([("room", "c1"), ("lobby", "c2")])
        nodes = await n2.nodes(snapshot("n2", {}, set()))
        room = await n2.members("room")
        lobby = await n2.members("lobby")
        await n1.heartbeat(snapshot("n1", {}, set()), {})  # left: its members stay gone
        room_after_beat = await n2.members("room")

    assert [n.node for n in nodes] == ["n2"]
    assert [m.client for m in room] == ["c3"] == [m.client for m in room_after_beat]
    assert lobby == []


async def test_the_heartbeat_writes_everything_again_after_redis_lost_it(
    fake_server: fakeredis.FakeServer,
) -> None:
    raw = fakeredis.FakeAsyncRedis(server=fake_server)
    members = {  # more than one script call's batch
        "big": [member(f"c{n}", f"u{n}") for n in range(1_200)],
        "room": [member("c1", "alice")],
    }
    async with presence_on(fake_server, "n1") as n1, presence_on(fake_server, "n2") as n2:
        await n1.heartbeat(snapshot("n1", {"room": 1}, {"alice"}), members)
        await raw.flushall()
        await raw.script_flush()
        assert await n2.members("room") == []

        await n1.heartbeat(snapshot("n1", {"room": 1}, {"alice"}), members)
        assert [m.client for m in await n2.members("room")] == ["c1"]
        assert len(await n2.members("big")) == 1_200
        nodes = await n2.nodes(snapshot("n2", {}, set()))
        assert [n.node for n in nodes] == ["n1", "n2"]
        assert 29_000 < await raw.pttl("hub:p:{room}") <= 30_000


async def test_a_heartbeat_forgets_the_departures_it_is_given(
    fake_server: fakeredis.FakeServer,
) -> None:
    """What Redis holds for a node becomes what the node has: a member it could not remove
    while Redis was away is removed by the heartbeat it is handed to."""
    async with presence_on(fake_server, "n1") as n1, presence_on(fake_server, "n2") as n2:
        await n1.add("room", member("c1", "alice"))
        await n1.add("room", member("c2", "bob"))
        await n2.add("room", member("c3", "carol"))
        await n1.heartbeat(snapshot("n1", {"room": 1}, {"bob"}), {"room": [member("c2", "bob")]},
                           [("room", "c1")])
        assert sorted(m.client for m in await n2.members("room")) == ["c2", "c3"]


async def test_an_unreachable_redis_fails_fast_but_leave_does_not_raise() -> None:
    client = create_server_client(f"redis://127.0.0.1:{free_port()}/0")
    presence = RedisPresence(client, "n1", 30)
    started = time.monotonic()
    await presence.start()  # not an error: the heartbeat retries
    with pytest.raises(BrokerUnavailable):
        await presence.members("room")
    with pytest.raises(BrokerUnavailable):
        await presence.add("room", member("c1", "alice"))
    with pytest.raises(BrokerUnavailable):
        await presence.nodes(snapshot("n1", {}, set()))
    await presence.leave([("room", "c1")])
    await presence.close()
    assert time.monotonic() - started < 5


async def test_a_node_that_stops_heartbeating_drops_out_within_the_ttl(redis_url: str) -> None:
    ttl = 2.0
    dying = RedisPresence(create_server_client(redis_url), "dying", ttl)
    alive = RedisPresence(create_server_client(redis_url), "alive", ttl)
    observer = RedisPresence(create_server_client(redis_url), "observer", ttl)
    nobody = snapshot("observer", {}, set())

    async def beat_forever() -> None:
        while True:
            # One beat that fails on a loaded machine is retried, as the node's own loop
            # does; a task that died of it took "alive" out of the cluster too.
            with contextlib.suppress(BrokerUnavailable):
                await alive.heartbeat(snapshot("alive", {"room": 1}, {"bob"}),
                                      {"room": [member("c2", "bob")]})
            await asyncio.sleep(ttl / 3)

    beating = asyncio.create_task(beat_forever())
    # Every wait bounded, the whole test too: a hang fails here with where it was.
    try:
        async with asyncio.timeout(30):
            await dying.heartbeat(snapshot("dying", {"room": 1}, {"alice"}), {})
            last_beat = time.monotonic()
            await dying.add("room", member("c1", "alice"))
            last_write = time.monotonic()  # c1's own TTL runs from here, a little after
            await alive.add("room", member("c2", "bob"))
            assert [n.node for n in await observer.nodes(nobody)] == ["alive", "dying", "observer"]
            assert await observer.channels(nobody) == {"room": 2}

            async def dropped_out() -> bool:
                return [n.node for n in await observer.nodes(nobody)] == ["alive", "observer"]

            await eventually(dropped_out, within=ttl + 3)
            assert time.monotonic() - last_beat < ttl + 1

            async def only_the_living() -> bool:
                return [m.client for m in await observer.members("room")] == ["c2"]

            # The node's entry lapses a TTL after its heartbeat; c1's a TTL after its own
            # write, which came later (seen once: the node gone, c1 still there for a moment).
            await eventually(only_the_living, within=ttl + 3)
            assert time.monotonic() - last_write < ttl + 1
            assert await observer.channels(nobody) == {"room": 1}
            assert await observer.distinct_users(nobody) == 1
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(beating, 5)
        for presence in (dying, alive, observer):
            await asyncio.wait_for(presence.close(), 5)
