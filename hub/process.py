"""What the operator's page shows of this process: resident memory and CPU use.

Read from the kernel on each call (a `/proc` read and a `getrusage`, a few microseconds), so
nothing runs in the background. CPU is a share of one core averaged since the previous
reading at least `window` seconds older, so frequent readers (every `/api/stats`) see a
steady figure instead of the noise of the last few milliseconds.
"""

from __future__ import annotations

import os
import resource
import sys
import time


def rss_bytes() -> int:
    """Resident set size now (Linux: /proc/self/statm); elsewhere the peak, which is what
    getrusage knows."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Percent of one core this process used lately (100 = one core busy)."""

    def __init__(self, window: float = 5.0) -> None:
        self._window = window
        self._then = (time.monotonic(), cpu_seconds())
        self._percent = 0.0

    def percent(self) -> float:
        now, used = time.monotonic(), cpu_seconds()
        then, used_then = self._then
        if now - then >= min(1.0, self._window):
            self._percent = round(100 * (used - used_then) / (now - then), 1)
        if now - then >= self._window:
            self._then = (now, used)
        return self._percent
