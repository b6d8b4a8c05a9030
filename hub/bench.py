"""`hub bench`: the fan-out benchmark (see benchmarks/README.md).

The parent process starts the nodes (`python -m hub serve --port 0`, optionally a private
redis-server), spreads the subscriber connections over `--client-procs` client processes
(`python -m hub.bench --client CONFIG`), waits until every connection got `subscribed`,
publishes through the HTTP API from a few keep-alive connections, and measures delivery
rate, loss, latency, memory per connection and CPU.

The subscriber side is deliberately lean so that it is not what is measured: one raw
asyncio Protocol per connection does the WebSocket handshake by hand, and then only walks
frame headers to count text frames, looking inside one frame in `--sample` for the
publisher's send time and the hub's `ts`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

T = TypeVar("T")

CHANNEL = "bench:fanout"
CONFIG_TOML = '[namespaces.bench]\nsubscribe = "any"\npublish = "any"\n'
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LISTENING = re.compile(r"hub listening on http://\[?([^\]\s]+?)\]?:(\d+)")
# In a `message` frame `data` (with the publisher's `sent`, unix µs) comes before `ts`.
SAMPLE = re.compile(rb'"sent":(\d+).*?"ts":(\d+)', re.DOTALL)
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONNECT_CONCURRENCY = 64


# ---------------------------------------------------------------------------------------
# Subscriber side: a lean WebSocket client, many per process


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, final frame, as a client must send it (RFC 6455 §5.3)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    if not length:
        return header + mask
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big"
    )
    return header + mask + masked


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


class ClientState:
    """What one client process knows; shared by its connections."""

    def __init__(self, sample: int) -> None:
        self.sample = sample
        self.received = 0
        self.expected = 0  # set by `go`; 0 means "not publishing yet"
        self.first = 0.0
        self.last = 0.0
        self.latencies_us: list[int] = []
        self.hub_latencies_ms: list[int] = []
        self.subscribed = 0
        self.open = 0
        self.closes: dict[int, int] = {}
        self.errors: list[str] = []
        self.finished = asyncio.Event()

    def check_finished(self) -> None:
        if self.expected and (self.received >= self.expected or self.open == 0):
            self.finished.set()

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


class Subscriber(asyncio.Protocol):
    """One WebSocket connection that subscribes to `channel` and counts what arrives."""

    def __init__(self, state: ClientState, host: str, port: int, token: str, channel: str):
        self.state = state
        self.host, self.port, self.token, self.channel = host, port, token, channel
        self.transport: asyncio.Transport | None = None
        self.key = base64.b64encode(os.urandom(16))
        self.handshaken = False
        self.live = False
        self.rest = b""
        self.frames = 0
        self.countdown = random.randrange(state.sample) + 1 if state.sample else 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not one
        self.state.open += 1
        transport.write(
            f"GET /ws?token={self.token} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        state.open -= 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before subscribed: {exc}"))
        state.check_finished()

    def _handshake(self, data: bytes) -> bytes | None:
        data = self.rest + data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self.rest = data
            if len(data) > 16384:
                self._fail("handshake response too long")
            return None
        head, data = data[:end], data[end + 4 :]
        self.rest = b""
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self._fail(f"handshake refused: {status.decode(errors='replace')}")
            return None
        if accept_key(self.key) not in head:
            self._fail("bad Sec-WebSocket-Accept")
            return None
        self.handshaken = True
        subscribe = json.dumps({"type": "subscribe", "channel": self.channel, "id": 1})
        assert self.transport is not None
        self.transport.write(client_frame(1, subscribe.encode()))
        return data

    def _fail(self, reason: str) -> None:
        self.state.error(reason)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:  # the hot path
        if not self.handshaken:
            handshake_rest = self._handshake(data)
            if handshake_rest is None:
                return
            data = handshake_rest
        elif self.rest:
            data = self.rest + data
        state = self.state
        n = len(data)
        i = 0
        texts = 0
        live = self.live
        countdown = self.countdown
        now = time.time()
        while n - i >= 2:
            b0 = data[i]
            length = data[i + 1] & 0x7F
            if length < 126:
                start = i + 2
            elif length == 126:
                if n - i < 4:
                    break
                length = (data[i + 2] << 8) | data[i + 3]
                start = i + 4
            else:
                if n - i < 10:
                    break
                length = int.from_bytes(data[i + 2 : i + 10], "big")
                start = i + 10
            end = start + length
            if end > n:
                break
            i = end
            opcode = b0 & 0x0F
            if opcode <= 1 and b0 & 0x80:  # the last (usually only) frame of a text message
                if live:
                    texts += 1
                    if countdown:
                        countdown -= 1
                        if not countdown:
                            countdown = state.sample
                            match = SAMPLE.search(data, start, end)
                            if match is not None:
                                state.latencies_us.append(
                                    int(now * 1e6) - int(match.group(1))
                                )
                                state.hub_latencies_ms.append(
                                    int(now * 1e3) - int(match.group(2))
                                )
                else:
                    live = self._before_live(data[start:end])
            elif opcode > 1 and self._control(opcode, data[start:end]):
                return
        self.rest = data[i:] if i < n else b""
        self.countdown = countdown
        self.live = live
        if texts:
            self.frames += texts
            state.received += texts
            if not state.first:
                state.first = now
            state.last = now
            if state.expected and state.received >= state.expected:
                state.finished.set()

    def _before_live(self, payload: bytes) -> bool:
        if b'"type":"subscribed"' in payload:
            self.state.subscribed += 1
            if not self.ready.done():
                self.ready.set_result(None)
            return True
        if b'"type":"error"' in payload:
            self._fail(payload.decode(errors="replace")[:200])
        return False

    def _control(self, opcode: int, payload: bytes) -> bool:
        """Returns True when the connection is closing."""
        transport = self.transport
        assert transport is not None
        if opcode == 9:  # ping
            transport.write(client_frame(10, payload))
        elif opcode == 8:  # close
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            closes = self.state.closes
            closes[code] = closes.get(code, 0) + 1
            transport.write(client_frame(8, payload[:2]))
            transport.close()
            if not self.ready.done():
                reason = payload[2:].decode(errors="replace")
                self.ready.set_exception(ConnectionError(f"closed {code} {reason}"))
            return True
        elif opcode == 2:
            self.state.error("unexpected binary frame")
        return False


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run_client(config: dict[str, Any]) -> int:
    """One client process: connect, subscribe, report `ready`, wait for `go`, count,
    report `done`. Commands come on stdin, reports go to stdout, one JSON line each."""
    from hub.auth import mint_token

    secret = os.environ["HUB_JWT_SECRET"]
    targets: list[tuple[str, int]] = [(str(h), int(p)) for h, p in config["targets"]]
    first, count, channel = int(config["first"]), int(config["count"]), str(config["channel"])
    state = ClientState(int(config["sample"]))
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    subscribers: list[Subscriber] = []
    ttl = float(config.get("ttl", 3600))

    async def connect(index: int) -> None:
        host, port = targets[index % len(targets)]
        token = mint_token(secret, f"bench-{index}", ttl=ttl)
        async with gate:
            protocol = Subscriber(state, host, port, token, channel)
            subscribers.append(protocol)
            try:
                await loop.create_connection(lambda: protocol, host, port)
                await asyncio.wait_for(protocol.ready, 30)
            except (OSError, TimeoutError) as exc:
                state.error(f"{host}:{port}: {exc!r}")
                if protocol.transport is not None:
                    protocol.transport.abort()

    started = time.time()
    await asyncio.gather(*(connect(first + k) for k in range(count)))
    _emit({
        "event": "ready", "subscribed": state.subscribed, "failed": count - state.subscribed,
        "seconds": round(time.time() - started, 3), "errors": state.errors,
    })
    command = json.loads(await _read_line() or '{"cmd": "quit"}')
    if command.get("cmd") == "go":
        cpu_before = time.process_time()
        state.expected = int(command["messages"]) * state.subscribed
        state.check_finished()
        remaining = float(command["deadline"]) - time.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.finished.wait(), max(0.0, remaining))
        counts = [s.frames for s in subscribers if s.live] or [0]
        _emit({
            "event": "done", "received": state.received, "expected": state.expected,
            "first": state.first, "last": state.last,
            "min_per_connection": min(counts), "max_per_connection": max(counts),
            "latencies_us": state.latencies_us, "hub_latencies_ms": state.hub_latencies_ms,
            "closes": {str(k): v for k, v in state.closes.items()}, "errors": state.errors,
            "cpu_seconds": round(time.process_time() - cpu_before, 3),
        })
        await _read_line()  # stay connected while the parent takes its readings
    for subscriber in subscribers:
        if subscriber.transport is not None:
            subscriber.transport.abort()
    return 0


# ---------------------------------------------------------------------------------------
# Process bookkeeping


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return float(sum(fields) - idle), float(sum(fields))


async def _stop(
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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class BenchError(Exception):
    pass


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
            raise BenchError(f"client process exited early:\n{_tail(self.log)}")
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
    await _stop(process)
    raise BenchError(f"node {name} did not start:\n{_tail(log)}")


async def http_request(
    host: str, port: int, method: str, path: str, body: bytes = b"", api_key: str = ""
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await _exchange(reader, writer, host, method, path, body, api_key)
    finally:
        writer.close()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, method: str,
    path: str, body: bytes, api_key: str,
) -> tuple[int, bytes]:
    key = f"X-API-Key: {api_key}\r\n" if api_key else ""
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{key}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    found = CONTENT_LENGTH.search(head)
    payload = await reader.readexactly(int(found.group(1))) if found else b""
    return status, payload


async def wait_ready(node: NodeProcess, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status, _ = await http_request(node.host, node.port, "GET", "/readyz")
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise BenchError(f"node {node.name} not ready in {within} s:\n{_tail(node.log)}")


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
    await _stop(process)
    raise BenchError(f"redis-server did not start:\n{_tail(log)}")


async def redis_info(url: str, section: str) -> str:
    """`INFO section` over a bare RESP connection (no client library needed)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1",
                                                   parts.port or 6379)
    try:
        commands = []
        if parts.password:
            user = [parts.username] if parts.username else []
            commands.append(["AUTH", *user, parts.password])
        commands.append(["INFO", section])
        for command in commands:
            writer.write(f"*{len(command)}\r\n".encode() + b"".join(
                f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in command
            ))
        async with asyncio.timeout(5):
            for _ in commands[:-1]:
                answer = await reader.readline()
                if not answer.startswith(b"+"):
                    raise BenchError(f"redis: {answer.decode(errors='replace').strip()}")
            header = await reader.readline()
            if not header.startswith(b"$"):
                raise BenchError(f"redis: {header.decode(errors='replace').strip()}")
            body = await reader.readexactly(int(header[1:]) + 2)
    finally:
        writer.close()
    return body.decode(errors="replace")


