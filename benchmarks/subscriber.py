"""The subscriber side's WebSocket connection: one raw asyncio Protocol per connection.

It does the handshake by hand and then walks frame headers, so that the client is not what
is measured. Inside a message it reads `seq` (two `find`s and an `int`) and, from the hub,
`offset` (an `rfind`, a `find`, an `int`; on `/ws` an `endswith` for the epoch), to check
them (`benchmarks.sequence`), and in one message in `sample` it also reads the publisher's
send time and the hub's `ts` for latency.

Three wire protocols, chosen per run: the hub's own on `/ws` (`Subscriber`: token in the
query, `subscribe`, one `message` per text frame, `offset` and `epoch` at its end),
Centrifugo's client protocol v2 JSON on `/connection/websocket` (`CentrifugoSubscriber`:
`connect` with the token, then `subscribe`, whose reply gives the epoch and offset; a text
frame may carry several `\n`-separated messages; the server's `{}` pings are answered with
`{}`), and Engine.IO v4 / Socket.IO 4 on `/socket.io/` (`SocketIOSubscriber`, for the
Socket.IO peer: `40`, then `subscribe` with an ack; `42["message",<data>]` per frame; `2`
pings answered with `3`; no offsets). All see the same `data` (`seq`, `sent`), so the hot
path is shared: only the line split, the ping and the offset are the protocol's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import re
import struct
import time
from typing import Any, cast

from benchmarks.sequence import OffsetCheck, OnceCheck, SequenceCheck

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# `data` (with the publisher's `sent`, unix µs) comes before the hub's `ts` (unix ms): in a
# `/ws` `message` frame `"ts":N` follows `data`; in a Centrifugo push it is a string in
# `pub.tags`, `"ts":"N"`, after `pub.data`. Socket.IO frames carry `data` only.
SAMPLE = re.compile(rb'"sent":(\d+).*?"ts":"?(\d+)', re.DOTALL)
SAMPLE_SENT = re.compile(rb'"sent":(\d+)')
# The publisher writes `{"seq":N,...`: a message has it once, in `data` (a channel name
# cannot contain a quote, and the hub's own fields have no `seq`).
SEQ = b'"seq":'
# The hub's `offset` comes after `data` (whose padding is only `x`s): the last one in the
# message is the hub's. `/ws`: `...,"ts":T,"offset":N,"epoch":"E"}`; Centrifugo:
# `...,"pub":{"data":{...},"offset":N,"tags":{...}}}}`.
OFFSET = b'"offset":'
OFFSET_RE = re.compile(rb'"offset":(\d+)')
EPOCH_RE = re.compile(rb'"epoch":"([^"]*)"')
# Centrifugo's ping, and the client's answer to it (docs/centrifugo-notes.md §2).
CENTRIFUGO_PING = b"{}"
# Engine.IO v4: the server pings with `2`, the client answers `3`.
ENGINEIO_PING, ENGINEIO_PONG = b"2", b"3"
PROTOCOLS = ("ws", "centrifugo")  # the hub's; a peer's subscribers speak its own


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, final frame, as a client must send it (RFC 6455 §5.3)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    if not length:
        return header + mask
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big"
    )
    return header + mask + masked


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def split_messages(payload: bytes) -> list[bytes]:
    """The messages of one Centrifugo text frame (`\n`-separated), blank lines skipped."""
    return [line for line in payload.split(b"\n") if line.strip()]


def read_sample(message: bytes) -> tuple[int, int] | None:
    """(`sent` in unix µs, hub `ts` in unix ms) of one message, either hub protocol's."""
    match = SAMPLE.search(message)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def read_position(message: bytes) -> tuple[int | None, str | None]:
    """(`offset`, `epoch`) of one message the hot path could not read: the last of each
    (the hub's come after `data`); None where there is none."""
    offsets = OFFSET_RE.findall(message)
    epochs = EPOCH_RE.findall(message)
    return (int(offsets[-1]) if offsets else None,
            epochs[-1].decode(errors="replace") if epochs else None)


