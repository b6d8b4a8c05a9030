"""The hub on Redis (PROTOCOL §5, §6, §14): what a node with `HUB_REDIS_URL` runs on.

    url.py       HUB_REDIS_URL in its three forms (server, Cluster, Sentinel), checked once
    topology.py  where Redis is: the command client, the shards, pub/sub connections
    gate.py      how many commands run at once on one server (`CommandSlots`)
    patience.py  a reply timeout that does not take a late event loop for a silent Redis
    links.py     the supervised pub/sub link to each shard and the command probe
    scripts.py   running Lua by SHA1, many scripts in one round trip
    history.py   a channel's history and publishing: its scripts and their arguments
    batcher.py   publications sharing round trips
    broker.py    `RedisBroker`: relay and history, over the links and scripts above
    presence.py  `RedisPresence`: members and node snapshots with TTLs
    events.py    `RedisLedger`: the events of PROTOCOL §14, decided once for the cluster

The factories below import the modules they build from when called, so a node without Redis
loads no redis-py (this package's `url` is read by `hub.settings` on every node).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hub.events import Delivery
    from hub.metrics import Metrics
    from hub.redis.broker import RedisBroker
    from hub.redis.events import RedisLedger
    from hub.redis.presence import RedisPresence
    from hub.redis.topology import Topology
    from hub.settings import Settings


def create_redis_backends(
    settings: Settings, *, prefix: str = "hub:", max_connections: int = 64
) -> tuple[RedisBroker, RedisPresence]:
    """Broker and presence sharing one topology (and its command pool); the broker adds its
    pub/sub connections."""
    from hub.redis.broker import RedisBroker
    from hub.redis.presence import RedisPresence
    from hub.redis.topology import create_topology
    from hub.redis.url import parse_redis_url

    if not settings.redis_url:
        raise ValueError("create_redis_backends needs settings.redis_url")
    topology = create_topology(parse_redis_url(settings.redis_url), max_connections=max_connections)
    broker = RedisBroker(topology, prefix=prefix, min_replicas=settings.redis_min_replicas)
    presence = RedisPresence(topology, settings.node_id, settings.presence_ttl, prefix=prefix)
    return broker, presence


def create_redis_ledger(
    topology: Topology, settings: Settings, delivery: Delivery, metrics: Metrics
) -> RedisLedger:
    """The events ledger on the broker's topology: the cluster decides each event once."""
    from hub.redis.events import RedisLedger

    return RedisLedger(topology, delivery, metrics, settings.node_id, settings.presence_ttl,
                       settings.events_max_pending, max_age=settings.events_max_age)
