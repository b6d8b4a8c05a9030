"""Refilling after a broker outage (PROTOCOL §5), with the timing held still: an in-process
node on its own redis-server whose real `broker.history` is wrapped (on the instance) by a
gate the test opens, so a refill or a subscribe can be caught half-way. Outages are real:
the node's pub/sub connection is cut with CLIENT KILL, or made slow or silent by a TCP
relay in front of Redis; publications go through a second broker straight to Redis, so
what the node does not hear is a real gap it must fill from history.

Also: the pub/sub loop's backoff survives a long run of failures.

Then the interleavings that once cost a message or sent one twice: a subscribe whose read
ends during a refill, one during an unnoticed half-open outage, a pub/sub link lagging the
command link, a second outage while a refill's read is in flight, and a push that fails
half-way through a page. Each subscription must get everything after its position once,
in order, and nothing at or below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio

import hub.refill
from hub.broker import HistoryOptions, HistoryPage, StreamPosition
from hub.errors import BrokerUnavailable
from hub.node import Node
from hub.protocol import Message
from hub.redis.broker import RedisBroker
from hub.redis.topology import create_server_client
from hub.session import Session
from hub.subscriptions import Cohort
from tests.broker_events import Recorder
from tests.conftest import NAMESPACES
from tests.redis_server import RedisServer
from tests.support import WAIT, Client, connect, eventually, make_settings, running_node, token

Factory = Callable[..., RedisServer]
HISTORY = HistoryOptions(size=100, ttl=300)  # as [namespaces.feed] in tests/conftest.py
Frames = list[tuple[str, int, Any]]


class HistoryGate:
    """Wraps a node broker's real `history`. `hold(n)` makes the next n calls wait, each
    until its own event in `held` is set, before they read; `hold_answer(n)` makes them
    read at once and wait before they answer. With `failing` set every call raises
    BrokerUnavailable (after its hold, if held) instead of reading."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self._real = real
        self._to_hold = 0
        self._answers_to_hold = 0
        self.calls = 0
        self.failing = False
        self.held: list[asyncio.Event] = []

    def hold(self, calls: int = 1) -> None:
        self._to_hold += calls

    def hold_answer(self, calls: int = 1) -> None:
        self._answers_to_hold += calls

    async def _wait(self) -> None:
        go = asyncio.Event()
        self.held.append(go)
        await asyncio.wait_for(go.wait(), 2 * WAIT)

    def release_all(self) -> None:
        for go in self.held:
            go.set()

    async def history(
        self,
        channel: str,
        history: HistoryOptions,
        since: StreamPosition | None = None,
        limit: int = 1000,
    ) -> HistoryPage:
        self.calls += 1
        if self._to_hold:
            self._to_hold -= 1
            await self._wait()
        if self.failing:
            raise BrokerUnavailable("history refused by the test")
        page: HistoryPage = await self._real(channel, history, since, limit)
        if self._answers_to_hold:
            self._answers_to_hold -= 1
            await self._wait()
        return page


def gate_history(node: Node, monkeypatch: pytest.MonkeyPatch) -> HistoryGate:
    gate = HistoryGate(node.broker.history)
    monkeypatch.setattr(node.broker, "history", gate.history)
    return gate


@contextlib.asynccontextmanager
async def other_broker(url: str) -> AsyncIterator[RedisBroker]:
    """A second path into the same Redis (another node's broker, without subscriptions:
    its connection is not a pub/sub client, so CLIENT KILL TYPE pubsub spares it)."""
    broker = RedisBroker(create_server_client(url))
    await broker.start(Recorder())
    try:
        yield broker
    finally:
        await broker.close()


async def publish_numbers(
    broker: RedisBroker, channel: str, *numbers: int, history: HistoryOptions = HISTORY
) -> None:
    """Publish each number as `data`; in these tests it is also the offset."""
    for n in numbers:
        message = Message(channel=channel, data=msgspec.Raw(b"%d" % n), ts=int(time.time() * 1000))
        position = await broker.publish(channel, message, history)
        assert position is not None and position.offset == n


async def cut_pubsub(server: RedisServer) -> None:
    """Kill the node's pub/sub connection (the only pub/sub client of this server)."""
    admin = redis.asyncio.Redis.from_url(server.url)
    try:
        assert await admin.client_kill_filter(_type="pubsub") == 1
    finally:
        await admin.aclose()


