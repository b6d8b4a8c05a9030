"""One run: start Redis (a server or a Cluster) and the nodes (the hub's, or a peer's),
connect the clients, publish, take the readings, and stop everything it started."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError
from benchmarks.fdlimit import raise_fd_limit, require_fds
from benchmarks.httpclient import http_request
from benchmarks.layout import node_of
from benchmarks.lifecycle import Window, connect_section, drain_section, idle_section, loadavg
from benchmarks.processes import (
    ClientProcess,
    NodeProcess,
    command_output,
    hub_source,
    node_info,
    socketio_missing,
    socketio_versions,
    start_client,
    start_node,
    start_redis,
    start_socketio_node,
    stop_process,
    wait_ready,
)
from benchmarks.procfs import cpu_seconds, machine_cpu, rss_kib
from benchmarks.publisher import Publishing, publisher
from benchmarks.redis_cluster import start_cluster
from benchmarks.redis_shards import redis_shards
from benchmarks.redis_stats import RedisWindow, read_shards, redis_version
from benchmarks.report import summarise

CONFIG_TOML = '[namespaces.bench]\nsubscribe = "any"\npublish = "any"\n'


def config_toml(history_size: int, history_ttl: float) -> str:
    """The nodes' namespace `bench`: anyone subscribes and publishes; with history every
    message frame carries the channel's `offset` and `epoch` (PROTOCOL §5)."""
    if history_size <= 0:
        return CONFIG_TOML
    return CONFIG_TOML + f"history_size = {history_size}\nhistory_ttl = {history_ttl:g}\n"


def _bench_env(
    workdir: Path, redis_url: str | None, args: argparse.Namespace
) -> tuple[dict[str, str], str]:
    config = workdir / "hub.toml"
    config.write_text(config_toml(args.history_size, args.history_ttl))
    api_key = secrets_token()
    env = dict(os.environ)
    env.update({
        "HUB_JWT_SECRET": secrets_token(),
        "HUB_API_KEY": api_key,
        "HUB_CONFIG": str(config),
        "HUB_LOG_LEVEL": env.get("HUB_LOG_LEVEL", "warning"),
    })
    if not args.drain:  # else the node's own (or the environment's) drain is measured
        env.update({"HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0"})
    env.pop("HUB_DEV", None)
    env.pop("HUB_REDIS_URL", None)
    if redis_url:
        env["HUB_REDIS_URL"] = redis_url
    return env, api_key


def secrets_token() -> str:
    return base64.urlsafe_b64encode(os.urandom(24)).decode()


