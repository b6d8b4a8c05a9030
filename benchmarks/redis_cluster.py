"""A private Redis Cluster for a run (`--redis-cluster N`): N masters, no replicas, on free
127.0.0.1 ports, formed without redis-cli so that N = 1 works too.

Each master gets `--cluster-enabled yes --cluster-config-file <workdir>/nodes-<port>.conf`
and its own free cluster-bus port (`--cluster-port`; port + 10000 may be taken or past
65535). Forming it: each node takes a distinct config epoch (as redis-cli does, so no
epoch collision has to be resolved) and its share of the 16384 slots
(`CLUSTER ADDSLOTSRANGE`, consecutive and even), every other node `CLUSTER MEET`s the
first, and the Cluster is ready once `CLUSTER INFO` on every node says `cluster_state:ok`,
knows all N nodes and all slots. Needs redis-server 7.0 or later.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from benchmarks.common import BenchError
from benchmarks.processes import free_ports, spawn_redis, wait_redis
from benchmarks.resp import redis_command

HOST = "127.0.0.1"
SLOTS = 16384


def slot_ranges(count: int) -> list[tuple[int, int]]:
    """Slots 0-16383 in `count` consecutive inclusive ranges whose sizes differ by at most
    one (the first ones take the remainder)."""
    if not 1 <= count <= SLOTS:
        raise ValueError(f"a Redis Cluster has 1-{SLOTS} masters, not {count}")
    ranges = []
    start = 0
    for index in range(count):
        size = SLOTS // count + (1 if index < SLOTS % count else 0)
        ranges.append((start, start + size - 1))
        start += size
    return ranges


def cluster_url(ports: list[int]) -> str:
    """`HUB_REDIS_URL` for the nodes: every master a seed."""
    return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in ports)


def cluster_ready(info: str, nodes: int) -> bool:
    """`CLUSTER INFO` of a node that sees the whole Cluster formed."""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    values = {name.strip(): value.strip() for name, value in fields.items()}
    return (values.get("cluster_state") == "ok"
            and values.get("cluster_slots_assigned") == str(SLOTS)
            and values.get("cluster_known_nodes") == str(nodes))


async def start_cluster(
    workdir: Path, count: int, started: list[asyncio.subprocess.Process]
) -> str:
    """Start and form the Cluster; its URL. Every redis-server goes into `started` as soon
    as it runs, so the caller stops them all, whatever happens here."""
    ranges = slot_ranges(count)
    ports = free_ports(2 * count)
    data, bus = ports[:count], ports[count:]
    waits = []
    for port, bus_port in zip(data, bus, strict=True):
        log = workdir / f"redis-{port}.log"
        process = await spawn_redis(port, [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
            "--cluster-port", str(bus_port),
        ], workdir, log, started)
        waits.append(wait_redis(process, port, log))
    await asyncio.gather(*waits)
    for epoch, (port, (first, last)) in enumerate(zip(data, ranges, strict=True), 1):
        await redis_command(HOST, port, "CLUSTER", "SET-CONFIG-EPOCH", str(epoch))
        await redis_command(HOST, port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
    for port in data[1:]:
        await redis_command(HOST, port, "CLUSTER", "MEET", HOST, str(data[0]), str(bus[0]))
    await wait_cluster_ready(data)
    return cluster_url(data)


async def wait_cluster_ready(ports: list[int], within: float = 30) -> None:
    deadline = time.monotonic() + within
    states = [""] * len(ports)
    while time.monotonic() < deadline:
        states = list(await asyncio.gather(*(_cluster_info(port) for port in ports)))
        if all(cluster_ready(info, len(ports)) for info in states):
            return
        await asyncio.sleep(0.1)
    summary = "; ".join(
        f"{port}: {_brief(info)}" for port, info in zip(ports, states, strict=True)
    )
    raise BenchError(f"Redis Cluster of {len(ports)} not ready in {within:.0f} s: {summary}")


async def _cluster_info(port: int) -> str:
    try:
        return str(await redis_command(HOST, port, "CLUSTER", "INFO"))
    except BenchError as exc:
        return str(exc)


def _brief(info: str) -> str:
    wanted = ("cluster_state", "cluster_slots_assigned", "cluster_known_nodes")
    found = [line.strip() for line in info.splitlines() if line.startswith(wanted)]
    return ", ".join(found) or info.strip()[:120]
