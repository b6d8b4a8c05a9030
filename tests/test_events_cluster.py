"""Events of a cluster (PROTOCOL §14): three node processes on a private, durable
redis-server, and a receiver app in its own process that checks every signature and
records every event.

Exactly one occupied and one vacated per busy period of a channel wherever its subscribers
are, one online and one offline per span of a user; a node SIGKILLed with the last
subscriber of a channel is counted out by the others (vacated within the TTL and a few
seconds); a node SIGKILLed while it sends loses nothing (duplicates keep their id); a
receiver answering 500 delays but loses nothing; a Redis restart with its data kept loses
and invents nothing. The tests run in file order: the last one restarts Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from hub.redis.events import bucket_of
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer
from tests.support import (
    Client,
    NodeProcess,
    connect,
    eventually,
    make_settings,
    running_node,
    token,
)
from tests.test_cluster import node_env, stop_nodes, unique
from tests.test_events import EVENTS_SECRET, Receiver, names, receiver_process

TTL = 2  # HUB_PRESENCE_TTL: a killed node is counted out within TTL + 5 s (the contract)
CONFIG = """\
[namespaces.default]
subscribe = "any"
publish = "any"

[namespaces.chat]
subscribe = "any"
publish = "any"
presence = true
"""


class EventsCluster:
    def __init__(self, redis_server: RedisServer, receiver: Receiver, config: str) -> None:
        self.redis_server = redis_server
        self.receiver = receiver
        self.config = config
        self.nodes: list[NodeProcess] = []

    def env(self, node_id: str) -> dict[str, str]:
        return node_env(self.redis_server.url, node_id, self.config,
                        HUB_PRESENCE_TTL=str(TTL), HUB_EVENTS_URL=self.receiver.events_url,
                        HUB_EVENTS_SECRET=EVENTS_SECRET)

    @contextlib.asynccontextmanager
    async def redis(self) -> AsyncIterator[Any]:
        client = redis.asyncio.Redis.from_url(self.redis_server.url)
        try:
            yield client
        finally:
            await client.aclose()

    async def holders(self, kind: str, name: str) -> int:
        """How many nodes hold a channel (kind c) or a user (u), as Redis says."""
        key = f"hub:ev:{{ev{bucket_of(kind, name)}}}:s:{kind}:{name}"
        async with self.redis() as client:
            return int(await client.hlen(key))

    async def held_by(self, kind: str, name: str, count: int) -> None:
        await eventually(lambda: self.holders(kind, name), lambda n: n == count,
                         what=f"{count} holders of {kind}:{name}")

    async def owner(self, channel: str) -> str:
        async with self.redis() as client:
            found = await client.get(f"hub:ev:{{ev{bucket_of('c', channel)}}}:owner")
        return found.decode() if found else ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventsCluster]:
    server = RedisServer(durable=True)
    server.start(keep_data=False)
    config = Path(tmp_path_factory.mktemp("events")) / "hub.toml"
    config.write_text(CONFIG)
    try:
        with receiver_process() as receiver:
            running = EventsCluster(server, receiver, str(config))
            logs = Path(tmp_path_factory.mktemp("logs"))  # the nodes' logs, to read on failure
            running.nodes = [
                NodeProcess(running.env(f"ev-{n}"), stderr=logs / f"ev-{n}.log") for n in "abc"
            ]
            try:
                with ThreadPoolExecutor(3) as pool:
                    list(pool.map(NodeProcess.start, running.nodes))
            except Exception:
                for node in running.nodes:
                    node.kill()
                raise
            try:
                yield running
            finally:
                stop_nodes(running.nodes)
    finally:
        server.cleanup()


def unique_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events without repeats; a repeat must be the very same event (same id, same body)."""
    seen: dict[str, dict[str, Any]] = {}
    kept = []
    for event in events:
        first = seen.setdefault(event["id"], event)
        if first is event:
            kept.append(event)
        else:
            assert first == event, f"two events share an id: {first} {event}"
    return kept


