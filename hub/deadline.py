"""A deadline for HTTP requests, WebSocket handshakes included, under uvicorn.

uvicorn drops an idle keep-alive connection after a response, but nothing drops one that
never sends its first request, sends half a request line, stops within its headers or its
body, or sends headers without end: each holds a socket (and its headers) for as long as the
peer likes. `HandshakeDeadline` wraps uvicorn's HTTP protocol: a request must be in, head
and body, within HUB_HANDSHAKE_TIMEOUT of the connection opening or of the previous response
(within twice that at worst: it is checked once per timeout), and a head still incomplete
after MAX_HEAD_BYTES is refused with 431 (counted per read: a head that completes in the
read that crosses the mark passes, so the bound is MAX_HEAD_BYTES and one read). Once a
connection is a WebSocket, the auth timeout takes over.

Each response of a known length leaves in one write: uvicorn writes a response's head and
its body apart (two syscalls, two sends on loopback, for every API call), so the request
cycle gets a transport (`OneWrite`) that holds the head until the body's first part.

It reads what uvicorn's protocol keeps of the request under way (`cycle`, and the cycle's
`more_body`, `response_started`, `response_complete`), which is not public API:
`http_protocol` probes for it once and serves with uvicorn's own protocol, with a warning,
where it is missing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, cast

from hub.abuse import CURRENT, ProtocolErrors

log = logging.getLogger("hub.deadline")

MAX_HEAD_BYTES = 64 * 1024
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                    b"connection: close\r\n\r\n")
_HEAD_TOO_BIG = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                 b"connection: close\r\n\r\n")
_CYCLE_ATTRIBUTES = ("more_body", "response_started", "response_complete")
_NOTHING = object()


def _between_requests(cycle: Any) -> bool:
    """What comes next is a request's head: none came yet, or the last one is answered and
    its body was all read (uvicorn drops the rest of a body nobody read, as it comes)."""
    return cycle is None or bool(cycle.response_complete and not cycle.more_body)


class HandshakeDeadline(asyncio.Protocol):
    """uvicorn's HTTP protocol (`base`), with a deadline and a cap on the head. A subclass
    made by `http_protocol` names the base, the timeout and whom to count for."""

    base: Any
    timeout: float
    errors: ProtocolErrors

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.inner = self.base(
            config=config, server_state=server_state, app_state=app_state, _loop=_loop
        )
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waited_on: object = None  # the request waited on at the last check
        self._head_bytes = 0
        self._joined: object = None  # the request cycle last given a OneWrite

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is none by class
        self.inner.connection_made(transport)
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def data_received(self, data: bytes) -> None:
        token = CURRENT.set(self.errors)  # uvicorn's refusals, counted by hub.logs' filter
        try:
            self.inner.data_received(data)
        finally:
            CURRENT.reset(token)
        if not self._http():
            self._let_go()
            return
        cycle = self.inner.cycle
        if cycle is not None and cycle is not self._joined:
            self._joined = cycle
            if not cycle.response_started and cycle.scope.get("method") != "HEAD":
                cycle.transport = OneWrite(cycle.transport)
        if _between_requests(cycle):
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse("http_head_too_big", _HEAD_TOO_BIG)
        else:
            self._head_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.inner.connection_lost(exc)

    def _let_go(self) -> None:
        """The connection is a WebSocket's now (or closing): its HTTP protocol, with the
        handshake's parser and request, need not live on until the next check."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _http(self) -> bool:
        """Still an HTTP connection of ours: open, and not handed to a WebSocket protocol."""
        transport = self.transport
        return (transport is not None and not transport.is_closing()
                and transport.get_protocol() is self)

    def _check(self) -> None:
        """Once per timeout: a connection that waited on its client through the whole
        period, for the same request, is dropped."""
        self._timer = None
        if not self._http():
            return
        cycle: Any = self.inner.cycle
        between = _between_requests(cycle)
        if between:
            # A fresh connection, or part of a next request; an idle keep-alive connection
            # is uvicorn's to drop (timeout_keep_alive).
            waiting = cycle is None or self._head_bytes > 0
        elif cycle.response_complete:  # answered; the rest of its body is still coming
            waiting = True
        else:  # a request whose body is still on the way
            waiting = bool(cycle.more_body and not cycle.response_started)
        if waiting and cycle is self._waited_on:
            # A 408 only where no response of the app can be under way.
            self._refuse("handshake_timeout", _REQUEST_TIMEOUT if between else b"")
            return
        self._waited_on = cycle if waiting else _NOTHING
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def _refuse(self, reason: str, response: bytes) -> None:
        """Count, answer (when no response of the app can be under way) and close."""
        self.errors.count(reason)
        transport = self.transport
        assert transport is not None
        if response:
            transport.write(response)
        transport.close()


class OneWrite:
    """A request cycle's view of the transport: the head of a response with a
    content-length is held and written with the first part of its body, which uvicorn
    always writes (an empty one too) unless the request is a HEAD, which gets none of this.
    Anything else passes straight through."""

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/1.1 ") and b"\r\ncontent-length: " in data and (
            not data.startswith(b"HTTP/1.1 100 ")
        ):
            self._head = data
        else:
            self._transport.write(data)

    def close(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head)
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def http_protocol(timeout: float, errors: ProtocolErrors) -> type[asyncio.Protocol] | str:
    """What to pass uvicorn as `http`: uvicorn's own protocol under a deadline, or (with a
    warning) its own alone where the probe finds what the deadline reads missing."""
    base = _probe()
    if isinstance(base, str):
        log.warning("HTTP requests without a deadline: %s", base)
        return "auto"
    namespace = {"base": base, "timeout": timeout, "errors": errors}
    return type("HubHttpProtocol", (HandshakeDeadline,), namespace)


def _probe() -> type | str:
    """uvicorn's HTTP protocol class if it and its request cycle have what the deadline
    reads, else what is missing."""
    try:
        import uvicorn
        from uvicorn.protocols.http.auto import AutoHTTPProtocol
    except ImportError as exc:
        return f"uvicorn's HTTP protocol is not importable ({exc})"
    module = sys.modules.get(AutoHTTPProtocol.__module__)
    cycle_class = getattr(module, "RequestResponseCycle", None)
    init = getattr(cycle_class, "__init__", None)
    names = getattr(getattr(init, "__code__", None), "co_names", ())
    missing = [name for name in _CYCLE_ATTRIBUTES if name not in names]
    if missing:
        return f"uvicorn {uvicorn.__version__}: its request cycle has no {', '.join(missing)}"
    for name in ("connection_made", "data_received", "connection_lost"):
        if not callable(getattr(AutoHTTPProtocol, name, None)):
            return f"uvicorn {uvicorn.__version__}: its HTTP protocol has no {name}"
    if "cycle" not in AutoHTTPProtocol.__init__.__code__.co_names:
        return f"uvicorn {uvicorn.__version__}: its HTTP protocol has no cycle"
    return AutoHTTPProtocol
