"""A connection's life around the publishing: how fast the connections come in, what they
cost while idle, and how long a node takes to let them go on SIGTERM.

Issue 23 sizes a node by these as much as by its fan-out: connects/s decides how fast a
node refills after a restart, idle CPU is the keepalive cost (a WebSocket ping every
HUB_PING_INTERVAL per connection, answered by the client), and the drain of PROTOCOL §7
spreads its 1012 closes over HUB_DRAIN_DELAY + HUB_DRAIN_SECONDS. Each reading here is
taken by the parent from /proc around a window, with the machine's load average, since the
machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import ClientProcess, NodeProcess
from benchmarks.procfs import cpu_seconds, machine_cpu, rss_kib


def loadavg() -> str:
    """The first three fields of /proc/loadavg ('' where there is none)."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return ""


class Window:
    """CPU of the nodes, the client processes and the machine between `start` and `stop`."""

    def __init__(self, nodes: list[NodeProcess], clients: list[ClientProcess]) -> None:
        self.nodes, self.clients = nodes, clients
        self.began = time.monotonic()
        self.node_cpu = [cpu_seconds(node.pid) for node in nodes]
        self.client_cpu = [cpu_seconds(client.process.pid) for client in clients]
        self.machine = machine_cpu()
        self.load_before = loadavg()

    def stop(self) -> dict[str, Any]:
        seconds = max(time.monotonic() - self.began, 1e-3)
        node_cpu = [cpu_seconds(n.pid) - b for n, b in zip(self.nodes, self.node_cpu, strict=True)]
        client_cpu = [cpu_seconds(c.process.pid) - b
                      for c, b in zip(self.clients, self.client_cpu, strict=True)]
        busy, total = (a - b for a, b in zip(machine_cpu(), self.machine, strict=True))
        return {
            "seconds": round(seconds, 2),
            "node_cpu_seconds": [round(cpu, 3) for cpu in node_cpu],
            "node_cpu_percent": [round(100 * cpu / seconds, 2) for cpu in node_cpu],
            "client_cpu_percent": [round(100 * cpu / seconds, 2) for cpu in client_cpu],
            "machine_busy_percent": round(100 * busy / max(total, 1), 1),
            "loadavg": [self.load_before, loadavg()],
        }


def connect_section(reports: list[dict[str, Any]], window: dict[str, Any]) -> dict[str, Any]:
    """Connects/s as the clients saw it: every connection subscribed, over the time from
    the first client's first connect to the last client's last `subscribed` (the client
    processes start one after another, so this is not their sum of rates). The nodes' CPU
    is over `window`, which also holds the client processes' start: read it per connect."""
    connections = sum(int(r["subscribed"]) for r in reports)
    seconds = max(float(r["finished"]) for r in reports) - min(float(r["started"])
                                                               for r in reports)
    node_cpu = sum(window["node_cpu_seconds"])
    return {"connections": connections, "seconds": round(seconds, 3),
            "per_second": round(connections / max(seconds, 1e-3), 1),
            "node_cpu_ms_per_connect": round(1000 * node_cpu / max(connections, 1), 3),
            "window": window}


async def idle_section(
    nodes: list[NodeProcess], clients: list[ClientProcess], seconds: float
) -> dict[str, Any]:
    """Hold every connection idle for `seconds`: the keepalive cost, and RSS after it."""
    window = Window(nodes, clients)
    await asyncio.sleep(seconds)
    found = window.stop()
    found["node_rss_kib"] = [rss_kib(node.pid).get("VmRSS") for node in nodes]
    return found


async def _exit_seconds(node: NodeProcess, sent: float, within: float) -> float | None:
    try:
        await asyncio.wait_for(node.process.wait(), within)
    except TimeoutError:
        return None
    return round(time.monotonic() - sent, 3)


async def drain_section(
    nodes: list[NodeProcess], clients: list[ClientProcess], within: float
) -> dict[str, Any]:
    """SIGTERM every node and time it: to each node's exit, and (the clients say) to the
    last connection closed, with the close codes seen meanwhile. Bounded by `within`; a node
    still running then is left to the run's own stop (SIGTERM again, then SIGKILL)."""
    sent = time.monotonic()
    wall = time.time()
    for node in nodes:
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(signal.SIGTERM)
    command = json.dumps({"cmd": "drain", "within": within}).encode() + b"\n"
    for client in clients:
        assert client.process.stdin is not None
        client.process.stdin.write(command)
        await client.process.stdin.drain()
    exits = await asyncio.gather(*(_exit_seconds(node, sent, within) for node in nodes))
    # Each client reports within `within` of the command: a margin for a busy machine.
    reports = await asyncio.wait_for(
        asyncio.gather(*(client.report() for client in clients)), within + 10)
    closes: dict[str, int] = {}
    for report in reports:
        for code, count in report["closes"].items():
            closes[code] = closes.get(code, 0) + int(count)
    lasts = [float(r["last_closed"]) for r in reports if r["last_closed"]]
    return {
        "node_exit_seconds": list(exits),
        "last_closed_seconds": round(max(lasts) - wall, 3) if lasts else None,
        "still_open": sum(int(r["open"]) for r in reports),
        "closes": closes,
    }
