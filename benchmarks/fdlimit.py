"""File descriptors: each connection costs one in its node and one in its client process.

The default soft RLIMIT_NOFILE is often 1024, below what 5,000 or 10,000 connections
need, while the hard limit is usually far higher. The parent raises its soft limit to the
hard one before it starts anything, so the nodes, redis-server and client processes
inherit it; a client process raises its own too, in case it is started some other way.
"""

from __future__ import annotations

import resource

from benchmarks.common import BenchError

# Beyond the connections: the listening socket, Redis, the event loop, logs, pipes, imports.
SPARE = 256
# Linux's default fs.nr_open: the most a soft limit may be when the hard one is unlimited.
NR_OPEN = 1 << 20


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def require_fds(connections: int, who: str, remedy: str = "") -> None:
    """Refuse to start when one process would hold more connections than it may open."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + SPARE
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(
            f"{who} needs about {needed} file descriptors but RLIMIT_NOFILE allows {soft}: "
            f"raise the hard limit (`ulimit -Hn`, LimitNOFILE=){remedy}"
        )