async def _gather_reports(
    clients: list[ClientProcess], within: float, what: str
) -> list[dict[str, Any]]:
    tasks = [asyncio.ensure_future(client.report()) for client in clients]
    try:
        async with asyncio.timeout(within):
            return list(await asyncio.gather(*tasks))
    except TimeoutError:
        raise BenchError(f"client processes did not report {what} in {within:.0f} s") from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """SIGTERM or SIGHUP cancels the run, so the nodes and Redis it started are stopped."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await _run(args)
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _check_fds(args: argparse.Namespace) -> None:
    """Raise the limit for this process and its children; fail now if it is still short."""
    raise_fd_limit()
    require_fds(-(-args.subscribers // args.nodes), "each node")
    require_fds(-(-args.subscribers // min(args.client_procs, args.subscribers)),
                "each client process", " or give more --client-procs")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    _check_fds(args)
    if args.peer == "socketio" and (problem := socketio_missing()):
        raise BenchError(problem)
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    redis_processes: list[asyncio.subprocess.Process] = []  # stopped by pid at the end
    started: list[NodeProcess] = []  # in the order they came up; `nodes` by index
    nodes: list[NodeProcess] = []
    clients: list[ClientProcess] = []
    publishing: asyncio.Future[None] | None = None
    try:
        redis_url: str | None = args.redis_url
        if args.redis_server:
            redis_url = await start_redis(workdir, redis_processes)
        elif args.redis_cluster:
            redis_url = await start_cluster(workdir, args.redis_cluster, redis_processes)
        env, api_key = _bench_env(workdir, redis_url, args)
        if args.peer == "socketio":
            peer_env = {k: v for k, v in env.items() if not k.startswith("HUB_")}
            nodes = list(await asyncio.gather(*(
                start_socketio_node(f"socketio-{i}", redis_url, peer_env, workdir, started)
                for i in range(args.nodes)
            )))
            software: dict[str, Any] = {"node": await command_output("node", "--version"),
                                        **socketio_versions()}
        else:
            software = {"hub": await hub_source(env)}
            nodes = list(await asyncio.gather(
                *(start_node(f"bench-{i}", env, workdir, started) for i in range(args.nodes))
            ))
        await asyncio.gather(*(wait_ready(node) for node in nodes))
        if args.peer == "hub":
            software["node_info"] = [await node_info(node) for node in nodes]
        redis: RedisWindow | None = None
        if redis_url:
            kind, shards = await redis_shards(redis_url)
            redis = RedisWindow(kind, bool(redis_processes), shards)
            software["redis_server"] = await redis_version(shards[0]) if shards else None
        for node in nodes:  # warm the API path, then take the idle footprint
            await http_request(node.host, node.port, "POST", "/api/publish",
                               b'{"channel":"bench:warm","data":1}', api_key)
            node.rss_idle = rss_kib(node.pid)
        for index in range(args.subscribers):
            nodes[node_of(index, len(nodes))].connections += 1

        connecting = Window(nodes, [])
        await _start_clients(args, nodes, env, workdir, clients)
        setup_timeout = 30 + args.subscribers / 100
        ready = await _gather_reports(clients, setup_timeout, "ready")
        connected = connect_section(ready, connecting.stop())
        for client, report in zip(clients, ready, strict=True):
            client.ready = report
        subscribed = sum(int(r["subscribed"]) for r in ready)
        if subscribed < args.subscribers:
            errors = [e for r in ready for e in r["errors"]][:5]
            raise BenchError(f"only {subscribed} of {args.subscribers} subscribed: {errors}")
        await asyncio.sleep(args.settle)
        for node in nodes:
            node.rss_connected = rss_kib(node.pid)
        idle = await idle_section(nodes, clients, args.idle) if args.idle else None
        if args.hold:
            pids = " ".join(str(node.pid) for node in nodes)
            print(f"benchmarks: holding {args.hold:.0f} s before publishing; node pids {pids}",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(args.hold)

        if redis is not None:
            redis.before = await read_shards(redis.shards)
        own_cpu_before = time.process_time()
        machine_before = machine_cpu()
        for node in nodes:
            node.cpu_before = cpu_seconds(node.pid)
        for client in clients:
            client.cpu_before = cpu_seconds(client.process.pid)
        start = time.time()
        deadline = start + args.duration
        go = json.dumps({"cmd": "go", "deadline": deadline})
        for client in clients:
            assert client.process.stdin is not None
            client.process.stdin.write(go.encode() + b"\n")
            await client.process.stdin.drain()
        job = Publishing(args.messages, args.batch, args.rate, args.payload, deadline, api_key,
                         args.channels, ordered=args.ordered, personal=args.personal)
        publishers = [
            publisher(nodes[i % len(nodes)], job, start) for i in range(args.publishers)
        ]
        publishing = asyncio.ensure_future(_all(publishers))
        done = await _gather_reports(clients, args.duration + 10, "results")
        await _finish(publishing)
        for client, report in zip(clients, done, strict=True):
            client.done = report
            client.cpu_after = cpu_seconds(client.process.pid)
        for node in nodes:
            node.cpu_after = cpu_seconds(node.pid)
            node.rss_after = rss_kib(node.pid)
        own_cpu = time.process_time() - own_cpu_before
        job.measured = time.time() - start
        machine_after = machine_cpu()
        busy = machine_after[0] - machine_before[0]
        machine_busy = round(100 * busy / max(machine_after[1] - machine_before[1], 1), 1)
        if redis is not None:
            redis.after = await read_shards(redis.shards)
        result = summarise(args, nodes, clients, job, own_cpu, redis)
        result["software"] = {"python": platform.python_version(), **software}
        result["machine_busy_percent"] = machine_busy
        result["cpus"] = os.cpu_count()
        result["loadavg"] = loadavg()
        result["connect"] = connected
        if idle is not None:
            result["idle"] = idle
        if args.drain:
            result["drain"] = await drain_section(nodes, clients, _drain_bound(env))
        return result
    finally:
        await _to_the_end(_stop_all(publishing, clients, started, redis_processes))
        shutil.rmtree(workdir, ignore_errors=True)


def _drain_bound(env: dict[str, str]) -> float:
    """How long a drain may take before the run stops waiting: the node's drain deadline
    (HUB_DRAIN_DELAY + HUB_DRAIN_SECONDS + 5 s, hub/server.py) and 10 s more."""
    delay = float(env.get("HUB_DRAIN_DELAY", 1))
    return delay + float(env.get("HUB_DRAIN_SECONDS", 10)) + 15


async def _stop_all(
    publishing: asyncio.Future[None] | None, clients: list[ClientProcess],
    nodes: list[NodeProcess], redis_processes: list[asyncio.subprocess.Process],
) -> None:
    """Stop what the run started: publishers, clients, nodes, then Redis (by pid)."""
    if publishing is not None and not publishing.done():
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
    for client in clients:
        if client.process.stdin is not None:
            client.process.stdin.close()  # EOF: disconnect and exit
    for client in clients:
        await stop_process(client.process, 5, exiting=5)
    await asyncio.gather(*(stop_process(node.process) for node in nodes))
    for node in nodes:
        if node.drain is not None:
            node.drain.cancel()
    await asyncio.gather(*(stop_process(process) for process in redis_processes))


async def _to_the_end(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run `cleanup` to its end even when the run is cancelled meanwhile (SIGTERM or Ctrl-C
    while it stops things), and then let the cancellation through. Bounded: every stop
    ends in SIGKILL."""
    task = asyncio.ensure_future(cleanup)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


