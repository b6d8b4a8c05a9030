"""The processes a run starts: nodes, a private redis-server, client processes.

Nodes run the installed hub (`python -m hub serve`). Client processes run this package
(`python -m benchmarks --client CONFIG`), which is not installed: their PYTHONPATH gets the
directory that holds it, so they start from any working directory.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError
from benchmarks.httpclient import http_request

LISTENING = re.compile(r"hub listening on http://\[?([^\]\s]+?)\]?:(\d+)")
# The directory that holds this package: client processes need it on their path.
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


async def start_node(name: str, env: dict[str, str], workdir: Path) -> NodeProcess:
    log = workdir / f"{name}.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1", "--port", "0",
            "--node-id", name, env=env, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
        )
    node = NodeProcess(name, process, log)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
        except TimeoutError:
            break
        if not line:
            break
        found = LISTENING.search(line.decode(errors="replace"))
        if found:
            node.host, node.port = found.group(1), int(found.group(2))
            node.drain = asyncio.ensure_future(_drain_stream(process.stdout))
            return node
    await stop_process(process)
    raise BenchError(f"node {name} did not start:\n{log_tail(log)}")


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
    client_env = dict(env)
    client_env["PYTHONPATH"] = os.pathsep.join(
        path for path in (SOURCE_ROOT, env.get("PYTHONPATH")) if path
    )
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks", "--client", json.dumps(config), env=client_env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            limit=2**28,
        )
    return ClientProcess(process, log, count)


async def start_redis(workdir: Path) -> tuple[asyncio.subprocess.Process, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("--redis-server: no redis-server on PATH")
    port = free_port()
    log = workdir / "redis.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no",
            stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            answer = await asyncio.wait_for(reader.readline(), 2)
            writer.close()
            if answer.startswith(b"+PONG"):
                return process, f"redis://127.0.0.1:{port}/0"
        await asyncio.sleep(0.05)
    await stop_process(process)
    raise BenchError(f"redis-server did not start:\n{log_tail(log)}")
