"""Centrifugo's client protocol (JSON) written for a transport other than
`/connection/websocket` (PROTOCOL §15): a protocol codec, which the transports' `Framing`
cuts into their stream.

Bidirectional emulation carries exactly what the WebSocket carries (each push inside a
reply, `{"push": {...}}`); the one-way transports carry bare pushes (`{"channel", "pub"}`,
`{"connect": {...}}`), as Centrifugo's unidirectional protocol does. Each codec is one
object per (protocol, framing), so the fan-out builds a frame once per message per codec,
whatever the number of recipients. A Protobuf codec plugs in beside these (same methods,
varint-delimited payloads): the framings and the transports do not change.
"""

from __future__ import annotations

import msgspec

from hub import centrifugo_frames as cf
from hub import protocol as p
from hub.centrifugo_session import client_info, publication
from hub.streams import LINES, SSE, WEBSOCKET, Framing


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


class StreamCodec:
    """Centrifugo's frames for one framing. `uni`: bare pushes; `ids`: publications of
    history channels carry their offset as the SSE event id."""

    protocol = "centrifugo"
    __slots__ = ("framing", "ids", "ping", "uni")

    def __init__(self, framing: Framing, *, uni: bool, ids: bool = False) -> None:
        self.framing = framing
        self.uni = uni
        self.ids = ids
        # The server's ping: `{}`, which a bidirectional client answers `{}`; a one-way
        # stream gets the framing's keepalive instead.
        self.ping = framing.keepalive if uni else framing.wrap(cf.PING)

    # what channels carry (the hub's `Codec`)

    def message(self, message: p.Message) -> bytes:
        push = cf.Push(channel=message.channel, pub=publication(message))
        return self.push(push, message.offset if self.ids else None)

    def event(self, event: p.Join | p.Leave) -> bytes:
        info = client_info(event.user, event.client, event.info)
        if isinstance(event, p.Join):
            return self.push(cf.Push(channel=event.channel, join=cf.Join(info=info)))
        return self.push(cf.Push(channel=event.channel, leave=cf.Leave(info=info)))

    # what a session writes

    def push(self, push: cf.Push, event_id: int | None = None) -> bytes:
        payload = encode_bare(push) if self.uni else cf.encode_push(push)
        return self.framing.wrap(payload, event_id if self.ids else None)

    def pushes(self, pushes: list[cf.Push]) -> bytes:
        """Several of a connection's own pushes, in order; on SSE with ids, a publication
        carries its offset and a subscription's start its position."""
        return b"".join([self.push(push, _event_id(push)) for push in pushes])

    def reply(self, reply: cf.Reply) -> bytes:
        return self.framing.wrap(cf.encode(reply))

    def disconnect(self, code: int, reason: str) -> bytes:
        """The last frame of a stream: why it ends, and whether to come back (a stream's
        end alone tells an SDK nothing: it reconnects)."""
        reason = reason or cf.reason_for(code)
        return self.push(cf.Push(disconnect=cf.Disconnect(
            code=code, reason=reason, reconnect=not cf.is_terminal(code))))


def _event_id(push: cf.Push) -> int | None:
    if push.pub is not None and push.pub.offset:
        return push.pub.offset
    subscribe = push.subscribe
    if subscribe is not None and subscribe.recoverable:
        return subscribe.offset
    return None


EMULATION_SSE = StreamCodec(SSE, uni=False)
EMULATION_HTTP_STREAM = StreamCodec(LINES, uni=False)
UNI_SSE = StreamCodec(SSE, uni=True, ids=True)
UNI_HTTP_STREAM = StreamCodec(LINES, uni=True)
UNI_WEBSOCKET = StreamCodec(WEBSOCKET, uni=True)
