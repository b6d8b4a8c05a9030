"""Presence in Redis with TTLs, so a node that dies without a word drops out (PROTOCOL §6).

Channel members and node snapshots are both kept as a hash (entry → value) beside a zset
(entry → expiry on the Redis clock), the approach of Centrifuge's presence_redis.go: each
node rewrites its own entries on every heartbeat, and whatever nobody rewrote within the
TTL is left out of reads and deleted by the next script that passes by.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis

from hub.errors import BrokerUnavailable
from hub.incident import Incident
from hub.presence import Departure, NodeSnapshot, NodeStats
from hub.protocol import ClientInfo, encode
from hub.redis.scripts import NOW_LUA, Call, Script, run_scripts, ttl_ms
from hub.redis.topology import REDIS_ERRORS, Topology, as_topology, tagged

log = logging.getLogger("hub.redis")

# Members per script call: keeps each call's argument list well under Lua's stack limit.
_BATCH = 500

# The scripts: a hash (field -> value) and a zset (field -> expiry, ms on the Redis clock) per
# key pair, like Centrifuge's presence_redis.go. Entries that nobody refreshes expire one by
# one; the keys themselves expire when nobody refreshes anything.
_FORGET_EXPIRED = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #dead, 1000 do
  redis.call('HDEL', KEYS[1], unpack(dead, i, math.min(i + 999, #dead)))
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"""

# KEYS: hash, zset. ARGV: ttl_ms, field, value, field, value...
TOUCH_LUA = (
    NOW_LUA
    + _FORGET_EXPIRED
    + """
local expire_at = string.format('%d', now + tonumber(ARGV[1]))
local scored = {}
for i = 2, #ARGV, 2 do
  scored[#scored + 1] = expire_at
  scored[#scored + 1] = ARGV[i]
end
if #scored > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  redis.call('ZADD', KEYS[2], unpack(scored))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return #scored / 2
"""
)

# KEYS: hash, zset. Returns field, value, field, value... of the live entries.
LIVE_LUA = (
    NOW_LUA
    + _FORGET_EXPIRED
    + """
local alive = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. string.format('%d', now), '+inf')
local result = {}
for i = 1, #alive, 1000 do
  local last = math.min(i + 999, #alive)
  local values = redis.call('HMGET', KEYS[1], unpack(alive, i, last))
  for j = 1, #values do
    if values[j] then
      result[#result + 1] = alive[i + j - 1]
      result[#result + 1] = values[j]
    end
  end
end
return result
"""
)

# KEYS: hash, zset. ARGV: fields to drop.
FORGET_LUA = """
for i = 1, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, last))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, last))
end
return #ARGV
"""


class _StoredMember(msgspec.Struct):
    """ClientInfo as read back: msgspec cannot decode `Raw | None`, so absent is empty."""

    client: str
    user: str
    node: str | None = None
    info: msgspec.Raw = msgspec.Raw()

    def client_info(self) -> ClientInfo:
        return ClientInfo(self.client, self.user, self.node, self.info if len(self.info) else None)


_member_decoder = msgspec.json.Decoder(_StoredMember)
_snapshot_decoder = msgspec.json.Decoder(NodeSnapshot)


