"""Where the hub's Redis is: one server, the master that Sentinels name, or the masters of a
Redis Cluster, behind one small interface (`Topology`), built by redis-py's own clients.

A topology gives the command client (one pool, shared by broker, presence and the events
ledger), the shards (one for a server or Sentinel; one per master of a Cluster), which
shard a pub/sub topic lives on, and new pub/sub connections to a shard. Everything here is
about *where*; what is sent is the business of `hub.redis.broker`, `hub.redis.presence`
and `hub.redis.events`; how many commands may run at once on a server is
`hub.redis.gate`'s.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, TypeAlias, cast

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from hub.redis.gate import CommandSlots, command_slots
from hub.redis.patience import (
    PatientConnection,
    PatientSentinelConnection,
    PatientSentinelSSLConnection,
    PatientSSLConnection,
)
from hub.redis.url import Kind, RedisTarget, parse_redis_url

log = logging.getLogger("hub.redis")

# redis-py's inline annotations make `Redis` plain; the types-redis stubs make it generic.
RedisClient: TypeAlias = "Redis[bytes]"  # type: ignore[type-arg, unused-ignore]
# Errors that mean "Redis is not there right now" (redis-py wraps most socket errors;
# cluster routing errors are not RedisErrors).
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)

SERVER_SHARD = "redis"
REBUILD_AFTER_FAILURES = 3

# Short timeouts: a command to an unreachable Redis fails within a second instead of
# hanging (PROTOCOL §5: `unavailable` within 1 s); no command is retried by redis-py, so a
# publish is never sent twice.
COMMAND_TIMEOUT = 0.8
_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 0.5, "socket_timeout": COMMAND_TIMEOUT}


class Topology(Protocol):
    sharded: bool  # SSUBSCRIBE/SPUBLISH (a Cluster) or SUBSCRIBE/PUBLISH
    db: int

    def slots_for(self, key: bytes) -> CommandSlots:
        """The gate to hold around a command on `key` (or a pipeline whose first key it
        is): one per server, so a Cluster master that hangs holds up only its own."""

    @property
    def client(self) -> Any:
        """The command client; a Cluster's may be rebuilt, so ask each time."""

    def shards(self) -> list[str]:
        """The shards that hold data now: one name each (a Cluster's masters)."""

    def shard_of(self, topic: bytes) -> str | None:
        """The shard a topic (or key with the same hash tag) lives on; None when no shard
        is known to hold it."""

    async def refresh(self) -> None:
        """Learn the shards again (a Cluster's slot map); raises REDIS_ERRORS."""

    def connection_to(self, shard: str) -> AbstractConnection:
        """A new, unconnected connection for pub/sub on `shard` (RESP2)."""

    async def still_serves(self, shard: str, connection: AbstractConnection) -> bool:
        """The server behind `connection` is still `shard`'s master."""

    async def close(self) -> None: ...


def tagged(name: str) -> bytes:
    """A channel name as a Redis Cluster hash tag: every key of the channel (and its
    pub/sub topic) hashes to the channel's slot."""
    return b"{" + name.encode(errors="surrogatepass") + b"}"


def as_topology(given: Topology | Redis) -> Topology:
    """Tests and tools may hand over a plain client: one server."""
    if isinstance(given, Redis):
        return ServerTopology(given)
    return given


def create_topology(target: RedisTarget, *, max_connections: int = 64) -> Topology:
    if target.kind is Kind.CLUSTER:
        return ClusterTopology(target, max_connections=max_connections)
    if target.kind is Kind.SENTINEL:
        return SentinelTopology(target, max_connections=max_connections)
    return ServerTopology(create_server_client(target.url, max_connections=max_connections))


def create_server_client(url: str, *, max_connections: int = 64) -> RedisClient:
    """One server: a pool of at most `max_connections`. It does not wait for a free one:
    the topology's `CommandSlots` lets no more commands run at once (a waiting pool costs
    each command an asyncio condition and a timeout, about 5% of a node's CPU per publish).
    TLS (`rediss://`), user, password and db number come from the URL, read by
    `hub.redis.url` as for the other forms (`redis://secret@host` is a password, as for
    redis-cli; redis-py's own parser would take it for a user name).

    RESP2: with redis-py 8's default RESP3 (and hiredis) a pooled connection that Redis
    closed (a restart) is handed out again and fails once (redis-py #4252); with RESP2 the
    pool notices the EOF and reconnects.
    """
    target = parse_redis_url(url)
    [(host, port)] = target.nodes
    kwargs = target.connection_kwargs()
    connection_class = PatientSSLConnection if kwargs.pop("ssl", False) else PatientConnection
    client: RedisClient = Redis(
        connection_pool=ConnectionPool(
            connection_class=connection_class, host=host, port=port, db=target.db,
            protocol=2, max_connections=max_connections,
            retry=AsyncRetry(NoBackoff(), 0), **_TIMEOUTS, **kwargs,
        )
    )
    return client


