"""Redis `INFO cpu` and `INFO commandstats` of every shard, read just before the first
publish and just after the clients reported (a diff: nothing is reset), and the report's
Redis section: per shard and summed, commands per published message and Redis CPU seconds
(`used_cpu_sys` + `used_cpu_user`) per 1,000 messages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import BenchError
from benchmarks.redis_shards import Shard
from benchmarks.resp import redis_commands

# The benchmark's own readings, not the hub's load.
OWN_COMMANDS = frozenset({"info"})


@dataclass(frozen=True)
class Reading:
    calls: dict[str, int]  # per command, since the server started
    cpu_seconds: float  # used_cpu_sys + used_cpu_user, since the server started


@dataclass
class RedisWindow:
    """The shards of one run and their readings around the measured window."""

    kind: str  # server, cluster or sentinel
    private: bool  # started by this run
    shards: list[Shard]
    before: list[Reading] = field(default_factory=list)
    after: list[Reading] = field(default_factory=list)


def _info_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def parse_commandstats(text: str) -> dict[str, int]:
    """Calls per command (`cmdstat_publish:calls=12,usec=...`)."""
    calls: dict[str, int] = {}
    for name, values in _info_fields(text).items():
        if name.startswith("cmdstat_"):
            found = dict(item.split("=", 1) for item in values.split(",") if "=" in item)
            calls[name.removeprefix("cmdstat_")] = int(found.get("calls", 0))
    return calls


def parse_cpu_seconds(text: str) -> float:
    """`used_cpu_sys` + `used_cpu_user` of `INFO cpu`: the whole server process, all its
    threads (`*_main_thread` is a part of it; `*_children`, forks for persistence, is not
    added)."""
    found = _info_fields(text)
    return float(found.get("used_cpu_sys", 0)) + float(found.get("used_cpu_user", 0))


async def read_shard(shard: Shard) -> Reading:
    cpu, commandstats = await redis_commands(
        shard.host, shard.port, [["INFO", "cpu"], ["INFO", "commandstats"]],
        username=shard.username, password=shard.password,
    )
    return Reading(parse_commandstats(str(commandstats)), parse_cpu_seconds(str(cpu)))


async def redis_version(shard: Shard) -> str | None:
    """`redis_version` of `INFO server` (None if it cannot be read)."""
    try:
        (info,) = await redis_commands(shard.host, shard.port, [["INFO", "server"]],
                                       username=shard.username, password=shard.password)
    except (BenchError, OSError):
        return None
    return _info_fields(str(info)).get("redis_version")


async def read_shards(shards: list[Shard]) -> list[Reading]:
    return list(await asyncio.gather(*(read_shard(shard) for shard in shards)))


def usage(before: Reading, after: Reading, published: int, measured: float) -> dict[str, Any]:
    """What one shard (or all, summed) did over the window, per published message."""
    calls = {
        name: n - before.calls.get(name, 0) for name, n in after.calls.items()
        if name not in OWN_COMMANDS
    }
    calls = {name: n for name, n in calls.items() if n > 0}
    cpu = max(0.0, after.cpu_seconds - before.cpu_seconds)
    per_message = max(published, 1)
    return {
        "commands": dict(sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))),
        "commands_per_message": round(sum(calls.values()) / per_message, 3),
        "cpu_seconds": round(cpu, 3),
        "cpu_seconds_per_1000_messages": round(cpu / per_message * 1000, 4),
        "cpu_percent": round(100 * cpu / max(measured, 1e-3), 1),
    }


def total(readings: list[Reading]) -> Reading:
    calls: dict[str, int] = {}
    for reading in readings:
        for name, n in reading.calls.items():
            calls[name] = calls.get(name, 0) + n
    return Reading(calls, sum(reading.cpu_seconds for reading in readings))


def redis_section(window: RedisWindow, published: int, measured: float) -> dict[str, Any]:
    """The report's `redis`: the sum over the shards (CPU percent of one core, so up to
    100 per shard), and `shards`, the same per shard."""
    section: dict[str, Any] = {"kind": window.kind, "private": window.private}
    section.update(usage(total(window.before), total(window.after), published, measured))
    section["shards"] = [
        {"shard": shard.name, **usage(before, after, published, measured)}
        for shard, before, after in zip(window.shards, window.before, window.after,
                                        strict=True)
    ]
    return section