def subscribers(node: Node, channel: str) -> int:
    return sum(1 for _ in node.subscriptions.members(channel))


def catching_up(node: Node, channel: str) -> Cohort | None:
    """The cohort of `channel` that waits for a history read, if one does."""
    waiting = [c for c in node.subscriptions.cohorts_of(channel) if c.held is not None]
    assert len(waiting) <= 1, "more than one cohort catching up"
    return waiting[0] if waiting else None


def held(node: Node, channel: str) -> list[int]:
    """Offsets of what the catching-up cohort of `channel` holds."""
    cohort = catching_up(node, channel)
    return [m.offset or 0 for m in cohort.held or ()] if cohort else []


async def frames_until(client: Client, offset: int) -> Frames:
    """(type, offset, data) of every frame up to the message with `offset` (bounded)."""
    got: Frames = []
    async with asyncio.timeout(WAIT):
        while not got or got[-1][:2] != ("message", offset):
            frame = await client.recv()
            got.append((frame["type"], frame.get("offset", -1), frame.get("data")))
    return got


def messages(first: int, last: int) -> Frames:
    """The frames of messages `first`..`last`, each with data equal to its offset."""
    return [("message", n, n) for n in range(first, last + 1)]


async def subscribed_with_two(other: RedisBroker, old: Client, channel: str) -> str:
    """`old` subscribes and gets messages 1 and 2; returns the epoch."""
    epoch: str = (await old.subscribe(channel))["epoch"]
    await publish_numbers(other, channel, 1, 2)
    assert await frames_until(old, 2) == messages(1, 2)
    return epoch


