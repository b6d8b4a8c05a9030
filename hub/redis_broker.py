"""The cluster broker: Redis pub/sub relays publications between nodes, Redis streams hold
history (PROTOCOL §5, §6), on one server, a Sentinel master or a Redis Cluster.

Every key of a channel (history stream, offset/epoch meta, presence) and its pub/sub topic
carry the channel as one hash tag (`hub:s:{news}`), so on a Cluster a publish is one script
on one shard, and channels spread over all shards. The relay is per shard: one supervised
pub/sub connection (`hub.redis_link.Link`) to each shard's master, subscribed to the topics
of the channels this node has local subscribers on (SSUBSCRIBE on a Cluster). A shard that
fails over, or a slot that moves, is an outage of that shard's channels only: the node
refills those, and the others notice nothing.

Publishing with history is one Lua script (epoch check, offset, XADD, EXPIRE, PUBLISH) in
one round trip; without history a small script around PUBLISH. Both refuse to run past a
deadline on the Redis clock, so a publish answered `unavailable` (timed out) is never
carried out later. With `HUB_REDIS_MIN_REPLICAS` a publish also waits for that many
replicas (`WAIT`, on the connection that ran it) before it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

import msgspec
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError

from hub.broker import BrokerEvents, HistoryOptions, HistoryPage, StreamPosition
from hub.errors import BrokerUnavailable
from hub.protocol import Message, Relayed, decode_relayed, encode
from hub.redis_link import Link
from hub.redis_presence import RedisPresence, ttl_ms
from hub.redis_support import (
    HISTORY_LUA,
    PUBLISH_LUA,
    RELAY_LUA,
    RESTART_EPOCH_LUA,
    Incident,
    Script,
    epoch_candidate,
)
from hub.redis_topology import REDIS_ERRORS, Topology, as_topology, create_topology, tagged
from hub.redis_url import RedisTarget, parse_redis_url
from hub.settings import Settings
from hub.tasks import cancel

log = logging.getLogger("hub.redis")

DEFAULT_PREFIX = "hub:"
TOPOLOGY_CHECK_SECONDS = 10.0  # a Cluster's slot map is read again at least this often


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
        ping_interval: float = 2.5,
        timeout: float = 2.0,
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
        self._publish_script = Script.of(PUBLISH_LUA)
        self._relay_script = Script.of(RELAY_LUA)
        self._history_script = Script.of(HISTORY_LUA)
        self._restart_script = Script.of(RESTART_EPOCH_LUA)
        self._node_pools: dict[str, ConnectionPool] = {}  # Cluster masters, for WAIT
        self._publish_command = "SPUBLISH" if self._topology.sharded else "PUBLISH"
        self._events: BrokerEvents | None = None
        self._links: dict[str, Link] = {}
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
        return any(link.up for link in self._links.values())

    def health(self) -> tuple[int, int]:
        """(shards reachable, shards known)."""
        links = list(self._links.values())
        return sum(link.up for link in links), len(links)

    async def start(self, events: BrokerEvents) -> None:
        """Learn the shards, connect to each, and wait for the first attempts. If Redis is
        not there yet, the node starts anyway (not ready) and keeps trying."""
        self._events = events
        with contextlib.suppress(*REDIS_ERRORS):
            await self._refresh()
        self._watcher = asyncio.create_task(self._watch(), name="hub-redis-topology")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3 * self._timeout):
                for link in list(self._links.values()):
                    await link.first_attempt.wait()
        if not self.up:
            log.warning("Redis is not reachable yet; the node is not ready until it is")

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        await cancel(watcher)
        await asyncio.gather(*(link.close() for link in self._links.values()))
        self._links.clear()
        self._events = None
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
        self._check_up()
        keys = self._keys(channel)
        try:
            if history is not None and isinstance(relayed, Message):
                position: StreamPosition | None = await self._publish_message(
                    channel, keys, relayed, history
                )
            else:
                args: list[bytes | str | int] = [
                    self._deadline_ms(), self._topic(channel), encode(relayed),
                    self._publish_command,
                ]
                if await self._run(self._relay_script, keys, args) is None:
                    raise TimeoutError("publish reached Redis after its deadline")
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
        self._check_up()
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
        messages = [m for m in map(decode_relayed, payloads) if isinstance(m, Message)]
        return HistoryPage(position, messages, complete=bool(complete))

    async def remove_history(self, channel: str) -> None:
        """The stream is emptied, not deleted: a stream gone while the meta says messages
        were published is how a lost history (a new epoch) looks, and here the epoch and
        offset stay."""
        self._check_up()
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
        self._check_up()
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

    def _check_up(self) -> None:
        if not self.up:
            raise BrokerUnavailable("Redis is unreachable")

    def _deadline_ms(self) -> int:
        """Redis must run a publish before the client gives up on the reply; a quarter of
        the timeout is left for the reply's way back."""
        skews = [link.clock_skew_ms for link in self._links.values() if link.up]
        skew = skews[0] if skews else 0.0
        return int(time.time() * 1000 + skew + self._timeout * 750)

    async def _run(self, script: Script, keys: list[bytes], args: list[Any]) -> Any:
        async with self._topology.slots_for(keys[0]):
            return await script.run(self._topology.client, keys, args)

    async def _publish_message(
        self, channel: str, keys: list[bytes], message: Message, history: HistoryOptions
    ) -> StreamPosition:
        # The script adds offset and epoch to the encoded object; a stale pair must not be
        # encoded as well.
        message.offset = message.epoch = None
        args: list[bytes | str | int] = [
            ttl_ms(history.ttl), epoch_candidate(), encode(message), max(history.size, 1),
            self._topic(channel), self._deadline_ms(), self._publish_command,
        ]
        if self._min_replicas:
            async with self._topology.slots_for(keys[0]):
                reply = await self._publish_replicated(keys, args)
        else:
            reply = await self._run(self._publish_script, keys, args)
        if reply is None:
            raise TimeoutError("publish reached Redis after its deadline")
        offset, epoch = reply
        message.offset, message.epoch = int(offset), epoch.decode()
        return StreamPosition(message.offset, message.epoch)

    async def _publish_replicated(self, keys: list[bytes], args: list[Any]) -> Any:
        """The publish script, then WAIT for the replicas, on one connection of the
        channel's master. Too few replicas in time: `unavailable` (it may still be
        delivered: PROTOCOL §6)."""
        client = self._node_client(keys[0])
        wait_ms = max(1, int(self._timeout * 500))
        script = self._publish_script
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self._min_replicas, wait_ms)
            reply, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 1:
                await client.script_load(script.source)
                continue
            for result in (reply, replicas):
                if isinstance(result, Exception):
                    raise result
            if reply is not None and int(replicas) < self._min_replicas:
                raise BrokerUnavailable(
                    f"published, but only {int(replicas)} of {self._min_replicas} replicas "
                    "confirmed in time; it may or may not survive a failover"
                )
            return reply
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
        missed = topics if reconnected else [topic for topic in topics if topic in self._lost]
        self._lost.difference_update(topics)
        if self._events is None:
            return
        if reconnected or missed:
            self._events.on_broker_up(True, [self._channel_of(topic) for topic in missed])
        else:
            self._events.on_broker_up(False, [self._channel_of(topic) for topic in topics])

    def went_down(self, link: Link, topics: list[bytes]) -> None:
        self._look_again.set()
        self._lost.update(topics)
        if self._events is not None:
            self._events.on_broker_down([self._channel_of(topic) for topic in topics])

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

