"""The two encodings of Centrifugo's client protocol v2 on `/connection/websocket`
(PROTOCOL §11), as codecs beside each other: JSON (text frames, newline-separated) and
Protobuf (binary frames, varint-length-delimited). A codec splits and decodes a client
frame into `centrifugo_frames.Command`s, and writes replies and what channels carry; the
session above it is the same for both. Each codec is one object, so the fan-out builds a
frame at most once per encoding per message per node (`hub.subscriptions.Frames`).

Delta (fossil) subscriptions get publications written by `delta`: a patch against the
previous publication they received (computed once per channel, `hub.subscriptions`), or
the full payload. In JSON both travel as a JSON *string* (Centrifugo's way: the SDK keeps
the payload's bytes to apply the next patch to); in Protobuf as the bytes they are.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import msgspec

from hub import centrifugo_frames as cf
from hub import centrifugo_protobuf as pb
from hub import protocol as p
from hub.channels import is_personal
from hub.wire import binary_frame, binary_frame_of, text_frame

PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
CENTRIFUGO_PERSONAL_PREFIX = "#"


def centrifugo_personal(user: str) -> str:
    """Centrifugo's name of a user's personal channel, served beside the hub's `@user`."""
    return CENTRIFUGO_PERSONAL_PREFIX + user


def client_info(user: str, client: str | None, info: msgspec.Raw | None) -> cf.ClientInfo:
    """`conn_info` is the token's `info`."""
    conn_info = info if info is not None and len(info) else None
    return cf.ClientInfo(user=user, client=client or "", conn_info=conn_info)


def publication(message: p.Message) -> cf.Publication:
    """Client publishes carry their publisher (`info`); API ones do not."""
    info = None
    if message.from_ is not None:
        info = client_info(message.from_, message.client, message.info)
    return cf.message_publication(message, info)


class CentrifugoCodec:
    """One encoding. `binary`: its frames are binary WebSocket frames."""

    protocol = "centrifugo"  # the `protocol` label: one endpoint, both encodings
    encoding = "json"
    binary = False

    @property
    def ping_frame(self) -> bytes:
        return text_frame(cf.PING)

    # client → server

    def split(self, frame: bytes) -> tuple[list[bytes], str | None]:
        """The messages of one client frame, and what was wrong after the last good one."""
        return cf.split_frame(frame), None

    def decode(self, message: bytes) -> cf.Command:
        """Raises cf.BadCommand."""
        return cf.decode_command(message)

    # server → client

    def reply(self, reply: cf.Reply) -> bytes:
        """One reply as a whole WebSocket frame."""
        return text_frame(cf.encode(reply))

    def unit(self, push: cf.Push) -> bytes:
        """A push as one message of a frame."""
        return cf.encode_push(push)

    def frame(self, units: list[bytes]) -> bytes:
        """Messages (`unit`s) as one WebSocket frame."""
        return text_frame(cf.join_frame(units))

    def push(self, push: cf.Push) -> bytes:
        return self.frame([self.unit(push)])

    def message(self, message: p.Message) -> bytes:
        return self._publication(message, publication(message))

    def _publication(self, message: p.Message, pub: cf.Publication) -> bytes:
        """A publication push; one on a personal channel goes out under both its names,
        `@user` and Centrifugo's `#user`, in one frame."""
        channel = message.channel
        units = [self.unit(cf.Push(channel=channel, pub=pub))]
        if is_personal(channel):
            units.append(self.unit(cf.Push(channel=centrifugo_personal(channel[1:]), pub=pub)))
        return self.frame(units)

    def event(self, event: p.Join | p.Leave) -> bytes:
        info = client_info(event.user, event.client, event.info)
        if isinstance(event, p.Join):
            return self.push(cf.Push(channel=event.channel, join=cf.Join(info=info)))
        return self.push(cf.Push(channel=event.channel, leave=cf.Leave(info=info)))

    def delta_publication(self, message: p.Message, patch: bytes | None) -> cf.Publication:
        """A publication for a delta subscription: `patch` against the previous one it
        received, or (None) the full payload."""
        pub = publication(message)
        data = patch if patch is not None else bytes(message.data)
        try:
            pub.data = msgspec.Raw(msgspec.json.encode(data.decode()))
        except UnicodeDecodeError:  # not for JSON payloads; kept whole to be safe
            pub.data = msgspec.Raw(msgspec.json.encode(bytes(message.data).decode()))
            return pub
        pub.delta = patch is not None
        return pub

    def delta(self, message: p.Message, patch: bytes | None) -> bytes:
        return self._publication(message, self.delta_publication(message, patch))


class CentrifugoProtobufCodec(CentrifugoCodec):
    encoding = "protobuf"
    binary = True

    @property
    def ping_frame(self) -> bytes:
        return binary_frame(pb.PING)

    def split(self, frame: bytes) -> tuple[list[bytes], str | None]:
        return pb.split_frame(frame)

    def decode(self, message: bytes) -> cf.Command:
        return pb.decode_command(message)

    def reply(self, reply: cf.Reply) -> bytes:
        return binary_frame(pb.delimit(pb.encode(reply)))

    def unit(self, push: cf.Push) -> bytes:
        return pb.encode_push(push)

    def frame(self, units: list[bytes]) -> bytes:
        return binary_frame(units[0] if len(units) == 1 else b"".join(units))

    def _publication(self, message: p.Message, pub: cf.Publication) -> bytes:
        channel = message.channel
        parts = pb.publication_parts(channel, pub)
        if is_personal(channel):
            parts += pb.publication_parts(centrifugo_personal(channel[1:]), pub)
        return binary_frame_of(parts)

    def delta_publication(self, message: p.Message, patch: bytes | None) -> cf.Publication:
        pub = publication(message)
        if patch is not None:
            pub.data = msgspec.Raw(patch)
            pub.delta = True
        return pub


JSON_CODEC = CentrifugoCodec()
PROTOBUF_CODEC = CentrifugoProtobufCodec()


def codec_for(scope: dict[str, object]) -> CentrifugoCodec:
    """As the SDKs ask for it: `?format=protobuf`, or the `centrifuge-protobuf`
    subprotocol (centrifuge-js and the mobile SDKs send the latter)."""
    subprotocols = scope.get("subprotocols") or ()
    if isinstance(subprotocols, list | tuple) and PROTOBUF_SUBPROTOCOL in subprotocols:
        return PROTOBUF_CODEC
    query = scope.get("query_string") or b""
    if isinstance(query, bytes) and b"format=" in query:
        formats = parse_qs(query.decode("latin-1")).get("format", [])
        if "protobuf" in formats:
            return PROTOBUF_CODEC
    return JSON_CODEC
