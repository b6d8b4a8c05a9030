"""The node's expiry clock (hub/expiry.py) on its own: it closes each connection at its
token's expiry, skips those that left or refreshed, and does not keep an entry for every
connection it ever watched."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from hub.expiry import ExpiryClock
from tests.support import WAIT


@dataclass
class Connection:
    expires: int | None
    closes: list[int] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self, code: int, reason: str = "") -> None:
        self.closes.append(code)
        self.closed.set()

    def expired(self) -> None:
        self.close(4002, "token expired")


async def test_due_connections_close_and_the_rest_wait() -> None:
    now = int(time.time())
    live = {"gone": Connection(now - 5), "due": Connection(now - 1), "later": Connection(now + 60),
            "refreshed": Connection(now + 60)}
    clock = ExpiryClock(live.get, lambda: len(live))
    for client_id in ("due", "later"):
        clock.watch(client_id, live[client_id].expires or 0)
    clock.watch("refreshed", now - 1)  # the expiry it had before its refresh
    clock.watch("left", now - 1)  # a connection that has ended
    async with asyncio.timeout(WAIT):
        await live["due"].closed.wait()
    assert live["due"].closes == [4002]
    assert live["later"].closes == live["refreshed"].closes == live["gone"].closes == []


async def test_entries_of_ended_connections_are_swept() -> None:
    live: dict[str, Connection] = {}
    clock = ExpiryClock(live.get, lambda: len(live))
    later = int(time.time()) + 3600
    for n in range(10_000):  # short connections on long tokens, a few at a time
        live[f"c{n}"] = Connection(later)
        clock.watch(f"c{n}", later)
        if n >= 3:
            del live[f"c{n - 3}"]
    assert len(clock) <= ExpiryClock.SWEEP_RATIO * len(live) + ExpiryClock.SWEEP_SLACK + 1


def test_a_clock_run_again_on_a_new_loop_still_fires() -> None:
    """An embedded hub may be started again under a new event loop: the first loop's timer
    is gone with it, and a later expiry must not wait for it."""
    now = time.time()
    live = {"first": Connection(int(now) + 60), "second": Connection(int(now))}
    clock = ExpiryClock(live.get, lambda: len(live))

    async def first() -> None:
        clock.watch("first", now + 0.3)  # its timer dies with this loop

    async def second() -> None:
        clock.watch("second", now + 0.5)
        async with asyncio.timeout(WAIT):
            await live["second"].closed.wait()

    asyncio.run(first())
    asyncio.run(second())
    assert live["second"].closes == [4002]