def alternating(found: list[str], first: str, last: str) -> bool:
    return len(found) % 2 == 0 and found == [first, last] * (len(found) // 2)


async def settled(receiver: Receiver, what: str, **match: str) -> list[dict[str, Any]]:
    """The events of a subject once they end in their closing event."""
    kind = next(iter(match))
    closing = {"channel": "channel_vacated", "user": "user_offline"}[kind]

    def done(found: list[dict[str, Any]]) -> bool:
        own = [name for name in names(unique_events(found)) if name.startswith(kind)]
        return bool(own) and own[-1] == closing

    return await eventually(lambda: receiver.events(**match), done, within=20, what=what)


async def test_one_occupied_and_one_vacated_per_busy_period(cluster: EventsCluster) -> None:
    """Subscribers come and go on different nodes, overlapping: one busy period, one pair;
    a second period, a second pair."""
    channel = unique("chat:ev-busy")
    a, b, c = cluster.nodes
    for _ in range(2):
        async with connect(a.ws_url, token(unique("u"))) as one:
            await one.subscribe(channel)
            await cluster.held_by("c", channel, 1)
            async with connect(b.ws_url, token(unique("u"))) as two:
                await two.subscribe(channel)
                await cluster.held_by("c", channel, 2)
                await one.close()
                await cluster.held_by("c", channel, 1)
                async with connect(c.ws_url, token(unique("u"))) as three:
                    await three.subscribe(channel)
                    await cluster.held_by("c", channel, 2)
                    await two.close()
                    await cluster.held_by("c", channel, 1)
        await cluster.held_by("c", channel, 0)
    found = await eventually(
        lambda: cluster.receiver.events(channel=channel, name="channel_vacated"),
        lambda found: len(found) == 2, within=10, what="two vacated")
    assert found
    events = unique_events(await cluster.receiver.events(channel=channel))
    pairs = [e["name"] for e in events if e["name"].startswith("channel_")]
    assert pairs == ["channel_occupied", "channel_vacated"] * 2
    assert (await cluster.receiver.recorded())["bad_signatures"] == 0


async def test_random_joins_and_leaves_across_nodes(cluster: EventsCluster) -> None:
    """Random subscribes and unsubscribes of users with connections on several nodes:
    per channel occupied and vacated alternate, starting with occupied and ending with
    vacated; per user online and offline likewise; members added and removed likewise."""
    rng = random.Random(19)
    channels = [unique(f"chat:ev-rand{i}") for i in range(4)]
    users = [unique("ev-user") for _ in range(4)]
    async with contextlib.AsyncExitStack() as stack:
        clients: list[tuple[str, Client]] = []
        for index in range(8):
            user = users[index % len(users)]
            node = cluster.nodes[rng.randrange(3)]
            clients.append((user, await stack.enter_async_context(
                connect(node.ws_url, token(user)))))
        joined: set[tuple[int, str]] = set()
        for _ in range(80):
            index, channel = rng.randrange(len(clients)), rng.choice(channels)
            client = clients[index][1]
            if (index, channel) in joined:
                reply = await client.request({"type": "unsubscribe", "channel": channel})
                assert reply["type"] == "unsubscribed", reply
                joined.discard((index, channel))
            else:
                await client.subscribe(channel)
                joined.add((index, channel))
            if rng.random() < 0.1:
                await asyncio.sleep(0.15)  # let some periods be seen apart
    receiver = cluster.receiver
    for channel in channels:
        found = unique_events(await settled(receiver, f"{channel} vacated", channel=channel))
        assert alternating([e["name"] for e in found if e["name"].startswith("channel_")],
                           "channel_occupied", "channel_vacated"), names(found)
        for user in users:
            mine = [e["name"] for e in found if e.get("user") == user]
            assert alternating(mine, "member_added", "member_removed"), (user, mine)
    for user in users:
        found = unique_events(await settled(receiver, f"{user} offline", user=user))
        spans = [e["name"] for e in found if e["name"].startswith("user_")]
        assert spans == ["user_online", "user_offline"], spans  # connected throughout


async def test_killed_node_is_counted_out(cluster: EventsCluster) -> None:
    """SIGKILL of the node with a channel's last subscriber: the others count it out and
    send what it owed (vacated, member removed, offline) within TTL + 5 s."""
    channel, user = unique("chat:ev-kill"), unique("ev-killed")
    doomed = NodeProcess(cluster.env(unique("ev-doomed"))).start()
    try:
        async with connect(doomed.ws_url, token(user)) as client:
            await client.subscribe(channel)
            await eventually(lambda: cluster.receiver.events(channel=channel),
                             lambda found: len(found) == 2, what="occupied, added")
            doomed.kill()
            killed_at = time.monotonic()
            found = await settled(cluster.receiver, "vacated after the kill", channel=channel)
            delay = time.monotonic() - killed_at
            await settled(cluster.receiver, "offline after the kill", user=user)
    finally:
        doomed.kill()
    assert names(unique_events(found)) == [
        "channel_occupied", "member_added", "member_removed", "channel_vacated"]
    assert delay < TTL + 5, delay
    print(f"vacated {delay:.2f} s after the SIGKILL (TTL {TTL} s)")


async def test_frozen_node_counted_out_tells_again(cluster: EventsCluster) -> None:
    """A node frozen (SIGSTOP) past the TTL is counted out (vacated); when it runs again
    it finds itself unknown and tells Redis what it holds (occupied again): the events
    follow what the cluster knew, and still pair up."""
    channel = unique("chat:ev-frozen")
    frozen = NodeProcess(cluster.env(unique("ev-frozen"))).start()
    try:
        async with connect(frozen.ws_url, token(unique("u"))) as client:
            await client.subscribe(channel)
            await cluster.held_by("c", channel, 1)
            frozen.signal(signal.SIGSTOP)
            try:
                await cluster.held_by("c", channel, 0)
            finally:
                frozen.signal(signal.SIGCONT)
            await cluster.held_by("c", channel, 1)
            await client.request({"type": "unsubscribe", "channel": channel})
        found = await eventually(
            lambda: cluster.receiver.events(channel=channel, name="channel_vacated"),
            lambda found: len(found) == 2, within=10, what="two vacated")
        assert found
        events = unique_events(await cluster.receiver.events(channel=channel))
        assert [e["name"] for e in events if e["name"].startswith("channel_")] == [
            "channel_occupied", "channel_vacated"] * 2
    finally:
        frozen.kill()


async def test_sender_killed_mid_send_loses_nothing(cluster: EventsCluster) -> None:
    """The node sending a channel's bucket dies while the receiver holds its POST: another
    node claims what it had read and sends it again, with the same ids."""
    channel = unique("chat:ev-mid")
    a = cluster.nodes[0]
    receiver = cluster.receiver
    await receiver.mode(delay=30)
    try:
        before = (await receiver.recorded())["attempts"]
        async with connect(a.ws_url, token(unique("u"))) as client:
            for _ in range(3):
                await client.subscribe(channel)
                await cluster.held_by("c", channel, 1)
                await client.request({"type": "unsubscribe", "channel": channel})
                await cluster.held_by("c", channel, 0)
        # A node killed by an earlier test may hold the bucket's lease for up to a TTL more;
        # its next owner is one of the three.
        by_id = {n.env["HUB_NODE_ID"]: n for n in cluster.nodes}
        owner = await eventually(lambda: cluster.owner(channel), lambda o: o in by_id,
                                 within=TTL + 5, what="a live owner of the channel's bucket")
        await eventually(receiver.recorded, lambda r: r["attempts"] > before,
                         what="a POST held by the receiver")
        victim = by_id[owner]
        victim.kill()
        killed_at = time.monotonic()
        await receiver.mode(delay=0)
        found = await eventually(
            lambda: receiver.events(channel=channel),
            lambda found: len(unique_events(found)) == 12, within=TTL + 10,
            what="every event, resent by another node")
        print(f"resent {time.monotonic() - killed_at:.2f} s after the sender's SIGKILL")
        assert names(unique_events(found)) == [
            "channel_occupied", "member_added", "member_removed", "channel_vacated"] * 3
        victim.start()  # a node again for the tests after
    finally:
        await receiver.mode(delay=0)


async def test_receiver_failing_for_a_while(cluster: EventsCluster) -> None:
    """500s for a while, then 200: every event arrives, in order per channel."""
    receiver = cluster.receiver
    channels = [unique(f"chat:ev-500-{i}") for i in range(3)]
    await receiver.mode(status=500)
    try:
        before = (await receiver.recorded())["attempts"]
        for node, channel in zip(cluster.nodes, channels, strict=True):
            async with connect(node.ws_url, token(unique("u"))) as client:
                await client.subscribe(channel)
                await cluster.held_by("c", channel, 1)
        await eventually(receiver.recorded, lambda r: r["attempts"] >= before + 3,
                         what="three refused POSTs")
        await receiver.mode(status=200)
        answering = time.monotonic()
        for channel in channels:
            found = unique_events(await settled(receiver, channel, channel=channel))
        print(f"delivered {time.monotonic() - answering:.2f} s after the receiver answered")
        for channel in channels:
            found = unique_events(await settled(receiver, channel, channel=channel))
            assert names(found) == [
                "channel_occupied", "member_added", "member_removed", "channel_vacated"]
    finally:
        await receiver.mode(status=200)


async def test_redis_restart_keeps_everything(cluster: EventsCluster) -> None:
    """Redis stops and comes back with its data (AOF): what was recorded but unsent goes
    out, a channel still busy is not vacated by a node counted out by mistake, and its
    vacated comes once it really is."""
    receiver = cluster.receiver
    busy, recorded = unique("chat:ev-rr"), unique("chat:ev-rr2")
    a, b, _ = cluster.nodes
    async with connect(a.ws_url, token(unique("u"))) as client:
        await client.subscribe(busy)
        await eventually(lambda: receiver.events(channel=busy), lambda f: len(f) == 2,
                         what="busy occupied")
        await receiver.mode(status=500)
        async with connect(b.ws_url, token(unique("u"))) as other:
            await other.subscribe(recorded)
            await cluster.held_by("c", recorded, 1)
        await cluster.held_by("c", recorded, 0)
        cluster.redis_server.stop()
        cluster.redis_server.start(keep_data=True)
        back = time.monotonic()
        await receiver.mode(status=200)
        await settled(receiver, "events recorded before the restart", channel=recorded)
        print(f"delivered {time.monotonic() - back:.2f} s after Redis was back")
        # Every node beats again; none is counted out for the outage (bounded wait).
        await asyncio.sleep(2 * TTL + 1)
        assert names(unique_events(await receiver.events(channel=busy))) == [
            "channel_occupied", "member_added"]
    found = unique_events(await settled(receiver, "vacated at last", channel=busy))
    assert names(found) == [
        "channel_occupied", "member_added", "member_removed", "channel_vacated"]
    assert names(unique_events(await receiver.events(channel=recorded))) == [
        "channel_occupied", "member_added", "member_removed", "channel_vacated"]


async def test_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    """On a Redis Cluster each bucket's scripts run on its shard: two nodes, channels in
    every bucket, one pair of events per channel."""
    channels = [f"chat:ev-shard{index}" for index in range(40)]
    assert {bucket_of("c", channel) for channel in channels} == set(range(16))
    with receiver_process() as receiver:
        settings = [
            make_settings(redis_url=redis_cluster.url, node_id=f"evc-{n}", presence_ttl=TTL,
                          events_url=receiver.events_url, events_secret=EVENTS_SECRET,
                          namespaces={"chat": {"subscribe": "any", "presence": True}})
            for n in "ab"
        ]
        async with running_node(settings[0]) as a:
            async with running_node(settings[1]) as b, \
                    connect(a.ws_url, token("evc-1")) as one, \
                    connect(b.ws_url, token("evc-2")) as two:
                for channel in channels:
                    await one.subscribe(channel)
                    await two.subscribe(channel)
                for channel in channels:
                    await one.request({"type": "unsubscribe", "channel": channel})
            for channel in channels:
                found = await settled(receiver, channel, channel=channel)
                assert [e["name"] for e in unique_events(found)
                        if e["name"].startswith("channel_")] == [
                    "channel_occupied", "channel_vacated"], channel
        assert (await receiver.recorded())["bad_signatures"] == 0
