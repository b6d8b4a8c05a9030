"""One-way streams against a WebSocket (`python -m benchmarks.streams`): node memory per
connection and node CPU per delivery for N subscribers of one channel on
`/connection/uni_sse`, `/connection/uni_http_stream` and `/connection/uni_websocket`
(PROTOCOL §15), each on a fresh node; with `--transports sse http_stream
http_stream_protobuf` also the bidirectional emulation's streams (connect and subscribe sent
in the connect request; the last in Centrifugo's Protobuf encoding).

Every connection is a server-side subscription of the token's `channels` claim, so the
three differ only in transport (SSE events through an ASGI streaming response, lines
through one, WebSocket frames through the node's direct write path). The clients are raw
asyncio protocols in this process that count what arrives (no parsing beyond a marker), so
the client costs little; the node's memory is its RSS (after the connections, minus before)
and its CPU is its own user + system time from /proc while M messages are published through
the HTTP API and all reach every subscriber.

    python -m benchmarks.streams --subscribers 5000 --messages 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from benchmarks.fdlimit import raise_fd_limit
from benchmarks.processes import NodeProcess, start_node, stop_process
from benchmarks.procfs import cpu_seconds, rss_kib
from hub import __version__
from hub.centrifugo_protobuf import delimit

SECRET = "stream-benchmark-secret-of-32-bytes-at-least"
API_KEY = "stream-benchmark"
CHANNEL = "bench:fanout"
TRANSPORTS = ("uni_sse", "uni_http_stream", "uni_websocket", "sse", "http_stream",
              "http_stream_protobuf")
DEFAULT_TRANSPORTS = TRANSPORTS[:3]
MARK = b'"pub"'
PROTOBUF_MARK = b'{"n":'  # the payload itself: Protobuf has no field names to count


class Tally:
    """Publications received by all connections; `done` once `target` arrived."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()

    def add(self, count: int) -> None:
        self.count += count
        if self.target and self.count >= self.target:
            self.done.set()


class Counter(asyncio.Protocol):
    """One connection: counts publications (the marker, split-safe across reads)."""

    def __init__(self, request: bytes, first: bytes, opened: asyncio.Event, tally: Tally,
                 mark: bytes = MARK, opened_mark: bytes = b'"connect"') -> None:
        self.request, self.first, self.opened, self.tally = request, first, opened, tally
        self.mark, self.opened_mark = mark, opened_mark
        self.tail = b""
        self.transport: asyncio.Transport | None = None
        self.connected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.connected:
            self.connected = True
            if self.first:  # the WebSocket's connect request, once the upgrade is answered
                assert self.transport is not None
                self.transport.write(self.first)
        buffer = self.tail + data
        found = buffer.count(self.mark)
        if found:
            self.tally.add(found)
        self.tail = buffer[-(max(len(self.mark), len(self.opened_mark)) - 1):]
        if self.opened_mark in buffer:
            self.opened.set()


def masked_text_frame(payload: bytes) -> bytes:
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    size = len(payload)
    head = bytes((0x81, 0x80 | size)) if size < 126 else \
        bytes((0x81, 0xFE)) + size.to_bytes(2, "big")
    return head + key + masked


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited Protobuf field (numbers and lengths here are small)."""
    return bytes((number << 3 | 2,)) + delimit(payload)


def protobuf_commands(token: str) -> bytes:
    """connect (id 1) and subscribe (id 2), delimited, as centrifuge-js's Protobuf build."""
    connect = b"\x08\x01" + _field(4, _field(1, token.encode()))
    subscribe = b"\x08\x02" + _field(5, _field(1, CHANNEL.encode()))
    return delimit(connect) + delimit(subscribe)


