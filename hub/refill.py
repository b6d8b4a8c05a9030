"""When and how often to read history for subscriptions that lost a stretch of their channel
(after a broker outage, or a gap in the live stream): PROTOCOL §5.

Each catch-up is one task that lives only while it waits: reads run side by side (at most
`CONCURRENCY` at once), a read that fails is retried with backoff while the broker is up,
and one that began before the latest broker reconnect is redone (it may predate the newest
gap). After `ATTEMPTS` failed reads within one outage the catch-up is given up (its
subscribers get `reset`); the count starts afresh at each outage. What a read means is the
target's business (`hub.subscriptions`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Generic, NamedTuple, Protocol, TypeVar

from hub.broker import Broker, HistoryOptions, HistoryPage, StreamPosition
from hub.tasks import cancel

log = logging.getLogger("hub.refill")

CONCURRENCY = 32
ATTEMPTS = 5
FIRST_RETRY_DELAY = 0.2

K = TypeVar("K", bound=Hashable)
K_contra = TypeVar("K_contra", bound=Hashable, contravariant=True)


class Read(NamedTuple):
    channel: str
    history: HistoryOptions
    since: StreamPosition
    limit: int


class CatchUpTarget(Protocol[K_contra]):
    def generation(self, key: K_contra) -> int:
        """Broker reconnects so far, of `key`'s channel."""

    def wanted(self, key: K_contra) -> Read | None:
        """What to read for `key`, or None when it no longer waits."""

    def refilled(self, key: K_contra, page: HistoryPage) -> StreamPosition | None:
        """Apply a read; a position back: the broker lost what was delivered, and the
        channel needs a new epoch from there."""

    def restarted(self, key: K_contra, position: StreamPosition) -> None: ...

    def give_up(self, key: K_contra) -> None: ...


class Refiller(Generic[K]):
    def __init__(self, broker: Broker, target: CatchUpTarget[K]) -> None:
        self._broker = broker
        self._target = target
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._parallel = asyncio.Semaphore(CONCURRENCY)

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    def request(self, key: K) -> None:
        """Catch `key` up, unless that is under way already (the running task sees a newer
        reconnect, or a new gap found while it delivers, by itself)."""
        running = self._tasks.get(key)
        if running is not None and not running.done():
            return
        task = asyncio.create_task(self._catch_up(key), name="hub-refill")
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))

    def _forget(self, key: K, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("a catch-up failed", exc_info=task.exception())

    async def stop(self) -> None:
        await asyncio.gather(*(cancel(task) for task in list(self._tasks.values())))

    async def _catch_up(self, key: K) -> None:
        target = self._target
        failures, failing_since = 0, -1
        while self._broker.up:  # else it stays held, and the reconnect asks again
            read = target.wanted(key)
            if read is None:
                return
            generation = target.generation(key)
            try:
                async with self._parallel:
                    page = await self._broker.history(*read)
                stale = None
                if target.generation(key) == generation and target.wanted(key) is not None:
                    # Delivering may find a further gap; the loop then reads again.
                    stale = target.refilled(key, page)
                if stale is not None:
                    position = await self._broker.restart_epoch(read.channel, read.history,
                                                                stale)
                    if target.wanted(key) is not None:
                        target.restarted(key, position)
            except Exception as exc:
                if generation != failing_since:
                    failures, failing_since = 0, generation
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "reading history to fill a gap failed (%d): %s", failures, exc)
                if failures >= ATTEMPTS:
                    failures = 0
                    target.give_up(key)
                else:
                    await asyncio.sleep(FIRST_RETRY_DELAY * 2 ** (failures - 1))
                continue
            # A read that began before the latest reconnect may predate the newest gap:
            # the loop reads again (`wanted` says whether anything still waits).
