"""How frames reach a socket: WebSocket framing done once per message per node, and the
shortest road from a session to the kernel.

Under uvicorn's websockets-sansio protocol a session writes pre-framed bytes straight to the
transport, many frames in one `write` (one syscall for a burst). That road uses attributes
of uvicorn's protocol object that are not public API, so `WritePath.probe` checks them once
at start-up; if they are missing (another uvicorn, another server) every session takes the
plain road, one ASGI `websocket.send` event per frame, and the node says so in its log and
in `hub_node_info{write_path}`. Server frames are never masked or compressed (we turn
permessage-deflate off), so a frame built once is valid on every connection.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from hub.protocol import encode

log = logging.getLogger("hub.wire")

_TEXT = 0x81  # FIN + text opcode
_BINARY = 0x82  # FIN + binary opcode
# A close handshake gets this long once our close frame is out (PROTOCOL §5: 5 s), then the
# TCP connection is dropped.
CLOSE_HANDSHAKE_SECONDS = 5.0

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying `payload` (UTF-8 JSON)."""
    return _frame(_TEXT, payload)


def binary_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented binary frame (Centrifugo's Protobuf encoding)."""
    return _frame(_BINARY, payload)


def binary_frame_of(parts: list[bytes]) -> bytes:
    """`binary_frame` of the pieces joined, in one copy of each."""
    size = sum(len(part) for part in parts)
    if size < 126:
        header = bytes((_BINARY, size))
    elif size < 65536:
        header = struct.pack("!BBH", _BINARY, 126, size)
    else:
        header = struct.pack("!BBQ", _BINARY, 127, size)
    return b"".join([header, *parts])


def is_binary(frame: bytes) -> bool:
    return frame[0] == _BINARY


def _frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((opcode, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", opcode, 126, size) + payload
    return struct.pack("!BBQ", opcode, 127, size) + payload


def payload_of(frame: bytes) -> bytes:
    marker = frame[1]
    return frame[4:] if marker == 126 else frame[10:] if marker == 127 else frame[2:]


def frame_of(frame: msgspec.Struct) -> bytes:
    """A server frame as wire bytes: JSON-encoded and WebSocket-framed, once."""
    return text_frame(encode(frame))


class Outbound(Protocol):
    @property
    def closed(self) -> bool:
        """The close handshake began (either side) or the connection is gone: write
        nothing more."""

    def write_now(self, frame: bytes) -> bool:
        """Write at once if the socket takes it (no await); False: it did not (queue it,
        unless `closed`)."""

    async def ready(self) -> None:
        """Wait until the socket takes more (flow control)."""

    async def write(self, frames: list[bytes]) -> None:
        """Write frames in order; call right after `ready`. OSError when the peer is gone."""

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame, unless a close already went out."""

    def abort(self) -> None:
        """Drop the TCP connection now, if the road allows (the close handshake is over
        time)."""

    def release_handshake(self) -> None:
        """The handshake is over: let go of what the server keeps of it (memory per
        connection), where the road allows."""


class AsgiOutbound:
    """Any ASGI server: one `websocket.send` per frame, always through the writer task."""

    __slots__ = ("_closed", "_send")

    def __init__(self, send: ASGISend) -> None:
        self._send = send
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def write_now(self, frame: bytes) -> bool:
        return False

    async def ready(self) -> None:
        return None

    async def write(self, frames: list[bytes]) -> None:
        send = self._send
        for frame in frames:
            if is_binary(frame):
                await send({"type": "websocket.send", "bytes": payload_of(frame)})
            else:
                await send({"type": "websocket.send", "text": payload_of(frame).decode()})

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        # The server may have closed already (a protocol error of the client): it then
        # refuses a second close, which is no news to us.
        with contextlib.suppress(RuntimeError):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        return None  # ASGI has no abort: the session ends, and the server closes

    def release_handshake(self) -> None:
        return None


class DirectOutbound:
    """uvicorn's websockets-sansio protocol: bytes straight to its transport, honouring its
    flow control (`writable` is cleared while the transport's buffer is over its mark)."""

    __slots__ = ("_protocol", "_send", "_transport", "_writable")

    def __init__(self, protocol: Any, send: ASGISend) -> None:
        self._protocol = protocol
        self._send = send
        self._transport = protocol.transport
        self._writable = protocol.writable

    @property
    def closed(self) -> bool:
        protocol = self._protocol
        return bool(protocol.disconnected or protocol.close_sent
                    or self._transport.is_closing())

    def write_now(self, frame: bytes) -> bool:
        # A transport that is closing covers every way a close begins on this road: the
        # peer's close frame, a protocol error, a ping timeout (uvicorn closes the
        # transport at once), and a lost connection. The session's own close it knows.
        transport = self._transport
        if not self._writable.is_set() or transport.is_closing():
            return False
        transport.write(frame)
        return True

    async def ready(self) -> None:
        writable = self._writable
        if not writable.is_set():
            await writable.wait()

    async def write(self, frames: list[bytes]) -> None:
        if self.closed:
            raise ConnectionResetError("connection closed")
        self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        if not self._protocol.disconnected:
            self._transport.abort()

    def release_handshake(self) -> None:
        """uvicorn keeps the handshake's request and response (their headers) and the
        scope for the connection's whole life, about 4.6 KiB, and reads none of them once
        the socket is accepted (nor does the hub, once the connection authenticated). Each
        is let go only if it is there; of the scope, its headers, the query string (which
        may hold the token), its extensions and its own `asgi` dict (for a shared one)."""
        protocol = self._protocol
        for name in _HANDSHAKE_ATTRIBUTES:
            message = getattr(protocol, name, None)
            if message is None:
                continue
            # websockets' parser keeps the request too (a local of its generator): what
            # the headers hold goes, whoever else keeps the message.
            headers = getattr(message, "headers", None)
            if headers is not None and hasattr(headers, "clear"):
                headers.clear()
            setattr(protocol, name, None)
        scope = getattr(protocol, "scope", None)
        if isinstance(scope, dict):
            for key, value in _SCOPE_RELEASED.items():
                if key in scope:
                    scope[key] = value
            scope.pop("extensions", None)
        lighten = getattr(protocol, "release_handshake", None)  # hub.uvicorn_ws's: more
        if callable(lighten):
            lighten()


# What DirectOutbound reads of uvicorn's protocol object, and what it lets go of.
_DIRECT_ATTRIBUTES = ("transport", "writable", "disconnected", "close_sent")
_HANDSHAKE_ATTRIBUTES = ("request", "response")
# What an accepted connection's scope keeps of these (the same objects for every one).
_SCOPE_RELEASED: dict[str, Any] = {
    "headers": (), "query_string": b"", "asgi": {"version": "3.0", "spec_version": "2.4"},
}


class WritePath:
    """The road every session of this node takes to its socket, chosen once."""

    def __init__(self) -> None:
        self._direct_class: type | None = None

    @property
    def name(self) -> str:
        return "direct" if self._direct_class is not None else "asgi"

    def probe(self) -> str:
        """Check uvicorn's sans-I/O protocol for what the direct road needs; returns the
        road's name. Call once, on the event loop, before serving."""
        problem = _probe_uvicorn()
        if isinstance(problem, str):
            log.warning("writing through ASGI sends (slower): %s", problem)
            self._direct_class = None
        else:
            self._direct_class = problem
        return self.name

    def outbound_for(self, send: ASGISend) -> Outbound:
        protocol = getattr(send, "__self__", None)
        direct = self._direct_class
        if direct is not None and isinstance(protocol, direct):
            return DirectOutbound(protocol, send)
        return AsgiOutbound(send)


def _probe_uvicorn() -> type | str:
    """The protocol class if an instance of it has every attribute the direct road uses,
    else what is wrong."""
    try:
        import uvicorn
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
        from uvicorn.server import ServerState
    except ImportError as exc:
        return f"uvicorn's websockets-sansio protocol is not importable ({exc})"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    try:
        config = uvicorn.Config(app, ws="websockets-sansio", lifespan="off", log_config=None)
        config.load()
        protocol = WebSocketsSansIOProtocol(config, ServerState(), {})
    except Exception as exc:
        return f"uvicorn's websockets-sansio protocol cannot be probed ({exc!r})"
    missing = [name for name in _DIRECT_ATTRIBUTES if not hasattr(protocol, name)]
    if missing:
        return f"uvicorn {uvicorn.__version__} has no {', '.join(missing)} on its protocol"
    if not all(hasattr(protocol.writable, name) for name in ("is_set", "wait")):
        return f"uvicorn {uvicorn.__version__}: `writable` is not an event"
    return WebSocketsSansIOProtocol