class ClientState:
    """What one client process knows; shared by its connections. `offsets`: check the
    hub's offsets (its namespace has history); `ordered`: check that `seq` arrives in
    order (`--ordered`)."""

    def __init__(self, sample: int, offsets: bool = False, ordered: bool = False) -> None:
        self.sample = sample
        self.offsets = offsets
        self.ordered = ordered
        self.received = 0  # message frames (with a `seq`)
        self.others = 0  # other text frames after `subscribed` (none are expected)
        self.expected: int | None = None  # set by `go`; None: not publishing yet
        self.first = 0.0
        self.last = 0.0
        self.latencies_us: list[int] = []
        self.hub_latencies_ms: list[int] = []
        self.subscribed = 0
        self.open = 0
        self.closes: dict[int, int] = {}
        self.errors: list[str] = []
        self.finished = asyncio.Event()
        self.last_closed = 0.0  # when a connection last ended (the drain's end)
        self.all_closed = asyncio.Event()  # set when the last open connection ended

    def check_finished(self) -> None:
        if self.expected is not None and (self.received >= self.expected or self.open == 0):
            self.finished.set()

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


class Subscriber(asyncio.Protocol):
    """One `/ws` connection that subscribes to `channel` and counts what arrives: each
    `seq` below `limit` (the messages its channel gets) at most once, offsets up by one
    from the subscribe reply's position (`state.offsets`), `seq` in order
    (`state.ordered`)."""

    protocol = "ws"
    # Several messages per text frame, `\n`-separated (Centrifugo).
    split = False
    # A message that is the server's application-level ping, and the answer to it.
    ping = b""
    pong = b""
    # The latency sample: `sent`, and the hub's `ts` where frames have one.
    sample_re = SAMPLE
    # Messages carry the epoch next to the offset (`/ws`), not only the subscribe reply.
    frames_have_epoch = True

    def __init__(
        self, state: ClientState, host: str, port: int, token: str, channel: str, limit: int
    ):
        self.state = state
        self.host, self.port, self.token, self.channel = host, port, token, channel
        self.once = OnceCheck(limit)
        self.offsets = OffsetCheck() if state.offsets else None
        self.order = SequenceCheck(limit) if state.ordered else None
        self.transport: asyncio.Transport | None = None
        self.key = base64.b64encode(os.urandom(16))
        self.handshaken = False
        self.live = False
        self.rest = b""
        self.frames = 0
        self.countdown = random.randrange(state.sample) + 1 if state.sample else 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def limit(self) -> int:
        return self.once.limit

    def checks(self) -> list[tuple[str, Any]]:
        """(name, check) of each check this connection runs."""
        found: list[tuple[str, Any]] = [("seq", self.once)]
        if self.offsets is not None:
            found.append(("offsets", self.offsets))
        if self.order is not None:
            found.append(("order", self.order))
        return found

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not one
        self.state.open += 1
        transport.write(
            f"GET {self.target()} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        state.open -= 1
        state.last_closed = time.time()
        if not state.open:
            state.all_closed.set()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before subscribed: {exc}"))
        state.check_finished()

    def _handshake(self, data: bytes) -> bytes | None:
        data = self.rest + data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self.rest = data
            if len(data) > 16384:
                self._fail("handshake response too long")
            return None
        head, data = data[:end], data[end + 4 :]
        self.rest = b""
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self._fail(f"handshake refused: {status.decode(errors='replace')}")
            return None
        if accept_key(self.key) not in head:
            self._fail("bad Sec-WebSocket-Accept")
            return None
        self.handshaken = True
        opening = self.opening()
        if opening is not None:
            self._send(opening)
        return data

    def _send(self, message: bytes) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(1, message))

    def target(self) -> str:
        """The request target of the upgrade."""
        return f"/ws?token={self.token}"

    def opening(self) -> bytes | None:
        """The first text frame, right after the handshake (None: the server speaks
        first)."""
        return json.dumps({"type": "subscribe", "channel": self.channel, "id": 1}).encode()

    def _fail(self, reason: str) -> None:
        self.state.error(reason)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    def _subscribed(self, offset: int | None = None, epoch: str | None = None) -> None:
        """Live: the subscribe reply came, with the channel's position where it has one."""
        if self.offsets is not None:
            self.offsets.start(offset, epoch, self.frames_have_epoch)
        self.state.subscribed += 1
        if not self.ready.done():
            self.ready.set_result(None)

    def _offsets(self) -> tuple[OffsetCheck | None, bytes]:
        """The offset check for the hot path (None before a position is known), and the
        `/ws` frame tail of the subscribed epoch."""
        offsets = self.offsets
        if offsets is None or not offsets.positioned:
            return None, b""
        return offsets, offsets.tail

    def data_received(self, data: bytes) -> None:  # the hot path
        if not self.handshaken:
            handshake_rest = self._handshake(data)
            if handshake_rest is None:
                return
            data = handshake_rest
        elif self.rest:
            data = self.rest + data
        state = self.state
        n = len(data)
        i = 0
        texts = 0
        others = 0
        live = self.live
        split = self.split
        ping = self.ping
        once = self.once
        seen = once.seen
        limit = once.limit
        order = self.order
        offsets, tail = self._offsets()
        countdown = self.countdown
        now = time.time()
        while n - i >= 2:
            b0 = data[i]
            length = data[i + 1] & 0x7F
            if length < 126:
                start = i + 2
            elif length == 126:
                if n - i < 4:
                    break
                length = (data[i + 2] << 8) | data[i + 3]
                start = i + 4
            else:
                if n - i < 10:
                    break
                length = int.from_bytes(data[i + 2 : i + 10], "big")
                start = i + 10
            end = start + length
            if end > n:
                break
            i = end
            opcode = b0 & 0x0F
            if opcode <= 1 and b0 & 0x80:  # the last (usually only) frame of a text message
                if not live:
                    live = self._before_live(data[start:end])
                    offsets, tail = self._offsets()
                    continue
                s = start
                while True:  # its messages: one, unless `split` finds `\n`s (s only grows)
                    e = end
                    if split:
                        e = data.find(b"\n", s, end)
                        if e < 0:
                            e = end
                    at = data.find(SEQ, s, e)
                    if at >= 0:
                        texts += 1
                        at += 6
                        seq: int | None
                        try:
                            seq = int(data[at : data.find(b",", at, e)])
                        except ValueError:
                            seq = None
                        if seq is not None and 0 <= seq < limit and not seen[seq]:
                            seen[seq] = 1
                        else:
                            once.unexpected(seq)
                        if order is not None:
                            if seq is None:
                                order.malformed()
                            elif seq == order.next:
                                order.next = seq + 1
                            else:
                                order.unexpected(seq)
                        if offsets is not None:
                            o = data.rfind(OFFSET, at, e)
                            c = data.find(b",", o + 9, e) if o >= 0 else -1
                            if c > 0 and (not tail or data.endswith(tail, s, e)):
                                try:
                                    offset = int(data[o + 9 : c])
                                except ValueError:
                                    offsets.frame(*read_position(data[at:e]))
                                else:
                                    if offset == offsets.next:
                                        offsets.next = offset + 1
                                    else:
                                        offsets.unexpected(offset)
                            else:  # another epoch, or no offset
                                offsets.frame(*read_position(data[at:e]))
                        if countdown:
                            countdown -= 1
                            if not countdown:
                                countdown = state.sample
                                match = self.sample_re.search(data, s, e)
                                if match is not None:
                                    state.latencies_us.append(
                                        int(now * 1e6) - int(match.group(1))
                                    )
                                    if match.lastindex == 2:
                                        state.hub_latencies_ms.append(
                                            int(now * 1e3) - int(match.group(2))
                                        )
                    elif ping and e - s == len(ping) and data[s:e] == ping:
                        self._pong()
                    elif not split or data[s:e].strip():
                        others += 1
                    if e >= end:
                        break
                    s = e + 1
            elif opcode > 1 and self._control(opcode, data[start:end]):
                return
        self.rest = data[i:] if i < n else b""
        self.countdown = countdown
        self.live = live
        state.others += others
        if texts:
            self.frames += texts
            state.received += texts
            if not state.first:
                state.first = now
            state.last = now
            if state.expected is not None and state.received >= state.expected:
                state.finished.set()

    def _before_live(self, payload: bytes) -> bool:
        if b'"type":"subscribed"' in payload:
            offset, epoch = None, None
            try:
                reply = json.loads(payload)
            except ValueError:
                reply = None
            if isinstance(reply, dict):
                offset = reply.get("offset") if isinstance(reply.get("offset"), int) else None
                epoch = reply.get("epoch") if isinstance(reply.get("epoch"), str) else None
            self._subscribed(offset, epoch)
            return True
        if b'"type":"error"' in payload:
            self._fail(payload.decode(errors="replace")[:200])
        return False

    def _pong(self) -> None:
        """An application-level ping is a message; its answer goes in a frame of its own."""
        self._send(self.pong)

    def _control(self, opcode: int, payload: bytes) -> bool:
        """Returns True when the connection is closing."""
        transport = self.transport
        assert transport is not None
        if opcode == 9:  # ping
            transport.write(client_frame(10, payload))
        elif opcode == 8:  # close
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            closes = self.state.closes
            closes[code] = closes.get(code, 0) + 1
            transport.write(client_frame(8, payload[:2]))
            transport.close()
            if not self.ready.done():
                reason = payload[2:].decode(errors="replace")
                self.ready.set_exception(ConnectionError(f"closed {code} {reason}"))
            return True
        elif opcode == 2:
            self.state.error("unexpected binary frame")
        return False


