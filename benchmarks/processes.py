"""The processes a run starts: nodes, private redis-servers, client processes.

Nodes run the hub of the tree this package sits in (`python -m hub serve` with that tree's
root first on PYTHONPATH, so a copy of the package inside a `git worktree` of another
commit runs that commit's hub, whatever is installed), or with `--peer socketio` the
Socket.IO server in benchmarks/peers/socketio (`node server.mjs 0 [REDIS_URL]`). Client
processes run this package (`python -m benchmarks --client CONFIG`), which is not
installed: their PYTHONPATH gets the same root, so they start from any working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError
from benchmarks.httpclient import http_request
from benchmarks.resp import redis_command

LISTENING = re.compile(r"hub listening on http://\[?([^\]\s]+?)\]?:(\d+)")
PEER_LISTENING = re.compile(r"^listening (\d+)")
# The directory that holds this package: nodes and client processes get it on their path.
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)
SOCKETIO_DIR = Path(__file__).resolve().parent / "peers" / "socketio"
SOCKETIO_PACKAGES = ("socket.io", "@socket.io/redis-adapter", "redis")


def with_source_root(env: dict[str, str]) -> dict[str, str]:
    """`env` with this package's tree first on PYTHONPATH."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (SOURCE_ROOT, env.get("PYTHONPATH")) if path
    )
    return env


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all held open until all are chosen."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


async def stop_process(
    process: asyncio.subprocess.Process, grace: float = 10.0, exiting: float = 0.0
) -> None:
    """Give a process `exiting` seconds to end by itself, then SIGTERM, then SIGKILL."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), exiting)
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class NodeProcess:
    name: str
    process: asyncio.subprocess.Process
    log: Path
    host: str = ""
    port: int = 0
    connections: int = 0
    rss_idle: dict[str, int] = field(default_factory=dict)
    rss_connected: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    cpu_before: float = 0.0
    cpu_after: float = 0.0
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class ClientProcess:
    process: asyncio.subprocess.Process
    log: Path
    count: int
    ready: dict[str, Any] = field(default_factory=dict)
    done: dict[str, Any] = field(default_factory=dict)
    cpu_before: float = 0.0
    cpu_after: float = 0.0

    async def report(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise BenchError(f"client process exited early:\n{log_tail(self.log)}")
        report: dict[str, Any] = json.loads(line)
        return report


async def _drain_stream(stream: asyncio.StreamReader | None) -> None:
    if stream is None:
        return
    while await stream.readline():
        pass


async def start_node(
    name: str, env: dict[str, str], workdir: Path, started: list[NodeProcess]
) -> NodeProcess:
    """A node, once it says where it listens. It goes into `started` as soon as it runs, so
    the caller stops it even if the wait fails or is cancelled."""
    log = workdir / f"{name}.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1", "--port", "0",
            "--node-id", name, env=with_source_root(env), stdout=asyncio.subprocess.PIPE,
            stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
        )
    return await _listening(NodeProcess(name, process, log), started, _hub_address)


def _hub_address(line: str) -> tuple[str, int] | None:
    found = LISTENING.search(line)
    return (found.group(1), int(found.group(2))) if found else None


def _peer_address(line: str) -> tuple[str, int] | None:
    found = PEER_LISTENING.search(line)
    return ("127.0.0.1", int(found.group(1))) if found else None


async def _listening(
    node: NodeProcess, started: list[NodeProcess],
    address: Callable[[str], tuple[str, int] | None],
) -> NodeProcess:
    """`node`, once its stdout says where it listens (30 s at most)."""
    started.append(node)
    process = node.process
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
        except TimeoutError:
            break
        if not line:
            break
        found = address(line.decode(errors="replace"))
        if found:
            node.host, node.port = found
            node.drain = asyncio.ensure_future(_drain_stream(process.stdout))
            return node
    await stop_process(process)
    raise BenchError(f"node {node.name} did not start:\n{log_tail(node.log)}")


def socketio_missing() -> str | None:
    """Why the Socket.IO peer cannot start here, with what to do; None when it can."""
    if shutil.which("node") is None:
        return "--peer socketio needs Node.js (`node` on PATH; Node 20 was measured)"
    modules = SOCKETIO_DIR / "node_modules"
    missing = [name for name in SOCKETIO_PACKAGES
               if not (modules / name / "package.json").is_file()]
    if missing:
        where = os.path.relpath(SOCKETIO_DIR)
        return (f"--peer socketio: npm packages missing in {modules} ({', '.join(missing)}): "
                f"run `npm install --prefix {where}`")
    return None


def socketio_versions() -> dict[str, str]:
    """Node's and the npm packages' versions the peer runs."""
    found: dict[str, str] = {}
    for name in SOCKETIO_PACKAGES:
        with contextlib.suppress(OSError, ValueError):
            package = json.loads((SOCKETIO_DIR / "node_modules" / name / "package.json")
                                 .read_text())
            found[name] = str(package.get("version"))
    return found


async def start_socketio_node(
    name: str, redis_url: str | None, env: dict[str, str], workdir: Path,
    started: list[NodeProcess],
) -> NodeProcess:
    """A Socket.IO node (benchmarks/peers/socketio/server.mjs) on a free port, with the
    Redis adapter on `redis_url` when given."""
    node_binary = shutil.which("node")
    if node_binary is None:
        raise BenchError("no node on PATH")
    log = workdir / f"{name}.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            node_binary, str(SOCKETIO_DIR / "server.mjs"), "0",
            *([redis_url] if redis_url else []), env=env, cwd=str(SOCKETIO_DIR),
            stdout=asyncio.subprocess.PIPE, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
        )
    return await _listening(NodeProcess(name, process, log), started, _peer_address)


async def command_output(*argv: str, env: dict[str, str] | None = None,
                         cwd: str | None = None, within: float = 20) -> str:
    """stdout of a short command ('' if it fails or takes longer than `within`)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return ""
    try:
        out, _ = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return ""
    return out.decode(errors="replace").strip() if process.returncode == 0 else ""


