"""A client's bad input (issue 13): one count in `hub_protocol_errors_total{reason}`, at most
one INFO line per reason per minute, and never an ERROR line or a traceback, uvicorn's own
included. Each case sends one bad thing over a real socket, built by hand (tests/rawws.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from hub.abuse import REASONS
from hub.session import Session
from tests import rawws
from tests.conftest import NAMESPACES
from tests.rawws import BINARY, CONT, PING, PONG, TEXT, RawSocket, close_frame, frame, text
from tests.support import (
    API_KEY,
    WAIT,
    RunningNode,
    eventually,
    make_settings,
    metric_of,
    publish,
    running_node,
    token,
)

HOST = "127.0.0.1"
TIMEOUT = 0.3  # HUB_AUTH_TIMEOUT and HUB_HANDSHAKE_TIMEOUT here


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records that must never come from a client's input: ERROR and up, or a traceback."""
    return [
        f"{record.levelname} {record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno >= logging.ERROR or record.exc_info or record.stack_info
        or "Traceback" in record.getMessage()
    ]


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_node() -> AsyncIterator[RunningNode]:
    """One node for the module's cases (each case waits for its own count to land)."""
    settings = make_settings(
        namespaces=NAMESPACES, auth_timeout=TIMEOUT, handshake_timeout=TIMEOUT,
        max_frame_bytes=4096,
    )
    async with running_node(settings) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def node(
    shared_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[RunningNode]:
    caplog.set_level(logging.INFO)
    yield shared_node
    gc.collect()  # a task that died with an exception says so when it is collected
    assert not problems(caplog)


def port_of(running: RunningNode) -> int:
    return int(running.url.rsplit(":", 1)[1])


async def counts(running: RunningNode) -> dict[str, float]:
    text_ = (await running.http.get("/metrics")).text
    return {r: metric_of(text_, "hub_protocol_errors_total", reason=r) for r in REASONS}


async def counted(running: RunningNode, before: dict[str, float], reason: str) -> None:
    """Exactly one more of `reason`, and nothing else (the count may land a moment after
    the socket closed)."""
    expected = {**before, reason: before[reason] + 1}
    await eventually(lambda: counts(running), lambda now: now == expected, within=WAIT,
                     what=f"one more {reason}")


async def authenticated(running: RunningNode, path: str = "/ws") -> RawSocket:
    if path == "/ws":
        raw = await rawws.websocket(HOST, port_of(running), "/ws",
                                    {"Authorization": f"Bearer {token('mallory')}"})
        assert json.loads(await raw.next_text())["type"] == "welcome"
        return raw
    raw = await rawws.websocket(HOST, port_of(running), path)
    raw.send(text(json.dumps({"id": 1, "connect": {"token": token("mallory")}})))
    assert "connect" in json.loads(await raw.next_text())
    return raw


async def test_every_reason_starts_at_zero(node: RunningNode) -> None:
    exposition = (await node.http.get("/metrics")).text
    for reason in REASONS:
        assert f'hub_protocol_errors_total{{reason="{reason}"}} 0.0' in exposition, reason


# Inputs that end the connection: (what is sent once authenticated on /ws, reason, close code)
CLOSING: list[tuple[str, bytes, str, int | str]] = [
    ("invalid UTF-8", text(b'{"type":"ping","x":"\xff\xfe"}'), "bad_utf8", 1007),
    ("invalid UTF-8 across fragments",
     text(b'{"type":"\xe2', fin=False) + frame(CONT, b'\x28"}'), "bad_utf8", 1007),
    ("reserved bit", frame(TEXT, b'{"type":"ping"}', rsv=4), "bad_frame", 1002),
    ("unknown opcode", frame(0x3, b"x"), "bad_frame", 1002),
    ("unknown control opcode", frame(0xB, b""), "bad_frame", 1002),
    ("orphan continuation", frame(CONT, b"x"), "bad_frame", 1002),
    ("control frame over 125 bytes", frame(PING, b"p" * 126), "bad_frame", 1002),
    ("fragmented control frame", frame(PING, b"p", fin=False), "bad_frame", 1002),
    ("unmasked", frame(TEXT, b'{"type":"ping"}', mask=False), "bad_frame", 1002),
    ("new message inside a fragmented one",
     text(b"{", fin=False) + text(b"}"), "bad_frame", 1002),
    ("bad close code", close_frame(999), "bad_frame", 1002),
    ("close code 1005 on the wire", close_frame(1005), "bad_frame", 1002),
    ("close frame of one byte", frame(0x8, b"\x03"), "bad_frame", 1002),
    ("close reason not UTF-8", close_frame(1000, b"\xc3\x28"), "bad_utf8", 1007),
    ("over HUB_MAX_FRAME_BYTES", text(b"x" * 5000), "frame_too_big", 1009),
    ("absurd length claim", frame(TEXT, b"", length=2**62), "frame_too_big", 1009),
    ("fragments over the limit together",
     text(b"[" + b"1," * 1500, fin=False) + frame(CONT, b"1," * 1500 + b"1]"),
     "frame_too_big", 1009),
    ("binary", frame(BINARY, b'{"type":"ping"}'), "binary_frame", 1003),
]


@pytest.mark.parametrize(("payload", "reason", "code"), [case[1:] for case in CLOSING],
                         ids=[case[0] for case in CLOSING])
async def test_a_frame_the_hub_closes_on(
    node: RunningNode, payload: bytes, reason: str, code: int
) -> None:
    raw = await authenticated(node)
    before = await counts(node)
    raw.send(payload)
    assert await raw.closed() == code
    raw.close()
    await counted(node, before, reason)


# Commands answered with an error on /ws (the connection stays): (frame, reason, error code)
ANSWERED: list[tuple[str, str, str, str]] = [
    ("not JSON", "{nope", "bad_json", "bad_request"),
    ("JSON but no object", "[1, 2]", "bad_json", "bad_request"),
    ("trailing garbage", '{"type":"ping"} x', "bad_json", "bad_request"),
    ("unknown type", '{"type":"launch","id":1}', "unknown_command", "unknown_type"),
    ("type not a string", '{"type":7}', "unknown_command", "unknown_type"),
    ("mistyped field", '{"type":"subscribe","channel":5,"id":2}', "bad_command", "bad_request"),
    ("missing field", '{"type":"publish","channel":"chat:a"}', "bad_command", "bad_request"),
    ("fractional id", '{"type":"ping","id":1.5}', "bad_command", "bad_request"),
    ("no type", '{"id":3}', "bad_command", "bad_request"),
    ("deep nesting", '{"type":"publish","channel":"chat:a","data":' + "[" * 2000
     + "]" * 2000 + "}", "bad_json", "bad_request"),
]


@pytest.mark.parametrize(("raw_frame", "reason", "error"), [case[1:] for case in ANSWERED],
                         ids=[case[0] for case in ANSWERED])
async def test_a_command_answered_with_an_error(
    node: RunningNode, raw_frame: str, reason: str, error: str
) -> None:
    raw = await authenticated(node)
    before = await counts(node)
    raw.send(text(raw_frame))
    reply = json.loads(await raw.next_text())
    assert reply["type"] == "error" and reply["code"] == error, reply
    await counted(node, before, reason)
    raw.send(text('{"type":"ping","id":9}'))  # and the connection goes on
    assert json.loads(await raw.next_text()) == {"type": "pong", "id": 9}
    raw.close()


Exchange = Callable[[RawSocket], Awaitable[None]]


async def expect_close(raw: RawSocket, code: int) -> None:
    assert await raw.closed() == code


def sends(payload: bytes, code: int) -> Exchange:
    async def exchange(raw: RawSocket) -> None:
        raw.send(payload)
        await expect_close(raw, code)

    return exchange


def answers(payload: str, error: int) -> Exchange:
    async def exchange(raw: RawSocket) -> None:
        raw.send(text(payload))
        reply = json.loads(await raw.next_text())
        assert reply["error"]["code"] == error, reply

    return exchange


async def waits_out(raw: RawSocket, code: int) -> None:
    assert await raw.closed(timeout=TIMEOUT + WAIT) == code


# The handshake of each endpoint, and Centrifugo's commands: (path, authenticated first?,
# what happens, reason)
SESSIONS: list[tuple[str, str, bool, Exchange, str]] = [
    ("/ws: a first frame that is no auth", "/ws", False, sends(text("hello"), 4001),
     "auth_failed"),
    ("/ws: binary first frame", "/ws", False, sends(frame(BINARY, b"{}"), 1003), "binary_frame"),
    ("/ws: auth with a bad token", "/ws", False,
     sends(text('{"type":"auth","token":"x.y.z"}'), 4001), "auth_failed"),
    ("/ws: no auth in time", "/ws", False, lambda raw: waits_out(raw, 4001), "auth_timeout"),
    ("/ws: invalid UTF-8 before auth", "/ws", False, sends(text(b"\xff"), 1007), "bad_utf8"),
    ("/ws: bad frame before auth", "/ws", False, sends(frame(0x7), 1002), "bad_frame"),
    ("centrifugo: first command no connect", "/connection/websocket", False,
     sends(text('{"id":1,"subscribe":{"channel":"a"}}'), 3501), "auth_failed"),
    ("centrifugo: connect with a bad token", "/connection/websocket", False,
     sends(text('{"id":1,"connect":{"token":"nope"}}'), 3500), "auth_failed"),
    ("centrifugo: no connect in time", "/connection/websocket", False,
     lambda raw: waits_out(raw, 3502), "auth_timeout"),
    ("centrifugo: unknown method", "/connection/websocket", True,
     answers('{"id":2,"ping":{}}', 104), "unknown_command"),
    ("centrifugo: no method", "/connection/websocket", True, answers('{"id":2}', 104),
     "unknown_command"),
    ("centrifugo: mistyped field", "/connection/websocket", True,
     answers('{"id":3,"subscribe":{"channel":7}}', 107), "bad_command"),
    ("centrifugo: not JSON", "/connection/websocket", True, sends(text("{{"), 3501), "bad_json"),
    ("centrifugo: a command without id", "/connection/websocket", True,
     sends(text('{"subscribe":{"channel":"chat:a"}}'), 3501), "bad_command"),
    ("centrifugo: connect again", "/connection/websocket", True,
     sends(text(json.dumps({"id": 5, "connect": {"token": token("mallory")}})), 3501),
     "bad_command"),
    ("centrifugo: binary", "/connection/websocket", True, sends(frame(BINARY, b"{}"), 3501),
     "binary_frame"),
]


@pytest.mark.parametrize(("path", "first", "exchange", "reason"),
                         [case[1:] for case in SESSIONS], ids=[case[0] for case in SESSIONS])
async def test_handshakes_and_centrifugo_commands(
    node: RunningNode, path: str, first: bool, exchange: Exchange, reason: str
) -> None:
    before = await counts(node)
    raw = await (authenticated(node, path) if first else rawws.websocket(HOST, port_of(node), path))
    try:
        await exchange(raw)
        await counted(node, before, reason)
    finally:
        raw.close()


async def test_an_expired_token_is_no_protocol_error(node: RunningNode) -> None:
    before = await counts(node)
    raw = await rawws.websocket(HOST, port_of(node), "/ws",
                                {"Authorization": f"Bearer {token('old', ttl=-10)}"})
    assert await raw.closed() == 4002
    raw.close()
    await eventually(lambda: counts(node), lambda now: now == before, what="no count")


# HTTP before any WebSocket: (what is sent, the status answered, reason)
HTTP: list[tuple[str, bytes, int, str]] = [
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "bad_http_request"),
    ("bad request line", b"GET /\x00 HTTP/1.1\r\n\r\n", 400, "bad_http_request"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_http_request"),
    ("bad chunk size", b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
     b"\r\n\r\nzz\r\n", 400, "bad_http_request"),
    ("head over 64 KiB", b"GET /healthz HTTP/1.1\r\n" + b"X-A: " + b"a" * 70000 + b"\r\n",
     431, "http_head_too_big"),
    ("nothing at all", b"", 408, "handshake_timeout"),
    ("half a request line", b"GET /ws HT", 408, "handshake_timeout"),
    ("headers without end", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n", 408,
     "handshake_timeout"),
]


@pytest.mark.parametrize(("request_bytes", "status", "reason"), [case[1:] for case in HTTP],
                         ids=[case[0] for case in HTTP])
async def test_http_requests_refused(
    node: RunningNode, request_bytes: bytes, status: int, reason: str
) -> None:
    before = await counts(node)
    raw = await rawws.tcp(HOST, port_of(node))
    started = time.monotonic()
    raw.send(request_bytes)
    response = await raw.eof(timeout=2 * TIMEOUT + WAIT)
    assert response.startswith(f"HTTP/1.1 {status} ".encode()), response[:80]
    if reason == "handshake_timeout":  # checked once per timeout: within two of them
        assert time.monotonic() - started < 2 * TIMEOUT + 0.5
    raw.close()
    await counted(node, before, reason)


async def test_unsupported_upgrade_is_counted_and_answered(node: RunningNode) -> None:
    before = await counts(node)
    raw = await rawws.tcp(HOST, port_of(node))
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: h2c"
             b"\r\n\r\n")
    assert (await raw.eof()).startswith(b"HTTP/1.1 200 ")
    raw.close()
    await counted(node, before, "unsupported_upgrade")