async def test_a_subscribe_during_a_refill_gets_neither_duplicates_nor_old_messages(
    redis_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = redis_factory()
    channel = "feed:refilling"
    settings = make_settings(redis_url=server.url, namespaces=NAMESPACES)
    async with running_node(settings) as running, other_broker(server.url) as other, \
            connect(running.ws_url, token("old")) as old, \
            connect(running.ws_url, token("since")) as since, \
            connect(running.ws_url, token("plain")) as plain:
        node = running.node
        epoch = await subscribed_with_two(other, old, channel)
        gate = gate_history(node, monkeypatch)
        try:
            gate.hold()  # the refill's read, once the node is back
            await cut_pubsub(server)
            # The node sleeps at least 50 ms before it reconnects: these are a gap.
            await publish_numbers(other, channel, 3, 4, 5)
            await eventually(lambda: len(gate.held) == 1, what="the refill's read")
            await publish_numbers(other, channel, 6, 7, 8)  # live, held by the refill
            await eventually(lambda: held(node, channel) == [6, 7, 8], what="live messages held")

            # Two clients subscribe while the refill is held: one from offset 4, one anew.
            await since.send({
                "type": "subscribe", "channel": channel, "since": {"offset": 4, "epoch": epoch},
            })
            await plain.send({"type": "subscribe", "channel": channel})
            await eventually(lambda: subscribers(node, channel) == 3,
                             what="both subscribes to finish")
        finally:
            gate.release_all()
        await eventually(lambda: catching_up(node, channel) is None, what="the refill to end")
        await publish_numbers(other, channel, 9, 10)

        # The fellow subscriber: the gap, the held messages and the new ones, once, in order.
        assert await frames_until(old, 10) == messages(3, 10)
        # From offset 4: subscribed at 8, recovered 5..8, then live 9 and 10.
        reply = await since.expect("subscribed")
        assert (reply["offset"], reply["epoch"], reply["recovered"]) == (8, epoch, True)
        assert await frames_until(since, 10) == messages(5, 10)
        # Anew: subscribed at 8, then nothing at or below it.
        reply = await plain.expect("subscribed")
        assert (reply["offset"], reply["epoch"]) == (8, epoch)
        assert await frames_until(plain, 10) == messages(9, 10)
        assert gate.calls == 3  # the refill's read, then one per subscribe


async def test_a_refill_whose_reads_keep_failing_ends_in_one_reset_then_held_messages(
    redis_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub.refill, "ATTEMPTS", 3)
    monkeypatch.setattr(hub.refill, "FIRST_RETRY_DELAY", 0.02)
    server = redis_factory()
    channel = "feed:unreadable"
    settings = make_settings(redis_url=server.url, namespaces=NAMESPACES)
    async with running_node(settings) as running, other_broker(server.url) as other, \
            connect(running.ws_url, token("watcher")) as watcher, \
            connect(running.ws_url, token("second")) as second:
        node = running.node
        await second.subscribe(channel)
        epoch = await subscribed_with_two(other, watcher, channel)
        assert await frames_until(second, 2) == messages(1, 2)

        gate = gate_history(node, monkeypatch)
        try:
            gate.failing = True
            gate.hold()  # the first failing read waits: live messages come meanwhile
            await cut_pubsub(server)
            await publish_numbers(other, channel, 3, 4)  # the gap: lost with the history reads
            await eventually(lambda: len(gate.held) == 1, what="the refill's first read")
            await publish_numbers(other, channel, 5, 6, 7)
            await eventually(lambda: held(node, channel) == [5, 6, 7], what="live messages held")
        finally:
            gate.release_all()
        await eventually(lambda: catching_up(node, channel) is None, what="the refill to give up")
        assert node.broker.up
        gate.failing = False
        await publish_numbers(other, channel, 8)

        for client in (watcher, second):
            reset = await client.expect("reset")
            assert (reset["channel"], reset["epoch"], reset["offset"]) == (channel, epoch, 4)
            # the held messages in order, then live ones; no second reset in between
            assert await frames_until(client, 8) == messages(5, 8)
        assert gate.calls == hub.refill.ATTEMPTS


async def test_the_pubsub_backoff_survives_a_long_run_of_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over 1,024 failed connects in a row: `0.05 * 2 ** failures` would overflow a float
    there and end the loop. A listener that hangs up on every connection fails them fast;
    a backoff cap of 0 takes the sleeps out. Then `close` must end the loop although it is
    busy writing (on Python 3.11 `asyncio.wait_for` can swallow the first cancellation)."""
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    broker = RedisBroker(create_server_client(f"redis://127.0.0.1:{port}/0"), backoff_cap=0)
    caplog.set_level(logging.ERROR, logger="hub.redis")
    try:
        await broker.start(Recorder())
        assert not broker.up
        await eventually(lambda: accepted > 1100, what="1,100 failed connects", within=15)
        before = accepted
        await eventually(lambda: accepted > before + 10, what="the loop to go on retrying")
    finally:
        await broker.close()
        listener.close()
        await listener.wait_closed()
    assert not broker.up
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_subscribe_whose_read_ends_during_a_refill_gets_nothing_below_it(
    redis_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscribe's read (say it waited for a pooled connection) began before the outage
    and comes back during the refill, before the refill's own read: it joins at 6 and must
    not get 3..6 from the refill; the old subscriber must get them."""
    server = redis_factory()
    channel = "feed:in-flight"
    settings = make_settings(redis_url=server.url, namespaces=NAMESPACES)
    async with running_node(settings) as running, other_broker(server.url) as other, \
            connect(running.ws_url, token("old")) as old, \
            connect(running.ws_url, token("late")) as late:
        node = running.node
        await subscribed_with_two(other, old, channel)
        gate = gate_history(node, monkeypatch)
        try:
            gate.hold(2)  # the subscribe's read, then the refill's
            await late.send({"type": "subscribe", "channel": channel})
            await eventually(lambda: len(gate.held) == 1, what="the subscribe's read")
            await cut_pubsub(server)
            await publish_numbers(other, channel, 3, 4, 5)
            await eventually(lambda: len(gate.held) == 2, what="the refill's read")
            await publish_numbers(other, channel, 6)
            await eventually(lambda: held(node, channel) == [6], what="6 held")
            gate.held[0].set()
            await eventually(lambda: subscribers(node, channel) == 2,
                             what="the subscribe to finish")
        finally:
            gate.release_all()
        await eventually(lambda: not node.subscriptions.refiller.busy, what="the refill to end")
        await publish_numbers(other, channel, 7)
        assert await frames_until(old, 7) == messages(3, 7)
        assert (await late.expect("subscribed"))["offset"] == 6
        assert await frames_until(late, 7) == messages(7, 7)  # got 3..7


class _Relay:
    """One proxied connection: client ↔ Redis."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.pubsub = False  # it sent SUBSCRIBE
        self.holding = False
        self.silent = False
        self.kept: list[bytes] = []

    def close(self) -> None:
        for writer in (self.client, self.server):
            writer.close()


class LinkProxy:
    """A TCP relay in front of the private Redis. The node's pub/sub connection (the one
    that sent SUBSCRIBE) can be slowed (what Redis sends on it is kept until `flush`),
    made silent (half-open: nothing passes, nothing closes) or cut."""

    _SUBSCRIBE = b"$9\r\nSUBSCRIBE\r\n"

    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self._relays: list[_Relay] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Yields the URL to give the node."""
        listener = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield f"redis://127.0.0.1:{listener.sockets[0].getsockname()[1]}/0"
        finally:
            listener.close()
            for relay in self._relays:
                relay.close()
            await asyncio.wait_for(listener.wait_closed(), WAIT)

    def _pubsub(self) -> list[_Relay]:
        found = [relay for relay in self._relays if relay.pubsub]
        assert found, "no pub/sub connection through the proxy"
        return found

    def slow(self) -> None:
        for relay in self._pubsub():
            relay.holding = True

    def flush(self) -> None:
        for relay in self._pubsub():
            relay.holding = False
            for data in relay.kept:
                relay.client.write(data)
            relay.kept.clear()

    def silence(self) -> None:
        for relay in self._pubsub():
            relay.silent = True

    def cut(self) -> None:
        for relay in self._pubsub():
            relay.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(
            "127.0.0.1", self._redis_port
        )
        relay = _Relay(writer, server_writer)
        self._relays.append(relay)
        await asyncio.gather(
            self._pump(reader, relay, upstream=True),
            self._pump(server_reader, relay, upstream=False),
        )

    async def _pump(self, source: asyncio.StreamReader, relay: _Relay, upstream: bool) -> None:
        target = relay.server if upstream else relay.client
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if upstream and self._SUBSCRIBE in data.upper():
                    relay.pubsub = True
                if relay.silent:
                    continue
                if relay.holding and not upstream:
                    relay.kept.append(data)
                    continue
                target.write(data)
                await target.drain()
        relay.close()