class CentrifugoSubscriber(Subscriber):
    """One `/connection/websocket` connection (Centrifugo client protocol v2, JSON): it
    sends `connect` (id 1) with the token, on the connect reply `subscribe` (id 2), and is
    live on the subscribe reply, whose `epoch` and `offset` (left out when 0) are where the
    offsets start. Pushes carry the publisher's `data` as `pub.data` and the offset as
    `pub.offset` (no epoch), so the shared hot path reads `seq`, `sent` and the offset
    there; it splits frames at `\n` and answers the server's `{}` pings (unanswered, the
    hub closes with 3012)."""

    protocol = "centrifugo"
    split = True
    ping = CENTRIFUGO_PING
    pong = CENTRIFUGO_PING
    frames_have_epoch = False
    CONNECT_ID = 1
    SUBSCRIBE_ID = 2

    def target(self) -> str:
        return "/connection/websocket"

    def opening(self) -> bytes:
        return connect_command(self.CONNECT_ID, self.token)

    def _before_live(self, payload: bytes) -> bool:
        for line in split_messages(payload):
            kind, detail = classify_reply(line)
            if kind == "ping":
                self._pong()
            elif kind == "error":
                self._fail(f"centrifugo error: {detail}")
                return False
            elif kind == "reply" and detail == str(self.CONNECT_ID):
                self._send(subscribe_command(self.SUBSCRIBE_ID, self.channel))
            elif kind == "reply" and detail == str(self.SUBSCRIBE_ID):
                self._subscribed(*subscribe_position(line))
                return True  # pushes that came in this same frame: none before `go`
        return False


