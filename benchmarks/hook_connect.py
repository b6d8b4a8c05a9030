"""Connects through the connect hook against JWT connects (PROTOCOL §13):

    python -m benchmarks.hook_connect [--connections 10000] [--in-flight 500]
                                      [--concurrency 64] [--timeout 1] [--backend-delay 0]

Starts a backend (a Starlette connect hook under uvicorn, in its own process, answering
after `--backend-delay` seconds) and a `hub serve` node (in its own process) whose
HUB_HOOK_CONNECT_URL is that backend's. Then, in turns, opens `--connections` `/ws`
connections with `--in-flight` handshakes at a time: with a token in the header (JWT: the
node verifies it itself), and without (the node asks the backend). Each connection's
latency runs from its TCP connect to its `welcome` (or close); they are all held until the
last is in, then closed. Prints connects/s, p50/p99/max latency, failures (closes 1011:
the hook's timeout), node CPU per connect, and the backend's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.churn import read_text
from benchmarks.fdlimit import raise_fd_limit, require_fds
from benchmarks.processes import free_ports
from benchmarks.procfs import cpu_seconds
from hub.auth import mint_token
from hub.hooks import ConnectRequest, ConnectResult, Reply

DELAY = float(os.environ.get("BENCH_HOOK_DELAY", "0"))
IN_FLIGHT = {"now": 0, "most": 0}  # the backend's calls at once


async def connect_hook(request: Request) -> Response:
    IN_FLIGHT["now"] += 1
    IN_FLIGHT["most"] = max(IN_FLIGHT["most"], IN_FLIGHT["now"])
    try:
        hook = msgspec.json.decode(await request.body(), type=ConnectRequest)
        if DELAY:
            await asyncio.sleep(DELAY)
        reply = Reply(result=ConnectResult(user="u-" + hook.client[:10]))
        return Response(msgspec.json.encode(reply), media_type="application/json")
    finally:
        IN_FLIGHT["now"] -= 1


async def most_in_flight(request: Request) -> Response:
    """GET: the most calls the backend had at once since the last POST (which resets it)."""
    most = IN_FLIGHT["most"]
    if request.method == "POST":
        IN_FLIGHT["most"] = 0
    return Response(str(most))


backend_app = Starlette(routes=[Route("/connect", connect_hook, methods=["POST"]),
                                Route("/in-flight", most_in_flight, methods=["GET", "POST"])])


@dataclass
class Process:
    process: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_backend(delay: float) -> Process:
    port = free_ports(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "benchmarks.hook_connect:backend_app", "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log",
         "--backlog", "4096"],
        env={**os.environ, "BENCH_HOOK_DELAY": str(delay)}, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url + "/connect", content=b'{"client":"x","transport":"websocket",'
                       b'"protocol":"json","encoding":"json"}', timeout=1)
            return Process(process, url)
        time.sleep(0.1)
    process.kill()
    sys.exit("hook_connect: the backend did not start")


def start_node(secret: str, backend: str, concurrency: int, timeout: float) -> Process:
    env = {**os.environ, "HUB_JWT_SECRET": secret, "HUB_NODE_ID": "hooks",
           "HUB_LOG_LEVEL": "warning", "HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0",
           "HUB_HOOK_CONNECT_URL": backend + "/connect",
           "HUB_HOOK_CONCURRENCY": str(concurrency), "HUB_HOOK_TIMEOUT": str(timeout)}
    process = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--port", "0"], env=env,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on http://" not in line:
        process.kill()
        sys.exit(f"hook_connect: the node did not start: {line!r}")
    return Process(process, "http://" + line.split("http://", 1)[1].split(" ", 1)[0])


async def open_one(host: str, port: int, token: str | None) -> tuple[float, bool,
                                                                       asyncio.StreamWriter]:
    """Latency to `welcome`, whether it came, and the connection (to close later)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{auth}\r\n").encode())
    response = await reader.readuntil(b"\r\n\r\n")
    if not response.startswith(b"HTTP/1.1 101"):
        return time.perf_counter() - started, False, writer
    try:
        welcomed = json.loads(await read_text(reader))["type"] == "welcome"
    except (ConnectionError, asyncio.IncompleteReadError):
        welcomed = False
    return time.perf_counter() - started, welcomed, writer


async def run_mode(node: Process, backend: Process, connections: int, in_flight: int,
                   secret: str, hooked: bool) -> dict[str, float]:
    host, port_text = node.url.removeprefix("http://").rsplit(":", 1)
    port = int(port_text)
    gate = asyncio.Semaphore(in_flight)
    tokens = [None if hooked else mint_token(secret, f"u-{n}") for n in range(connections)]

    async def one(token: str | None) -> tuple[float, bool, asyncio.StreamWriter]:
        async with gate:
            return await open_one(host, port, token)

    calls_before, call_seconds_before = hook_calls(node)
    backend_in_flight(backend, reset=True)
    node_cpu, backend_cpu = cpu_seconds(node.process.pid), cpu_seconds(backend.process.pid)
    started = time.perf_counter()
    results = await asyncio.gather(*(one(token) for token in tokens))
    elapsed = time.perf_counter() - started
    node_cpu = cpu_seconds(node.process.pid) - node_cpu
    backend_cpu = cpu_seconds(backend.process.pid) - backend_cpu
    calls, call_seconds = hook_calls(node)
    calls, call_seconds = calls - calls_before, call_seconds - call_seconds_before
    for _, _, writer in results:
        writer.transport.abort()
    latencies = sorted(latency for latency, _, _ in results)
    welcomed = sum(ok for _, ok, _ in results)
    await asyncio.sleep(2)  # the node lets them go before the next turn
    return {
        "connects_per_s": welcomed / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": 1000 * latencies[-1],
        "failed": connections - welcomed,
        "node_cpu_us_per_connect": 1e6 * node_cpu / max(1, welcomed),
        "backend_cpu_s": backend_cpu,
        "backend_most_in_flight": backend_in_flight(backend),
        "hook_calls": calls,
        "hook_call_mean_ms": 1000 * call_seconds / max(1, calls),
        "seconds": elapsed,
    }


def backend_in_flight(backend: Process, reset: bool = False) -> float:
    """The most calls the backend had at once since the last reset."""
    method = "POST" if reset else "GET"
    return float(httpx.request(method, backend.url + "/in-flight", timeout=10).text)


def hook_calls(node: Process) -> tuple[float, float]:
    """Connect hook calls so far, and their time in all (wait for a slot included)."""
    count = total = 0.0
    for line in httpx.get(node.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('hub_hook_duration_seconds_count{hook="connect"}'):
            count = float(line.split()[-1])
        elif line.startswith('hub_hook_duration_seconds_sum{hook="connect"}'):
            total = float(line.split()[-1])
    return count, total


async def bench(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    secret = secrets.token_hex(16)
    backend = start_backend(args.backend_delay)
    node = start_node(secret, backend.url, args.concurrency, args.timeout)
    results: dict[str, dict[str, float]] = {}
    try:
        for turn in range(args.turns):
            for mode in ("jwt", "hook"):
                result = await run_mode(node, backend, args.connections, args.in_flight,
                                        secret, hooked=mode == "hook")
                results[f"{mode}#{turn + 1}"] = result
                print(f"{mode:4} turn {turn + 1}: " + ", ".join(
                    f"{name} {value:.1f}" for name, value in result.items()), flush=True)
    finally:
        node.stop()
        backend.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--in-flight", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--backend-delay", type=float, default=0.0)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    raise_fd_limit()
    require_fds(args.connections, "hook_connect")
    results = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
