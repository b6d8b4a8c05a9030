"""The fan-out's shortcut to the socket depends on uvicorn's websockets-sansio protocol;
these tests fail loudly when an uvicorn upgrade takes it away."""

from __future__ import annotations

import websockets.frames
from websockets.streams import StreamReader

from hub.session import Session
from hub.wire import DirectOutbound, payload_of, text_frame
from tests.support import RunningNode, connect, token


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