class RedisPresence:
    """`Presence` over Redis. It keeps no member of its own: the heartbeat is handed every
    member the node has (derived from its subscriptions), and what could not be forgotten
    while Redis was away."""

    def __init__(
        self, topology: Topology | Redis, node_id: str, ttl: float, *, prefix: str = "hub:"
    ) -> None:
        self._topology = as_topology(topology)
        self._node_id = node_id
        self._ttl_ms = ttl_ms(ttl)
        self._prefix = prefix.encode()
        self._touch = Script.of(TOUCH_LUA)
        self._live = Script.of(LIVE_LUA)
        self._forget = Script.of(FORGET_LUA)
        self._incident = Incident(log, "Redis presence")

    async def start(self) -> None:
        """Load the scripts now so the first heartbeat is one round trip; a Redis that is
        not there yet is not an error (the heartbeat retries)."""
        try:
            for script in (self._touch, self._live, self._forget):
                await self._load(script)
        except REDIS_ERRORS as exc:
            self._incident.failed(exc)

    async def close(self) -> None:
        """Closes the topology too (as the broker does; closing twice is harmless), so
        presence used on its own leaves nothing open."""
        await self._topology.close()

    async def add(self, channel: str, member: ClientInfo) -> None:
        await self.update([(channel, member)], [])

    async def remove(self, channel: str, client: str) -> None:
        await self.update([], [(channel, client)])

    async def update(
        self, added: Sequence[tuple[str, ClientInfo]], removed: Sequence[Departure]
    ) -> None:
        by_channel: dict[str, list[ClientInfo]] = {}
        for channel, member in added:
            by_channel.setdefault(channel, []).append(member)
        await self._run([*self._touches(by_channel), *self._forgets(removed)])

    async def members(self, channel: str) -> list[ClientInfo]:
        (flat,) = await self._run([(self._live, self._member_keys(channel), [])])
        return [_member_decoder.decode(value).client_info() for value in flat[1::2]]

    async def heartbeat(
        self,
        local: NodeSnapshot,
        members: Mapping[str, Sequence[ClientInfo]],
        removed: Sequence[Departure] = (),
    ) -> None:
        """One round trip: this node's snapshot and every member it has, with a new TTL,
        then the departures Redis missed."""
        calls: list[Call] = [
            (self._touch, self._node_keys(), [self._ttl_ms, self._node_id, encode(local)])
        ]
        await self._run([*calls, *self._touches(members), *self._forgets(removed)])

    async def leave(self, removed: Sequence[Departure]) -> None:
        """Never raises: a node that cannot reach Redis at shutdown drops out by the TTL."""
        calls: list[Call] = [(self._forget, self._node_keys(), [self._node_id])]
        try:
            await self._run([*calls, *self._forgets(removed)])
        except BrokerUnavailable:
            log.warning("could not leave presence; this node's entries expire by their TTL")

    def _touches(self, members: Mapping[str, Sequence[ClientInfo]]) -> list[Call]:
        calls: list[Call] = []
        for channel, listed in members.items():
            pairs: list[bytes | str | int] = []
            for given in listed:
                member = given if given.node is not None else msgspec.structs.replace(
                    given, node=self._node_id
                )
                pairs += (member.client, encode(member))
            for start in range(0, len(pairs), 2 * _BATCH):
                args: list[bytes | str | int] = [self._ttl_ms, *pairs[start : start + 2 * _BATCH]]
                calls.append((self._touch, self._member_keys(channel), args))
        return calls

    def _forgets(self, removed: Sequence[Departure]) -> list[Call]:
        by_channel: dict[str, list[bytes | str | int]] = {}
        for channel, client in removed:
            by_channel.setdefault(channel, []).append(client)
        return [
            (self._forget, self._member_keys(channel), clients[start : start + _BATCH])
            for channel, clients in by_channel.items()
            for start in range(0, len(clients), _BATCH)
        ]

    async def nodes(self, local: NodeSnapshot) -> list[NodeStats]:
        return [snapshot.stats for snapshot in await self._snapshots(local)]

    async def distinct_users(self, local: NodeSnapshot) -> int:
        users: set[str] = set()
        for snapshot in await self._snapshots(local):
            users.update(snapshot.users)
        return len(users)

    async def channels(self, local: NodeSnapshot, prefix: str = "") -> dict[str, int]:
        totals: dict[str, int] = {}
        for snapshot in await self._snapshots(local):
            for name, count in snapshot.subscribers_by_channel.items():
                if count > 0 and name.startswith(prefix):
                    totals[name] = totals.get(name, 0) + count
        return totals

    async def _snapshots(self, local: NodeSnapshot) -> list[NodeSnapshot]:
        """Every live node's last heartbeat, this node's replaced by `local`, by node id."""
        (flat,) = await self._run([(self._live, self._node_keys(), [])])
        by_node = {
            node.decode(errors="surrogateescape"): _snapshot_decoder.decode(value)
            for node, value in zip(flat[::2], flat[1::2], strict=True)
        }
        by_node[self._node_id] = local
        return [by_node[node] for node in sorted(by_node)]

    def _member_keys(self, channel: str) -> list[bytes]:
        name = tagged(channel)
        return [self._prefix + b"p:" + name, self._prefix + b"pe:" + name]

    def _node_keys(self) -> list[bytes]:
        return [self._prefix + b"{nodes}", self._prefix + b"{nodes}:exp"]

    async def _run(self, calls: Sequence[Call]) -> list[Any]:
        """Run scripts in one pipelined round trip; load them once if Redis lost them."""
        if not calls:
            return []
        try:
            results = await run_scripts(self._topology, calls)
        except REDIS_ERRORS as exc:
            self._incident.failed(exc)
            raise BrokerUnavailable("presence failed: Redis is unreachable") from exc
        self._incident.recovered()
        return results

    async def _load(self, script: Script) -> None:
        await self._topology.client.script_load(script.source)