async def test_a_subscribe_while_the_pubsub_link_is_half_open_costs_others_nothing(
    redis_factory: Factory,
) -> None:
    """PROTOCOL §5 gives a node 10 s to notice a silent pub/sub connection. A subscribe in
    that time reads offset 4: it starts there, while `old` still stands at 2, and after the
    reconnect each catches up from its own position."""
    server = redis_factory()
    channel = "feed:half-open"
    proxy = LinkProxy(server.port)
    async with proxy.running() as url, \
            running_node(make_settings(redis_url=url, namespaces=NAMESPACES)) as running, \
            other_broker(server.url) as other, \
            connect(running.ws_url, token("old")) as old, \
            connect(running.ws_url, token("late")) as late:
        node = running.node
        await subscribed_with_two(other, old, channel)
        proxy.silence()
        await publish_numbers(other, channel, 3, 4)  # the node does not hear these
        reply = await late.subscribe(channel)
        assert reply["offset"] == 4 and node.broker.up  # not noticed yet
        await publish_numbers(other, channel, 5)
        proxy.cut()
        await eventually(lambda: not node.broker.up, what="the node to notice")
        await eventually(lambda: node.broker.up and not node.subscriptions.refiller.busy,
                         what="the refill to end")
        await publish_numbers(other, channel, 6)
        assert await frames_until(late, 6) == messages(5, 6)
        assert await frames_until(old, 6) == messages(3, 6)  # got 5, 6


async def test_a_message_late_on_the_pubsub_link_is_not_sent_twice_to_a_new_subscriber(
    redis_factory: Factory,
) -> None:
    """No outage: the pub/sub link lags the command link (a busy link, a slow reader). A
    subscribe to a channel the node already relays does not wait for the link, reads
    offset 3 and recovers 3; then 3 comes in live, and must not reach it again."""
    server = redis_factory()
    channel = "feed:lagging"
    proxy = LinkProxy(server.port)
    async with proxy.running() as url, \
            running_node(make_settings(redis_url=url, namespaces=NAMESPACES)) as running, \
            other_broker(server.url) as other, \
            connect(running.ws_url, token("old")) as old, \
            connect(running.ws_url, token("new")) as new:
        epoch = await subscribed_with_two(other, old, channel)
        proxy.slow()
        await publish_numbers(other, channel, 3)  # on its way to the node, slowly
        await new.send({
            "type": "subscribe", "channel": channel, "since": {"offset": 2, "epoch": epoch},
        })
        reply = await new.expect("subscribed")
        assert (reply["offset"], reply["recovered"]) == (3, True)
        proxy.flush()
        await publish_numbers(other, channel, 4)
        assert await frames_until(old, 4) == messages(3, 4)
        assert await frames_until(new, 4) == messages(3, 4)  # got 3 (recovered), 3, 4


