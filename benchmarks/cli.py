"""`python -m benchmarks` options and entry point; `--client CONFIG` runs a client process
instead."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from benchmarks.client import run_client
from benchmarks.common import BenchError
from benchmarks.redis_cluster import SLOTS
from benchmarks.report import human
from benchmarks.run import run
from benchmarks.subscriber import PROTOCOLS

PEERS = ("hub", "socketio")

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Fan-out benchmark: N nodes (the hub's or "
        "a peer's), S subscribers on C channels, M messages published round-robin through "
        "the HTTP API by P concurrent publishers; every subscriber checks that each message "
        "arrives once and, on the hub, that offsets go up by 1 in one epoch.")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to start (default 1)")
    parser.add_argument("--redis-url", help="Redis for the nodes (needed when --nodes > 1)")
    parser.add_argument("--redis-server", action="store_true",
                        help="start a private redis-server on a free port")
    parser.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                        help="start a private Redis Cluster of N masters on free ports")
    parser.add_argument("--peer", choices=PEERS, default="hub",
                        help="whose nodes to start: the hub's (default), or Socket.IO 4 on "
                        "Node with its Redis adapter (benchmarks/peers/socketio)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="ws",
                        help="what the subscribers speak: the hub's own on /ws (default) or "
                        "Centrifugo's client protocol v2 JSON on /connection/websocket")
    parser.add_argument("--subscribers", type=int, default=1000,
                        help="subscriber connections, spread evenly over nodes (1000)")
    parser.add_argument("--channels", type=int, default=1,
                        help="channels; subscribers and messages are spread over them (1)")
    parser.add_argument("--messages", type=int, default=2000,
                        help="messages to publish, in total over all channels (2000)")
    parser.add_argument("--rate", type=float, default=0,
                        help="messages/s offered; 0 = as fast as the hub answers (default)")
    parser.add_argument("--payload", type=int, default=100, help="bytes of `data` (100)")
    parser.add_argument("--duration", type=float, default=60,
                        help="cap in seconds on publishing + delivery (60)")
    parser.add_argument("--client-procs", type=int, default=2,
                        help="processes the subscriber connections are spread over (2)")
    parser.add_argument("--publishers", type=int, default=4,
                        help="concurrent keep-alive HTTP connections publishing, each sending "
                        "its next message once its previous one was answered (4)")
    parser.add_argument("--ordered", action="store_true",
                        help="publish a channel's next message only once its previous one "
                        "was answered, and check that `seq` arrives in order too")
    parser.add_argument("--history-size", type=int, default=100,
                        help="the hub namespace's history_size; > 0 puts offset/epoch in "
                        "every frame, which the subscribers check (100)")
    parser.add_argument("--history-ttl", type=float, default=600,
                        help="the hub namespace's history_ttl in seconds (600)")
    parser.add_argument("--batch", type=int, default=1,
                        help="messages per request, on as many consecutive channels; > 1 uses "
                        "/api/batch (B publications, or sends with --personal) and needs "
                        "--channels >= B (1)")
    parser.add_argument("--personal", action="store_true",
                        help="each subscriber on its own personal channel (@bench-i), messages "
                        "sent round-robin over the users with /api/send; --channels is then "
                        "--subscribers")
    parser.add_argument("--sample", type=int, default=20,
                        help="measure latency on 1 frame in N per connection (20)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after subscribing before measuring RSS (1)")
    parser.add_argument("--hold", type=float, default=0,
                        help="seconds to wait before publishing, e.g. to attach a profiler")
    parser.add_argument("--idle", type=float, default=0, metavar="SECONDS",
                        help="hold the connections idle this long before publishing and "
                        "report the nodes' CPU over it: the keepalive cost (0: skip)")
    parser.add_argument("--drain", action="store_true",
                        help="end by SIGTERM to the nodes with their own HUB_DRAIN_DELAY and "
                        "HUB_DRAIN_SECONDS (defaults 1 and 10, else 0 and 0) and report the "
                        "time to each node's exit and to the last connection closed")
    parser.add_argument("--source-addresses", type=int, default=1, metavar="K",
                        help="connect from 127.0.0.1 .. 127.0.0.K in turn: one source address "
                        "has ~28,000 ephemeral ports towards a node (1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    if args.personal:
        if args.protocol != "ws":
            return "--personal sends to users over /ws: no --protocol"
        args.channels = args.subscribers
    if min(args.nodes, args.subscribers, args.messages, args.client_procs, args.channels) < 1:
        return "--nodes, --subscribers, --channels, --messages and --client-procs must be >= 1"
    if args.idle < 0 or not 1 <= args.source_addresses <= 254:
        return "--idle must be >= 0 and --source-addresses 1-254"
    if args.publishers < 1 or args.batch < 1 or args.sample < 0 or args.duration <= 0:
        return "--publishers and --batch must be >= 1, --sample >= 0, --duration > 0"
    if not 0 <= args.redis_cluster <= SLOTS:
        return f"--redis-cluster takes 1-{SLOTS} masters"
    redis = [("--redis-url", args.redis_url), ("--redis-server", args.redis_server),
             ("--redis-cluster", args.redis_cluster)]
    given = [name for name, value in redis if value]
    if args.nodes > 1 and not given:
        return "--nodes > 1 needs --redis-url, --redis-server or --redis-cluster"
    if len(given) > 1:
        return ("give one of --redis-url, --redis-server or --redis-cluster, not "
                + " and ".join(given))
    if args.history_size < 0 or args.history_ttl <= 0:
        return "--history-size must be >= 0 and --history-ttl > 0"
    if args.peer == "hub" and not args.history_size and not args.ordered:
        return ("--history-size 0 leaves the hub's frames without offsets, so nothing would "
                "check their order: give --ordered (seq order) too")
    if args.peer != "hub":
        problem = _peer_problem(args)
        if problem:
            return problem
    if args.batch > args.channels:
        # One batch's publications share one `data`, so one `seq`: it can serve B channels
        # of one round, but not B messages of one channel.
        return "--batch must be <= --channels (a batch sends one seq to B channels)"
    return None


def _peer_problem(args: argparse.Namespace) -> str | None:
    if args.protocol != "ws":
        return f"--peer {args.peer} speaks its own protocol: leave out --protocol"
    if args.redis_cluster or (args.redis_url and not args.redis_url.startswith("redis://")):
        return f"--peer {args.peer} takes one Redis server (--redis-server or a redis:// URL)"
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
        print(f"benchmarks: {problem}", file=sys.stderr)
        return 2
    try:
        result = _run_loop(run(args))
    except BenchError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result) if args.json else human(result))
    return 1 if result["failures"] else 0