async def hub_source(env: dict[str, str]) -> dict[str, Any]:
    """Which hub the nodes run: the directory `import hub` finds with the nodes' path, and
    the git commit of its tree, with `dirty` when hub/ differs from it there."""
    where = await command_output(
        sys.executable, "-c", "import hub, os; print(os.path.dirname(hub.__file__))",
        env=with_source_root(env))
    found: dict[str, Any] = {"path": where or None}
    if where:
        tree = str(Path(where).parent)
        found["commit"] = await command_output("git", "-C", tree, "rev-parse", "HEAD") or None
        status = await command_output("git", "-C", tree, "status", "--porcelain", "--", "hub")
        found["dirty"] = bool(status) if found["commit"] else None
    return found


async def node_info(node: NodeProcess) -> dict[str, str]:
    """The labels of `hub_node_info` on the node's /metrics (node, version, write_path…)."""
    with contextlib.suppress(OSError, ValueError, asyncio.IncompleteReadError):
        status, body = await http_request(node.host, node.port, "GET", "/metrics")
        if status == 200:
            for line in body.decode(errors="replace").splitlines():
                if line.startswith("hub_node_info{"):
                    labels = line[len("hub_node_info{") : line.rindex("}")]
                    return dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return {}


async def wait_ready(node: NodeProcess, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status, _ = await http_request(node.host, node.port, "GET", "/readyz")
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise BenchError(f"node {node.name} not ready in {within} s:\n{log_tail(node.log)}")


async def start_client(
    config: dict[str, Any], env: dict[str, str], log: Path, count: int
) -> ClientProcess:
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks", "--client", json.dumps(config),
            env=with_source_root(env),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            limit=2**28,
        )
    return ClientProcess(process, log, count)


async def spawn_redis(
    port: int, args: list[str], workdir: Path, log: Path,
    started: list[asyncio.subprocess.Process],
) -> asyncio.subprocess.Process:
    """A redis-server on 127.0.0.1:`port` without persistence, plus `args`. It goes into
    `started` at once, so the caller stops it even if what follows fails or is cancelled."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("no redis-server on PATH")
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir), *args,
            stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
        )
    started.append(process)
    return process


async def wait_redis(
    process: asyncio.subprocess.Process, port: int, log: Path, within: float = 10
) -> None:
    """Until the server answers PING; a BenchError with its log if it exits or does not."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and process.returncode is None:
        with contextlib.suppress(BenchError):
            if await redis_command("127.0.0.1", port, "PING") == "PONG":
                return
        await asyncio.sleep(0.05)
    raise BenchError(f"redis-server on port {port} did not start:\n{log_tail(log)}")


async def start_redis(workdir: Path, started: list[asyncio.subprocess.Process]) -> str:
    """A private redis-server on a free port; its URL."""
    (port,) = free_ports(1)
    log = workdir / "redis.log"
    process = await spawn_redis(port, [], workdir, log, started)
    await wait_redis(process, port, log)
    return f"redis://127.0.0.1:{port}/0"
