"""Who is where: channel presence, node heartbeats and cluster statistics.

`Presence` is the interface; `MemoryPresence` serves a single node; the Redis one keeps the
same data in Redis with TTLs so a node that dies without a word drops out.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from hub.protocol import ClientInfo


class NodeStats(msgspec.Struct, frozen=True):
    """One node in `/api/stats`. The fields after `updated` are for the operator's page
    (defaults: what a node of an older version, which sends none, is read as): its
    `version`, `address` (host:port), `state` (`ready`, `draining`, `broker unavailable`),
    resident memory `rss` (bytes), `cpu` (percent of one core, lately), and counters since
    it started: messages `published` through it, `delivered` by it, connections
    `accepted`; rates are their differences between two readings."""

    node: str
    connections: int
    users: int
    subscriptions: int
    channels: int
    started: int
    updated: int
    version: str = ""
    address: str = ""
    state: str = "ready"
    rss: int = 0
    cpu: float = 0.0
    published: int = 0
    delivered: int = 0
    accepted: int = 0


class NodeSnapshot(msgspec.Struct, frozen=True):
    """This node as it is now: what a heartbeat writes and what cluster reads merge in."""

    stats: NodeStats
    subscribers_by_channel: dict[str, int]
    users: frozenset[str]


class ClusterStats(msgspec.Struct):
    """`/api/stats`: every live node and the cluster totals."""

    nodes: list[NodeStats]
    total: dict[str, int]


async def cluster_stats(presence: Presence, local: NodeSnapshot) -> ClusterStats:
    nodes = await presence.nodes(local)
    users = await presence.distinct_users(local)
    channels = await presence.channels(local)
    total = {
        "nodes": len(nodes),
        "connections": sum(n.connections for n in nodes),
        "users": users,
        "subscriptions": sum(n.subscriptions for n in nodes),
        "channels": len(channels),
    }
    return ClusterStats(nodes, total)


class Presence(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, channel: str, member: ClientInfo) -> None: ...

    async def remove(self, channel: str, client: str) -> None: ...

    async def members(self, channel: str) -> list[ClientInfo]: ...

    async def heartbeat(self, local: NodeSnapshot) -> None:
        """Publish this node's snapshot; called on a schedule well inside the TTL."""

    async def leave(self) -> None:
        """Remove this node and its members at once (graceful shutdown)."""

    async def nodes(self, local: NodeSnapshot) -> list[NodeStats]:
        """Every live node, this one as `local` says (fresher than its last heartbeat)."""

    async def distinct_users(self, local: NodeSnapshot) -> int: ...

    async def channels(self, local: NodeSnapshot, prefix: str = "") -> dict[str, int]:
        """Subscriber count of each channel with subscribers, cluster-wide."""


class MemoryPresence:
    """The single node is the whole cluster."""

    def __init__(self) -> None:
        self._members: dict[str, dict[str, ClientInfo]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._members.clear()

    async def add(self, channel: str, member: ClientInfo) -> None:
        self._members.setdefault(channel, {})[member.client] = member

    async def remove(self, channel: str, client: str) -> None:
        members = self._members.get(channel)
        if members is not None:
            members.pop(client, None)
            if not members:
                del self._members[channel]

    async def members(self, channel: str) -> list[ClientInfo]:
        return list(self._members.get(channel, {}).values())

    async def heartbeat(self, local: NodeSnapshot) -> None:
        return None

    async def leave(self) -> None:
        self._members.clear()

    async def nodes(self, local: NodeSnapshot) -> list[NodeStats]:
        return [local.stats]

    async def distinct_users(self, local: NodeSnapshot) -> int:
        return len(local.users)

    async def channels(self, local: NodeSnapshot, prefix: str = "") -> dict[str, int]:
        return {
            name: count
            for name, count in local.subscribers_by_channel.items()
            if name.startswith(prefix)
        }
