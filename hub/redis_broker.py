"""The cluster broker: Redis pub/sub relays publications between nodes, Redis streams hold
history (PROTOCOL §5, §6), on one server, a Sentinel master or a Redis Cluster.

Every key of a channel (history stream, offset/epoch meta, presence) and its pub/sub topic
carry the channel as one hash tag (`hub:s:{news}`), so on a Cluster a publish is one script
on one shard, and channels spread over all shards. The relay is per shard: one supervised
pub/sub connection (`hub.redis_link.Link`) to each shard's master, subscribed to the topics
of the channels this node has local subscribers on (SSUBSCRIBE on a Cluster). A shard that
fails over, or a slot that moves, is an outage of that shard's channels only: the node
refills those, and the others notice nothing.

Publishing is one Lua script per round trip: on one server (or a Sentinel's master) one round
trip is in flight per node, and the publications that came meanwhile go together in the next,
in the order they came (`Batcher`: no added wait when there is no crowd); on a Cluster each
goes on its own.
With history a publication is HINCRBY (offset, on the epoch the node expects), XADD and
PUBLISH, and the keys' TTL once a minute per channel at most (`ExpiryClock`); without history
the PUBLISH alone. Each refuses to run past a deadline on the Redis clock, so a publish
answered `unavailable` (timed out) is never carried out later. With
`HUB_REDIS_MIN_REPLICAS` a publish also waits for that many replicas (`WAIT`, on the
connection that ran it) before it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

from hub.broker import BrokerEvents, HistoryOptions, HistoryPage, StreamPosition
from hub.errors import BrokerUnavailable
from hub.protocol import Message, Relayed, decode_relayed, encode
from hub.redis_link import PROBE_INTERVAL, CommandProbe, Link
from hub.redis_presence import RedisPresence, ttl_ms
from hub.redis_support import (
    HISTORY_LUA,
    PUBLISH_BATCH_LUA,
    RESTART_EPOCH_LUA,
    Incident,
    Script,
    epoch_candidate,
)
from hub.redis_topology import (
    COMMAND_TIMEOUT,
    REDIS_ERRORS,
    Topology,
    as_topology,
    create_topology,
    tagged,
)
from hub.redis_url import RedisTarget, parse_redis_url
from hub.settings import Settings
from hub.tasks import cancel

log = logging.getLogger("hub.redis")

DEFAULT_PREFIX = "hub:"
TOPOLOGY_CHECK_SECONDS = 10.0  # a Cluster's slot map is read again at least this often
BATCH_LIMIT = 256  # publications in one script at most


class _Queued(NamedTuple):
    keys: list[bytes]
    item: list[Any]
    answer: asyncio.Future[Any]


_LEAD: Any = object()  # a queued publication's turn to send the batch it heads


def _leads(entry: _Queued) -> bool:
    answer = entry.answer
    return (answer.done() and not answer.cancelled() and answer.exception() is None
            and answer.result() is _LEAD)


class Batcher:
    """Publications go to Redis `slots` round trips at a time at most (one by default): one
    that finds a slot free goes at once, from its own task; those that come while every slot
    is taken queue, and go together, as one script, when a slot frees: the first of them
    still waiting sends the batch (woken once, as it would be for its answer) and answers the
    others (as Centrifugo's Redis broker pipelines what comes in a crowd). A crowd of
    publishes then costs one round trip and one script between them, and a lone publish
    waits for nothing. With one slot the node's publications run in the order they came; a
    publication whose caller gave up before it left is not sent."""

    def __init__(
        self, send: Callable[[list[bytes], list[Any]], Awaitable[list[Any]]],
        limit: int = BATCH_LIMIT, slots: int = 1,
    ) -> None:
        self._send = send
        self._limit = limit
        self._slots = slots
        self._in_flight = 0
        self._queue: list[_Queued] = []
        self._closed = False

    async def submit(self, keys: list[bytes], item: list[Any]) -> Any:
        """The script's answer for this publication; raises what the round trip raised."""
        if self._in_flight < self._slots and not self._queue:  # go now
            self._in_flight += 1
            try:
                [alone] = await self._send(keys, item)
            finally:
                self._release()
            return alone
        entry = _Queued(keys, item, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        try:
            answer = await entry.answer
        except asyncio.CancelledError:
            if _leads(entry):
                self._release()  # it was this one's turn: the next one waiting leads
            elif entry in self._queue:
                self._queue.remove(entry)
            raise
        if answer is not _LEAD:
            return answer
        return await self._lead(entry)

    async def _lead(self, head: _Queued) -> Any:
        """Send the batch `head` (this task's publication) heads, with what waits behind
        it; its own answer."""
        batch = [head]
        while self._queue and len(batch) < self._limit:
            entry = self._queue.pop(0)
            if not entry.answer.done():  # else its caller gave up: not sent
                batch.append(entry)
        if len(batch) == 1:  # alone after all: as if it had found the slot free
            try:
                [alone] = await self._send(head.keys, head.item)
            finally:
                self._release()
            return alone
        keys = [key for entry in batch for key in entry.keys]
        items = [arg for entry in batch for arg in entry.item]
        # Shielded: the others' publications do not share this caller's fate (one that gives
        # up does not make theirs fail, or leave the slot taken).
        sending = asyncio.ensure_future(self._send(keys, items))
        sending.add_done_callback(functools.partial(self._answer, batch))
        answers: list[Any] = await asyncio.shield(sending)
        return answers[0]

    def _answer(self, batch: list[_Queued], sending: asyncio.Future[list[Any]]) -> None:
        self._release()
        if sending.cancelled():
            failure: BaseException | None = BrokerUnavailable("the broker is closing")
        else:
            failure = sending.exception()
        for index, entry in enumerate(batch[1:], 1):
            if entry.answer.done():
                continue
            if failure is not None:
                entry.answer.set_exception(failure)
            else:
                entry.answer.set_result(sending.result()[index])

    def _release(self) -> None:
        """A round trip is back: the slot passes to the first publication still waiting,
        or is free."""
        while self._queue and not self._closed:
            first = self._queue.pop(0)
            if not first.answer.done():
                first.answer.set_result(_LEAD)
                return
        self._in_flight -= 1

    async def close(self) -> None:
        self._closed = True
        queued, self._queue = self._queue, []
        for entry in queued:
            if not entry.answer.done():
                entry.answer.set_exception(BrokerUnavailable("the broker is closing"))


class ExpiryClock:
    """When this node last set the TTL of a channel's history keys, and the epoch it last
    saw: a publish sets the TTL only every `every` seconds per channel (a tenth of the TTL,
    5 s to a minute), to the history's TTL plus that plus the longest a publish may wait for
    Redis (`grace`), so the keys
    outlive every publication by at least the TTL whichever node published it, and the
    script runs no PEXPIRE on most publishes. Short TTLs (under `min_ttl`) are set on every
    publish, exactly. Bounded: past `limit` channels it starts over (each channel's next
    publish then sets the TTL and reads the epoch)."""

    def __init__(
        self, every: float = 60.0, grace: float = 4.0, min_ttl: float = 60.0,
        limit: int = 65_536,
    ) -> None:
        self._every = every  # at most; a tenth of the TTL when that is less (5 s at least)
        self._grace = grace
        self._min_ttl = min_ttl
        self._limit = limit
        self._seen: dict[str, tuple[str, float]] = {}

    def plan(self, channel: str, ttl: float, now: float) -> tuple[str, int, bool, float]:
        """(expected epoch or '', TTL to set in ms, set it now, the time to remember if the
        publish succeeds); `now` is `time.monotonic()` before it is sent."""
        seen = self._seen.get(channel)
        if ttl < self._min_ttl:
            return (seen[0] if seen else "", ttl_ms(ttl), True, now)
        every = min(self._every, max(5.0, ttl / 10))
        expire = ttl_ms(ttl) + int((every + self._grace) * 1000)
        if seen is None:
            return "", expire, True, now
        epoch, refreshed = seen
        if now - refreshed >= every:
            return epoch, expire, True, now
        return epoch, expire, False, refreshed

    def saw(self, channel: str, epoch: str, refreshed: float) -> None:
        if len(self._seen) >= self._limit and channel not in self._seen:
            self._seen.clear()
        self._seen[channel] = (epoch, refreshed)

    def learn(self, channel: str, epoch: str) -> None:
        """An epoch read elsewhere (a history read): the next publish expects it, and sets
        the TTL (when it was last set is not known)."""
        if channel not in self._seen:
            self.saw(channel, epoch, -math.inf)

    def forget(self, channel: str) -> None:
        self._seen.pop(channel, None)


def create_redis_backends(
    settings: Settings, *, prefix: str = DEFAULT_PREFIX, max_connections: int = 64
) -> tuple[RedisBroker, RedisPresence]:
    """Broker and presence sharing one topology (and its command pool); the broker adds its
    pub/sub connections."""
    if not settings.redis_url:
        raise ValueError("create_redis_backends needs settings.redis_url")
    target: RedisTarget = parse_redis_url(settings.redis_url)
    topology = create_topology(target, max_connections=max_connections)
    broker = RedisBroker(topology, prefix=prefix, min_replicas=settings.redis_min_replicas)
    presence = RedisPresence(topology, settings.node_id, settings.presence_ttl, prefix=prefix)
    return broker, presence


class RedisBroker:
    """`Broker` over Redis. Channel names are used as bytes inside keys and topics, which
    Redis treats as opaque (no pattern subscriptions), so any name is safe. Topics carry
    the db number: Redis pub/sub ignores databases, and hubs on different dbs of one
    server must not hear each other."""

    def __init__(
        self,
        topology: Topology | Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        ping_interval: float = PROBE_INTERVAL,
        timeout: float = COMMAND_TIMEOUT,
        backoff_cap: float = 2.0,
        min_replicas: int = 0,
    ) -> None:
        self._topology = as_topology(topology)
        self._prefix = prefix.encode()
        self._topic_prefix = f"{prefix}c:{self._topology.db}:".encode()
        self._ping_interval = ping_interval
        self._timeout = timeout
        self._backoff_cap = backoff_cap
        self._min_replicas = min_replicas
        self._publish_script = Script.of(PUBLISH_BATCH_LUA)
        self._batcher = Batcher(self._send_batch)
        self._expiry = ExpiryClock(grace=2 * timeout)
        self._history_script = Script.of(HISTORY_LUA)
        self._restart_script = Script.of(RESTART_EPOCH_LUA)
        self._node_pools: dict[str, ConnectionPool] = {}  # Cluster masters, for WAIT
        self._publish_command = "SPUBLISH" if self._topology.sharded else "PUBLISH"
        self._events: BrokerEvents | None = None
        self._links: dict[str, Link] = {}  # pub/sub, per shard
        self._probes: dict[str, CommandProbe] = {}  # the command client's way, per shard
        self._watcher: asyncio.Task[None] | None = None
        self._look_again = asyncio.Event()  # a link failed or a topic moved
        # Topics whose link went down, until a link carries them again: they may have
        # missed publications then, whichever link it is (a new master's, on a Cluster).
        self._lost: set[bytes] = set()
        self._commands = Incident(log, "Redis commands")
        self._topology_incident = Incident(log, "Redis Cluster slot map")

    @property
    def topology(self) -> Topology:
        """Where the broker's Redis is (the events of PROTOCOL §14 use it too)."""
        return self._topology

    # Broker protocol

    @property
    def up(self) -> bool:
        """Serving: at least one shard is reachable (PROTOCOL §6)."""
        return any(self._shard_up(shard) for shard in self._links)

    def health(self) -> tuple[int, int]:
        """(shards reachable, shards known): reachable is both ways up, the pub/sub link and
        the command client's."""
        shards = list(self._links)
        return sum(self._shard_up(shard) for shard in shards), len(shards)

    def _shard_up(self, shard: str) -> bool:
        link, probe = self._links.get(shard), self._probes.get(shard)
        return link is not None and link.up and (probe is None or probe.up)

    async def start(self, events: BrokerEvents) -> None:
        """Learn the shards, connect to each, and wait for the first attempts. If Redis is
        not there yet, the node starts anyway (not ready) and keeps trying."""
        self._events = events
        with contextlib.suppress(*REDIS_ERRORS):
            await self._refresh()
        self._watcher = asyncio.create_task(self._watch(), name="hub-redis-topology")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3 * self._timeout):
                attempts = [link.first_attempt for link in self._links.values()]
                attempts += [probe.first_attempt for probe in self._probes.values()]
                for attempt in attempts:
                    await attempt.wait()
        if not self.up:
            log.warning("Redis is not reachable yet; the node is not ready until it is")

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        await cancel(watcher)
        await asyncio.gather(*(link.close() for link in self._links.values()),
                             *(probe.close() for probe in self._probes.values()))
        self._links.clear()
        self._probes.clear()
        self._events = None
        await self._batcher.close()
        for pool in self._node_pools.values():
            await pool.disconnect()
        await self._topology.close()

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed it; BrokerUnavailable when the channel's shard is
        not reachable (the reconnect subscribes every channel the node wants)."""
        topic = self._topic(channel)
        link = self._links.get(self._topology.shard_of(topic) or "")
        if link is None:
            raise BrokerUnavailable("no reachable Redis shard serves this channel")
        await link.subscribe(topic)

    async def unsubscribe(self, channel: str) -> None:
        """The link a subscribe would take goes first, before anything awaits: a subscribe
        to the same channel made after this call reaches Redis after this UNSUBSCRIBE.
        Other links may hold the topic from before a shard moved."""
        topic = self._topic(channel)
        self._lost.discard(topic)
        home = self._links.get(self._topology.shard_of(topic) or "")
        others = [link for link in self._links.values() if link is not home]
        for link in ([home] if home is not None else []) + others:
            await link.unsubscribe(topic)

    async def publish(
        self, channel: str, relayed: Relayed, history: HistoryOptions | None = None
    ) -> StreamPosition | None:
        """Taken as soon as the command client reaches the channel's shard, whether or not
        this node's pub/sub link to it is up (docs/protocol.md §5)."""
        self._check_commands(channel)
        keys = self._keys(channel)
        try:
            if history is not None and isinstance(relayed, Message):
                position: StreamPosition | None = await self._publish_message(
                    channel, keys, relayed, history
                )
            else:
                item: list[bytes | str | int] = [
                    b"r", self._deadline_ms(), self._topic(channel), encode(relayed),
                ]
                await self._publish_item(keys, item)
                position = None
        except REDIS_ERRORS as exc:
            self._commands.failed(exc)
            raise BrokerUnavailable("publish failed: Redis is unreachable") from exc
        self._commands.recovered()
        return position

    async def history(
        self,
        channel: str,
        history: HistoryOptions,
        since: StreamPosition | None = None,
        limit: int = 1000,
    ) -> HistoryPage:
        self._check_commands(channel)
        args: list[bytes | str | int] = [ttl_ms(history.ttl), epoch_candidate(), max(limit, 0)]
        args += [1, since.offset, since.epoch] if since is not None else [0, 0, ""]
        try:
            reply = await self._run(self._history_script, self._keys(channel), args)
        except REDIS_ERRORS as exc:
            self._commands.failed(exc)
            raise BrokerUnavailable("history failed: Redis is unreachable") from exc
        self._commands.recovered()
        epoch, offset, complete, *payloads = reply
        position = StreamPosition(int(offset), epoch.decode())
        self._expiry.learn(channel, position.epoch)
        messages = [m for m in map(decode_relayed, payloads) if isinstance(m, Message)]
        return HistoryPage(position, messages, complete=bool(complete))

    async def remove_history(self, channel: str) -> None:
        """The stream is emptied, not deleted: a stream gone while the meta says messages
        were published is how a lost history (a new epoch) looks, and here the epoch and
        offset stay."""
        self._check_commands(channel)
        stream_key = self._keys(channel)[0]
        try:
            async with self._topology.slots_for(stream_key):
                await self._topology.client.xtrim(stream_key, maxlen=0, approximate=False)
        except REDIS_ERRORS as exc:
            self._commands.failed(exc)
            raise BrokerUnavailable("removing history failed: Redis is unreachable") from exc
        self._commands.recovered()

    async def restart_epoch(
        self, channel: str, history: HistoryOptions, stale: StreamPosition
    ) -> StreamPosition:
        """Start a new epoch for a channel whose history lost messages the node delivered
        (a failover to a replica that lacked them), unless another node already did; the
        position to go on from either way."""
        self._check_commands(channel)
        args: list[bytes | str | int] = [ttl_ms(history.ttl), epoch_candidate(), stale.epoch]
        try:
            epoch, offset = await self._run(self._restart_script, self._keys(channel), args)
        except REDIS_ERRORS as exc:
            self._commands.failed(exc)
            raise BrokerUnavailable("starting a new epoch failed: Redis is unreachable") from exc
        return StreamPosition(int(offset), epoch.decode())

    # keys, scripts and publishing

    def _topic(self, channel: str) -> bytes:
        return self._topic_prefix + tagged(channel)

    def _keys(self, channel: str) -> list[bytes]:
        name = tagged(channel)
        return [self._prefix + b"s:" + name, self._prefix + b"m:" + name]

    def _check_commands(self, channel: str) -> None:
        """Refuse at once what the command client cannot take to the channel's shard now
        (its probe failed): no command waits for a timeout on a link known to be down."""
        shard = self._topology.shard_of(self._topic(channel))
        probe = self._probes.get(shard) if shard is not None else None
        if probe is None:
            if not self.up:
                raise BrokerUnavailable("Redis is unreachable")
        elif not probe.up:
            raise BrokerUnavailable(f"Redis commands to {shard} fail")

    def _deadline_ms(self) -> int:
        """Redis must run a publish before the client gives up on the reply; a quarter of
        the timeout is left for the reply's way back."""
        skews = [link.clock_skew_ms for link in self._links.values() if link.up]
        skew = skews[0] if skews else 0.0
        return int(time.time() * 1000 + skew + self._timeout * 750)

    async def _run(
        self, script: Script, keys: list[bytes], args: list[Any], deadline_at: int | None = None
    ) -> Any:
        """Run `script`, loading it on a server that lacks it. `args[deadline_at]` is a
        publish deadline: the first call did not run, so the second gets a new one."""
        async with self._topology.slots_for(keys[0]):
            client = self._topology.client
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(script.source)
                if deadline_at is not None:
                    args[deadline_at] = self._deadline_ms()
                return await client.evalsha(script.sha, len(keys), *keys, *args)

    async def _publish_item(self, keys: list[bytes], item: list[Any]) -> Any:
        """One publication through the script: batched with others on one server, alone
        on a Cluster (a script's keys must share a slot there) or with `min_replicas`."""
        if self._min_replicas:
            async with self._topology.slots_for(keys[0]):
                answer = await self._publish_replicated(keys, item)
        elif self._topology.sharded:
            [answer] = await self._send_batch(keys, item)
        else:
            answer = await self._batcher.submit(keys, item)
        if answer is None:
            raise TimeoutError("publish reached Redis after its deadline")
        if isinstance(answer, list) and answer and answer[0] == b"err":
            raise ResponseError(answer[1].decode(errors="replace"))
        return answer

    async def _send_batch(self, keys: list[bytes], items: list[Any]) -> list[Any]:
        """One script for the publications `items` (one after another, flat); on a server
        that lacked the script it did not run, so the second call gets new deadlines."""
        script = self._publish_script
        async with self._topology.slots_for(keys[0]):
            client = self._topology.client
            try:
                answers: list[Any] = await client.evalsha(
                    script.sha, len(keys), *keys, self._publish_command, *items
                )
            except NoScriptError:
                await client.script_load(script.source)
                _renew_deadlines(items, self._deadline_ms())
                answers = await client.evalsha(
                    script.sha, len(keys), *keys, self._publish_command, *items
                )
        return answers

    async def _publish_message(
        self, channel: str, keys: list[bytes], message: Message, history: HistoryOptions
    ) -> StreamPosition:
        # The script adds offset and epoch to the encoded object; a stale pair must not be
        # encoded as well.
        message.offset = message.epoch = None
        sent = time.monotonic()
        expected, expire_ms, refresh, refreshed = self._expiry.plan(channel, history.ttl, sent)
        item: list[bytes | str | int] = [
            b"H" if refresh else b"h", self._deadline_ms(), self._topic(channel),
            encode(message), expire_ms, max(history.size, 1), expected, epoch_candidate(),
        ]
        try:
            offset, epoch = await self._publish_item(keys, item)
        except BaseException:
            self._expiry.forget(channel)
            raise
        message.offset, message.epoch = int(offset), epoch.decode()
        # The script sets the TTL at an epoch's first message whatever was asked.
        self._expiry.saw(channel, message.epoch, sent if message.offset == 1 else refreshed)
        return StreamPosition(message.offset, message.epoch)

    async def _publish_replicated(self, keys: list[bytes], item: list[Any]) -> Any:
        """The publish script, then WAIT for the replicas, on one connection of the
        channel's master. Too few replicas in time: `unavailable` (it may still be
        delivered: PROTOCOL §6)."""
        client = self._node_client(keys[0])
        wait_ms = max(1, int(self._timeout * 500))
        script = self._publish_script
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            pipe.execute_command(
                "EVALSHA", script.sha, len(keys), *keys, self._publish_command, *item
            )
            pipe.execute_command("WAIT", self._min_replicas, wait_ms)
            reply, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 1:
                await client.script_load(script.source)
                _renew_deadlines(item, self._deadline_ms())  # it did not run
                continue
            for result in (reply, replicas):
                if isinstance(result, Exception):
                    raise result
            [answer] = reply
            if answer is not None and int(replicas) < self._min_replicas:
                raise BrokerUnavailable(
                    f"published, but only {int(replicas)} of {self._min_replicas} replicas "
                    "confirmed in time; it may or may not survive a failover"
                )
            return answer
        raise AssertionError("unreachable")

    def _node_client(self, key: bytes) -> Any:
        """A client of the server that holds `key` (the command client itself but on a
        Cluster, where it is the key's master's own client)."""
        client = self._topology.client
        get_node = getattr(client, "get_node_from_key", None)
        if get_node is None:
            return client
        node = get_node(key)
        pool = self._node_pools.get(node.name)
        if pool is None:
            # As many as the master's slots let through, so those are the only gate.
            pool = self._node_pools[node.name] = BlockingConnectionPool(
                connection_class=node.connection_class, max_connections=64, timeout=2.0,
                **{**node.connection_kwargs, "protocol": 2},
            )
        return Redis(connection_pool=pool)

    # the links (LinkOwner)

    def wanted(self, link: Link) -> list[bytes]:
        events = self._events
        if events is None:
            return []
        topology = self._topology
        topics = (self._topic(channel) for channel in events.channels)
        return [topic for topic in topics if topology.shard_of(topic) == link.shard]

    def deliver(self, publications: list[tuple[bytes, bytes]]) -> None:
        events = self._events
        if events is None:
            return
        by_topic: dict[bytes, list[Relayed]] = {}
        for topic, payload in publications:
            try:
                relayed = decode_relayed(payload)
            except msgspec.DecodeError as exc:
                log.warning("dropped an undecodable publication on %r: %s",
                            self._channel_of(topic), exc)
                continue
            by_topic.setdefault(topic, []).append(relayed)
        for topic, relayed_list in by_topic.items():
            channel = self._channel_of(topic)
            try:
                events.on_relayed(channel, relayed_list)
            except Exception:
                log.exception("on_relayed failed for channel %r", channel)

    def went_up(self, link: Link, topics: list[bytes], reconnected: bool) -> None:
        """A link carries `topics` (again): those it carried before it went down, and
        those another link lost, may have missed publications."""
        probe = self._probes.get(link.shard)
        if probe is not None and not probe.up:
            probe.poke()  # Redis answers the link: the commands' way is likely back too
        missed = topics if reconnected else [topic for topic in topics if topic in self._lost]
        self._lost.difference_update(topics)
        if self._events is None:
            return
        if reconnected or missed:
            self._events.on_broker_up(True, [self._channel_of(topic) for topic in missed])
        else:
            self._events.on_broker_up(False, [self._channel_of(topic) for topic in topics])
        if self._shard_up(link.shard):
            self._events.on_broker_ready()

    def went_down(self, link: Link, topics: list[bytes]) -> None:
        self._look_again.set()
        self._lost.update(topics)
        if self._events is not None:
            self._events.on_broker_down([self._channel_of(topic) for topic in topics])

    def _probe_changed(self, shard: str) -> None:
        """The command client's way to `shard` went down or came back; back, with the
        shard's link up, the node goes on with what waited for it (catch-up reads)."""
        self._look_again.set()
        if self._events is not None and self._shard_up(shard):
            self._events.on_broker_ready()

    def lost_topic(self, link: Link, topic: bytes) -> None:
        self.went_down(link, [topic])

    def failed(self, link: Link, exc: BaseException) -> None:
        self._look_again.set()

    async def still_serves(self, link: Link, connection: AbstractConnection) -> bool:
        return await self._topology.still_serves(link.shard, connection)

    def _channel_of(self, topic: bytes) -> str:
        return topic[len(self._topic_prefix) + 1 : -1].decode(errors="surrogatepass")

    # the shards

    async def _watch(self) -> None:
        """Keep one link per shard, and each wanted topic on its shard's link: read the
        shards again when a link fails or a topic moves, and now and then."""
        while True:
            # While a shard is unreachable its replica may be promoted any moment: look
            # often (PROTOCOL §6: served again within 5 s of the promotion).
            reachable, known = self.health()
            pause = TOPOLOGY_CHECK_SECONDS if known and reachable == known else 0.5
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._look_again.wait(), pause)
            self._look_again.clear()
            try:
                await self._refresh()
            except REDIS_ERRORS as exc:
                self._topology_incident.failed(exc)
                await asyncio.sleep(min(self._backoff_cap, 0.25))
                self._look_again.set()
            except Exception:
                log.exception("keeping the Redis links in line with the shards failed")
                await asyncio.sleep(self._backoff_cap)
            else:
                self._topology_incident.recovered()

    async def _refresh(self) -> None:
        await self._topology.refresh()
        shards = set(self._topology.shards())
        for shard in shards - set(self._links):
            link = self._links[shard] = Link(
                shard, functools.partial(self._topology.connection_to, shard), self,
                sharded=self._topology.sharded, ping_interval=self._ping_interval,
                timeout=self._timeout, backoff_cap=self._backoff_cap,
            )
            link.start()
        for shard in shards - set(self._probes):
            probe = self._probes[shard] = CommandProbe(
                shard, functools.partial(self._topology.connection_to, shard),
                functools.partial(self._probe_changed, shard),
            )
            probe.start()
        for shard in set(self._probes) - shards:
            await self._probes.pop(shard).close()
        for shard in set(self._links) - shards:
            gone = self._links.pop(shard)
            if gone.up and gone.sent:
                self.went_down(gone, sorted(gone.sent))
            await gone.close()
        await asyncio.gather(*(self._rehome(link) for link in list(self._links.values())))

    async def _rehome(self, link: Link) -> None:
        """Topics whose slot moved to `link`'s shard are subscribed there (and refilled);
        those that moved away are dropped."""
        if not link.up:
            return
        wanted = set(self.wanted(link))
        for topic in link.sent - wanted:
            await link.unsubscribe(topic)
        arrived = sorted(wanted - link.sent)
        for topic in arrived:
            with contextlib.suppress(BrokerUnavailable):
                await link.subscribe(topic)
        arrived = [topic for topic in arrived if topic in link.sent]
        if arrived:
            self.went_up(link, arrived, reconnected=True)


# Arguments of one publication in the publish script, by its kind (its first argument):
# a relayed frame (b"r": kind, deadline, topic, payload) or a message with history (b"h",
# b"H": kind, deadline, topic, payload, expiry, size, expected epoch, candidate epoch).
_ITEM_LENGTHS = {b"r": 4, b"h": 8, b"H": 8}


def _renew_deadlines(items: list[Any], deadline_ms: int) -> None:
    """Give every publication of a flat batch `deadline_ms` (the second argument of each)."""
    at = 0
    while at < len(items):
        items[at + 1] = deadline_ms
        at += _ITEM_LENGTHS[items[at]]
