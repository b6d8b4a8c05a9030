"""Connection churn soak: connections opened, authenticated, subscribed and closed in waves
against a `hub serve` process that this starts, with the node's RSS after each wave.

    python -m benchmarks.churn [--connections 20000] [--wave 2000]

Each wave opens its connections at once (half on `/ws` with the token in the header, half
on `/connection/websocket` with a `connect` command), subscribes each to one of 50 channels,
checks the reply, then closes them (half with a close handshake, half by dropping the TCP
connection) and waits until the node counts none. A node that keeps something per
connection after it is gone shows as RSS that grows wave after wave.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import secrets
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from websockets.utils import apply_mask

from hub.auth import mint_token

CHANNELS = 50
OPEN_AT_ONCE = 500  # handshakes in flight at a time
WAIT = 30.0


@dataclass
class Node:
    process: subprocess.Popen[str]
    host: str
    port: int

    def rss_kib(self) -> tuple[int, int]:
        """VmRSS and VmHWM (peak) of the node."""
        found = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
        return found["VmRSS"], found["VmHWM"]


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        sys.exit(f"churn: needs {needed} file descriptors, RLIMIT_NOFILE allows {soft}")


def start_node(secret: str) -> Node:
    env = {**os.environ, "HUB_JWT_SECRET": secret, "HUB_API_KEY": secrets.token_hex(8),
           "HUB_NODE_ID": "churn", "HUB_LOG_LEVEL": "warning", "HUB_DRAIN_DELAY": "0",
           "HUB_DRAIN_SECONDS": "0"}
    process = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--port", "0"], env=env,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on http://" not in line:
        process.kill()
        sys.exit(f"churn: the node did not start: {line!r}")
    address = line.split("http://", 1)[1].split(" ", 1)[0]
    host, port = address.rsplit(":", 1)
    return Node(process, host, int(port))


def stop_node(node: Node) -> None:
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(5)


# A WebSocket client by hand: small, so 2,000 of them cost the client little.


def frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    head = bytes((0x80 | opcode, 0x80 | size)) if size < 126 else \
        struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


async def read_text(reader: asyncio.StreamReader) -> bytes:
    """The next text frame's payload. Pings of the node (WebSocket ones, and Centrifugo's
    `{}`) are left unanswered: a connection lives shorter than HUB_PING_INTERVAL."""
    while True:
        head = await reader.readexactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(size)
        if head[0] & 0x0F == 0x1 and payload != b"{}":  # {}: a Centrifugo ping, left too
            return payload
        if head[0] & 0x0F == 0x8:
            raise ConnectionError(f"closed by the node: {payload[:2].hex()}")


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, node: Node, number: int, token: str) -> Connection:
        centrifugo = number % 2 == 1
        reader, writer = await asyncio.open_connection(node.host, node.port)
        connection = cls(reader, writer)
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/connection/websocket" if centrifugo else "/ws"
        auth = "" if centrifugo else f"Authorization: Bearer {token}\r\n"
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {node.host}:{node.port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n")
                     .encode())
        response = await reader.readuntil(b"\r\n\r\n")
        if not response.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(response.split(b"\r\n", 1)[0].decode())
        channel = f"churn:{number % CHANNELS}"
        if centrifugo:
            writer.write(frame(1, json.dumps({"id": 1, "connect": {"token": token}}).encode()))
            assert b'"connect"' in await read_text(reader)
            writer.write(frame(1, json.dumps({"id": 2, "subscribe": {"channel": channel}})
                               .encode()))
            reply = await read_text(reader)
            assert json.loads(reply).get("id") == 2, reply
        else:
            assert json.loads(await read_text(reader))["type"] == "welcome"
            writer.write(frame(1, json.dumps({"type": "subscribe", "channel": channel, "id": 1})
                               .encode()))
            assert json.loads(await read_text(reader))["type"] == "subscribed"
        return connection

    async def close(self, number: int) -> None:
        if number % 4 < 2:  # a close handshake, answered by the node's close
            self.writer.write(frame(0x8, struct.pack("!H", 1000)))
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    await read_text(self.reader)
        self.writer.transport.abort()  # or gone without a word


async def ready(http: httpx.AsyncClient) -> float:
    with contextlib.suppress(httpx.HTTPError):
        return float((await http.get("/readyz")).status_code == 200)
    return 0.0


async def connections_on_node(http: httpx.AsyncClient) -> float:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith("hub_connections "):
            return float(line.split()[1])
    return -1.0


async def wave(node: Node, http: httpx.AsyncClient, first: int, size: int, token: str) -> float:
    """One wave; returns its duration."""
    started = time.monotonic()
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def opened(number: int) -> Connection:
        async with gate:
            return await Connection.open(node, number, token)

    numbers = range(first, first + size)
    async with asyncio.timeout(WAIT):
        connections = await asyncio.gather(*(opened(n) for n in numbers))
        held = await connections_on_node(http)
        if held != size:
            raise RuntimeError(f"the node holds {held} connections, not {size}")
        await asyncio.gather(*(c.close(n) for c, n in zip(connections, numbers, strict=True)))
        await until(lambda: connections_on_node(http), 0.0)
    return time.monotonic() - started


async def until(probe: Callable[[], Awaitable[float]], value: float) -> None:
    """Poll the node (another process: nothing to await but its answers)."""
    while True:
        if await probe() == value:
            return
        await asyncio.sleep(0.05)


async def churn(total: int, size: int) -> None:
    raise_fd_limit(size + 1024)
    secret = secrets.token_hex(24)
    token = mint_token(secret, "churner", ttl=3600, channels=["churn:*"])
    node = start_node(secret)
    try:
        async with httpx.AsyncClient(base_url=f"http://{node.host}:{node.port}") as http:
            async with asyncio.timeout(WAIT):
                await until(lambda: ready(http), 1.0)
            rss, peak = node.rss_kib()
            print(f"node pid {node.process.pid}, {total:,} connections in waves of {size:,}")
            print(f"{'wave':>4} {'connections':>11} {'seconds':>7} {'RSS MiB':>8} "
                  f"{'peak MiB':>8}")
            print(f"{0:>4} {0:>11,} {0.0:>7.1f} {rss / 1024:>8.1f} {peak / 1024:>8.1f}")
            rss_by_wave = []
            for index, first in enumerate(range(0, total, size), start=1):
                seconds = await wave(node, http, first, min(size, total - first), token)
                rss, peak = node.rss_kib()
                rss_by_wave.append(rss)
                print(f"{index:>4} {first + min(size, total - first):>11,} {seconds:>7.1f} "
                      f"{rss / 1024:>8.1f} {peak / 1024:>8.1f}", flush=True)
            if len(rss_by_wave) > 1:
                growth = (rss_by_wave[-1] - rss_by_wave[0]) / 1024
                print(f"RSS from the first wave to the last: {growth:+.1f} MiB")
    finally:
        stop_node(node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--wave", type=int, default=2_000)
    args = parser.parse_args()
    asyncio.run(churn(args.connections, args.wave))


if __name__ == "__main__":
    main()