async def _all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*coroutines)


async def _finish(task: asyncio.Future[None]) -> None:
    """The clients reported; the publisher is done or past the deadline."""
    try:
        await asyncio.wait_for(task, 10)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def client_protocol(args: argparse.Namespace) -> str:
    """What the subscribers speak: the peer's protocol, or the hub's `--protocol`."""
    return "socketio" if args.peer == "socketio" else str(args.protocol)


def checks_offsets(args: argparse.Namespace) -> bool:
    """The hub's frames carry offsets when its namespace keeps history; a peer's do not."""
    return bool(args.peer == "hub" and args.history_size > 0 and not args.personal)


async def _start_clients(
    args: argparse.Namespace, nodes: list[NodeProcess], env: dict[str, str], workdir: Path,
    clients: list[ClientProcess],
) -> None:
    """Connections 0 .. S-1 in consecutive slices, one slice per client process, each
    added to `clients` as it starts."""
    targets = [[node.host, node.port] for node in nodes]
    procs = min(args.client_procs, args.subscribers)
    first = 0
    for k in range(procs):
        count = args.subscribers // procs + (1 if k < args.subscribers % procs else 0)
        config = {
            "targets": targets, "first": first, "count": count, "channels": args.channels,
            "messages": args.messages, "sample": args.sample, "protocol": client_protocol(args),
            "offsets": checks_offsets(args), "ordered": args.ordered,
            "personal": args.personal, "sources": args.source_addresses,
            "ttl": 3600 + args.duration + 600,
        }
        clients.append(await start_client(config, env, workdir / f"client-{k}.log", count))
        first += count
