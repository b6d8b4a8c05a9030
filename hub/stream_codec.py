"""Centrifugo's client protocol (JSON) written for a transport other than
`/connection/websocket` (PROTOCOL §15): the JSON codec of `hub.centrifugo_codecs`, with
each message cut into the transport's stream by its `Framing` instead of a WebSocket frame.

Bidirectional emulation carries exactly what the WebSocket carries (each push inside a
reply, `{"push": {...}}`); the one-way transports carry bare pushes (`{"channel", "pub"}`,
`{"connect": {...}}`), as Centrifugo's unidirectional protocol does. Each codec is one
object per (encoding, framing), so the fan-out builds a frame once per message per codec,
whatever the number of recipients. The Protobuf encoding plugs in the same way
(`ProtobufStreamCodec`, http_stream only, as Centrifugo serves it): its units are
varint-length-delimited already, so its framing adds nothing, and the session is unchanged.
"""

from __future__ import annotations

import msgspec

from hub import centrifugo_frames as cf
from hub import centrifugo_protobuf as pb
from hub import protocol as p
from hub.centrifugo_codecs import CentrifugoCodec, CentrifugoProtobufCodec, centrifugo_personal
from hub.channels import is_personal
from hub.streams import DELIMITED, LINES, SSE, WEBSOCKET, Framing


class UniSubscribe(cf.SubscribePush, omit_defaults=True):
    """A server-side subscription's start on a one-way stream: where it stands, and
    whether it recovered what the client asked for."""

    recovered: bool = False
    was_recovering: bool = False


class UniConnect(cf.ConnectResult, omit_defaults=True):
    """The one-way connect push: the bidirectional connect result, with the start of each
    server-side subscription in `subs`."""

    subs: dict[str, UniSubscribe] | None = None  # type: ignore[assignment]


class UniPush(cf.Push, omit_defaults=True):
    connect: UniConnect | None = None


_encoder = msgspec.json.Encoder()


def encode_bare(push: cf.Push) -> bytes:
    """A push as one-way transports carry it (no reply around it); raw newlines stripped
    as `cf.encode` does."""
    data = _encoder.encode(push)
    return data.replace(b"\n", b"") if b"\n" in data else data


def event_id(push: cf.Push) -> int | None:
    """The SSE id of a push on a one-way stream: a publication's offset, a subscription's
    position, or the connect push's one history channel's."""
    if push.pub is not None and push.pub.offset:
        return push.pub.offset
    if push.subscribe is not None and push.subscribe.recoverable:
        return push.subscribe.offset
    connect = push.connect if isinstance(push, UniPush) else None
    if connect is not None and connect.subs:
        positioned = [sub.offset for sub in connect.subs.values() if sub.recoverable]
        if len(positioned) == 1:
            return positioned[0]
    return None


class StreamCodec(CentrifugoCodec):
    """The JSON codec for one framing: each unit (push) is a whole piece of the stream (an
    SSE event, a line, a WebSocket frame), so a frame of several is their concatenation.
    `uni`: bare pushes, and the framing's keepalive as the ping; `ids`: SSE ids."""

    def __init__(self, framing: Framing, *, uni: bool, ids: bool = False) -> None:
        self.framing = framing
        self.uni = uni
        self.ids = ids
        # The server's ping: `{}`, which a bidirectional client answers `{}`; a one-way
        # stream gets the framing's keepalive instead.
        self._ping = framing.keepalive if uni else framing.wrap(cf.PING)

    @property
    def ping_frame(self) -> bytes:
        return self._ping

    def reply(self, reply: cf.Reply) -> bytes:
        return self.framing.wrap(cf.encode(reply))

    def unit(self, push: cf.Push) -> bytes:
        payload = encode_bare(push) if self.uni else cf.encode_push(push)
        return self.framing.wrap(payload, event_id(push) if self.ids else None)

    def frame(self, units: list[bytes]) -> bytes:
        return units[0] if len(units) == 1 else b"".join(units)

    def disconnect(self, code: int, reason: str) -> bytes:
        """The last frame of a stream: why it ends, and whether to come back (a stream's
        end alone tells an SDK nothing: it reconnects)."""
        reason = reason or cf.reason_for(code)
        return self.push(cf.Push(disconnect=cf.Disconnect(
            code=code, reason=reason, reconnect=not cf.is_terminal(code))))


class ProtobufStreamCodec(CentrifugoProtobufCodec):
    """§11's Protobuf codec on an HTTP stream (centrifuge-js's `http_stream` with its
    Protobuf build): each reply varint-length-delimited, laid end to end in the response
    body, exactly what a binary WebSocket frame would carry, without the frame."""

    framing = DELIMITED
    uni = False

    @property
    def ping_frame(self) -> bytes:
        return pb.PING

    def reply(self, reply: cf.Reply) -> bytes:
        return pb.delimit(pb.encode(reply))

    def frame(self, units: list[bytes]) -> bytes:
        return units[0] if len(units) == 1 else b"".join(units)

    def _publication(self, message: p.Message, pub: cf.Publication) -> bytes:
        channel = message.channel
        parts = pb.publication_parts(channel, pub)
        if is_personal(channel):
            parts += pb.publication_parts(centrifugo_personal(channel[1:]), pub)
        return b"".join(parts)

    def disconnect(self, code: int, reason: str) -> bytes:
        """The last frame of a stream, as `StreamCodec.disconnect`."""
        reason = reason or cf.reason_for(code)
        return self.push(cf.Push(disconnect=cf.Disconnect(
            code=code, reason=reason, reconnect=not cf.is_terminal(code))))


EmulationCodec = StreamCodec | ProtobufStreamCodec
"""What an emulated session writes with: JSON on either stream, Protobuf on http_stream."""

EMULATION_SSE = StreamCodec(SSE, uni=False)
EMULATION_HTTP_STREAM = StreamCodec(LINES, uni=False)
UNI_SSE = StreamCodec(SSE, uni=True, ids=True)
UNI_HTTP_STREAM = StreamCodec(LINES, uni=True)
UNI_WEBSOCKET = StreamCodec(WEBSOCKET, uni=True)
EMULATION_PROTOBUF_HTTP_STREAM = ProtobufStreamCodec()