async def test_a_body_that_stops_coming(node: RunningNode) -> None:
    """The head is in, the body never is: dropped (no response: the app had begun), and
    the endpoint takes the disconnect for what it is, no 500 and no traceback."""
    before = await counts(node)
    raw = await rawws.tcp(HOST, port_of(node))
    raw.send(f"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
             "Content-Length: 100\r\n\r\n{\"chan".encode())
    assert await raw.eof(timeout=2 * TIMEOUT + WAIT) == b""
    raw.close()
    await counted(node, before, "handshake_timeout")


async def test_a_refused_body_that_keeps_trickling(node: RunningNode) -> None:
    """A body declared over 1 MiB is answered 413 at once; what of it still comes is
    dropped as it comes, and a client that goes on sending it is cut at the deadline
    (without a second response)."""
    before = await counts(node)
    raw = await rawws.tcp(HOST, port_of(node))
    raw.send(f"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
             f"Content-Length: {2 * 1024 * 1024}\r\n\r\n{{\"chan".encode())
    head = await raw.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    async with asyncio.timeout(2 * TIMEOUT + WAIT):
        while not raw.reader.at_eof():
            raw.send(b"x" * 100)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TIMEOUT / 4):
                    assert b"HTTP/1.1" not in await raw.reader.read(65536)
    raw.close()
    await counted(node, before, "handshake_timeout")


