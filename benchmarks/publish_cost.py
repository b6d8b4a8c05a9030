"""Node CPU and Redis commands per publish in the Redis broker alone (no HTTP, no
subscribers): `python -m benchmarks.publish_cost --redis-url redis://127.0.0.1:PORT/0`.

A `RedisBroker` of the `hub` on the path publishes to `--channels` channels with history,
round-robin, `--messages` times for each width in `--widths` (publishes awaited together),
after one warm-up publish per channel; it prints, per width, the process CPU time
(`time.process_time`) and wall time per publish and the Redis commands per publish
(`INFO commandstats`, reset before each width: use a private redis-server). To compare two
commits, run it with each tree's root first on `PYTHONPATH`, in turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import redis

from hub.broker import HistoryOptions
from hub.protocol import Message, Relayed
from hub.redis.broker import RedisBroker
from hub.redis.topology import create_server_client


class _Events:
    """A node that wants nothing relayed."""

    @property
    def channels(self) -> Iterable[str]:
        return ()

    def on_relayed(self, channel: str, relayed: list[Relayed]) -> None:
        pass

    def on_broker_up(self, reconnected: bool, channels: Iterable[str]) -> None:
        pass

    def on_broker_down(self, channels: Iterable[str]) -> None:
        pass

    def on_broker_ready(self) -> None:
        pass


async def measure(url: str, channels: int, messages: int, widths: list[int]) -> dict[str, Any]:
    broker = RedisBroker(create_server_client(url))
    await broker.start(_Events())
    history = HistoryOptions(size=100, ttl=600)
    data = msgspec.Raw(b'{"seq":1,"pad":"' + b"x" * 80 + b'"}')
    names = [f"bench:cost.{k}" for k in range(channels)]

    def publish(k: int) -> Any:
        name = names[k % channels]
        return broker.publish(name, Message(channel=name, data=data, ts=1), history)

    for k in range(channels):
        await publish(k)
    stats = redis.Redis.from_url(url)
    result: dict[str, Any] = {}
    try:
        for width in widths:
            stats.config_resetstat()
            cpu, wall = time.process_time(), time.perf_counter()
            for k in range(0, messages, width):
                await asyncio.gather(*(publish(k + j) for j in range(width)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            calls = sum(int(entry["calls"]) for name, entry in stats.info("commandstats").items()
                        if not name.startswith(("cmdstat_info", "cmdstat_config")))
            result[str(width)] = {
                "cpu_us_per_publish": round(cpu / messages * 1e6, 1),
                "wall_us_per_publish": round(wall / messages * 1e6, 1),
                "commands_per_publish": round(calls / messages, 2),
            }
    finally:
        stats.close()
        await broker.close()
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publish_cost")
    parser.add_argument("--redis-url", required=True, help="a private redis-server")
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--widths", default="1,2,16", help="publishes at once (1,2,16)")
    args = parser.parse_args(argv)
    widths = [int(width) for width in args.widths.split(",")]
    if min(args.channels, args.messages, *widths) < 1:
        print("publish_cost: --channels, --messages and widths must be >= 1", file=sys.stderr)
        return 2
    coroutine = measure(args.redis_url, args.channels, args.messages, widths)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    import hub

    print(json.dumps({"hub": hub.__file__, "publishes_at_once": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