async def test_a_message_both_in_the_refill_page_and_late_on_the_link_arrives_once(
    redis_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the reconnect the new pub/sub link lags: a message published then is in the
    refill's page, and reaches the node live only after the refill finished."""
    server = redis_factory()
    channel = "feed:late-and-refilled"
    proxy = LinkProxy(server.port)
    async with proxy.running() as url, \
            running_node(make_settings(redis_url=url, namespaces=NAMESPACES)) as running, \
            other_broker(server.url) as other, \
            connect(running.ws_url, token("old")) as old:
        node = running.node
        await subscribed_with_two(other, old, channel)
        gate = gate_history(node, monkeypatch)
        try:
            gate.hold()  # the refill's read
            proxy.cut()
            await publish_numbers(other, channel, 3, 4)  # the gap
            await eventually(lambda: len(gate.held) == 1, what="the refill's read")
            proxy.slow()  # the new link: what Redis sends on it waits in the proxy
            await publish_numbers(other, channel, 5)  # in history, and late on the link
        finally:
            gate.release_all()
        assert await frames_until(old, 5) == messages(3, 5)  # the refill's page
        proxy.flush()  # 5 arrives live now
        await publish_numbers(other, channel, 6)
        assert await frames_until(old, 6) == messages(6, 6)


async def test_a_second_outage_while_the_refill_reads_is_filled_too(
    redis_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refill's read is done (it has 3 and 4) but its answer lands after a second
    outage that lost 5 and 6: the read predates that gap, so it is read again, and 5 and 6
    come without waiting for another live message."""
    server = redis_factory()
    channel = "feed:two-outages"
    settings = make_settings(redis_url=server.url, namespaces=NAMESPACES)
    async with running_node(settings) as running, other_broker(server.url) as other, \
            connect(running.ws_url, token("old")) as old:
        node = running.node
        await subscribed_with_two(other, old, channel)
        gate = gate_history(node, monkeypatch)
        try:
            gate.hold_answer()  # the first refill's read: done, its answer held
            await cut_pubsub(server)
            await publish_numbers(other, channel, 3, 4)
            await eventually(lambda: len(gate.held) == 1, what="the refill's read")
            await cut_pubsub(server)  # the second outage
            await publish_numbers(other, channel, 5, 6)
            await eventually(
                lambda: node.subscriptions.generation_of(channel) == 2 and node.broker.up,
                what="the second reconnect",
            )
        finally:
            gate.release_all()
        assert await frames_until(old, 6) == messages(3, 6)
        assert gate.calls == 2
        await publish_numbers(other, channel, 7)
        assert await frames_until(old, 7) == messages(7, 7)


async def test_a_push_that_fails_half_way_through_a_page_costs_the_others_nothing(
    redis_factory: Factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One connection's push raises on the refill's page (3..6, one write: it holds offset
    4): the other gets everything once, the failing one loses what that push carried and
    nothing else, and nothing is sent twice (the page is not read again)."""
    server = redis_factory()
    channel = "feed:failing-push"
    settings = make_settings(redis_url=server.url, namespaces=NAMESPACES)
    async with running_node(settings) as running, other_broker(server.url) as other, \
            connect(running.ws_url, token("victim")) as victim, \
            connect(running.ws_url, token("bystander")) as bystander:
        node = running.node
        await bystander.subscribe(channel)
        await subscribed_with_two(other, victim, channel)
        assert await frames_until(bystander, 2) == messages(1, 2)
        victim_id = victim.welcome["client"]
        real_push = Session.push

        def push(session: Session, frame: bytes, count: int = 1) -> bool:
            if session.client_id == victim_id and b'"offset":4,' in frame:
                raise RuntimeError("push failed (test)")
            return real_push(session, frame, count)

        monkeypatch.setattr(Session, "push", push)
        gate = gate_history(node, monkeypatch)
        await cut_pubsub(server)
        await publish_numbers(other, channel, 3, 4, 5, 6)
        assert await frames_until(bystander, 6) == messages(3, 6)
        await publish_numbers(other, channel, 7, 8)
        assert await frames_until(bystander, 8) == messages(7, 8)
        assert await frames_until(victim, 8) == messages(7, 8)
        assert gate.calls == 1
    failed = [r for r in caplog.records if "delivery to one connection failed" in r.getMessage()]
    assert len(failed) == 1