async def test_the_deadline_spares_what_keeps_its_time(node: RunningNode) -> None:
    """A request sent in pieces inside the deadline is served; a keep-alive connection
    serves a second request; a WebSocket outlives the deadline; none is counted."""
    before = await counts(node)
    raw = await rawws.tcp(HOST, port_of(node))
    for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nHo", b"st: x\r\n\r\n"):
        raw.send(piece)
        await asyncio.sleep(TIMEOUT / 4)
    assert (await raw.reader.readuntil(b'"ok"}')).startswith(b"HTTP/1.1 200 ")
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await raw.eof()).startswith(b"HTTP/1.1 200 ")
    raw.close()
    websocket = await authenticated(node)
    await asyncio.sleep(3 * TIMEOUT)  # past the deadline: a WebSocket is no longer its affair
    websocket.send(text('{"type":"ping","id":1}'))
    assert json.loads(await websocket.next_text()) == {"type": "pong", "id": 1}
    websocket.close()
    assert await counts(node) == before


# Logs


async def test_a_reason_is_one_info_line_however_often(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_node(make_settings()) as fresh:  # no line of its own yet
        raw = await authenticated(fresh)
        for number in range(30):
            raw.send(text(f"nope {number}"))
            assert json.loads(await raw.next_text())["type"] == "error"
        raw.close()
    lines = [r for r in caplog.records if r.name == "hub.abuse"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.INFO and "bad_json" in lines[0].getMessage()


async def test_uvicorns_utf8_traceback_is_one_info_line(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        raw = await authenticated(node)
        raw.send(text(b"\xff"))
        assert await raw.closed() == 1007
        raw.close()
    uvicorn_lines = [r for r in caplog.records if r.name.startswith("uvicorn")]
    assert len(uvicorn_lines) <= 1, [r.getMessage() for r in uvicorn_lines]
    for record in uvicorn_lines:
        assert record.levelno == logging.INFO and record.exc_info is None


# The double close


def protocol_of(running: RunningNode) -> Any:
    """uvicorn's protocol object of the one WebSocket the node serves (test-only peeking,
    to know when uvicorn closed the connection on its own)."""
    sockets = [c for c in running.server.server_state.connections if hasattr(c, "close_sent")]
    assert len(sockets) == 1, sockets
    return sockets[0]


async def test_protocol_pings_come_every_interval_and_an_answer_keeps_the_connection() -> None:
    interval = 0.3
    async with running_node(make_settings(ping_interval=interval)) as running:
        raw = await authenticated(running)
        pings = 0
        deadline = time.monotonic() + 4.5 * interval
        while (left := deadline - time.monotonic()) > 0:
            try:
                opcode, payload = await raw.read_frame(timeout=left)
            except TimeoutError:
                break
            assert opcode == PING, opcode
            pings += 1
            raw.send(frame(PONG, payload))
        assert 3 <= pings <= 5, pings
        raw.send(text('{"type":"ping","id":1}'))
        assert json.loads(await raw.next_text())["type"] == "pong"
        raw.close()


async def test_a_pong_read_with_a_command_counts_and_the_command_is_answered() -> None:
    """The node reads a lone empty pong without websockets' parser; one that shares its read
    with a frame, or one with a payload the (empty) ping did not carry, goes the long way:
    the first answers the ping, the second does not."""
    interval = 0.3
    async with running_node(make_settings(ping_interval=interval)) as running:
        raw = await authenticated(running)
        for number in range(1, 4):
            opcode, payload = await raw.read_frame()
            assert (opcode, payload) == (PING, b"")  # the same two bytes for everyone
            raw.send(frame(PONG) + text(f'{{"type":"ping","id":{number}}}'))
            assert json.loads(await raw.next_text())["type"] == "pong"
        assert await raw.read_frame() == (PING, b"")
        raw.send(frame(PONG, b"late"))  # not this ping's answer
        started = time.monotonic()
        assert await raw.closed(timeout=WAIT) == 1011
        assert time.monotonic() - started < interval + 0.25


async def test_a_connection_that_answers_no_ping_is_closed_within_two_intervals() -> None:
    interval = 0.3
    async with running_node(make_settings(ping_interval=interval)) as running:
        raw = await authenticated(running)
        started = time.monotonic()
        assert await raw.closed(timeout=WAIT) == 1011  # uvicorn's "keepalive ping timeout"
        assert time.monotonic() - started < 2 * interval + 0.25
        await eventually(lambda: not running.node.hub.sessions, what="the session's end")


async def test_no_second_close_after_uvicorn_closed_for_a_ping_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The old failure: the hub closed a slow consumer (4008) while its socket was full, so
    its close waited for the socket; uvicorn then closed the connection itself (the client
    answered no ping, as it read nothing); when the client read again and the socket took
    more, the session's writer sent its close after uvicorn's, and uvicorn raised
    `RuntimeError: Unexpected ASGI message 'websocket.close', after sending
    'websocket.close'` out of the writer task. The socket buffers are made small on both
    sides so that the buffer drains in small steps and the writer wakes before the
    connection is gone."""
    caplog.set_level(logging.INFO)
    settings = make_settings(namespaces=NAMESPACES, ping_interval=1.0, queue_limit=4)
    async with running_node(settings) as running:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, port_of(running)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        raw = RawSocket(reader, writer)
        raw.send(rawws.handshake_request(HOST, "/ws", {"Authorization": f"Bearer {token()}"}))
        await reader.readuntil(b"\r\n\r\n")
        assert json.loads(await raw.next_text())["type"] == "welcome"
        raw.send(text('{"type":"subscribe","channel":"chat:slow","id":1}'))
        assert json.loads(await raw.next_text())["type"] == "subscribed"
        (session,) = running.node.hub.sessions.values()
        assert isinstance(session, Session)
        uvicorn_side = protocol_of(running)
        server_socket = uvicorn_side.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # The client reads nothing from here on: the socket fills, the queue overflows.
        async with asyncio.timeout(WAIT):
            while session.close_code is None:
                await publish(running, "chat:slow", "x" * 20_000)
        assert session.close_code == 4008
        assert not uvicorn_side.close_sent  # the hub's close waits for the socket
        await eventually(lambda: uvicorn_side.close_sent, within=3 * settings.ping_interval + 1,
                         what="uvicorn's ping timeout")
        # Now read: the socket drains bit by bit, and the writer wakes with the hub's close.
        closes: list[int] = []
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    opcode, payload = await raw.read_frame()
                except asyncio.IncompleteReadError:
                    break
                if opcode == rawws.CLOSE:
                    closes.append(rawws.close_code_of(payload))
        raw.close()
        assert closes == [1011], closes  # uvicorn's ("keepalive ping timeout"), and only it
        await eventually(lambda: not running.node.hub.sessions, what="the session's end")
    gc.collect()
    assert not problems(caplog)
    assert not any("Unexpected ASGI message" in r.getMessage() for r in caplog.records)
