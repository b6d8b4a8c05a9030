"""RedisBroker against fakeredis (with Lua through lupa): history must behave exactly like
MemoryBroker's, and the relay must deliver what was published, once, to subscribed channels
only. Real-server behaviour (several nodes, outages) is in test_redis_broker_server.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import msgspec
import pytest

from hub.broker import Broker, HistoryOptions, HistoryPage, MemoryBroker, StreamPosition
from hub.errors import BrokerUnavailable
from hub.protocol import Disconnect, Join, Message, Relayed
from hub.redis.broker import RedisBroker
from tests.broker_events import Recorder, subscribe, unsubscribe
from tests.support import FakeClock

pytest.importorskip("lupa", reason="fakeredis runs Lua scripts only with lupa installed")


def message(channel: str, n: int, **fields: Any) -> Message:
    return Message(channel=channel, data=msgspec.Raw(b'{"n":%d}' % n), ts=1_000 + n, **fields)


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def redis_broker(
    fake_server: fakeredis.FakeServer, recorder: Recorder
) -> AsyncIterator[RedisBroker]:
    broker = RedisBroker(fakeredis.FakeAsyncRedis(server=fake_server), ping_interval=0.5)
    await broker.start(recorder)
    yield broker
    await broker.close()


async def let_time_pass(broker: Broker, seconds: float) -> None:
    """The memory broker's history clock is moved; fakeredis expires keys by the wall clock
    (`fakeredis._helpers.current_time`, imported by name into each command mixin, so not
    injectable): that one is slept."""
    if isinstance(broker, MemoryBroker) and isinstance(broker.clock, FakeClock):
        broker.clock.advance(seconds)
    else:
        await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
async def any_broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    broker: Broker
    if request.param == "memory":
        broker = MemoryBroker(clock=FakeClock())
    else:
        broker = RedisBroker(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    await broker.start(Recorder())
    yield broker
    await broker.close()


class Normalised:
    """Pages and positions with epochs renamed E0, E1... in order of appearance, so two
    brokers' answers compare equal when they mean the same."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def epoch(self, epoch: str | None) -> str | None:
        if epoch is None:
            return None
        return self.names.setdefault(epoch, f"E{len(self.names)}")

    def position(self, position: StreamPosition | None) -> object:
        assert position is not None
        return (position.offset, self.epoch(position.epoch))

    def page(self, page: HistoryPage) -> object:
        messages = [(m.offset, self.epoch(m.epoch), bytes(m.data), m.ts) for m in page.messages]
        return (self.position(page.position), page.complete, messages)


async def test_history_answers_exactly_like_memory_broker(any_broker: Broker) -> None:
    broker, norm, history = any_broker, Normalised(), HistoryOptions(size=3, ttl=60)
    answers: list[object] = []

    # Asking first fixes the epoch that the first publication then uses, at offset 1.
    answers.append(norm.page(await broker.history("room", history, limit=0)))
    for n in range(1, 6):
        answers.append(norm.position(await broker.publish("room", message("room", n), history)))
    epoch = next(iter(norm.names))
    for since, limit in [
        (None, 2),
        (None, 10),
        (None, 0),
        (0, 10),
        (1, 10),
        (2, 10),
        (2, 1),
        (3, 0),
        (4, 1),
        (5, 10),
        (6, 10),
        (-3, 10),
    ]:
        position = None if since is None else StreamPosition(since, epoch)
        answers.append(norm.page(await broker.history("room", history, position, limit)))
    answers.append(norm.page(await broker.history("room", history, StreamPosition(5, "x"))))
    answers.append(norm.page(await broker.history("other", history, StreamPosition(0, "x"))))

    assert answers == [
        ((0, "E0"), True, []),
        (1, "E0"),
        (2, "E0"),
        (3, "E0"),
        (4, "E0"),
        (5, "E0"),
        ((5, "E0"), True, [(4, "E0", b'{"n":4}', 1004), (5, "E0", b'{"n":5}', 1005)]),
        ((5, "E0"), True, [(n, "E0", b'{"n":%d}' % n, 1000 + n) for n in (3, 4, 5)]),
        ((5, "E0"), True, []),
        ((5, "E0"), False, [(n, "E0", b'{"n":%d}' % n, 1000 + n) for n in (3, 4, 5)]),
        ((5, "E0"), False, [(n, "E0", b'{"n":%d}' % n, 1000 + n) for n in (3, 4, 5)]),
        ((5, "E0"), True, [(n, "E0", b'{"n":%d}' % n, 1000 + n) for n in (3, 4, 5)]),
        ((5, "E0"), True, [(3, "E0", b'{"n":3}', 1003)]),
        ((5, "E0"), True, []),
        ((5, "E0"), True, [(5, "E0", b'{"n":5}', 1005)]),
        ((5, "E0"), True, []),
        ((5, "E0"), False, []),
        ((5, "E0"), False, [(n, "E0", b'{"n":%d}' % n, 1000 + n) for n in (3, 4, 5)]),
        ((5, "E0"), False, []),
        ((0, "E1"), False, []),
    ]


