"""An incident in the logs: one line when something starts failing and one when it works
again, not one per failure. Shared by whatever may fail in a crowd: the Redis links,
probes, broker, presence and events ledger, the events receiver, membership's writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Incident:
    """Logs when something starts failing and when it works again, with how long it lasted,
    not every failure between: a Redis outage under load would otherwise write one line per
    message. It works again once it has not failed for `QUIET_SECONDS` (on a Cluster with
    one shard down, commands to the others succeed between the failures), or at once when
    the caller knows (`for_sure`: a connection is up again)."""

    QUIET_SECONDS = 2.0

    def __init__(
        self, logger: logging.Logger, what: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._what = what
        self._clock = clock
        self._failures = 0
        self._started_at = 0.0
        self._failed_at = 0.0

    @property
    def ongoing(self) -> bool:
        return self._failures > 0

    def failed(self, exc: BaseException) -> None:
        self._failures += 1
        self._failed_at = self._clock()
        if self._failures == 1:
            self._started_at = self._failed_at
            self._logger.warning("%s failing: %s: %s", self._what, type(exc).__name__, exc)
        else:
            self._logger.debug("%s still failing: %s", self._what, exc)

    def recovered(self, *, for_sure: bool = False) -> None:
        if not self._failures:
            return
        now = self._clock()
        if for_sure or now - self._failed_at >= self.QUIET_SECONDS:
            # Without `for_sure` the end is only known to lie between the last failure and
            # now: the last failure is what is said.
            ended = now if for_sure else self._failed_at
            self._logger.info("%s works again after %.2f s (%d failures)", self._what,
                              ended - self._started_at, self._failures)
            self._failures = 0