async def redis_commandstats(url: str) -> dict[str, int]:
    """Calls per command so far (`cmdstat_publish:calls=12,usec=...`)."""
    calls: dict[str, int] = {}
    for line in (await redis_info(url, "commandstats")).splitlines():
        name, _, values = line.partition(":")
        if name.startswith("cmdstat_"):
            fields = dict(item.split("=", 1) for item in values.split(",") if "=" in item)
            calls[name.removeprefix("cmdstat_")] = int(fields.get("calls", 0))
    return calls


# ---------------------------------------------------------------------------------------
# Publisher


@dataclass
class Publishing:
    messages: int
    batch: int
    rate: float
    payload: int
    deadline: float
    api_key: str
    next_index: int = 0
    published: int = 0
    errors: int = 0
    first: float = 0.0
    last: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    measured: float = 0.0  # seconds from the start of publishing to the CPU readings

    def claim(self) -> tuple[int, int] | None:
        if self.next_index >= self.messages or time.time() >= self.deadline:
            return None
        index = self.next_index
        size = min(self.batch, self.messages - index)
        self.next_index += size
        return index, size

    def data(self, index: int) -> bytes:
        sent = int(time.time() * 1e6)
        head = f'{{"seq":{index},"sent":{sent},"pad":"'
        pad = max(0, self.payload - len(head) - 2)
        return (head + "x" * pad + '"}').encode()


