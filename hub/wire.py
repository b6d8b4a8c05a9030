"""How frames reach a socket: WebSocket framing done once per message per node, and the
shortest road from a session's queue to the kernel.

Under uvicorn's websockets-sansio protocol a session writes pre-framed bytes straight to the
transport, many frames in one `write` (one syscall for a burst). Under any other ASGI
server it falls back to one `websocket.send` event per frame. Server frames are never
masked or compressed (we turn permessage-deflate off), so a frame built once is valid on
every connection.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from hub.protocol import encode

_TEXT = 0x81  # FIN + text opcode

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying `payload` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _TEXT, 126, size) + payload
    return struct.pack("!BBQ", _TEXT, 127, size) + payload


def payload_of(frame: bytes) -> bytes:
    marker = frame[1]
    return frame[4:] if marker == 126 else frame[10:] if marker == 127 else frame[2:]


def frame_of(frame: msgspec.Struct) -> bytes:
    """A server frame as wire bytes: JSON-encoded and WebSocket-framed, once."""
    return text_frame(encode(frame))


class Outbound(Protocol):
    def write_now(self, frame: bytes) -> bool:
        """Write at once if nothing stands in the way (no await); False: queue it."""

    async def ready(self) -> None:
        """Wait until the socket takes more (flow control)."""

    async def write(self, frames: list[bytes]) -> None:
        """Write frames in order; call right after `ready`. OSError when the peer is gone."""

    def abort_later(self, delay: float) -> None:
        """Drop the TCP connection if its close handshake has not finished by then."""


class AsgiOutbound:
    """Any ASGI server: one `websocket.send` per frame, always through the writer task."""

    __slots__ = ("_send",)

    def __init__(self, send: ASGISend) -> None:
        self._send = send

    def write_now(self, frame: bytes) -> bool:
        return False

    async def ready(self) -> None:
        return None

    async def write(self, frames: list[bytes]) -> None:
        send = self._send
        for frame in frames:
            await send({"type": "websocket.send", "text": payload_of(frame).decode()})

    def abort_later(self, delay: float) -> None:
        return None  # ASGI has no abort; the server's own close timeout applies


class DirectOutbound:
    """uvicorn's websockets-sansio protocol: bytes straight to its transport, honouring its
    flow control (`writable` is cleared while the transport's buffer is over its mark)."""

    __slots__ = ("_protocol", "_transport", "_writable")

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._transport = protocol.transport
        self._writable = protocol.writable

    def write_now(self, frame: bytes) -> bool:
        protocol = self._protocol
        if protocol.disconnected or protocol.close_sent or not self._writable.is_set():
            return False
        self._transport.write(frame)
        return True

    async def ready(self) -> None:
        writable = self._writable
        if not writable.is_set():
            await writable.wait()

    async def write(self, frames: list[bytes]) -> None:
        if self._closed():
            raise ConnectionResetError("connection closed")
        self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def abort_later(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self._protocol.disconnected:
            self._transport.abort()

    def _closed(self) -> bool:
        protocol = self._protocol
        return bool(protocol.disconnected or protocol.close_sent)


def outbound_for(send: ASGISend) -> Outbound:
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
    except ImportError:  # pragma: no cover - uvicorn without the sans-I/O protocol
        return AsgiOutbound(send)
    protocol = getattr(send, "__self__", None)
    if isinstance(protocol, WebSocketsSansIOProtocol):
        return DirectOutbound(protocol)
    return AsgiOutbound(send)
