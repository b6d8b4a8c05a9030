"""Token expiry of every connection of a node on one timer (PROTOCOL §2: a connection whose
token expires is closed with 4002, unless a `refresh` moved its expiry on).

A timer per connection cost each about 0.8 KiB (uvloop's timer handle, its libuv timer,
the bound method and its arguments); here a connection costs one heap entry, its expiry
and id, and the clock holds one timer, for the earliest. An entry is not removed when its
connection ends or refreshes: when it comes due, the connection is looked up by id and
closed only if it is still there and its token's expiry has come. Entries of
connections that ended (or refreshed) before their time are swept out whenever they
outnumber the connections watched, so a node with many short connections on long tokens
does not keep one entry per connection it ever had.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("hub.expiry")


class Expiring(Protocol):
    @property
    def expires(self) -> int | None:
        """Its token's `exp` (unix seconds), None if it has none."""

    def expired(self) -> None:
        """Its expiry has come: close it with 4002 (or ask the refresh hook)."""


class ExpiryClock:
    # Entries past this many per live connection (plus a little) trigger a sweep.
    SWEEP_RATIO = 2
    SWEEP_SLACK = 256

    def __init__(
        self, lookup: Callable[[str], Expiring | None], live: Callable[[], int]
    ) -> None:
        self._lookup = lookup
        self._live = live  # how many connections there are (each has one entry at most)
        self._due: list[tuple[float, str]] = []  # a heap of (expiry, client id)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._timer_at = math.inf

    def watch(self, client_id: str, expires: float) -> None:
        """Close the connection `client_id` at `expires` (unix s), if its token's expiry
        is still that far by then."""
        heapq.heappush(self._due, (expires, client_id))
        if len(self._due) > self.SWEEP_RATIO * self._live() + self.SWEEP_SLACK:
            self._sweep()
        # (A node run again on a new loop: the old loop's timer never fires.)
        if expires < self._timer_at or self._timer_loop is not asyncio.get_running_loop():
            self._arm(self._due[0][0])

    def _sweep(self) -> None:
        """Keep only the entries that still mean something: a connection that is there
        with that very expiry (a refresh leaves its old one behind)."""
        kept = []
        for entry in self._due:
            connection = self._lookup(entry[1])
            if connection is not None and connection.expires == entry[0]:
                kept.append(entry)
        heapq.heapify(kept)
        self._due = kept

    def __len__(self) -> int:
        return len(self._due)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + max(0.0, at - time.time()), self._fire)
        self._timer_loop, self._timer_at = loop, at

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = time.time()
        due = self._due
        while due and due[0][0] <= now:
            _, client_id = heapq.heappop(due)
            connection = self._lookup(client_id)
            if connection is not None and connection.expires is not None \
                    and connection.expires <= now:
                try:
                    connection.expired()
                except Exception:  # one connection's fault must not stop the clock
                    log.exception("closing a connection whose token expired failed")
        if due:
            self._arm(due[0][0])
