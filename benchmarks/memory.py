"""Where a connection's memory goes (`python -m benchmarks.memory`).

A node runs in this process under `tracemalloc`, with the in-process broker or a Redis
(`--redis-url`); a client process of the benchmark (`python -m benchmarks --client`)
opens N idle subscribers on one history channel (authenticated, one subscription each, as
`python -m benchmarks` measures them). Two snapshots, one before the connections and one
after them, are compared by file and line (or by traceback with `--traceback`); the
report gives the bytes each line holds per connection, the Python heap's total per
connection, and the RSS per connection beside it (what tracemalloc cannot see: C
allocations of uvloop, the kernel's share is not in RSS at all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import tempfile
import tracemalloc
from typing import Any

from benchmarks.procfs import rss_kib

SECRET = "memory-profile-secret-of-32-bytes-at-least"
CHANNEL = "bench:fanout"


async def _profile(args: argparse.Namespace) -> int:
    import msgspec
    import uvicorn

    from hub.app import create_app
    from hub.server import uvicorn_config
    from hub.settings import Settings

    history = {"history_size": 100, "history_ttl": 600} if args.history else {}
    settings = msgspec.convert({
        "port": 0, "node_id": "memory", "jwt_secret": SECRET, "api_key": "memory",
        "redis_url": args.redis_url, "log_level": "warning",
        "namespaces": {"bench": {"subscribe": "any", **history}},
    }, Settings)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
            return 1
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]

    config: dict[str, Any] = {
        "targets": [["127.0.0.1", port]], "first": 0, "count": args.connections,
        "channels": 1, "messages": 0, "sample": 1000, "offsets": args.history,
        "protocol": args.protocol,
    }
    env = {**os.environ, "HUB_JWT_SECRET": SECRET}
    with tempfile.TemporaryFile() as client_log:
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks", "--client", json.dumps(config), env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=client_log,
        )
        assert client.stdin is not None and client.stdout is not None
        try:
            await _warm_up(port)
            gc.collect()
            rss_before = rss_kib(os.getpid())["VmRSS"]
            before = tracemalloc.take_snapshot()
            ready = json.loads(await asyncio.wait_for(client.stdout.readline(), 300))
            await asyncio.sleep(args.settle)
            gc.collect()
            after = tracemalloc.take_snapshot()
            rss_after = rss_kib(os.getpid())["VmRSS"]
            _report(args, ready, before, after, rss_before, rss_after)
        finally:
            client.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            await client.wait()
    server.should_exit = True
    await serving
    return 0


async def _warm_up(port: int) -> None:
    """One connection in and out first, so that what every node allocates once (imports,
    caches, the first handshake's tables) is in the first snapshot, not the second."""
    import websockets

    from hub.auth import mint_token

    token = mint_token(SECRET, "warm-up", ttl=60)
    url = f"ws://127.0.0.1:{port}/ws?token={token}"
    async with websockets.connect(url) as connection:
        await connection.recv()
        await connection.send(json.dumps({"type": "subscribe", "channel": CHANNEL}))
        await connection.recv()


def _report(args: argparse.Namespace, ready: dict[str, Any], before: tracemalloc.Snapshot,
            after: tracemalloc.Snapshot, rss_before: int, rss_after: int) -> None:
    connections = int(ready["subscribed"])
    key = "traceback" if args.traceback else "lineno"
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(filters).compare_to(before.filter_traces(filters), key)
    heap = sum(stat.size_diff for stat in diff)
    print(f"{connections} connections ({args.protocol}, "
          f"{'history' if args.history else 'no history'}, "
          f"{'Redis' if args.redis_url else 'in-process broker'})")
    print(f"RSS {rss_before} -> {rss_after} KiB: "
          f"{(rss_after - rss_before) / connections:.2f} KiB per connection")
    print(f"Python heap (tracemalloc): {heap / connections / 1024:.2f} KiB per connection")
    print(f"{'bytes/conn':>10} {'blocks/conn':>11}  where")
    for stat in diff[:args.top]:
        per = stat.size_diff / connections
        if abs(per) < 8:
            break
        frames = stat.traceback.format(limit=args.depth if args.traceback else 1)
        where = "\n" + "\n".join(frames) if args.traceback else frames[0].strip()
        print(f"{per:10.0f} {stat.count_diff / connections:11.2f}  {where}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--protocol", choices=("ws", "centrifugo"), default="ws")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--no-history", dest="history", action="store_false",
                        help="a channel without history (frames without offsets)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between the last subscribe and the second snapshot")
    parser.add_argument("--top", type=int, default=30, help="lines to show")
    parser.add_argument("--traceback", action="store_true",
                        help="group by traceback instead of by line")
    parser.add_argument("--depth", type=int, default=12, help="frames per traceback")
    args = parser.parse_args(argv)
    tracemalloc.start(args.depth if args.traceback else 1)
    from benchmarks.fdlimit import raise_fd_limit

    raise_fd_limit()
    import uvloop  # as a node runs (uvicorn's loop="auto" takes it)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_profile(args))


if __name__ == "__main__":
    sys.exit(main())