async def test_messages_expire_one_by_one_and_then_the_epoch_ends(any_broker: Broker) -> None:
    broker, norm, history = any_broker, Normalised(), HistoryOptions(size=10, ttl=1.0)
    first = norm.position(await broker.publish("room", message("room", 1), history))
    await let_time_pass(broker, 0.6)
    await broker.publish("room", message("room", 2), history)
    await let_time_pass(broker, 0.6)  # the first is 1.2 s old (gone), the second 0.6 s (held)
    epoch = next(iter(norm.names))
    since_start = await broker.history("room", history, StreamPosition(0, epoch))
    newest = await broker.history("room", history, limit=10)
    await let_time_pass(broker, 0.6)  # both gone: the history is lost, and with it its epoch
    after = await broker.history("room", history, limit=10)
    again = await broker.publish("room", message("room", 3), history)

    assert first == (1, "E0")
    assert norm.page(since_start) == ((2, "E0"), False, [(2, "E0", b'{"n":2}', 1002)])
    assert norm.page(newest) == ((2, "E0"), True, [(2, "E0", b'{"n":2}', 1002)])
    assert norm.page(after) == ((0, "E1"), True, [])
    assert norm.position(again) == (1, "E1")


async def test_remove_history_drops_the_messages_and_keeps_the_position(
    any_broker: Broker,
) -> None:
    """Centrifugo's `history_remove`: the next publication goes on in the same epoch, and a
    recovery from before the removal is not complete."""
    broker, norm, history = any_broker, Normalised(), HistoryOptions(size=10, ttl=60)
    for n in (1, 2):
        await broker.publish("room", message("room", n), history)
    await broker.remove_history("room")
    await broker.remove_history("never-used")
    epoch = next(iter(norm.names)) if norm.names else (
        await broker.history("room", history, limit=0)).position.epoch
    newest = await broker.history("room", history, limit=10)
    since_one = await broker.history("room", history, StreamPosition(1, epoch))
    at_top = await broker.history("room", history, StreamPosition(2, epoch))
    again = await broker.publish("room", message("room", 3), history)
    after = await broker.history("room", history, StreamPosition(2, epoch))

    assert norm.page(newest) == ((2, "E0"), True, [])
    assert norm.page(since_one) == ((2, "E0"), False, [])
    assert norm.page(at_top) == ((2, "E0"), True, [])
    assert norm.position(again) == (3, "E0")
    assert norm.page(after) == ((3, "E0"), True, [(3, "E0", b'{"n":3}', 1003)])


