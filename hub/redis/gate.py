"""The command gate: how many commands of the command client may run at once on one Redis
server (`CommandSlots`, one per server, handed out by the topology's `slots_for`), so a
crowd waits its turn instead of failing on a full pool, and a master that hangs holds up
only its own commands.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class CommandSlots:
    """At most `size` commands (or pipelines) of the command client at once on one Redis
    server: `async with topology.slots_for(key):` around each. The pools do not wait for a
    free connection (a Cluster node's and a Sentinel master's cannot; one server's would
    cost every command an asyncio condition and a timeout): past their size redis-py
    raises MaxConnectionsError or ConnectionError "Too many connections", and a crowd of
    subscribes or publishes on one node (thousands of clients reconnecting at once) failed
    as `unavailable` with Redis idle. Here they wait their turn instead, at most
    `timeout` seconds (then TimeoutError: Redis is too slow to answer them)."""

    __slots__ = ("_free", "_timeout")

    def __init__(self, size: int, timeout: float = 2.0) -> None:
        self._free = asyncio.Semaphore(size)
        self._timeout = timeout

    @property
    def full(self) -> bool:
        """Every slot is held: the next command waits."""
        return self._free.locked()

    async def __aenter__(self) -> None:
        if self._free.locked():
            async with asyncio.timeout(self._timeout):
                await self._free.acquire()
        else:
            await self._free.acquire()  # free: no waiting, no timer

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._free.release()


# Connections of each server's pool that the slots leave free, for what runs outside them:
# a Cluster's slot-map refresh, SCRIPT LOAD on every master, a pipeline that spans shards.
POOL_HEADROOM = 8


def command_slots(pool_size: int) -> CommandSlots:
    return CommandSlots(max(1, pool_size - POOL_HEADROOM))
