"""The local Redis Cluster and Sentinel helpers (tests/redis_cluster.py), checked with
redis-py's own cluster and sentinel clients: keys and shard channels land where the
helpers say, failovers happen within seconds, and the stale-replica recipe really loses
the writes it is meant to lose. Failover times are printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel

from tests.redis_cluster import (
    HOST,
    RedisCluster,
    RedisSentinel,
    iter_hash_tags,
    slot_of,
    until,
)
from tests.support import eventually

pytestmark = pytest.mark.timeout(90)

FAILOVER_BOUND = 10.0  # seconds; measured ~2.3-2.8 s with cluster-node-timeout 1000 ms


async def cluster_client(cluster: RedisCluster) -> AsyncRedisCluster:
    """Initialized: ClusterPubSub.ssubscribe() on a client that has not loaded its slot
    map yet fails with SlotNotCoveredError (redis-py 8.1 does not initialize it lazily
    there, unlike for commands)."""
    client = AsyncRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.seeds],
        decode_responses=True,
        **cluster.client_kwargs(),
    )
    await client.initialize()
    return client


def tag_per_master(cluster: RedisCluster) -> dict[int, str]:
    """master port -> a hash tag whose slot it owns."""
    masters = {node.port for node in cluster.masters()}
    tags: dict[int, str] = {}
    for tag in iter_hash_tags():
        tags.setdefault(cluster.master_for(tag).port, tag)
        if set(tags) == masters:
            return tags
    raise AssertionError("unreachable")


async def succeeds(what: str, attempt: Callable[[], object], timeout: float = 10.0) -> None:
    """Await `attempt()` until it stops raising Redis errors (bounded)."""
    await eventually(attempt, lambda _: True, timeout, what,
                     ignoring=(redis.RedisError, OSError), every=0.05)


# -- the shared cluster -------------------------------------------------------------------


async def test_hash_tags_land_on_different_masters(redis_cluster: RedisCluster) -> None:
    tags = tag_per_master(redis_cluster)
    assert len(tags) == 3
    assert len(redis_cluster.replicas()) == 3
    assert redis_cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert redis_cluster.url.count(",") == 5
    client = await cluster_client(redis_cluster)
    try:
        for tag in tags.values():
            await client.set(f"key{tag}", tag)
        for port, tag in tags.items():
            # each master holds exactly its own key; CLUSTER KEYSLOT agrees with slot_of
            assert redis_cluster.client(port).dbsize() == 1
            assert redis_cluster.client(port).get(f"key{tag}") == tag
            assert redis_cluster.command(port, "CLUSTER", "KEYSLOT", f"key{tag}") == slot_of(tag)
            assert await client.get(f"key{tag}") == tag
    finally:
        await client.aclose()


async def test_sharded_pubsub_through_redis_py(redis_cluster: RedisCluster) -> None:
    tags = tag_per_master(redis_cluster)
    channels = {port: f"chan{tag}" for port, tag in tags.items()}
    client = await cluster_client(redis_cluster)
    pubsub = client.pubsub()
    try:
        # ClusterPubSub.ssubscribe keeps one PubSub (one connection) per owning node
        await pubsub.ssubscribe(*channels.values())
        assert set(pubsub.node_pubsub_mapping) == {f"{HOST}:{port}" for port in channels}
        for port, channel in channels.items():
            # PUBSUB SHARDCHANNELS on the owning master, and only there, shows the channel
            for other in channels:
                listed = redis_cluster.command(other, "PUBSUB", "SHARDCHANNELS")
                assert (channel in listed) == (other == port), (port, other, listed)
            assert await client.spublish(channel, f"to {port}") == 1
        received: dict[str, str] = {}

        async def all_received() -> bool:
            message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                received[message["channel"]] = message["data"]
            return len(received) == len(channels)

        await eventually(all_received, within=5.0, what="a message from each shard", every=0)
        assert received == {channel: f"to {port}" for port, channel in channels.items()}
        # reading one shard only: get_sharded_message(target_node=...)
        port, channel = next(iter(channels.items()))
        node = client.get_node(host=HOST, port=port)
        assert node is not None
        await client.spublish(channel, "again")
        message = await eventually(
            lambda: pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=0.1, target_node=node
            ),
            lambda got: got is not None, 5.0, "a message from one shard", every=0,
        )
        assert message is not None and message["data"] == "again"
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_sharded_pubsub_on_a_plain_node_connection(redis_cluster: RedisCluster) -> None:
    """A plain (non-cluster) connection can SSUBSCRIBE on the owning master or one of its
    replicas; any other master answers MOVED."""
    tag = "{plain}"
    owner = redis_cluster.master_for(tag).port
    replica = redis_cluster.replicas_of(owner)[0].port
    other = next(node.port for node in redis_cluster.masters() if node.port != owner)
    for port in (owner, replica):
        channel = f"chan{tag}{port}"  # one channel per subscriber: no stray earlier message
        client = redis.asyncio.Redis(host=HOST, port=port, decode_responses=True)
        pubsub = client.pubsub()
        try:
            await pubsub.ssubscribe(channel)
            confirm = await pubsub.get_message(timeout=2.0)
            assert confirm is not None and confirm["type"] == "ssubscribe"
            redis_cluster.command(owner, "SPUBLISH", channel, f"via {port}")
            message = await pubsub.get_message(timeout=2.0)
            assert message is not None and message["type"] == "smessage"
            assert message["data"] == f"via {port}"
        finally:
            await pubsub.aclose()
            await client.aclose()
    client = redis.asyncio.Redis(host=HOST, port=other, decode_responses=True)
    pubsub = client.pubsub()
    try:
        await pubsub.ssubscribe(f"chan{tag}")
        with pytest.raises(redis.exceptions.MovedError):
            await pubsub.get_message(timeout=2.0)
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_scripts_route_to_the_shard_of_their_keys(redis_cluster: RedisCluster) -> None:
    tags = tag_per_master(redis_cluster)
    client = await cluster_client(redis_cluster)
    script = "return redis.call('INCR', KEYS[1])"
    try:
        sha = await client.script_load(script)  # loaded on every master
        for tag in tags.values():
            assert await client.evalsha(sha, 1, f"n{tag}") == 1
        for port, tag in tags.items():
            assert redis_cluster.client(port).get(f"n{tag}") == "1"
        # one pipeline, a script call per shard: execute_command("EVALSHA", ...) and eval()
        # work (ClusterPipeline.evalsha() itself is blocked in redis-py 8.1)
        pipe = client.pipeline()
        for tag in tags.values():
            pipe.execute_command("EVALSHA", sha, 1, f"n{tag}")
            pipe.eval(script, 1, f"n{tag}")
        assert await pipe.execute() == [2, 3] * len(tags)
    finally:
        await client.aclose()


# -- clusters of their own ----------------------------------------------------------------


async def test_cluster_with_tls_and_an_acl_user(
    redis_cluster_factory: Callable[..., RedisCluster],
) -> None:
    cluster = redis_cluster_factory(replicas=0, tls=True, user="hub", password="p@ss w")
    assert cluster.url.startswith("rediss+cluster://hub:p%40ss%20w@127.0.0.1:")
    assert cluster.url.endswith(f"?ssl_ca_certs={cluster.ca}")
    client = await cluster_client(cluster)  # username, password, ssl, ssl_ca_certs
    try:
        for tag in tag_per_master(cluster).values():
            await client.set(f"k{tag}", "v")
            assert await client.get(f"k{tag}") == "v"
        assert await client.acl_whoami() == "hub"
    finally:
        await client.aclose()
    anonymous = AsyncRedisCluster(
        host=HOST, port=cluster.ports[0], ssl=True, ssl_ca_certs=str(cluster.ca)
    )
    # the default user needs the password too; redis-py reports it as "cannot be connected"
    with pytest.raises(redis.exceptions.RedisClusterException, match="cannot be connected"):
        await anonymous.initialize()
    await anonymous.aclose()


async def test_killed_master_is_replaced_within_seconds(
    redis_cluster_factory: Callable[..., RedisCluster],
) -> None:
    cluster = redis_cluster_factory()
    tags = tag_per_master(cluster)
    (victim, tag), (_, other_tag) = list(tags.items())[:2]
    replica = cluster.replicas_of(victim)[0].port
    client = await cluster_client(cluster)
    pubsub = client.pubsub()
    stop = asyncio.Event()
    failures: dict[str, list[str]] = {tag: [], other_tag: []}
    written = {tag: 0, other_tag: 0}

    async def write(key_tag: str) -> None:
        while not stop.is_set():
            try:
                await client.set(f"w{key_tag}", "x")
            except redis.RedisError as error:
                failures[key_tag].append(type(error).__name__)
            else:
                written[key_tag] += 1
            await asyncio.sleep(0.02)

    try:
        await pubsub.ssubscribe(f"chan{tag}")
        writers = [asyncio.create_task(write(t)) for t in (tag, other_tag)]
        await eventually(lambda: all(written.values()), what="each writer writing")
        cluster.kill(victim)
        seconds = await asyncio.to_thread(cluster.wait_for_failover, victim)
        failover = cluster.last_failover
        assert failover is not None and failover.new_master == replica
        print(
            f"\ncluster failover: killed master -> replica promoted "
            f"{failover.promoted_after:.2f} s -> every node agrees, cluster_state ok "
            f"{failover.ok_after:.2f} s"
        )
        assert seconds < FAILOVER_BOUND
        # The writers stop first: one still retrying its "x" could land after the "y".
        stop.set()
        await asyncio.gather(*writers)
        await succeeds("write to the failed-over shard", lambda: client.set(f"w{tag}", "y"))
        # cluster-require-full-coverage no: the other shards never noticed
        assert failures[other_tag] == []
        # The failed shard's writes may fail meanwhile, only in these ways. Whether any does
        # depends on redis-py's own retries outlasting the failover (redis-py 8 retries a
        # cluster command with backoff; on a loaded machine every write was retried through
        # it and none failed), so none failing is no fault.
        retried = {"ConnectionError", "TimeoutError", "ClusterDownError", "SlotNotCoveredError"}
        assert set(failures[tag]) <= retried, failures[tag]
        assert cluster.master_for(tag).port == replica
        assert {n.port for n in cluster.masters()} == set(tags) - {victim} | {replica}

        # redis-py's ClusterPubSub moves the shard subscription to the new owner once its
        # slot map has refreshed (the writes above refreshed it), in a background task
        async def published_and_received() -> Any:
            await client.spublish(f"chan{tag}", "after")
            with contextlib.suppress(redis.ConnectionError):
                return await pubsub.get_sharded_message(
                    ignore_subscribe_messages=True, timeout=0.2
                )
            return None

        received = await eventually(published_and_received, lambda got: got is not None, 5.0,
                                    "a message from the new owner", every=0)
        assert received is not None and received["data"] == "after"
        assert cluster.command(replica, "PUBSUB", "SHARDCHANNELS") == [f"chan{tag}"]

        # the old master comes back (empty) as a replica of the promoted one
        await asyncio.to_thread(cluster.start, victim)
        nodes = cluster.nodes()
        assert nodes[victim].role == "replica" and nodes[victim].master_port == replica
        assert await client.get(f"w{tag}") == "y"
        await asyncio.to_thread(cluster.wait_healthy)
    finally:
        stop.set()
        await pubsub.aclose()
        await client.aclose()


async def test_promoted_stale_replica_lacks_the_last_writes(
    redis_cluster_factory: Callable[..., RedisCluster],
) -> None:
    cluster = redis_cluster_factory()
    tag = "{stale}"
    master = cluster.master_for(tag).port
    replica = cluster.replicas_of(master)[0].port
    direct = cluster.client(master)
    direct.set(f"before{tag}", "1")
    assert direct.wait(1, 2000) == 1  # replicated

    assert cluster.pause_replication(replica) == master
    direct.set(f"after{tag}", "1")  # answered by the master ...
    assert direct.wait(1, 100) == 0  # ... and held by no replica
    cluster.kill(master)
    seconds = await asyncio.to_thread(cluster.promote, replica, takeover=True)
    print(f"\nstale replica promoted with CLUSTER FAILOVER TAKEOVER in {seconds:.2f} s")
    assert cluster.master_for(tag).port == replica

    client = await cluster_client(cluster)
    try:
        assert await client.get(f"before{tag}") == "1"
        assert await client.get(f"after{tag}") is None  # the last write is lost
        await client.set(f"new{tag}", "1")
        # the old master rejoins as a replica of the promoted one: the loss is final
        await asyncio.to_thread(cluster.start, master)
        assert cluster.nodes()[master].master_port == replica
        assert await client.get(f"after{tag}") is None
        assert cluster.client(replica).wait(1, 2000) == 1
    finally:
        await client.aclose()


async def test_paused_master_fails_over_with_full_coverage(
    redis_cluster_factory: Callable[..., RedisCluster],
) -> None:
    """SIGSTOP (a half-open master) with cluster-require-full-coverage yes: the whole
    cluster reports cluster_state:fail until the replica is promoted; resumed, the old
    master rejoins as a replica."""
    cluster = redis_cluster_factory(require_full_coverage=True)
    victim = cluster.masters()[0].port
    replica = cluster.replicas_of(victim)[0].port
    witness = next(n.port for n in cluster.masters() if n.port != victim)
    cluster.pause(victim)
    states: set[str] = set()

    def down_then_promoted() -> bool:
        states.add(cluster.cluster_info(witness)["cluster_state"])
        return cluster.nodes()[replica].role == "master"

    await asyncio.to_thread(until, down_then_promoted, FAILOVER_BOUND, "promotion")
    seconds = await asyncio.to_thread(cluster.wait_for_failover, victim)
    print(f"\ncluster failover of a paused master (full coverage): {seconds:.2f} s")
    assert "fail" in states
    await asyncio.to_thread(cluster.start, victim)  # SIGCONT; it rejoins as a replica
    assert cluster.nodes()[victim].master_port == replica


async def test_sentinel_failover_is_followed_by_master_for(
    redis_sentinel_factory: Callable[..., RedisSentinel],
) -> None:
    deployment = redis_sentinel_factory(password="data-secret", sentinel_password="s-secret")
    hosts = ",".join(f"{HOST}:{port}" for port in deployment.sentinel_ports)
    assert deployment.url == (
        f"redis+sentinel://:data-secret@{hosts}/mymaster?sentinel_password=s-secret"
    )
    sentinel = Sentinel(
        deployment.sentinels,
        sentinel_kwargs={"password": "s-secret", "socket_timeout": 1.0},
        password="data-secret",
        socket_timeout=1.0,
        decode_responses=True,
    )
    master = sentinel.master_for("mymaster")
    try:
        old = deployment.master()
        assert await sentinel.discover_master("mymaster") == (HOST, old)
        await master.set("k", "before")
        assert deployment.client(old).wait(1, 2000) == 1
        assert deployment.kill_master() == old
        seconds = await asyncio.to_thread(deployment.wait_for_failover)
        new = deployment.master()
        print(
            f"\nsentinel failover: killed master -> every Sentinel names the new one "
            f"{seconds:.2f} s"
        )
        assert new != old and seconds < FAILOVER_BOUND
        assert await sentinel.discover_master("mymaster") == (HOST, new)
        # the same master_for client reconnects to the new master by itself
        await succeeds("write through master_for", lambda: master.set("k2", "after"))
        assert await master.get("k") == "before"
        assert deployment.client(new).get("k2") == "after"
        await asyncio.to_thread(deployment.start_node, old)
        assert deployment.replicas() == [old]
    finally:
        await master.aclose()
        for client in sentinel.sentinels:
            await client.aclose()
