"""`hub bench` options and entry point; `--client CONFIG` runs a client process instead."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from hub.bench.client import run_client
from hub.bench.common import BenchError
from hub.bench.report import human
from hub.bench.run import run

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub bench", description="Fan-out benchmark: N nodes, S subscribers on one "
        "channel, M messages published through the HTTP API.")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to start (default 1)")
    parser.add_argument("--redis-url", help="Redis for the nodes (needed when --nodes > 1)")
    parser.add_argument("--redis-server", action="store_true",
                        help="start a private redis-server on a free port")
    parser.add_argument("--subscribers", type=int, default=1000,
                        help="subscriber connections, spread evenly over nodes (1000)")
    parser.add_argument("--messages", type=int, default=2000, help="messages to publish (2000)")
    parser.add_argument("--rate", type=float, default=0,
                        help="messages/s offered; 0 = as fast as the hub answers (default)")
    parser.add_argument("--payload", type=int, default=100, help="bytes of `data` (100)")
    parser.add_argument("--duration", type=float, default=60,
                        help="cap in seconds on publishing + delivery (60)")
    parser.add_argument("--client-procs", type=int, default=2,
                        help="processes the subscriber connections are spread over (2)")
    parser.add_argument("--publishers", type=int, default=4,
                        help="concurrent keep-alive HTTP connections publishing (4)")
    parser.add_argument("--batch", type=int, default=1,
                        help="messages per request; > 1 uses /api/broadcast (1)")
    parser.add_argument("--sample", type=int, default=20,
                        help="measure latency on 1 frame in N per connection (20)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after subscribing before measuring RSS (1)")
    parser.add_argument("--hold", type=float, default=0,
                        help="seconds to wait before publishing, e.g. to attach a profiler")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    if args.nodes < 1 or args.subscribers < 1 or args.messages < 1 or args.client_procs < 1:
        return "--nodes, --subscribers, --messages and --client-procs must be >= 1"
    if args.publishers < 1 or args.batch < 1 or args.sample < 0 or args.duration <= 0:
        return "--publishers and --batch must be >= 1, --sample >= 0, --duration > 0"
    if args.nodes > 1 and not (args.redis_url or args.redis_server):
        return "--nodes > 1 needs --redis-url or --redis-server"
    if args.redis_url and args.redis_server:
        return "give --redis-url or --redis-server, not both"
    return None


def _run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--client"]:
        return _run_loop(run_client(json.loads(argv[1])))
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"hub bench: {problem}", file=sys.stderr)
        return 2
    try:
        result = _run_loop(run(args))
    except BenchError as exc:
        print(f"hub bench: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("hub bench: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result) if args.json else human(result))
    return 0 if result["lost"] == 0 and result["publish_errors"] == 0 else 1