class SocketIOSubscriber(Subscriber):
    """One Socket.IO 4 connection over Engine.IO v4's WebSocket transport, for the peer
    (benchmarks/peers/socketio/server.mjs): after the upgrade the server sends its open
    packet `0{...}`, the client connects to the main namespace (`40`, answered `40{...}`)
    and asks to join the room (`421["subscribe","<channel>"]`, event `subscribe` with ack
    id 1); it is live on the ack, `431[]`. Messages are `42["message",<data>]`, one per
    frame; the server pings with `2`, answered `3` (unanswered, it closes after
    pingInterval + pingTimeout). No offsets: `seq` is checked for exactly once."""

    protocol = "socketio"
    ping = ENGINEIO_PING
    pong = ENGINEIO_PONG
    sample_re = SAMPLE_SENT
    frames_have_epoch = False

    def target(self) -> str:
        return "/socket.io/?EIO=4&transport=websocket"

    def opening(self) -> None:
        return None  # the server's open packet comes first

    def _before_live(self, payload: bytes) -> bool:
        if payload.startswith(b"0{"):  # Engine.IO open
            self._send(b"40")
        elif payload.startswith(b"40"):  # Socket.IO CONNECT accepted
            self._send(socketio_subscribe(self.channel))
        elif payload.startswith(b"431"):  # the ack of `subscribe`
            self._subscribed()
            return True
        elif payload == ENGINEIO_PING:
            self._pong()
        elif payload.startswith(b"44") or payload.startswith(b"1"):  # CONNECT_ERROR, close
            self._fail(f"socket.io refused: {payload[:200].decode(errors='replace')}")
        return False