class ServerTopology:
    """One Redis server: one shard, reached through the command client's pool."""

    sharded = False

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        pool = client.connection_pool
        self.db = int(pool.connection_kwargs.get("db", 0) or 0)
        self._slots = command_slots(int(getattr(pool, "max_connections", 64) or 64))

    def slots_for(self, key: bytes) -> CommandSlots:
        return self._slots

    @property
    def client(self) -> RedisClient:
        return self._client

    def shards(self) -> list[str]:
        return [SERVER_SHARD]

    def shard_of(self, topic: bytes) -> str | None:
        return SERVER_SHARD

    async def refresh(self) -> None:
        return None

    def connection_to(self, shard: str) -> AbstractConnection:
        pool = self._client.connection_pool
        connection: AbstractConnection = pool.connection_class(
            **{**pool.connection_kwargs, "protocol": 2}
        )
        return connection

    async def still_serves(self, shard: str, connection: AbstractConnection) -> bool:
        return True

    async def close(self) -> None:
        await self._client.connection_pool.disconnect()


class SentinelTopology(ServerTopology):
    """The master that Sentinels name: every new connection asks them where it is, and a
    pub/sub connection whose server is no longer the master is given up (a failover is an
    outage, after which the node refills)."""

    def __init__(self, target: RedisTarget, *, max_connections: int) -> None:
        assert target.master is not None
        sentinel_kwargs: dict[str, Any] = dict(_TIMEOUTS)
        if target.sentinel_password:
            sentinel_kwargs["password"] = target.sentinel_password
        if target.tls:
            sentinel_kwargs["ssl"] = True
            sentinel_kwargs.update(target.options)
        self._sentinel = cast(Any, Sentinel)(
            list(target.nodes), sentinel_kwargs=sentinel_kwargs,
            **_TIMEOUTS, **target.connection_kwargs(),
        )
        self._master = target.master
        client: RedisClient = self._sentinel.master_for(
            target.master, db=target.db, protocol=2, max_connections=max_connections,
            retry=AsyncRetry(NoBackoff(), 0),
            connection_class=PatientSentinelSSLConnection if target.tls
            else PatientSentinelConnection,
        )
        super().__init__(client)
        self.db = target.db

    async def still_serves(self, shard: str, connection: AbstractConnection) -> bool:
        try:
            host, port = await self._sentinel.discover_master(self._master)
        except REDIS_ERRORS:
            return True  # the Sentinels cannot say; the connection itself still answers
        serving = cast(Any, connection)
        return bool((serving.host, int(serving.port)) == (host, int(port)))


class ClusterTopology:
    """A Redis Cluster through redis-py's `RedisCluster`: the slot map is its; a client
    that cannot learn the cluster any more is rebuilt from the configured seeds."""

    sharded = True
    db = 0

    def __init__(self, target: RedisTarget, *, max_connections: int) -> None:
        self._target = target
        self._max_connections = max_connections
        self._slots: dict[str, CommandSlots] = {}  # per master, by name
        self._unrouted = command_slots(max_connections)  # keys of a slot no master serves
        self._client = self._build()
        self._initialised = False
        self._failed_refreshes = 0

    def _build(self) -> RedisCluster:
        seeds = [ClusterNode(host, port) for host, port in self._target.nodes]
        return RedisCluster(
            startup_nodes=seeds, require_full_coverage=False, protocol=2,
            # No retries: a publish whose connection failed may have run, and must not
            # run twice. Redirects (MOVED, ASK) are followed: those did not run.
            max_connections=self._max_connections, retry=AsyncRetry(NoBackoff(), 0),
            **_TIMEOUTS, **self._target.connection_kwargs(),
        )

    @property
    def client(self) -> RedisCluster:
        return self._client

    def shards(self) -> list[str]:
        if not self._initialised:
            return []
        return sorted(node.name for node in self._client.get_primaries())

    def slots_for(self, key: bytes) -> CommandSlots:
        shard = self.shard_of(key)
        if shard is None:
            return self._unrouted
        slots = self._slots.get(shard)
        if slots is None:
            slots = self._slots[shard] = command_slots(self._max_connections)
        return slots

    def shard_of(self, topic: bytes) -> str | None:
        if not self._initialised:
            return None
        try:
            return str(self._client.nodes_manager.get_node_from_slot(key_slot(topic)).name)
        except RedisClusterException:
            return None  # a slot no master serves right now

    async def refresh(self) -> None:
        try:
            if self._initialised:
                await self._client.nodes_manager.initialize()
            else:
                await self._client.initialize()
                self._initialised = True
        except REDIS_ERRORS:
            self._failed_refreshes += 1
            # A client that failed to initialise is closed, and one that keeps failing
            # may hold only nodes that are gone: start again from the configured seeds.
            if not self._initialised or self._failed_refreshes >= REBUILD_AFTER_FAILURES:
                self._initialised = False
                self._failed_refreshes = 0
                await self._discard()
            raise
        self._failed_refreshes = 0

    async def _discard(self) -> None:
        old, self._client = self._client, self._build()
        try:
            await old.aclose()
        except REDIS_ERRORS as exc:
            log.debug("closing a failed cluster client: %s", exc)

    def connection_to(self, shard: str) -> AbstractConnection:
        node = self._client.get_node(node_name=shard)
        if node is None:
            raise RedisClusterException(f"no cluster node {shard}")
        connection: AbstractConnection = node.connection_class(
            **{**node.connection_kwargs, "protocol": 2}
        )
        return connection

    async def still_serves(self, shard: str, connection: AbstractConnection) -> bool:
        return shard in self.shards()

    async def close(self) -> None:
        await self._client.aclose()
