"""RedisBroker against a private redis-server: several nodes on one Redis, outages (killed,
frozen, restarted with or without its data), authentication, and the cost of a publish."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import msgspec
import pytest
import redis

from hub.broker import HistoryOptions, StreamPosition
from hub.errors import BrokerUnavailable
from hub.protocol import Message
from hub.redis_broker import RedisBroker, create_redis_backends
from hub.redis_topology import create_server_client
from hub.settings import Settings
from tests.broker_events import Recorder, subscribe, unsubscribe
from tests.redis_server import RedisServer

HISTORY = HistoryOptions(size=100, ttl=300)
Factory = Callable[..., RedisServer]


def message(channel: str, n: int) -> Message:
    return Message(channel=channel, data=msgspec.Raw(b"%d" % n), ts=n)


@contextlib.asynccontextmanager
async def node(url: str, **options: Any) -> AsyncIterator[tuple[RedisBroker, Recorder]]:
    """The broker side of one node: a broker and the events it reports."""
    broker, recorder = RedisBroker(create_server_client(url), **options), Recorder()
    await broker.start(recorder)
    try:
        yield broker, recorder
    finally:
        await broker.close()


async def test_one_publish_reaches_each_subscribed_node_once(redis_url: str) -> None:
    async with node(redis_url) as (a, seen_a), node(redis_url) as (b, seen_b):
        assert (a.up, seen_a.ups, b.up, seen_b.ups) == (True, [False], True, [False])
        for broker, seen in ((a, seen_a), (b, seen_b)):
            await subscribe(broker, seen, "room", "marker")
        await subscribe(b, seen_b, "room")
        await a.publish("room", message("room", 1), HISTORY)
        await b.publish("room", message("room", 2))
        await seen_a.wait_for(lambda: len(seen_a.data_on("room")) == 2)
        await seen_b.wait_for(lambda: len(seen_b.data_on("room")) == 2)

        await unsubscribe(b, seen_b, "room")
        await a.publish("room", message("room", 3), HISTORY)
        await a.publish("marker", message("marker", 4))
        await seen_b.wait_for(lambda: seen_b.data_on("marker") == [b"4"])
        await seen_a.wait_for(lambda: seen_a.data_on("marker") == [b"4"])

    assert seen_a.data_on("room") == [b"1", b"2", b"3"]
    assert seen_b.data_on("room") == [b"1", b"2"]
    first = next(m for c, m in seen_b.relayed if c == "room")
    assert isinstance(first, Message) and first.offset == 1 and first.epoch


async def test_a_publish_costs_one_round_trip(redis_url: str) -> None:
    stats = redis.Redis.from_url(redis_url)
    async with node(redis_url) as (broker, _):
        await broker.publish("warm", message("warm", 0), HISTORY)  # loads the script
        await broker.publish("warm", message("warm", 0))  # and the other one
        stats.config_resetstat()
        for n in range(100):
            await broker.publish("room", message("room", n), HISTORY)
        with_history = stats.info("commandstats")
        stats.config_resetstat()
        for n in range(100):
            await broker.publish("room", message("room", n))
        plain = stats.info("commandstats")
    stats.close()

    assert with_history["cmdstat_evalsha"]["calls"] == 100
    assert with_history["cmdstat_publish"]["calls"] == 100
    assert "cmdstat_eval" not in with_history
    # Without history: one EVALSHA around PUBLISH (its deadline check needs the Redis clock).
    assert _calls(plain) == {"cmdstat_evalsha": 100, "cmdstat_publish": 100, "cmdstat_time": 100}


def _calls(commandstats: Mapping[str, Any]) -> dict[str, int]:
    """Calls per command, less those of the test's own stats client and of the pub/sub probe."""
    own = ("cmdstat_info", "cmdstat_config", "cmdstat_ping")
    return {name: s["calls"] for name, s in commandstats.items() if not name.startswith(own)}


async def test_a_killed_redis_is_noticed_and_a_restarted_one_resubscribed(
    redis_factory: Factory,
) -> None:
    server = redis_factory()
    async with node(server.url) as (a, seen), node(server.url) as (b, seen_b):
        await subscribe(a, seen, "room")
        server.kill()
        await seen.wait_for(lambda: seen.downs == 1)
        assert not a.up
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await a.publish("room", message("room", 1))
        assert time.monotonic() - started < 0.5
        seen.channels.add("late")  # wanted while down: subscribed when Redis is back
        with pytest.raises(BrokerUnavailable):
            await a.subscribe("late")

        server.start(keep_data=False)
        await seen.wait_for(lambda: seen.ups == [False, True] and a.up)
        await seen_b.wait_for(lambda: seen_b.ups == [False, True] and b.up)
        await b.publish("room", message("room", 2))
        await b.publish("late", message("late", 3))
        await seen.wait_for(lambda: seen.data_on("late") == [b"3"])

    assert seen.data_on("room") == [b"2"]
    assert seen.events[:3] == ["up:False", "down", "up:True"]


