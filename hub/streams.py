"""HTTP streams as a transport (PROTOCOL §15): how a session's frames reach a client that
holds a long HTTP response open (Server-Sent Events, or newline-delimited messages), and how
that client's end of the connection is noticed.

A transport moves frames; it knows nothing of the protocol in them. `Framing` says how one
message is cut into the stream (an SSE event, a line, a WebSocket frame); `StreamOutbound` is
the session's `Outbound` onto an ASGI streaming response (uvicorn does the HTTP/1.1 chunking
and keep-alive); `StreamInbox` is what the session reads: the client's commands that reach it
by other roads (POSTs to `/emulation`), and the end of the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from hub.session import ASGIReceive
from hub.wire import ASGISend, text_frame

log = logging.getLogger("hub.streams")

# What ends a stream's headers: no caching, no buffering by a proxy (nginx reads
# X-Accel-Buffering), and the client may read it across origins (CORS is added around).
STREAM_HEADERS: list[tuple[bytes, bytes]] = [
    (b"cache-control", b"private, no-cache, no-store, must-revalidate, max-age=0"),
    (b"pragma", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Framing:
    """How one encoded message goes into the stream. One object per kind, shared."""

    __slots__ = ("content_type", "keepalive", "name", "prelude")

    def __init__(self, name: str, content_type: bytes, keepalive: bytes, prelude: bytes) -> None:
        self.name = name
        self.content_type = content_type
        self.keepalive = keepalive  # written every HUB_PING_INTERVAL on a one-way stream
        self.prelude = prelude  # written once, before anything else

    def wrap(self, payload: bytes, event_id: int | None = None) -> bytes:
        raise NotImplementedError


class SseFraming(Framing):
    """`data: <message>\\n\\n`, with `id: <offset>` where the message has one (an
    EventSource sends the last one back as `Last-Event-ID` when it reconnects)."""

    __slots__ = ()

    def wrap(self, payload: bytes, event_id: int | None = None) -> bytes:
        if event_id is None:
            return b"data: " + payload + b"\n\n"
        return b"id: %d\ndata: " % event_id + payload + b"\n\n"


class LineFraming(Framing):
    """One message per line (JSON never holds a raw newline)."""

    __slots__ = ()

    def wrap(self, payload: bytes, event_id: int | None = None) -> bytes:
        return payload + b"\n"


class BareFraming(Framing):
    """Each message as it is: messages that carry their own length (Centrifugo's Protobuf
    encoding, varint-length-delimited), laid end to end."""

    __slots__ = ()

    def wrap(self, payload: bytes, event_id: int | None = None) -> bytes:
        return payload


class WebSocketFraming(Framing):
    """A text frame each, for the one-way WebSocket (the node's write path sends it)."""

    __slots__ = ()

    def wrap(self, payload: bytes, event_id: int | None = None) -> bytes:
        return text_frame(payload)


# `retry:` tells an EventSource how long to wait before it reconnects (ms).
SSE_RETRY_MS = 3000
SSE = SseFraming("sse", b"text/event-stream; charset=utf-8", b": ping\n\n",
                 b"retry: %d\n\n" % SSE_RETRY_MS)
LINES = LineFraming("http_stream", b"application/x-ndjson", b"{}\n", b"")
WEBSOCKET = WebSocketFraming("websocket", b"", text_frame(b"{}"), b"")
# No keepalive of its own: only the bidirectional emulation uses it, and that pings.
DELIMITED = BareFraming("http_stream", b"application/octet-stream", b"", b"")


class StreamOutbound:
    """A session's `Outbound` onto a streaming HTTP response.

    `write_now` hands frames to a pump task that lives only while there is something to
    send (as the session's own writer does on a socket: an idle stream holds no task), which
    gives each batch to the server in one ASGI body event. While the server pushes back
    (its transport is paused: the client reads slower than we write), `write_now` says no
    and the session's bounded queue takes over, which closes a slow consumer. `close` writes
    the protocol's last frame (a disconnect with a reconnect hint) and ends the response.
    """

    __slots__ = ("_closed", "_cycle", "_drained", "_ending", "_gone", "_last_frame", "_pending",
                 "_pump", "_send", "_sending", "on_end")

    def __init__(self, send: ASGISend, last_frame: Callable[[int, str], bytes]) -> None:
        self._send = send
        self._last_frame = last_frame
        self._pending: list[bytes] = []
        self._pump: asyncio.Task[None] | None = None
        self._sending = False  # the pump waits in a send: the server pushes back
        self._drained: asyncio.Future[None] | None = None  # for a writer waiting on that
        self._closed = False  # a close began: nothing more is taken
        self._ending = False  # the response ends once `_pending` is out
        self._gone = False  # the client went away (or the response ended)
        self.on_end: Callable[[], None] | None = None  # the session's reader stops
        self._cycle: Any = None  # uvicorn's request cycle, when a body event can go at once

    async def start(self, status: int, headers: list[tuple[bytes, bytes]], first: bytes) -> None:
        """Send the response head and its first bytes. Body events then go to the server's
        own `send`: a middleware around it (CORS) has nothing to add to them."""
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": first, "more_body": True})
        self._send = _innermost(self._send)
        self._cycle = _direct_cycle(self._send)

    @property
    def closed(self) -> bool:
        return self._closed or self._gone

    def write_now(self, frame: bytes) -> bool:
        if self._closed or self._gone or self._sending:
            return False
        cycle = self._cycle
        if cycle is not None and self._pump is None:
            if cycle.flow.write_paused:
                return False  # the session's queue takes it, and the pump waits for the drain
            return self._send_at_once(frame)
        self._pending.append(frame)
        self._pump_soon()
        return True

    def _send_at_once(self, frame: bytes) -> bool:
        """uvicorn's `send` awaits only while its transport is paused (checked just
        before): run it to its end here, without a task per frame. Should it wait after all
        (another uvicorn), it is stopped where it waits, before writing, and the frame goes
        the pump's way, as do all after it."""
        if self._cycle.disconnected:
            self.gone()
            return False
        coroutine: Any = self._send(
            {"type": "http.response.body", "body": frame, "more_body": True})
        try:
            coroutine.send(None)
        except StopIteration:
            return True
        except OSError:
            self.gone()
            return False
        coroutine.close()
        log.warning("uvicorn's send waited on a writable transport: streams take the pump")
        self._cycle = None
        self._pending.append(frame)
        self._pump_soon()
        return True

    async def ready(self) -> None:
        if not self._sending:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    async def write(self, frames: list[bytes]) -> None:
        if self._gone:
            raise ConnectionResetError("the client went away")
        self._pending.extend(frames)
        self._pump_soon()

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._gone:
            self._pending.append(self._last_frame(code, reason))
        self.end()

    def end(self) -> None:
        """End the response after what is written (no last frame of its own)."""
        self._closed = True
        self._ending = True
        self._pump_soon()

    def abort(self) -> None:
        """The client did not take the last frames in time: drop its TCP connection (the
        server's transport, where it lets us reach it), so a send waiting on it returns."""
        transport = _transport_of(self._send)
        if transport is not None:
            transport.abort()
        self.gone()

    def release_handshake(self) -> None:
        """What uvicorn keeps of the request for the response's whole life and nobody
        reads once the stream is on: its headers and query string (which may hold the
        token), as the WebSocket road lets them go."""
        scope = getattr(self._cycle, "scope", None)
        if isinstance(scope, dict):
            headers = scope.get("headers")
            if isinstance(headers, list):
                headers.clear()  # in place: a middleware's view of them (CORS's) goes too
            scope["headers"] = ()
            scope["query_string"] = b""

    def gone(self) -> None:
        """The client went away, or the response ended: the session ends."""
        if self._gone:
            return
        self._gone = True
        self._pending.clear()
        self._wake_writer()
        if self.on_end is not None:
            self.on_end()

    async def finish(self) -> None:
        """After the session ended: the response is ended (or its pump stopped)."""
        self._ending = True
        self._pump_soon()
        pump = self._pump
        if pump is not None and not pump.done():
            try:
                async with asyncio.timeout(1.0):
                    await asyncio.shield(pump)
            except TimeoutError:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        self.gone()

    def _pump_soon(self) -> None:
        if self._pump is None and not self._gone:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def _run_pump(self) -> None:
        send, pending = self._send, self._pending
        try:
            while pending and not self._gone:
                chunk = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                self._sending = True
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finally:
                    self._sending = False
                    self._wake_writer()
            if self._ending and not self._gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.gone()
        except OSError:
            self.gone()  # the client is gone
        finally:
            self._pump = None


def _direct_cycle(send: Any) -> Any:
    """uvicorn's request cycle behind `send`, if it has what `_send_at_once` reads (its flow
    control's `write_paused` and `disconnected`); else None, and every frame takes the pump."""
    cycle = getattr(send, "__self__", None)
    kind = type(cycle)
    if kind.__name__ != "RequestResponseCycle" or not kind.__module__.startswith(
            "uvicorn.protocols.http."):
        return None
    flow = getattr(cycle, "flow", None)
    if not isinstance(getattr(flow, "write_paused", None), bool):
        return None
    return cycle if isinstance(getattr(cycle, "disconnected", None), bool) else None


def _innermost(send: Any) -> Any:
    """The server's own `send` under the `functools.partial`s of middlewares."""
    for _ in range(4):
        if not isinstance(send, functools.partial) or "send" not in send.keywords:
            return send
        send = send.keywords["send"]
    return send


def _transport_of(send: Any) -> Any:
    """The server's transport behind `send` (uvicorn's request cycle keeps it); None where
    it is not there."""
    transport = getattr(getattr(_innermost(send), "__self__", None), "transport", None)
    return transport if callable(getattr(transport, "abort", None)) else None


async def until_disconnect(receive: ASGIReceive) -> dict[str, Any]:
    """A one-way stream's reader: it reads nothing but the end of the request (the client
    left, or the response ended), as a WebSocket's disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    return {"type": "websocket.disconnect", "code": 1000}


class StreamInbox:
    """What a stream session's reader awaits instead of a WebSocket's `receive`: the
    client's command batches (from `/emulation`: text in JSON, bytes in Protobuf, as a
    WebSocket's text and binary frames), at most `limit` waiting, and the end of the stream
    (the client left, or the response ended)."""

    __slots__ = ("_ended", "_event", "_limit", "_texts", "_watch")

    def __init__(self, limit: int) -> None:
        self._texts: deque[str | bytes] = deque()
        self._event = asyncio.Event()
        self._ended = False
        self._limit = limit
        self._watch: asyncio.Task[None] | None = None

    def put(self, text: str | bytes) -> bool:
        """False: the session has `limit` batches waiting already (or ended)."""
        if self._ended or len(self._texts) >= self._limit:
            return False
        self._texts.append(text)
        self._event.set()
        return True

    def end(self) -> None:
        self._ended = True
        self._event.set()

    def watch(self, receive: ASGIReceive, outbound: StreamOutbound) -> None:
        """Notice the client leaving (`http.disconnect`)."""

        async def wait_for_disconnect() -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while (await receive())["type"] != "http.disconnect":
                    pass
            outbound.gone()

        self._watch = asyncio.get_running_loop().create_task(wait_for_disconnect())

    def stop_watching(self) -> None:
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()

    async def __call__(self) -> dict[str, Any]:
        while True:
            if self._texts:
                batch = self._texts.popleft()
                if isinstance(batch, bytes):
                    return {"type": "websocket.receive", "bytes": batch}
                return {"type": "websocket.receive", "text": batch}
            if self._ended:
                return {"type": "websocket.disconnect", "code": 1000}
            self._event.clear()
            await self._event.wait()


async def read_body(receive: ASGIReceive, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def plain_response(send: ASGISend, status: int, body: bytes,
                         content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})