def socketio_subscribe(channel: str) -> bytes:
    """Socket.IO EVENT `subscribe` on the main namespace with ack id 1."""
    return b"421" + json.dumps(["subscribe", channel], separators=(",", ":")).encode()


def connect_command(command_id: int, token: str) -> bytes:
    return json.dumps({"id": command_id, "connect": {"token": token, "name": "bench"}},
                      separators=(",", ":")).encode()


def subscribe_command(command_id: int, channel: str) -> bytes:
    return json.dumps({"id": command_id, "subscribe": {"channel": channel}},
                      separators=(",", ":")).encode()


def subscribe_position(message: bytes) -> tuple[int | None, str | None]:
    """(offset, epoch) of a Centrifugo subscribe reply: `epoch` is there for a channel with
    history (`recoverable`), `offset` left out when 0; (None, None) without history."""
    try:
        result = json.loads(message).get("subscribe")
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(result, dict) or not isinstance(result.get("epoch"), str):
        return None, None
    offset = result.get("offset", 0)
    return (offset if isinstance(offset, int) else None), result["epoch"]


def classify_reply(message: bytes) -> tuple[str, str]:
    """One Centrifugo message before the subscription is live: ("ping", ""), ("error",
    its code and message), ("reply", its id) for a successful reply to a command, ("push",
    channel) or ("bad", why)."""
    try:
        reply = json.loads(message)
    except ValueError:
        return "bad", message[:80].decode(errors="replace")
    if not isinstance(reply, dict):
        return "bad", message[:80].decode(errors="replace")
    if not reply:
        return "ping", ""
    error = reply.get("error")
    if isinstance(error, dict):
        return "error", f"{error.get('code')} {error.get('message', '')}".strip()
    if "push" in reply:
        push = reply["push"]
        return "push", str(push.get("channel", "")) if isinstance(push, dict) else ""
    if isinstance(reply.get("id"), int) and reply["id"] > 0:
        return "reply", str(reply["id"])
    return "bad", message[:80].decode(errors="replace")


class PersonalSubscriber(Subscriber):
    """`/ws` with nothing to subscribe (`--personal`): the connection's own channel is its
    user's, joined before the welcome; a `ping` after it makes it live on the `pong`."""

    def opening(self) -> bytes:
        return b'{"type":"ping","id":1}'

    def _before_live(self, payload: bytes) -> bool:
        if b'"type":"pong"' in payload:
            self._subscribed()
            return True
        if b'"type":"error"' in payload:
            self._fail(payload.decode(errors="replace")[:200])
        return False


def subscriber_class(protocol: str, personal: bool = False) -> type[Subscriber]:
    if protocol == "centrifugo":
        return CentrifugoSubscriber
    if protocol == "ws":
        return PersonalSubscriber if personal else Subscriber
    if protocol == "socketio":
        return SocketIOSubscriber
    raise ValueError(f"unknown protocol {protocol!r}")
