"""A TCP fault proxy for tests: put it between a node and Redis (or a client and a node) on
loopback, and break the network between them on demand.

- `partition()`: every connection is reset (RST) and new ones are reset at once, as when a
  host goes away and the kernel answers for it;
- `blackhole()`: packets vanish: connections stay open, new ones are accepted, and nothing
  is forwarded either way (a half-open link, a dropped route);
- `latency(mean, jitter)`: each chunk is held `mean` ± `jitter` seconds (order kept);
- `bandwidth(bytes_per_second)`: each direction trickles at that rate;
- `heal()`: back to a clean network. Connections that lived through a blackhole lost bytes,
  so they are reset then (TCP would have retransmitted; the peer has given them up anyway).

Each direction of each connection is one task reading and writing in order, so a held
chunk holds those behind it, as a real link does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    blackholed: bool = False


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "clean"  # clean, partition, blackhole
        self.delay = (0.0, 0.0)  # mean, jitter
        self.rate = 0.0  # bytes per second each way; 0: unlimited
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self.port = 0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            self._reset(pair)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    # faults

    def partition(self) -> None:
        self.mode = "partition"
        for pair in list(self._pairs):
            self._reset(pair)

    def blackhole(self) -> None:
        self.mode = "blackhole"
        for pair in self._pairs:
            pair.blackholed = True

    def latency(self, mean: float, jitter: float = 0.0) -> None:
        self.delay = (mean, jitter)

    def bandwidth(self, bytes_per_second: float) -> None:
        self.rate = bytes_per_second

    def heal(self) -> None:
        self.mode = "clean"
        self.delay = (0.0, 0.0)
        self.rate = 0.0
        for pair in list(self._pairs):
            if pair.blackholed:
                self._reset(pair)

    @property
    def connections(self) -> int:
        return len(self._pairs)

    # forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pair = _Pair(writer)
        if self.mode == "partition":
            self._reset(pair)
            return
        self._pairs.add(pair)
        if self.mode == "blackhole":
            pair.blackholed = True
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass  # swallowed
            self._pairs.discard(pair)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._pairs.discard(pair)
            self._reset(pair)
            return
        pair.upstream = up_writer
        pair.tasks = [
            asyncio.create_task(self._pump(pair, reader, up_writer)),
            asyncio.create_task(self._pump(pair, up_reader, writer)),
        ]

    async def _pump(
        self, pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        due = 0.0  # when the previous chunk went out: order is kept
        try:
            while True:
                chunk = await reader.read(16384 if not self.rate else 1024)
                if not chunk:
                    break
                if pair.blackholed:
                    continue
                mean, jitter = self.delay
                now = loop.time()
                # Latency: each chunk is held its own delay, but never overtakes the one
                # before it. Bandwidth: chunks go out one after another at the rate.
                latest = now + max(0.0, mean + random.uniform(-jitter, jitter)) if mean else now
                if self.rate:
                    latest = max(latest, due) + len(chunk) / self.rate
                due = max(due, latest)
                if due > now:
                    await asyncio.sleep(due - now)
                if pair.blackholed:
                    continue
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not pair.blackholed:
                self._reset(pair)

    def _reset(self, pair: _Pair) -> None:
        """Close both sides with RST (SO_LINGER 0), and forget the pair."""
        self._pairs.discard(pair)
        for writer in (pair.client, pair.upstream):
            if writer is None or writer.transport.is_closing():
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        current = asyncio.current_task()
        for task in pair.tasks:
            if task is not current:
                task.cancel()