def requests_for(transport: str, token: str) -> tuple[bytes, bytes]:
    connect = json.dumps({"token": token}).encode()
    if transport == "http_stream_protobuf":
        commands = protobuf_commands(token)
        return (b"POST /connection/http_stream HTTP/1.1\r\nHost: bench\r\n"
                b"Content-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % len(commands) + commands, b"")
    if transport in ("sse", "http_stream"):  # the emulation: connect and subscribe at once
        commands = (json.dumps({"id": 1, "connect": {"token": token}}) + "\n"
                    + json.dumps({"id": 2, "subscribe": {"channel": CHANNEL}})).encode()
        if transport == "sse":
            return (b"GET /connection/sse?cf_connect=" + quote(commands).encode()
                    + b" HTTP/1.1\r\nHost: bench\r\n\r\n", b"")
        return (b"POST /connection/http_stream HTTP/1.1\r\nHost: bench\r\n"
                b"Content-Length: %d\r\n\r\n" % len(commands) + commands, b"")
    if transport == "uni_sse":
        return (b"GET /connection/uni_sse?cf_connect=" + quote(connect).encode()
                + b" HTTP/1.1\r\nHost: bench\r\n\r\n", b"")
    if transport == "uni_http_stream":
        return (b"POST /connection/uni_http_stream HTTP/1.1\r\nHost: bench\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(connect)
                + connect, b"")
    key = base64.b64encode(os.urandom(16))
    return (b"GET /connection/uni_websocket HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
            + key + b"\r\n\r\n", masked_text_frame(connect))


def mint(user: str) -> str:
    from hub.auth import mint_token

    return mint_token(SECRET, user, ttl=None, channels=[CHANNEL])


async def measure(transport: str, subscribers: int, messages: int, workdir: Path
                  ) -> dict[str, Any]:
    env = {**os.environ, "HUB_JWT_SECRET": SECRET, "HUB_API_KEY": API_KEY,
           "HUB_JWT_REQUIRE_EXP": "0", "HUB_PING_INTERVAL": "0", "HUB_LOG_LEVEL": "warning",
           "HUB_RATE_LIMIT": "0"}
    started: list[NodeProcess] = []
    loop = asyncio.get_running_loop()
    counters: list[Counter] = []
    tally = Tally()
    try:
        node = await start_node(f"bench-{transport}", env, workdir, started)
        url = f"http://{node.host}:{node.port}"
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY},
                                     timeout=30) as api:
            await api.post("/api/publish", json={"channel": CHANNEL, "data": 0})  # warm-up
            await asyncio.sleep(0.5)
            rss_before = rss_kib(node.pid)["VmRSS"]
            token = mint("bench")
            # The Protobuf connect reply has no field names: it is known by the version.
            marks = ((PROTOBUF_MARK, __version__.encode()) if transport.endswith("protobuf")
                     else (MARK, b'"connect"'))
            for batch in range(0, subscribers, 250):
                opened = []
                for _ in range(min(250, subscribers - batch)):
                    event = asyncio.Event()
                    request, first = requests_for(transport, token)
                    _, counter = await loop.create_connection(
                        functools.partial(Counter, request, first, event, tally, *marks),
                        node.host, node.port)
                    counters.append(counter)
                    opened.append(event.wait())
                async with asyncio.timeout(60):
                    await asyncio.gather(*opened)
            await asyncio.sleep(1.0)
            rss_after = rss_kib(node.pid)["VmRSS"]
            tally.target = tally.count + subscribers * messages
            cpu_before = cpu_seconds(node.pid)
            started_at = time.perf_counter()
            for n in range(messages):
                await api.post("/api/publish", json={"channel": CHANNEL, "data": {"n": n}})
            async with asyncio.timeout(120):
                await tally.done.wait()
            elapsed = time.perf_counter() - started_at
            cpu_after = cpu_seconds(node.pid)
        deliveries = subscribers * messages
        return {
            "transport": transport, "subscribers": subscribers, "messages": messages,
            "rss_per_connection_kib": round((rss_after - rss_before) / subscribers, 2),
            "node_cpu_us_per_delivery": round((cpu_after - cpu_before) / deliveries * 1e6, 3),
            "deliveries_per_s": round(deliveries / elapsed),
        }
    finally:
        for counter in counters:
            if counter.transport is not None:
                counter.transport.close()
        for started_node in started:
            await stop_process(started_node.process)


async def run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    results = []
    with tempfile.TemporaryDirectory(prefix="hub-streams-") as workdir:
        for transport in args.transports:
            result = await measure(transport, args.subscribers, args.messages, Path(workdir))
            results.append(result)
            print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streams", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS,
                        default=list(DEFAULT_TRANSPORTS),
                        help="uni_* are one-way; sse, http_stream and http_stream_protobuf "
                             "the bidirectional emulation (connect and subscribe in the "
                             "connect request)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
