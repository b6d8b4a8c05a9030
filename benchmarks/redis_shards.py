"""The Redis servers behind `HUB_REDIS_URL` whose `INFO` a run reads: the one server, the
master a Sentinel names, or every master of a Cluster that holds slots (asked from the
seeds with `CLUSTER NODES`). The URL is parsed by the hub's own `hub.redis.url`."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.common import BenchError
from benchmarks.resp import redis_command
from hub.redis.url import Kind, RedisTarget, RedisUrlError, parse_redis_url


@dataclass(frozen=True)
class Shard:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


def cluster_masters(nodes: str, seed_host: str) -> list[tuple[str, int]]:
    """The masters that hold slots in a `CLUSTER NODES` reply, in slot order (a master
    marked failed is left out: its replica takes its slots). A node that
    never learnt its own address (a Cluster of one) shows `:port@bus`: it is the seed's
    host."""
    found: list[tuple[int, str, int]] = []
    for line in nodes.splitlines():
        fields = line.split()
        flags = fields[2].split(",") if len(fields) >= 9 else []
        if "master" not in flags or {"fail", "noaddr", "handshake"} & set(flags):
            continue
        address = fields[1].split(",", 1)[0].split("@", 1)[0]
        host, _, port = address.rpartition(":")
        first_slot = fields[8].split("-", 1)[0]
        if not first_slot.isdigit():  # `[slot->-id]`: a slot being moved, not owned
            continue
        found.append((int(first_slot), host.strip("[]") or seed_host, int(port)))
    return [(host, port) for _, host, port in sorted(found)]


async def redis_shards(url: str) -> tuple[str, list[Shard]]:
    """The URL's kind (server, cluster, sentinel) and the servers to read."""
    try:
        target = parse_redis_url(url)
    except RedisUrlError as exc:
        raise BenchError(str(exc)) from None
    if target.tls:
        raise BenchError("Redis over TLS: the benchmark reads INFO over plain TCP only")
    if target.kind is Kind.CLUSTER:
        return target.kind.value, await _cluster(target)
    if target.kind is Kind.SENTINEL:
        return target.kind.value, [await _sentinel_master(target)]
    host, port = target.nodes[0]
    return target.kind.value, [Shard(host, port, target.username, target.password)]


async def _cluster(target: RedisTarget) -> list[Shard]:
    problems = []
    for host, port in target.nodes:
        try:
            nodes = await redis_command(host, port, "CLUSTER", "NODES",
                                        username=target.username, password=target.password)
        except BenchError as exc:
            problems.append(str(exc))
            continue
        masters = cluster_masters(str(nodes), host)
        if masters:
            return [Shard(h, p, target.username, target.password) for h, p in masters]
        problems.append(f"redis {host}:{port}: no master holds slots")
    raise BenchError(f"no Cluster seed answered CLUSTER NODES: {'; '.join(problems)}")


async def _sentinel_master(target: RedisTarget) -> Shard:
    assert target.master is not None
    problems = []
    for host, port in target.nodes:
        try:
            answer = await redis_command(host, port, "SENTINEL", "get-master-addr-by-name",
                                         target.master, password=target.sentinel_password)
        except BenchError as exc:
            problems.append(str(exc))
            continue
        if isinstance(answer, list) and len(answer) == 2:
            return Shard(str(answer[0]), int(str(answer[1])), target.username,
                         target.password)
        problems.append(f"sentinel {host}:{port} knows no master {target.master!r}")
    raise BenchError(f"no Sentinel named the master: {'; '.join(problems)}")
