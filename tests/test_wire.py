"""The road from the fan-out to the socket: the frames it builds, its shortcut through
uvicorn's websockets-sansio protocol (these tests fail loudly when an uvicorn upgrade
takes it away), backpressure, a peer that began to close, one failing recipient, and the
plain ASGI road the node falls back to."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import pytest
import websockets.frames
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol
from websockets.streams import StreamReader

import hub.wire
from hub.broker import StreamPosition
from hub.deadline import HandshakeDeadline
from hub.session import Session
from hub.subscriptions import Frames, fan_out
from hub.uvicorn_ws import LeanWebSocketsProtocol
from hub.wire import AsgiOutbound, DirectOutbound, payload_of, text_frame
from hub.ws_session import WS_CODEC
from tests.conftest import NAMESPACES
from tests.support import (
    WAIT,
    RunningNode,
    connect,
    eventually,
    make_settings,
    metric,
    next_message,
    publish,
    running_node,
    token,
)


def parse(frame: bytes) -> websockets.frames.Frame:
    reader = StreamReader()
    reader.feed_data(frame)
    parser = websockets.frames.Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        parsed: websockets.frames.Frame = done.value
        return parsed
    raise AssertionError("incomplete frame")


def test_frames_of_every_length_class_parse_as_text() -> None:
    for size in (0, 125, 126, 65535, 65536, 200_000):
        payload = b"x" * size
        frame = text_frame(payload)
        parsed = parse(frame)
        assert parsed.opcode is websockets.frames.Opcode.TEXT and parsed.fin
        assert parsed.data == payload
        assert payload_of(frame) == payload


async def test_sessions_write_straight_to_uvicorns_transport(node: RunningNode) -> None:
    async with connect(node.ws_url, token("wire")) as client:
        await client.subscribe("feed:wire")
        (session,) = node.node.hub.sessions.values()
        assert isinstance(session, Session)
        assert isinstance(session._outbound, DirectOutbound)


async def test_uvicorns_websocket_protocol_keeps_its_state_in_slots(node: RunningNode) -> None:
    """Every attribute uvicorn sets is one of LeanWebSocketsProtocol's slots (an instance
    dict of its own cost a connection 1.5 KiB): an uvicorn upgrade that adds one fails
    here, and the name goes into the slots."""
    async with connect(node.ws_url, token("slots"), header=False) as client:
        await client.subscribe("feed:wire")
        (protocol,) = [c for c in node.server.server_state.connections
                       if isinstance(c, LeanWebSocketsProtocol)]
        assert protocol.__dict__ == {}
        # and what it keeps of the handshake is let go (the token in the query string too)
        released: Any = protocol  # uvicorn types them as never None
        assert (released.request, released.response) == (None, None)
        assert released.scope == {}  # nothing reads it after the accept
        assert (released.client, released.server) == (None, None)
        # websockets' handshake parser (which holds the request) gave way to the frames'
        assert released.conn.parser.gi_code is Protocol.parse.__code__


async def test_a_websocket_lets_go_of_its_http_protocol_once_upgraded(node: RunningNode) -> None:
    """The handshake's HTTP protocol (its parser, request and headers, under the request
    deadline) is not kept alive by the deadline's timer after the upgrade: it held 5.7 KiB
    of every connection for HUB_HANDSHAKE_TIMEOUT, which is all of an idle one's life
    when they connect in a crowd."""
    async with contextlib.AsyncExitStack() as stack:
        for index in range(10):
            client = await stack.enter_async_context(connect(node.ws_url, token(f"up{index}")))
            await client.subscribe("feed:wire")
        gc.collect()
        upgraded = [protocol for protocol in gc.get_objects()
                    if isinstance(protocol, HandshakeDeadline) and not protocol._http()]
        assert upgraded == []


class Recipient:
    """A stand-in subscriber for the fan-out loop alone: takes frames, or raises."""

    codec = WS_CODEC
    expires = None

    def __init__(self, name: str, fails: bool = False) -> None:
        self.client_id = self.user = name
        self.fails = fails
        self.frames: list[bytes] = []

    def reset(self, channel: str, position: StreamPosition) -> bool:
        return True

    def push(self, frame: bytes, count: int = 1) -> bool:
        if self.fails:
            raise RuntimeError("broken connection object")
        self.frames.append(frame)
        return True

    def close(self, code: int, reason: str = "") -> None:
        return None


def test_one_failing_recipient_does_not_stop_the_fan_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recipients = [Recipient("a"), Recipient("b", fails=True), Recipient("c")]
    assert fan_out(recipients, Frames(lambda codec: b"frame")) == 2
    assert [r.frames for r in recipients] == [[b"frame"], [], [b"frame"]]
    assert "delivery to one connection failed" in caplog.text


async def test_a_reader_that_stalls_gets_everything_in_order_once_it_reads_again() -> None:
    """Backpressure without overflow: while the socket takes nothing, frames wait in the
    session's queue; then the writer drains them in order."""
    settings = make_settings(namespaces=NAMESPACES, queue_limit=100_000, rate_limit=0)
    payload = "y" * 2000
    async with running_node(settings) as running, \
            connect(running.ws_url, token("stalled")) as stalled:
        await stalled.subscribe("feed:stall")
        (session,) = running.node.hub.sessions.values()
        assert isinstance(session, Session)
        stalled.connection.transport.pause_reading()
        published = 0
        while not session.queue and published < 20_000:
            for n in range(published, published + 500):
                await publish(running, "feed:stall", {"n": n, "p": payload})
            published += 500
        assert session.queue, "the socket never pushed back"
        stalled.connection.transport.resume_reading()
        got = [(await next_message(stalled))["data"]["n"] for _ in range(published)]
        assert got == list(range(published))


