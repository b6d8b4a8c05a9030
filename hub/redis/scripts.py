"""How the hub runs Lua on Redis: a script by its SHA1 (`Script`), loaded again on a server
that lost it, and `run_scripts`, many scripts in one pipelined round trip, which presence
and the events ledger share. The scripts themselves live with what they keep:
`hub.redis.history` (a channel's history and publishing), `hub.redis.presence`,
`hub.redis.events`.

Every script that judges expiry reads the clock with Redis `TIME` (`NOW_LUA`), so expiry is
judged by one clock for the whole cluster, not by each node's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from redis.exceptions import NoScriptError

from hub.redis.topology import Topology

NOW_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""


class Script(NamedTuple):
    """A Lua script run by its SHA1, loaded on the server that lacks it (a restarted or
    promoted one). A script that was not loaded did not run, so running it again is safe."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


Call = tuple[Script, list[bytes], list[bytes | str | int]]  # script, KEYS, ARGV


def ttl_ms(ttl: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses 0)."""
    return max(1, int(ttl * 1000))


async def run_scripts(topology: Topology, calls: Sequence[Call]) -> list[Any]:
    """Run scripts in one pipelined round trip, through the gate of the first call's first
    key; load them once if Redis lost them. Raises the first error among the answers."""
    if not calls:
        return []
    async with topology.slots_for(calls[0][1][0]):
        results = await _pipeline(topology, calls)
        if any(isinstance(result, NoScriptError) for result in results):
            for script in {call[0] for call in calls}:
                await topology.client.script_load(script.source)
            results = await _pipeline(topology, calls)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


async def _pipeline(topology: Topology, calls: Sequence[Call]) -> list[Any]:
    # EVALSHA by name: a Cluster pipeline routes it by its keys (its `evalsha` is refused by
    # redis-py 8.1).
    pipe = topology.client.pipeline(transaction=False)
    for script, keys, args in calls:
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    return results