async def test_publish_tells_offset_and_epoch_to_the_message_and_the_subscribers(
    redis_broker: RedisBroker, recorder: Recorder
) -> None:
    history = HistoryOptions(size=10, ttl=60)
    await subscribe(redis_broker, recorder, "feed")
    stale = message("feed", 1, offset=99, epoch="stale")
    position = await redis_broker.publish("feed", stale, history)
    await redis_broker.publish("feed", message("feed", 2, event="e", from_="alice"), history)
    await recorder.wait_for(lambda: len(recorder.relayed) == 2)

    assert position is not None and position.offset == 1
    assert (stale.offset, stale.epoch) == (1, position.epoch)
    relayed = [relayed for _, relayed in recorder.relayed]
    assert all(isinstance(m, Message) for m in relayed)
    assert [(m.offset, m.epoch) for m in relayed if isinstance(m, Message)] == [
        (1, position.epoch),
        (2, position.epoch),
    ]
    second = relayed[1]
    assert isinstance(second, Message) and (second.event, second.from_) == ("e", "alice")
    page = await redis_broker.history("feed", history, limit=10)
    assert [(m.offset, m.event, m.from_) for m in page.messages] == [
        (1, None, None),
        (2, "e", "alice"),
    ]


async def test_without_history_it_is_one_plain_publish_that_stores_nothing(
    redis_broker: RedisBroker, recorder: Recorder, fake_server: fakeredis.FakeServer
) -> None:
    await subscribe(redis_broker, recorder, "@bob")
    assert await redis_broker.publish("@bob", message("@bob", 1)) is None
    await redis_broker.publish("@bob", Join(channel="@bob", user="bob", client="c1"))
    await redis_broker.publish("@bob", Disconnect(user="bob", code=4003, reason="bye"))
    await recorder.wait_for(lambda: len(recorder.relayed) == 3)

    kinds = [type(relayed) for _, relayed in recorder.relayed]
    assert kinds == [Message, Join, Disconnect]
    first = recorder.relayed[0][1]
    assert isinstance(first, Message) and first.offset is None
    assert await fakeredis.FakeAsyncRedis(server=fake_server).keys("*") == []


async def test_relays_only_subscribed_channels_and_any_channel_name_is_safe(
    redis_broker: RedisBroker, recorder: Recorder
) -> None:
    odd = "@ü ser*?[a-z]{x}\\:\n"
    await subscribe(redis_broker, recorder, odd, "room", "marker")
    await subscribe(redis_broker, recorder, "room")  # idempotent: one copy of each message
    await unsubscribe(redis_broker, recorder, "room", "room")
    for channel in ("@ü ser", "room", "@ü ser*", odd, "marker"):
        await redis_broker.publish(channel, message(channel, 1))
    await recorder.wait_for(lambda: recorder.data_on("marker") != [])

    assert [channel for channel, _ in recorder.relayed] == [odd, "marker"]


async def test_racing_subscribe_and_unsubscribe_end_as_the_last_call_says(
    redis_broker: RedisBroker, recorder: Recorder
) -> None:
    b = redis_broker
    recorder.channels = {"a", "c", "marker"}  # what a node wants at the end
    await asyncio.gather(b.subscribe("a"), b.unsubscribe("a"), b.subscribe("a"))
    await asyncio.gather(b.subscribe("b"), b.unsubscribe("b"))
    await asyncio.gather(b.subscribe("c"), b.subscribe("c"), b.unsubscribe("c"), b.subscribe("c"))
    await b.subscribe("marker")
    for channel in ("a", "b", "c", "marker"):
        await b.publish(channel, message(channel, 1))
    await recorder.wait_for(lambda: recorder.data_on("marker") != [])

    assert [channel for channel, _ in recorder.relayed] == ["a", "c", "marker"]


class FailsOnBoom(Recorder):
    def on_relayed(self, channel: str, relayed: list[Relayed]) -> None:
        super().on_relayed(channel, relayed)
        if channel == "boom":
            raise RuntimeError("node bug")