async def test_a_connection_whose_peer_began_to_close_gets_no_more_frames(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's close frame is in: uvicorn closes the transport, and until the session
    hears of the disconnect (held here) the fan-out neither writes to it nor counts it."""
    release = asyncio.Event()
    real_receive = WebSocketsSansIOProtocol.receive

    async def receive(self: WebSocketsSansIOProtocol) -> Any:
        message = await real_receive(self)
        if message["type"] == "websocket.disconnect":
            await asyncio.wait_for(release.wait(), WAIT)
        return message

    monkeypatch.setattr(WebSocketsSansIOProtocol, "receive", receive)
    async with connect(node.ws_url, token("stays")) as stays, \
            connect(node.ws_url, token("leaves")) as leaves:
        for client in (stays, leaves):
            await client.subscribe("feed:closing")
        leaving = next(s for s in node.node.hub.sessions.values() if s.user == "leaves")
        assert isinstance(leaving, Session)
        await leaves.connection.close()
        await eventually(lambda: leaving._outbound.closed, what="the transport closing")
        before = await metric(node, "hub_messages_delivered_total")
        for n in range(5):
            await publish(node, "feed:closing", n)
        assert [(await next_message(stays))["data"] for _ in range(5)] == list(range(5))
        assert await metric(node, "hub_messages_delivered_total") == before + 5
        assert leaving.push(b"\x81\x01x") is False
        release.set()


async def test_without_uvicorns_attributes_sessions_take_the_asgi_road(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An uvicorn without what the direct road reads: the probe says so at start-up, and
    every session sends one ASGI event per frame, with the same frames, limits and
    close codes."""
    monkeypatch.setattr(hub.wire, "_DIRECT_ATTRIBUTES", ("transport", "no_such_attribute"))
    settings = make_settings(namespaces=NAMESPACES, queue_limit=10, rate_limit=0)
    async with running_node(settings) as running, \
            connect(running.ws_url, token("plain")) as plain, \
            connect(running.ws_url, token("slow")) as slow:
        assert "writing through ASGI sends" in caplog.text and "no_such_attribute" in caplog.text
        assert await metric(running, "hub_node_info", write_path="asgi") == 1
        for client in (plain, slow):
            await client.subscribe("feed:asgi")
        (session, _) = running.node.hub.sessions.values()
        assert isinstance(session, Session) and isinstance(session._outbound, AsgiOutbound)
        for n in range(1, 51):
            assert (await publish(running, "feed:asgi", n))["offset"] == n
        got = [await next_message(plain) for _ in range(50)]
        assert [(m["offset"], m["data"]) for m in got] == [(n, n) for n in range(1, 51)]
        slow.connection.transport.pause_reading()
        while not await metric(running, "hub_messages_dropped_total", reason="slow_consumer"):
            await publish(running, "feed:asgi", "x" * 60000)
        slow.connection.transport.resume_reading()
        assert await slow.closed() == 4008
        await eventually(lambda: metric(running, "hub_disconnections_total", code="4008"))
        await publish(running, "feed:asgi", "after")
        assert (await plain.recv())["data"] in {"x" * 60000, "after"}