async def publisher(node: NodeProcess, job: Publishing, start: float) -> None:
    reader, writer = await asyncio.open_connection(node.host, node.port)
    try:
        while (claimed := job.claim()) is not None:
            index, size = claimed
            if job.rate:
                delay = start + index / job.rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            data = job.data(index)
            if size == 1:
                path = "/api/publish"
                body = b'{"channel":"' + CHANNEL.encode() + b'","data":' + data + b"}"
            else:
                path = "/api/broadcast"
                channels = json.dumps([CHANNEL] * size).encode()
                body = b'{"channels":' + channels + b',"data":' + data + b"}"
            if not job.first:
                job.first = time.time()
            try:
                status, reply = await _exchange(
                    reader, writer, node.host, "POST", path, body, job.api_key
                )
            except (OSError, asyncio.IncompleteReadError) as exc:
                job.errors += size
                job.error_samples.append(f"{node.name}: {exc!r}")
                return
            failed = size if status != 200 else reply.count(b'"error"')
            job.errors += failed
            job.published += size - failed
            if failed and len(job.error_samples) < 5:
                job.error_samples.append(f"{status} {reply[:200]!r}")
            job.last = time.time()
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------
# The run


def percentiles(values: list[int], scale: float) -> dict[str, float]:
    if not values:
        return {"samples": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 2)

    return {"samples": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": round(ordered[-1] * scale, 2)}


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


def _bench_env(workdir: Path, redis_url: str | None) -> tuple[dict[str, str], str]:
    config = workdir / "hub.toml"
    config.write_text(CONFIG_TOML)
    api_key = secrets_token()
    env = dict(os.environ)
    env.update({
        "HUB_JWT_SECRET": secrets_token(),
        "HUB_API_KEY": api_key,
        "HUB_CONFIG": str(config),
        "HUB_LOG_LEVEL": env.get("HUB_LOG_LEVEL", "warning"),
        "HUB_DRAIN_DELAY": "0",
        "HUB_DRAIN_SECONDS": "0",
    })
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


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    redis_process: asyncio.subprocess.Process | None = None
    nodes: list[NodeProcess] = []
    clients: list[ClientProcess] = []
    publishing: asyncio.Future[None] | None = None
    try:
        redis_url: str | None = args.redis_url
        if args.redis_server:
            redis_process, redis_url = await start_redis(workdir)
        env, api_key = _bench_env(workdir, redis_url)
        nodes = list(await asyncio.gather(
            *(start_node(f"bench-{i}", env, workdir) for i in range(args.nodes))
        ))
        await asyncio.gather(*(wait_ready(node) for node in nodes))
        for node in nodes:  # warm the API path, then take the idle footprint
            await http_request(node.host, node.port, "POST", "/api/publish",
                               b'{"channel":"bench:warm","data":1}', api_key)
            node.rss_idle = rss_kib(node.pid)
        for index in range(args.subscribers):
            nodes[index % len(nodes)].connections += 1

        clients = await _start_clients(args, nodes, env, workdir)
        setup_timeout = 30 + args.subscribers / 100
        ready = await _gather_reports(clients, setup_timeout, "ready")
        for client, report in zip(clients, ready, strict=True):
            client.ready = report
        subscribed = sum(int(r["subscribed"]) for r in ready)
        if subscribed < args.subscribers:
            errors = [e for r in ready for e in r["errors"]][:5]
            raise BenchError(f"only {subscribed} of {args.subscribers} subscribed: {errors}")
        await asyncio.sleep(args.settle)
        for node in nodes:
            node.rss_connected = rss_kib(node.pid)
        if args.hold:
            pids = " ".join(str(node.pid) for node in nodes)
            print(f"hub bench: holding {args.hold:.0f} s before publishing; node pids {pids}",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(args.hold)

        stats_before = await redis_commandstats(redis_url) if redis_url else {}
        redis_cpu_before = cpu_seconds(redis_process.pid) if redis_process else 0.0
        own_cpu_before = time.process_time()
        machine_before = machine_cpu()
        for node in nodes:
            node.cpu_before = cpu_seconds(node.pid)
        for client in clients:
            client.cpu_before = cpu_seconds(client.process.pid)
        start = time.time()
        deadline = start + args.duration
        go = json.dumps({"cmd": "go", "messages": args.messages, "deadline": deadline})
        for client in clients:
            assert client.process.stdin is not None
            client.process.stdin.write(go.encode() + b"\n")
            await client.process.stdin.drain()
        job = Publishing(args.messages, args.batch, args.rate, args.payload, deadline, api_key)
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
        redis_cpu = (cpu_seconds(redis_process.pid) - redis_cpu_before) if redis_process else 0.0
        stats_after = await redis_commandstats(redis_url) if redis_url else {}
        result = summarise(args, nodes, clients, job, own_cpu, redis_url, redis_cpu,
                           redis_process is not None, stats_before, stats_after)
        result["machine_busy_percent"] = machine_busy
        result["cpus"] = os.cpu_count()
        return result
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
        for client in clients:
            if client.process.stdin is not None:
                client.process.stdin.close()  # EOF: disconnect and exit
        for client in clients:
            await _stop(client.process, 5, exiting=5)
        await asyncio.gather(*(_stop(node.process) for node in nodes))
        for node in nodes:
            if node.drain is not None:
                node.drain.cancel()
        if redis_process is not None:
            await _stop(redis_process)
        shutil.rmtree(workdir, ignore_errors=True)


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


async def _start_clients(
    args: argparse.Namespace, nodes: list[NodeProcess], env: dict[str, str], workdir: Path
) -> list[ClientProcess]:
    targets = [[node.host, node.port] for node in nodes]
    procs = min(args.client_procs, args.subscribers)
    clients: list[ClientProcess] = []
    first = 0
    for k in range(procs):
        count = args.subscribers // procs + (1 if k < args.subscribers % procs else 0)
        config = json.dumps({
            "targets": targets, "first": first, "count": count, "channel": CHANNEL,
            "sample": args.sample, "ttl": 3600 + args.duration + 600,
        })
        log = workdir / f"client-{k}.log"
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hub.bench", "--client", config, env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                limit=2**28,
            )
        clients.append(ClientProcess(process, log, count))
        first += count
    return clients


def _kib_per_connection(node: NodeProcess) -> float | None:
    if not node.connections or "VmRSS" not in node.rss_idle or "VmRSS" not in node.rss_connected:
        return None
    return round((node.rss_connected["VmRSS"] - node.rss_idle["VmRSS"]) / node.connections, 2)


def summarise(
    args: argparse.Namespace, nodes: list[NodeProcess], clients: list[ClientProcess],
    job: Publishing, own_cpu: float, redis_url: str | None, redis_cpu: float,
    private_redis: bool, stats_before: dict[str, int], stats_after: dict[str, int],
) -> dict[str, Any]:
    reports = [c.done for c in clients]
    received = sum(int(r["received"]) for r in reports)
    expected = args.subscribers * job.published
    first = job.first or time.time()
    lasts = [float(r["last"]) for r in reports if r["last"]]
    last = max(lasts) if lasts else first
    window = max(last - first, 1e-9)
    # CPU is read from just before the first publish to just after the clients reported.
    measured = max(job.measured, 1e-3)
    latencies = [v for r in reports for v in r["latencies_us"]]
    hub_latencies = [v for r in reports for v in r["hub_latencies_ms"]]
    closes: dict[str, int] = {}
    for report in reports:
        for code, n in report["closes"].items():
            closes[code] = closes.get(code, 0) + int(n)
    result: dict[str, Any] = {
        "config": {
            "nodes": args.nodes, "broker": "redis" if redis_url else "memory",
            "subscribers": args.subscribers, "messages": args.messages, "rate": args.rate,
            "payload": args.payload, "client_procs": len(clients),
            "publishers": args.publishers, "batch": args.batch, "sample": args.sample,
        },
        "published": job.published,
        "publish_errors": job.errors,
        "publish_error_samples": job.error_samples,
        "publish_seconds": round(job.last - job.first, 3) if job.first else 0.0,
        "offered_per_second": round(job.published / max(job.last - job.first, 1e-9), 1),
        "expected": expected,
        "received": received,
        "lost": max(0, expected - received),
        "extra": max(0, received - expected),
        "min_per_connection": min(int(r["min_per_connection"]) for r in reports),
        "max_per_connection": max(int(r["max_per_connection"]) for r in reports),
        "delivery_seconds": round(window, 3),
        "delivered_per_second": round(received / window, 1),
        "messages_per_second": round(received / window / args.subscribers, 1),
        "latency_ms": percentiles(latencies, 1e-3),
        "hub_ts_latency_ms": percentiles(hub_latencies, 1.0),
        "closes": closes,
        "client_errors": [e for r in reports for e in r["errors"]][:5],
        "nodes": [
            {
                "node": node.name, "pid": node.pid, "connections": node.connections,
                "rss_idle_kib": node.rss_idle.get("VmRSS"),
                "rss_connected_kib": node.rss_connected.get("VmRSS"),
                "rss_after_kib": node.rss_after.get("VmRSS"),
                "rss_peak_kib": node.rss_after.get("VmHWM"),
                "kib_per_connection": _kib_per_connection(node),
                "cpu_seconds": round(node.cpu_after - node.cpu_before, 2),
                "cpu_percent": round(100 * (node.cpu_after - node.cpu_before) / measured, 1),
            }
            for node in nodes
        ],
        "delivered_per_node_cpu_second": round(
            received / max(sum(n.cpu_after - n.cpu_before for n in nodes), 1e-9)
        ),
        "client_cpu_percent": [
            round(100 * (c.cpu_after - c.cpu_before) / measured, 1) for c in clients
        ],
        "publisher_cpu_percent": round(100 * own_cpu / measured, 1),
    }
    if redis_url:
        calls = {
            name: stats_after.get(name, 0) - stats_before.get(name, 0) for name in stats_after
        }
        calls = {name: n for name, n in calls.items() if n > 0 and name != "info"}
        per_message = job.published or 1
        result["redis"] = {
            "private": private_redis,
            "cpu_percent": round(100 * redis_cpu / measured, 1) if private_redis else None,
            "commands": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "commands_per_message": round(sum(calls.values()) / per_message, 3),
        }
    return result


def human(result: dict[str, Any]) -> str:
    config = result["config"]
    rate = f"{config['rate']:g}/s" if config["rate"] else "max"
    lat, hub_lat = result["latency_ms"], result["hub_ts_latency_ms"]
    lines = [
        f"hub bench: {config['nodes']} node(s), {config['broker']} broker, "
        f"{config['subscribers']} subscribers, {config['messages']} messages of "
        f"{config['payload']} B at {rate} ({config['publishers']} publishers, batch "
        f"{config['batch']}), {config['client_procs']} client procs",
        f"published   {result['published']} in {result['publish_seconds']} s "
        f"({result['offered_per_second']} msg/s), {result['publish_errors']} errors",
        f"delivered   {result['received']} of {result['expected']} frames "
        f"(lost {result['lost']}, per connection {result['min_per_connection']}-"
        f"{result['max_per_connection']}) in {result['delivery_seconds']} s",
        f"rate        {result['delivered_per_second']:,.0f} frames/s delivered = "
        f"{result['messages_per_second']:,.1f} msg/s to every subscriber",
    ]
    if lat.get("samples"):
        lines.append(
            f"latency     p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  "
            f"max {lat['max']} ms  (publisher send -> receive, {lat['samples']} samples)"
        )
    if hub_lat.get("samples"):
        lines.append(
            f"            hub ts -> receive (1 ms resolution): p50 {hub_lat['p50']}  "
            f"p99 {hub_lat['p99']} ms"
        )
    for node in result["nodes"]:
        idle, connected = node["rss_idle_kib"] or 0, node["rss_connected_kib"] or 0
        lines.append(
            f"node        {node['node']}: {node['connections']} conns, RSS {idle / 1024:.1f} "
            f"-> {connected / 1024:.1f} MiB = {node['kib_per_connection']} KiB/conn, "
            f"peak {(node['rss_peak_kib'] or 0) / 1024:.1f} MiB, CPU {node['cpu_percent']}%"
        )
    clients = ", ".join(f"{c}%" for c in result["client_cpu_percent"])
    lines.append(
        f"cpu         {result['delivered_per_node_cpu_second']:,} frames per node CPU second; "
        f"clients {clients}; publisher {result['publisher_cpu_percent']}%; machine "
        f"{result.get('machine_busy_percent')}% busy of {result.get('cpus')} CPUs"
    )
    if result["closes"] or result["client_errors"]:
        lines.append(f"closes      {result['closes']} errors {result['client_errors']}")
    redis = result.get("redis")
    if redis:
        top = ", ".join(f"{k} {v}" for k, v in list(redis["commands"].items())[:6])
        cpu = f", CPU {redis['cpu_percent']}%" if redis["cpu_percent"] is not None else ""
        lines.append(
            f"redis       {redis['commands_per_message']} commands per message ({top}){cpu}"
        )
    return "\n".join(lines)


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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
