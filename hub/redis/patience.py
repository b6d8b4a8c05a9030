"""A command's reply timeout that forgives a late event loop.

PROTOCOL §5: a publish answered with an error was not published. A publish carries a
deadline on the Redis clock (`hub.redis.history`), so Redis never runs one after the node has
given up on it. But a node whose event loop was held up (a busy or starved process) finds,
when it wakes, both its read timeout due and the reply already in its socket; redis-py's
timeout fires first, drops the connection with the reply unread, and the node answers
`unavailable` for a publication that subscribers then receive. `PatientReads` makes a
command connection's reply timeout look at the clock first: a timer that fires more than
`LATE` after it was due gives the reply another `LATE`, at most `LATE_RETRIES` times, so
that what arrived while the loop was held up is read. A Redis that is really silent is still
given up after the timeout (plus at most `LATE_RETRIES` times `LATE` when the loop is late too).
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

LATE = 0.1  # a timer this late means the loop was held up, not that Redis was silent
LATE_RETRIES = 3


class PatientTimeout:
    """`asyncio.timeout(delay)`, except that a late expiry is given `LATE` more."""

    __slots__ = ("_delay", "_due", "_handle", "_late", "_loop", "_timeout")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._late = 0

    async def __aenter__(self) -> PatientTimeout:
        self._loop = loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._arm(loop.time() + self._delay)
        return self

    def _arm(self, due: float) -> None:
        self._due = due
        self._handle = self._loop.call_at(due, self._expire)

    def _expire(self) -> None:
        now = self._loop.time()
        if now - self._due > LATE and self._late < LATE_RETRIES:
            self._late += 1
            self._arm(now + LATE)  # the loop was held up: read what came meanwhile first
            return
        self._timeout.reschedule(now)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        await self._timeout.__aexit__(kind, error, traceback)


class PatientReads(AbstractConnection):
    """A connection whose replies wait `socket_timeout` under `PatientTimeout` (reads with
    their own timeout, as the probes' and pub/sub's, are left as redis-py does them)."""

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (redis-py's signature)
        *,
        disconnect_on_error: Any = True,  # bool; redis-py's Sentinel connection says float
        push_request: bool | None = False,
    ) -> Any:
        limit = self.socket_timeout
        if timeout is not None or not limit:
            return await super().read_response(
                disable_decoding, timeout,
                disconnect_on_error=disconnect_on_error, push_request=push_request,
            )
        async with PatientTimeout(limit):
            return await super().read_response(
                disable_decoding, math.inf,  # redis-py's own timeout off: this one instead
                disconnect_on_error=disconnect_on_error, push_request=push_request,
            )


class PatientConnection(PatientReads, Connection):
    pass


class PatientSSLConnection(PatientReads, SSLConnection):
    pass


class PatientSentinelConnection(PatientReads, SentinelManagedConnection):
    pass


class PatientSentinelSSLConnection(PatientReads, SentinelManagedSSLConnection):
    pass
