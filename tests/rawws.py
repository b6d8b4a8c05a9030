"""WebSocket by hand over asyncio streams, for tests that must send what no client library
would: frames built byte by byte (masked as a client must, or deliberately not), handshakes
cut short, garbage. And a reader of the server's frames."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from dataclasses import dataclass, field

from websockets.utils import apply_mask

WAIT = 5.0

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One frame. `rsv` sets the reserved bits (0-7), `length` claims another payload length
    than the payload's own, `mask=False` sends it unmasked (a protocol error from a client)."""
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)
    size = len(payload) if length is None else length
    masked = 0x80 if mask else 0
    if size < 126:
        head = bytes((first, masked | size))
    elif size < 65536:
        head = struct.pack("!BBH", first, masked | 126, size)
    else:
        head = struct.pack("!BBQ", first, masked | 127, size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


def text(payload: str | bytes, **options: bool | int) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return frame(TEXT, data, **options)  # type: ignore[arg-type]


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(CLOSE, payload)


def handshake_request(host: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class RawSocket:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    frames: list[tuple[int, bytes]] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def read_frame(self, timeout: float | None = WAIT) -> tuple[int, bytes]:
        """The server's next frame: (opcode, payload). IncompleteReadError at EOF."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readexactly(2)
            size = head[1] & 0x7F
            if size == 126:
                size = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(size)
        return head[0] & 0x0F, payload

    async def next_text(self, timeout: float = WAIT) -> bytes:
        """The payload of the next text frame, answering pings on the way."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.read_frame(timeout)
                if opcode == TEXT:
                    return payload
                if opcode == PING:
                    self.send(frame(PONG, payload))
                if opcode == CLOSE:
                    raise ConnectionError(f"closed: {close_code_of(payload)}")

    async def closed(self, timeout: float = WAIT) -> int | str:
        """Read until the server closes: its close code, "eof" if the TCP connection ended
        without a close frame; texts before are dropped."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    opcode, payload = await self.read_frame(timeout)
                    if opcode == CLOSE:
                        return close_code_of(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            return "eof"

    async def eof(self, timeout: float = WAIT) -> bytes:
        """Everything up to the end of the TCP connection (which must come within
        `timeout`)."""
        chunks: list[bytes] = []
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError):
                while chunk := await self.reader.read(65536):
                    chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def close_code_of(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


async def tcp(host: str, port: int, timeout: float = WAIT) -> RawSocket:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
    return RawSocket(reader, writer)


async def websocket(
    host: str, port: int, path: str = "/ws", headers: dict[str, str] | None = None,
    timeout: float = WAIT,
) -> RawSocket:
    """A WebSocket whose handshake is done (the server answered 101; `status` says)."""
    raw = await tcp(host, port, timeout)
    raw.send(handshake_request(f"{host}:{port}", path, headers))
    async with asyncio.timeout(timeout):
        response = await raw.reader.readuntil(b"\r\n\r\n")
    raw.status = int(response.split(b" ", 2)[1])
    return raw
