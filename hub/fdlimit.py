"""The node's file-descriptor limit: every connection holds one socket.

Container runtimes and systemd often start a process with a soft RLIMIT_NOFILE of 1024 and
a much higher hard limit, and uvicorn does not raise it: a node would then refuse
connections (`accept` fails with EMFILE) near a thousand, far below what its memory and
CPU allow. An unprivileged process may raise its soft limit up to the hard one, so the node
does that once at start, says what it runs with, and warns when the limit, not
HUB_MAX_CONNECTIONS, would be what caps the connections.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("hub.fdlimit")

# Descriptors a node holds besides its client sockets: the listening socket, Redis
# connections (a pool per shard, pub/sub links), the event loop's own, logs, hook calls.
RESERVE = 256
# The soft limit below which a node without HUB_MAX_CONNECTIONS gets a warning: it would
# turn connections away at a few thousand, well below what one core serves.
LOW_LIMIT = 10_000
# Linux's default fs.nr_open: the highest soft limit when the hard one is unlimited.
NR_OPEN = 1 << 20


def reachable() -> int:
    """The soft limit `raise_soft_limit` would reach (`hub check` asks without raising)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    return NR_OPEN if hard == resource.RLIM_INFINITY else max(soft, hard)


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = reachable()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. above fs.nr_open
            log.warning("could not raise the file descriptor limit from %d to %d: %s",
                        soft, target, exc)
        else:
            soft = target
    return soft, hard


def connections_allowed(soft: int) -> int:
    """About how many client connections a soft limit leaves room for."""
    return max(0, soft - RESERVE)


def problem(soft: int, max_connections: int) -> str | None:
    """Why the descriptor limit, not HUB_MAX_CONNECTIONS, would cap connections; None if
    it would not."""
    if soft == resource.RLIM_INFINITY:
        return None
    room = connections_allowed(soft)
    if max_connections > room:
        return (f"HUB_MAX_CONNECTIONS={max_connections} but the file descriptor limit "
                f"({soft}) leaves room for about {room} connections: past that new ones fail "
                "in accept(); raise the hard limit (docker --ulimit nofile=, systemd "
                "LimitNOFILE=) or lower HUB_MAX_CONNECTIONS")
    if not max_connections and soft < LOW_LIMIT:
        return (f"the file descriptor limit ({soft}) leaves room for about {room} "
                "connections and HUB_MAX_CONNECTIONS is unset: past that new ones fail in "
                "accept(); raise the hard limit or set HUB_MAX_CONNECTIONS below it")
    return None


def apply(max_connections: int) -> int:
    """At start: raise the soft limit, log it, warn when it is short; the soft limit."""
    soft, hard = raise_soft_limit()
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info("file descriptor limit %d (hard %s): room for about %d connections; "
             "HUB_MAX_CONNECTIONS=%d", soft, shown, connections_allowed(soft), max_connections)
    found = problem(soft, max_connections)
    if found:
        log.warning(found)
    return soft