async def test_a_silent_connection_is_taken_for_dead(redis_factory: Factory) -> None:
    server = redis_factory()
    async with node(server.url, ping_interval=0.5) as (broker, seen):
        await subscribe(broker, seen, "room")
        server.pause()  # the socket stays open; nothing answers any more
        try:
            took = await seen.wait_for(lambda: seen.downs == 1)
        finally:
            server.resume()
        assert took < 3.0
        await seen.wait_for(lambda: seen.ups == [False, True] and broker.up)
        await broker.publish("room", message("room", 1))
        await seen.wait_for(lambda: seen.data_on("room") == [b"1"])


async def test_default_probe_notices_a_silent_connection_within_10_seconds(
    redis_factory: Factory,
) -> None:
    server = redis_factory()
    async with node(server.url) as (_, seen):
        server.pause()
        try:
            took = await seen.wait_for(lambda: seen.downs == 1, within=12)
        finally:
            server.resume()
        assert took < 10


async def test_the_epoch_survives_a_restart_with_data_and_not_an_empty_one(
    redis_factory: Factory,
) -> None:
    server = redis_factory(durable=True)
    async with node(server.url) as (broker, seen):
        for n in range(1, 4):
            before = await broker.publish("room", message("room", n), HISTORY)
        assert before is not None and before.offset == 3

        server.restart(keep_data=True)
        # Up: the pub/sub link and the command probe (they come back independently).
        await seen.wait_for(lambda: seen.ups == [False, True] and broker.up)
        kept = await broker.publish("room", message("room", 4), HISTORY)
        assert kept == StreamPosition(4, before.epoch)
        page = await broker.history("room", HISTORY, before)
        assert page.complete and [m.offset for m in page.messages] == [4]

        server.restart(keep_data=False)
        await seen.wait_for(lambda: seen.ups == [False, True, True] and broker.up)
        fresh = await broker.publish("room", message("room", 5), HISTORY)
        assert fresh is not None and fresh.offset == 1 and fresh.epoch != before.epoch
        page = await broker.history("room", HISTORY, kept)
        assert (page.position, page.complete, page.messages) == (fresh, False, [])


async def test_a_node_starting_before_redis_connects_when_it_comes(
    redis_factory: Factory,
) -> None:
    server = redis_factory()
    server.stop()
    async with node(server.url) as (broker, seen):
        assert not broker.up and seen.events == []
        seen.channels.add("room")
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe("room")
        server.start()
        await seen.wait_for(lambda: seen.ups == [False] and broker.up)
        await broker.publish("room", message("room", 1))
        await seen.wait_for(lambda: seen.data_on("room") == [b"1"])
        assert seen.downs == 0


@pytest.mark.parametrize("user", [None, "hubuser"])
async def test_password_user_and_db_come_from_the_url(
    redis_factory: Factory, user: str | None
) -> None:
    server = redis_factory(password="s3cret")
    admin = redis.Redis.from_url(server.url)
    if user:
        admin.acl_setuser(
            user,
            enabled=True,
            passwords=["+userpass"],
            keys=["hub:*"],
            channels=["hub:*"],
            commands=["+@all"],
        )
    url = server.url_for(user=user, password="userpass" if user else "s3cret", db=3)
    broker, presence = create_redis_backends(Settings(redis_url=url, node_id="n1", presence_ttl=5))
    recorder = Recorder()
    await presence.start()
    await broker.start(recorder)
    try:
        await subscribe(broker, recorder, "room")
        await broker.publish("room", message("room", 1), HISTORY)
        await recorder.wait_for(lambda: recorder.data_on("room") == [b"1"])
        assert admin.exists("hub:s:{room}") == 0
        db3 = redis.Redis.from_url(server.url_for(password="s3cret", db=3))
        assert db3.exists("hub:s:{room}") == 1
        db3.close()
    finally:
        await presence.leave([])
        await broker.close()
        await presence.close()
        admin.close()


async def test_tls_with_a_verified_server_certificate(redis_factory: Factory) -> None:
    server = redis_factory(tls=True, password="s3cret")
    assert server.url.startswith("rediss://")
    async with node(server.url) as (broker, seen):
        await subscribe(broker, seen, "room")
        await broker.publish("room", message("room", 1), HISTORY)
        await seen.wait_for(lambda: seen.data_on("room") == [b"1"])
        page = await broker.history("room", HISTORY, limit=10)
        assert [m.offset for m in page.messages] == [1]


async def test_hubs_on_different_dbs_of_one_server_do_not_hear_each_other(
    redis_server: RedisServer, redis_url: str
) -> None:
    other_db = redis_server.url_for(db=5)
    async with node(redis_url) as (a, seen_a), node(other_db) as (b, seen_b):
        for broker, seen in ((a, seen_a), (b, seen_b)):
            await subscribe(broker, seen, "room")
        await a.publish("room", message("room", 1))
        await b.publish("room", message("room", 2))
        await seen_a.wait_for(lambda: seen_a.data_on("room") == [b"1"])
        await seen_b.wait_for(lambda: seen_b.data_on("room") == [b"2"])
        await a.publish("room", message("room", 3))
        await seen_a.wait_for(lambda: seen_a.data_on("room") == [b"1", b"3"])
    assert seen_b.data_on("room") == [b"2"]
