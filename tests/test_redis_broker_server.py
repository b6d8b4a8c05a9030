"""RedisBroker against a private redis-server: several nodes on one Redis, outages (killed,
frozen, restarted with or without its data), authentication, and the cost of a publish."""

from __future__ import annotations

import asyncio
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
from hub.redis import create_redis_backends
from hub.redis.broker import RedisBroker
from hub.redis.topology import create_server_client
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
        # loads the script; the channel's first message reads its epoch and sets the TTL
        await broker.publish("room", message("room", 0), HISTORY)
        stats.config_resetstat()
        for n in range(100):
            await broker.publish("room", message("room", n), HISTORY)
        with_history = stats.info("commandstats")
        stats.config_resetstat()
        for n in range(100):
            await broker.publish("room", message("room", n))
        plain = stats.info("commandstats")
    stats.close()

    # The offset from the epoch the node expects (HINCRBY), the stream (XADD) and the
    # PUBLISH; the keys' TTL was set by the first publish, and is again now and then.
    assert _calls(with_history) == {
        "cmdstat_evalsha": 100, "cmdstat_time": 100, "cmdstat_hincrby": 100,
        "cmdstat_xadd": 100, "cmdstat_publish": 100,
    }
    # Without history: one EVALSHA around PUBLISH (its deadline check needs the Redis clock).
    assert _calls(plain) == {"cmdstat_evalsha": 100, "cmdstat_publish": 100, "cmdstat_time": 100}


async def test_concurrent_publishes_share_round_trips_and_keep_offsets(redis_url: str) -> None:
    """What a node publishes while its round trips are on their way goes as one script: a
    crowd of publishes costs one EVALSHA and one TIME between them. Publishes made at once
    have no order between them; each channel's offsets are still 1, 2, 3, ... in the order
    every node hears them."""
    stats = redis.Redis.from_url(redis_url)
    channels = [f"c{n}" for n in range(50)]
    async with node(redis_url) as (broker, seen):
        await subscribe(broker, seen, *channels)
        for channel in channels:  # each channel's first message sets its keys' TTL
            await broker.publish(channel, message(channel, 0), HISTORY)
        stats.config_resetstat()
        positions = await asyncio.gather(*(
            broker.publish(channel, message(channel, n), HISTORY)
            for n in range(1, 5) for channel in channels
        ), broker.publish("plain", message("plain", 9)))
        calls = _calls(stats.info("commandstats"))
        await seen.wait_for(lambda: all(len(seen.data_on(c)) == 5 for c in channels))
    stats.close()

    for k in range(len(channels)):
        assert sorted(p.offset for p in positions[k:-1:len(channels)] if p) == [2, 3, 4, 5]
    for channel in channels:
        offsets = [m.offset for c, m in seen.relayed if c == channel and isinstance(m, Message)]
        assert offsets == [1, 2, 3, 4, 5]
    assert calls["cmdstat_evalsha"] < 20 and calls["cmdstat_time"] == calls["cmdstat_evalsha"]
    assert calls["cmdstat_publish"] == 201 and "cmdstat_hgetall" not in calls
    assert sum(calls.values()) / 201 < 3.2


async def test_a_stale_expected_epoch_is_taken_back(redis_url: str) -> None:
    """A node that expects an epoch the channel no longer has (another node started a new
    one) reads the real one; a node that expected the old one after the keys expired
    starts a new one: the old epoch is never used again."""
    raw = redis.Redis.from_url(redis_url)
    async with node(redis_url) as (a, _), node(redis_url) as (b, _):
        first = await a.publish("room", message("room", 1), HISTORY)
        assert first is not None
        raw.delete("hub:s:{room}", "hub:m:{room}")  # expired, say
        second = await b.publish("room", message("room", 2), HISTORY)
        third = await a.publish("room", message("room", 3), HISTORY)
        assert second is not None and third is not None
        assert (second.offset, third.offset) == (1, 2)
        assert second.epoch == third.epoch != first.epoch
        assert raw.hgetall("hub:m:{room}") == {second.epoch.encode(): b"3"}
        page = await a.history("room", HISTORY)
        assert [m.offset for m in page.messages] == [1, 2]
        assert page.position == third
        raw.delete("hub:m:{room}")  # the meta alone lost: nobody may reuse the epoch
        fourth = await a.publish("room", message("room", 4), HISTORY)
        assert fourth is not None and fourth.offset == 1 and fourth.epoch != third.epoch
    raw.close()


async def test_meta_of_the_format_before_is_read_and_rewritten(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.hset("hub:m:{old}", mapping={"e": "abcd0123", "s": 7})
    raw.pexpire("hub:m:{old}", 300_000)
    raw.xadd("hub:s:{old}", {"d": "{}", "t": "0"}, id="7")
    async with node(redis_url) as (broker, _):
        position = await broker.publish("old", message("old", 8), HISTORY)
    assert position == StreamPosition(8, "abcd0123")
    assert raw.hgetall("hub:m:{old}") == {b"abcd0123": b"9"}
    assert raw.pttl("hub:m:{old}") > 290_000
    raw.close()


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


async def test_a_caller_that_gives_up_in_a_crowd_fails_nobody_else(redis_url: str) -> None:
    """Publications queued behind a round trip go as one batch sent by the first of them:
    callers cancelled while they wait are not sent, and one cancelled while its batch is on
    its way leaves the others' answers (and the next batches) alone."""
    async with node(redis_url) as (broker, seen):
        await subscribe(broker, seen, "crowd")
        await broker.publish("crowd", message("crowd", 0), HISTORY)
        tasks = [asyncio.create_task(broker.publish("crowd", message("crowd", n), HISTORY))
                 for n in range(1, 31)]
        await asyncio.sleep(0)  # all submitted: the first on its way, the rest queued
        for n in (2, 3):  # queued: not sent
            tasks[n - 1].cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        sent = [n for n, r in zip(range(1, 31), results, strict=True)
                if isinstance(r, StreamPosition)]
        cancelled = [n for n, r in zip(range(1, 31), results, strict=True)
                     if isinstance(r, asyncio.CancelledError)]
        assert cancelled == [2, 3] and len(sent) == 28
        after = await broker.publish("crowd", message("crowd", 99), HISTORY)
        assert after is not None and after.offset == 30
        await seen.wait_for(lambda: len(seen.data_on("crowd")) == 30)
    assert sorted(int(d) for d in seen.data_on("crowd")) == [0, *sent, 99]