async def test_a_failing_node_callback_or_a_foreign_payload_does_not_stop_the_relay(
    fake_server: fakeredis.FakeServer,
) -> None:
    recorder = FailsOnBoom()
    broker = RedisBroker(fakeredis.FakeAsyncRedis(server=fake_server))
    await broker.start(recorder)
    await subscribe(broker, recorder, "boom", "ok")
    await broker.publish("boom", message("boom", 1))
    await fakeredis.FakeAsyncRedis(server=fake_server).publish("hub:c:0:{ok}", b"not json")
    await broker.publish("ok", message("ok", 2))
    await recorder.wait_for(lambda: recorder.data_on("ok") == [b'{"n":2}'])

    assert [channel for channel, _ in recorder.relayed] == ["boom", "ok"]
    assert broker.up
    await broker.close()


async def test_a_lost_stream_starts_a_new_epoch(
    redis_broker: RedisBroker, fake_server: fakeredis.FakeServer
) -> None:
    history = HistoryOptions(size=10, ttl=30)
    old = await redis_broker.publish("room", message("room", 1), history)
    await redis_broker.publish("room", message("room", 2), history)
    raw = fakeredis.FakeAsyncRedis(server=fake_server)
    assert 29_000 < await raw.pttl("hub:s:{room}") <= 30_000  # short TTLs: set exactly
    assert 29_000 < await raw.pttl("hub:m:{room}") <= 30_000
    await raw.delete("hub:s:{room}")  # evicted, say: the meta alone must not keep the epoch

    new = await redis_broker.publish("room", message("room", 3), history)
    assert old is not None and new is not None
    assert new.offset == 1 and new.epoch != old.epoch
    page = await redis_broker.history("room", history, StreamPosition(2, old.epoch))
    assert (page.position, page.complete, page.messages) == (new, False, [])

    await raw.flushall()  # Redis restarted empty
    newer = await redis_broker.publish("room", message("room", 4), history)
    assert newer is not None and newer.offset == 1 and newer.epoch != new.epoch


async def test_down_or_not_started_fails_fast(fake_server: fakeredis.FakeServer) -> None:
    broker = RedisBroker(fakeredis.FakeAsyncRedis(server=fake_server))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.publish("room", message("room", 1))
    with pytest.raises(BrokerUnavailable):
        await broker.history("room", HistoryOptions(10, 60))
    with pytest.raises(BrokerUnavailable):  # the reconnect subscribes what the node wants
        await broker.subscribe("room")
    await broker.unsubscribe("room")
    assert time.monotonic() - started < 0.5
    await broker.close()


def test_expiry_clock_sets_a_long_ttl_now_and_then_and_a_short_one_always() -> None:
    from hub.redis.history import ExpiryClock

    clock = ExpiryClock(every=60, grace=4, min_ttl=60)
    # never seen: no epoch to expect, the TTL is set, to the TTL + a tenth of it + grace
    assert clock.plan("a", 600, 100.0) == ("", (600 + 60 + 4) * 1000, True, 100.0)
    clock.saw("a", "e1", 100.0)
    assert clock.plan("a", 600, 159.0) == ("e1", 664_000, False, 100.0)
    assert clock.plan("a", 600, 160.0) == ("e1", 664_000, True, 160.0)
    assert clock.plan("a", 100, 106.0) == ("e1", 114_000, False, 100.0)  # every 10 s
    assert clock.plan("a", 100, 110.0) == ("e1", 114_000, True, 110.0)
    clock.saw("b", "e2", 100.0)
    assert clock.plan("b", 30, 100.5) == ("e2", 30_000, True, 100.5)  # short: exact, always
    clock.learn("c", "e3")  # an epoch from a history read: expected, TTL still set
    assert clock.plan("c", 600, 100.0) == ("e3", 664_000, True, 100.0)
    clock.forget("a")
    assert clock.plan("a", 600, 101.0)[:3] == ("", 664_000, True)
