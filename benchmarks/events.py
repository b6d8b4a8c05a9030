"""Events benchmark (PROTOCOL §14): `python -m benchmarks.events`.

Starts a private redis-server (or none: `--memory`, the in-process broker of one node),
`--nodes` hub nodes with `HUB_EVENTS_URL` pointing at a receiver process, and drives
channel transitions through `/ws` connections at `--rate` transitions per second for
`--seconds` (`--rate 0`: as fast as the nodes take them). Each connection subscribes to a
new channel and unsubscribes from the one it subscribed `WINDOW` steps before, so every
command is one transition (occupied or vacated). The receiver checks every signature and
records, per event, `time_ms` and when it arrived; the report gives events sent and
received, duplicates, the receive rate, and the delay from the transition to its arrival
(p50, p99, max).

    python -m benchmarks.events --nodes 2 --rate 1000 --seconds 10
    python -m benchmarks.events --nodes 1 --rate 0 --seconds 5      # events/s per node
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from benchmarks.processes import (
    NodeProcess,
    free_ports,
    start_node,
    start_redis,
    stop_process,
    with_source_root,
)
from benchmarks.procfs import cpu_seconds

SECRET = "benchmark-events-secret"
WINDOW = 50  # a connection's channels stay occupied for this many of its steps


def receiver_main(port: int) -> None:
    """The receiver process: checks signatures, keeps (time_ms, arrival ms) per event."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from hub.hooks import SIGNATURE_HEADER, verify_signature

    seen: dict[str, tuple[int, int]] = {}
    counts = {"duplicates": 0, "bad": 0, "batches": 0}

    async def receive(request: Request) -> Response:
        body = await request.body()
        if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), SECRET):
            counts["bad"] += 1
            return Response(status_code=401)
        now = time.time_ns() // 1_000_000
        counts["batches"] += 1
        for event in json.loads(body)["events"]:
            if event["id"] in seen:
                counts["duplicates"] += 1
            else:
                seen[event["id"]] = (event["time_ms"], now)
        return Response(status_code=204)

    async def report(request: Request) -> Response:
        delays = sorted(arrived - made for made, arrived in seen.values())
        arrivals = sorted(arrived for _, arrived in seen.values())

        def pct(p: float) -> float:
            return delays[min(len(delays) - 1, int(p * len(delays)))] if delays else 0

        span = (arrivals[-1] - arrivals[0]) / 1000 if len(arrivals) > 1 else 0
        return JSONResponse({
            "received": len(seen), **counts,
            "delay_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": delays[-1] if delays else 0},
            "receive_rate": round(len(seen) / span, 1) if span else 0,
        })

    app = Starlette(routes=[Route("/events", receive, methods=["POST"]),
                            Route("/report", report)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def http_get_json(port: int, path: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        body: dict[str, Any] = (await http.get(f"http://127.0.0.1:{port}{path}")).json()
        return body


async def drive(node: NodeProcess, index: int, steps: int, interval: float) -> int:
    """One connection: `steps` transitions, one every `interval` s (0: back to back,
    awaiting each reply). Ends with every channel left and every reply read. Returns the
    transitions made."""
    async with websockets.connect(f"ws://127.0.0.1:{node.port}/ws", max_size=None) as ws:
        json.loads(await ws.recv())  # welcome (dev mode: no token)
        replies = 0
        replied = asyncio.Event()

        async def read() -> None:
            nonlocal replies
            async for _ in ws:
                replies += 1
                replied.set()

        reader = asyncio.create_task(read())
        started = time.monotonic()
        open_channels: list[str] = []
        made = 0

        async def command(kind: str, channel: str) -> None:
            nonlocal made
            await ws.send(json.dumps({"type": kind, "channel": channel, "id": made}))
            made += 1
            if interval:
                await asyncio.sleep(max(0.0, started + made * interval - time.monotonic()))
            else:
                while replies < made:
                    replied.clear()
                    await replied.wait()

        for step in range(steps):
            if open_channels and (len(open_channels) >= WINDOW or step >= steps - WINDOW):
                await command("unsubscribe", open_channels.pop(0))
            else:
                channel = f"bench:{node.name}-{index}-{step}"
                open_channels.append(channel)
                await command("subscribe", channel)
        for channel in open_channels:
            await command("unsubscribe", channel)
        async with asyncio.timeout(60):
            while replies < made:
                replied.clear()
                await replied.wait()
        reader.cancel()
    return made


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="hub-events-bench-"))
    redis_processes: list[asyncio.subprocess.Process] = []
    nodes: list[NodeProcess] = []
    (receiver_port,) = free_ports(1)
    receiver = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.events", "--receiver", str(receiver_port),
        env=with_source_root(dict(os.environ)),
    )
    try:
        env = {**os.environ, "HUB_DEV": "1", "HUB_RATE_LIMIT": "0",
               "HUB_EVENTS_URL": f"http://127.0.0.1:{receiver_port}/events",
               "HUB_EVENTS_SECRET": SECRET, "HUB_LOG_LEVEL": "warning",
               "HUB_MAX_SUBSCRIPTIONS": "0"}
        if args.no_events:
            del env["HUB_EVENTS_URL"]
        if not args.memory:
            env["HUB_REDIS_URL"] = await start_redis(workdir, redis_processes)
        for n in range(args.nodes):
            await start_node(f"n{n}", env, workdir, nodes)  # into `nodes` as it starts
        for _ in range(100):
            with contextlib.suppress(Exception):
                await http_get_json(receiver_port, "/report")
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.0)  # the nodes share the buckets out
        per_connection = args.connections // args.nodes
        total_connections = per_connection * args.nodes
        if args.rate:
            steps = int(args.rate * args.seconds / total_connections)
            interval = total_connections / args.rate
        else:
            steps, interval = args.steps, 0.0
        cpu_before = [cpu_seconds(node.pid) for node in nodes]
        started = time.monotonic()
        made = sum(await asyncio.gather(*(
            drive(node, index, steps, interval)
            for node in nodes for index in range(per_connection)
        )))
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 60
        report = await http_get_json(receiver_port, "/report")
        while not args.no_events and report["received"] < made and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.5)
            report = await http_get_json(receiver_port, "/report")
        cpu = [cpu_seconds(node.pid) - before for node, before in zip(nodes, cpu_before,
                                                                       strict=True)]
        return {
            "node_cpu_seconds": [round(value, 2) for value in cpu],
            "nodes": args.nodes, "broker": "memory" if args.memory else "redis",
            "offered_rate": args.rate or "max", "transitions": made,
            "drive_seconds": round(elapsed, 2),
            "transitions_per_s": round(made / elapsed, 1), **report,
        }
    finally:
        for node in nodes:
            await stop_process(node.process)
        for process in redis_processes:
            await stop_process(process)
        await stop_process(receiver)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.events")
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="in-process broker (1 node)")
    parser.add_argument("--rate", type=float, default=1000, help="transitions/s; 0 = max")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--steps", type=int, default=2000, help="per connection at max")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--no-events", action="store_true",
                        help="no HUB_EVENTS_URL: what the transitions cost without events")
    args = parser.parse_args()
    if args.receiver:
        receiver_main(args.receiver)
        return
    if args.memory and args.nodes != 1:
        parser.error("--memory runs one node")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
