"""`RedisBroker`, the cluster broker: Redis pub/sub relays publications between nodes,
Redis streams hold history (PROTOCOL §5, §6), on one server, a Sentinel master or a Redis
Cluster.

Every key of a channel (history stream, offset/epoch meta, presence) and its pub/sub topic
carry the channel as one hash tag (`hub:s:{news}`), so on a Cluster a publish is one script
on one shard, and channels spread over all shards. The relay is per shard: one supervised
pub/sub connection (`hub.redis.links.Link`) to each shard's master, subscribed to the topics
of the channels this node has local subscribers on (SSUBSCRIBE on a Cluster). A shard that
fails over, or a slot that moves, is an outage of that shard's channels only: the node
refills those, and the others notice nothing.

Publishing is one Lua script per round trip: on one server (or a Sentinel's master) one round
trip is in flight per node, and the publications that came meanwhile go together in the next,
in the order they came (`hub.redis.batcher.Batcher`: no added wait when there is no crowd);
on a Cluster each goes on its own.
With history a publication is HINCRBY (offset, on the epoch the node expects), XADD and
PUBLISH, and the keys' TTL once a minute per channel at most
(`hub.redis.history.ExpiryClock`); without history the PUBLISH alone. Each refuses to run
past a deadline on the Redis clock, so a publish answered `unavailable` (timed out) is never
carried out later. With `HUB_REDIS_MIN_REPLICAS` a publish also waits for that many replicas
(`WAIT`, on the connection that ran it) before it is answered.
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
from redis.exceptions import NoScriptError, ResponseError

from hub.broker import BrokerEvents, HistoryOptions, HistoryPage, StreamPosition
from hub.errors import BrokerUnavailable
from hub.incident import Incident
from hub.protocol import Message, Relayed, decode_relayed, encode
from hub.redis.batcher import Batcher
from hub.redis.history import (
    HISTORY_LUA,
    PUBLISH_BATCH_LUA,
    RESTART_EPOCH_LUA,
    ExpiryClock,
    epoch_candidate,
    renew_deadlines,
)
from hub.redis.links import PROBE_INTERVAL, CommandProbe, Link
from hub.redis.scripts import Script, ttl_ms
from hub.redis.topology import COMMAND_TIMEOUT, REDIS_ERRORS, Topology, as_topology, tagged
from hub.tasks import cancel

log = logging.getLogger("hub.redis")

DEFAULT_PREFIX = "hub:"
TOPOLOGY_CHECK_SECONDS = 10.0  # a Cluster's slot map is read again at least this often


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
                renew_deadlines(items, self._deadline_ms())
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
                renew_deadlines(item, self._deadline_ms())  # it did not run
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
