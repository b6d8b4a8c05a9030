"""Centrifugo's client protocol v2 in its Protobuf encoding (PROTOCOL §11): the same
commands, replies and pushes as `hub.centrifugo_frames` (the very same Structs), written and
read as the messages of centrifugal/protocol's client.proto. Field numbers and wire types
below are that file's; they are the wire contract.

Framing. A WebSocket *binary* frame holds one or more messages, each preceded by its length
as a varint (protobuf's "delimited" form, as Centrifugo and the SDKs frame them). An empty
`Reply` (a lone 0x00) is the server's ping, an empty `Command` the client's pong.

Hand-written, not generated: the hot path is one `Reply{push{channel, pub}}` per
publication, which a few byte joins build faster than the `protobuf` runtime builds and
serialises its objects (docs/protocol.md §11 has the measurement), and the decoder reads
straight into the Structs the JSON decoder fills, so one session serves both encodings.

Payload bytes pass as they are, both ways: `data` of a publication is the JSON a `/ws` or
JSON client published (and must be JSON when a Protobuf client publishes it: the hub's
history, relays and `/ws` frames carry JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from hub import centrifugo_frames as cf

# Writing

_VARINT_1 = [bytes((n,)) for n in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _VARINT_1[value]
    value &= 0xFFFFFFFFFFFFFFFF  # negative int32/int64: ten bytes, two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delimit(message: bytes) -> bytes:
    """A message with its varint length before it: one unit of a binary frame."""
    return _varint(len(message)) + message


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


class _Writer:
    """One message's fields, in field order; a default value writes nothing (proto3)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def uint(self, number: int, value: int) -> None:
        if value:
            self.parts += (_key(number, 0), _varint(value))

    def flag(self, number: int, value: bool) -> None:
        if value:
            self.parts += (_key(number, 0), b"\x01")

    def blob(self, number: int, value: bytes | None) -> None:
        if value:
            self.parts += (_key(number, 2), _varint(len(value)), value)

    def text(self, number: int, value: str) -> None:
        if value:
            self.blob(number, value.encode())

    def message(self, number: int, value: bytes | None) -> None:
        """An embedded message; present even when empty (an empty result is a result)."""
        if value is not None:
            self.parts += (_key(number, 2), _varint(len(value)), value)

    def raw(self, number: int, value: msgspec.Raw | None) -> None:
        if value is not None and len(value):
            self.blob(number, bytes(value))

    def done(self) -> bytes:
        return b"".join(self.parts)


def _entry(key: str, value: bytes) -> bytes:
    """A map entry: key 1, value 2."""
    w = _Writer()
    w.text(1, key)
    w.message(2, value)
    return w.done()


def client_info(info: cf.ClientInfo) -> bytes:
    w = _Writer()
    w.text(1, info.user)
    w.text(2, info.client)
    w.raw(3, info.conn_info)
    w.raw(4, info.chan_info)
    return w.done()


def publication(pub: cf.Publication) -> bytes:
    w = _Writer()
    w.raw(4, pub.data)
    if pub.info is not None:
        w.message(5, client_info(pub.info))
    w.uint(6, pub.offset)
    if pub.tags:
        for key, value in pub.tags.items():
            entry = _Writer()
            entry.text(1, key)
            entry.text(2, value)
            w.message(7, entry.done())
    w.flag(8, pub.delta)
    w.uint(9, pub.time)
    return w.done()


def _string_field(key: bytes, value: bytes) -> bytes:
    return key + _varint(len(value)) + value if value else b""


def publication_parts(channel: str, pub: cf.Publication) -> list[bytes]:
    """`Reply{push{channel, pub}}`, delimited, as pieces to join once into the frame: the
    hot path, so written out by hand. The payload is written last (field order is free in
    protobuf) and the lengths are summed rather than nested, so it is copied once, where
    the frame is joined."""
    fields = []
    info = pub.info
    if info is not None:
        body = _string_field(b"\x0a", info.user.encode()) + _string_field(
            b"\x12", info.client.encode())
        if info.conn_info is not None and len(info.conn_info):
            body += b"\x1a" + _varint(len(info.conn_info)) + bytes(info.conn_info)
        fields.append(b"\x2a" + _varint(len(body)) + body)
    if pub.offset:
        fields.append(b"\x30" + _varint(pub.offset))
    if pub.tags:
        for key, value in pub.tags.items():
            entry = _string_field(b"\x0a", key.encode()) + _string_field(
                b"\x12", value.encode())
            fields.append(b"\x3a" + _varint(len(entry)) + entry)
    if pub.delta:
        fields.append(b"\x40\x01")
    if pub.time:
        fields.append(b"\x48" + _varint(pub.time))
    data: Any = pub.data
    size = len(data)
    if size:
        fields.append(b"\x22" + _varint(size))
    head = b"".join(fields)
    pub_size = len(head) + size
    push_head = _string_field(b"\x12", channel.encode()) + b"\x22" + _varint(pub_size)
    push_size = len(push_head) + pub_size
    reply_head = b"\x22" + _varint(push_size)
    return [_varint(len(reply_head) + push_size) + reply_head + push_head + head, data]


def _info_only(info: cf.ClientInfo) -> bytes:
    w = _Writer()
    w.message(1, client_info(info))
    return w.done()


def push(value: cf.Push) -> bytes:
    w = _Writer()
    w.text(2, value.channel)
    if value.pub is not None:
        w.message(4, publication(value.pub))
    if value.join is not None:
        w.message(5, _info_only(value.join.info))
    if value.leave is not None:
        w.message(6, _info_only(value.leave.info))
    if value.unsubscribe is not None:
        u = _Writer()
        u.uint(2, value.unsubscribe.code)
        u.text(3, value.unsubscribe.reason)
        w.message(7, u.done())
    if value.message is not None:
        m = _Writer()
        m.raw(1, value.message.data)
        w.message(8, m.done())
    if value.subscribe is not None:
        s, sub = _Writer(), value.subscribe
        s.flag(1, sub.recoverable)
        s.text(4, sub.epoch)
        s.uint(5, sub.offset)
        s.flag(6, sub.positioned)
        s.raw(7, sub.data)
        w.message(9, s.done())
    if value.disconnect is not None:
        d = _Writer()
        d.uint(1, value.disconnect.code)
        d.text(2, value.disconnect.reason)
        d.flag(3, value.disconnect.reconnect)
        w.message(11, d.done())
    return w.done()


def subscribe_result(result: cf.SubscribeResult) -> bytes:
    w = _Writer()
    w.flag(1, result.expires)
    w.uint(2, result.ttl)
    w.flag(3, result.recoverable)
    w.text(6, result.epoch)
    for pub in result.publications:
        w.message(7, publication(pub))
    w.flag(8, result.recovered)
    w.uint(9, result.offset)
    w.flag(10, result.positioned)
    w.raw(11, result.data)
    w.flag(12, result.was_recovering)
    w.flag(13, result.delta)
    return w.done()


def _connect_result(result: cf.ConnectResult) -> bytes:
    w = _Writer()
    w.text(1, result.client)
    w.text(2, result.version)
    w.flag(3, result.expires)
    w.uint(4, result.ttl)
    w.raw(5, result.data)
    for channel, sub in (result.subs or {}).items():
        w.message(6, _entry(channel, subscribe_result(sub)))
    w.uint(7, result.ping)
    w.flag(8, result.pong)
    w.text(9, result.session)
    w.text(10, result.node)
    return w.done()


def _refresh_result(result: cf.RefreshResult) -> bytes:
    w = _Writer()
    w.text(1, result.client)
    w.text(2, result.version)
    w.flag(3, result.expires)
    w.uint(4, result.ttl)
    return w.done()


def _sub_refresh_result(result: cf.SubRefreshResult) -> bytes:
    w = _Writer()
    w.flag(1, result.expires)
    w.uint(2, result.ttl)
    return w.done()


def _presence_result(result: cf.PresenceResult) -> bytes:
    w = _Writer()
    for client, info in result.presence.items():
        w.message(1, _entry(client, client_info(info)))
    return w.done()


def _presence_stats_result(result: cf.PresenceStatsResult) -> bytes:
    w = _Writer()
    w.uint(1, result.num_clients)
    w.uint(2, result.num_users)
    return w.done()


def _history_result(result: cf.HistoryResult) -> bytes:
    w = _Writer()
    for pub in result.publications:
        w.message(1, publication(pub))
    w.text(2, result.epoch)
    w.uint(3, result.offset)
    return w.done()


def _error(error: cf.Error) -> bytes:
    w = _Writer()
    w.uint(1, error.code)
    w.text(2, error.message)
    w.flag(3, error.temporary)
    return w.done()


def _rpc_result(result: cf.RPCResult) -> bytes:
    w = _Writer()
    w.raw(1, result.data)
    return w.done()


def encode(reply: cf.Reply) -> bytes:
    """One `Reply`, without its length."""
    w = _Writer()
    w.uint(1, reply.id)
    if reply.error is not None:
        w.message(2, _error(reply.error))
    if reply.push is not None:
        w.message(4, push(reply.push))
    if reply.connect is not None:
        w.message(5, _connect_result(reply.connect))
    if reply.subscribe is not None:
        w.message(6, subscribe_result(reply.subscribe))
    if reply.unsubscribe is not None:
        w.message(7, b"")
    if reply.publish is not None:
        w.message(8, b"")
    if reply.presence is not None:
        w.message(9, _presence_result(reply.presence))
    if reply.presence_stats is not None:
        w.message(10, _presence_stats_result(reply.presence_stats))
    if reply.history is not None:
        w.message(11, _history_result(reply.history))
    if reply.rpc is not None:
        w.message(13, _rpc_result(reply.rpc))
    if reply.refresh is not None:
        w.message(14, _refresh_result(reply.refresh))
    if reply.sub_refresh is not None:
        w.message(15, _sub_refresh_result(reply.sub_refresh))
    return w.done()


def encode_push(value: cf.Push) -> bytes:
    """`Reply{push}` as one delimited unit: the fan-out's frame body."""
    body = push(value)
    reply = _key(4, 2) + _varint(len(body)) + body
    return _varint(len(reply)) + reply


PING = b"\x00"
"""The server's ping: an empty `Reply`, delimited."""


# Reading


class _Malformed(ValueError):
    pass


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while True:
        if position >= end:
            raise _Malformed("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than ten bytes")


Field = tuple[int, int, Any]  # number, wire type, value (int or bytes)


def _fields(data: bytes) -> Iterator[Field]:
    """The fields of one message, in order; unknown numbers are the caller's to skip."""
    position, end = 0, len(data)
    while position < end:
        key, position = _read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire_type == 0:
            value, position = _read_varint(data, position)
            yield number, 0, value
        elif wire_type == 2:
            size, position = _read_varint(data, position)
            if position + size > end:
                raise _Malformed("length past the end of the message")
            yield number, 2, data[position:position + size]
            position += size
        elif wire_type in {1, 5}:
            size = 8 if wire_type == 1 else 4
            if position + size > end:
                raise _Malformed("truncated fixed-size field")
            yield number, wire_type, data[position:position + size]
            position += size
        else:
            raise _Malformed(f"unsupported wire type {wire_type}")


# How each field of a request is read: (name, kind). Kinds: "str", "bytes", "json" (bytes
# that must be JSON: they travel on as msgspec.Raw), "bool", "uint", "int32", or a reader.
_Reader = Callable[[bytes], Any]
_Schema = dict[int, tuple[str, Any]]

_JSON = msgspec.json.Decoder(msgspec.Raw)


def _as_json(value: bytes, name: str) -> msgspec.Raw:
    if not value:
        return cf.NO_RAW
    try:
        raw: msgspec.Raw = _JSON.decode(value)
    except msgspec.DecodeError:
        raise _Malformed(f"`{name}` is not JSON (the hub carries JSON payloads)") from None
    return raw


def _scalar(kind: str, wire_type: int, value: Any, name: str) -> Any:
    if kind in ("str", "bytes", "json"):
        if wire_type != 2:
            raise _Malformed(f"`{name}`: wrong wire type")
        if kind == "bytes":
            return bytes(value)
        if kind == "json":
            return _as_json(bytes(value), name)
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise _Malformed(f"`{name}` is not UTF-8") from None
    if wire_type != 0:
        raise _Malformed(f"`{name}`: wrong wire type")
    if kind == "bool":
        return bool(value)
    if kind == "int32":
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value & 0x80000000 else value
    if kind == "int64":
        return value - (1 << 64) if value & (1 << 63) else value
    return value  # uint


def _read(schema: _Schema, data: bytes) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for number, wire_type, value in _fields(data):
        spec = schema.get(number)
        if spec is None:
            continue  # unknown field: skipped, as protobuf does
        name, kind = spec
        if callable(kind):
            if wire_type != 2:
                raise _Malformed(f"`{name}`: wrong wire type")
            kind(values, name, bytes(value))
        else:
            values[name] = _scalar(kind, wire_type, value, name)
    return values


_DEFAULTS = {"str": "", "bytes": b"", "bool": False, "uint": 0, "int32": 0, "int64": 0}


def _struct(
    schema: _Schema, cls: type[Any], required: tuple[str, ...] = ()
) -> Callable[[dict[str, Any], str, bytes], None]:
    """A request: absent fields are their proto3 defaults, except `required` JSON payloads
    (as in the JSON encoding, a publish without data is a bad command)."""
    defaults = {name: _DEFAULTS[kind] for name, kind in schema.values() if kind in _DEFAULTS}

    def read(values: dict[str, Any], name: str, data: bytes) -> None:
        fields = _read(schema, data)
        for missing in required:
            if not fields.get(missing):
                raise _Malformed(f"`{name}` without `{missing}`")
        values[name] = cls(**{**defaults, **fields})
    return read


def _map(value_reader: Callable[[bytes], Any]) -> Callable[[dict[str, Any], str, bytes], None]:
    def read(values: dict[str, Any], name: str, data: bytes) -> None:
        entry = _read({1: ("key", "str"), 2: ("value", "bytes")}, data)
        values.setdefault(name, {})[entry.get("key", "")] = value_reader(entry.get("value", b""))
    return read


def _present(values: dict[str, Any], name: str, data: bytes) -> None:
    """A method the hub reads nothing of (ping, send): only that it was sent."""
    values[name] = _MARK


_MARK = msgspec.Raw(b"{}")

def _utf8(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise _Malformed("a header is not UTF-8") from None


_SUBSCRIBE: _Schema = {
    1: ("channel", "str"), 2: ("token", "str"), 3: ("recover", "bool"), 6: ("epoch", "str"),
    7: ("offset", "uint"), 8: ("data", "json"), 9: ("positioned", "bool"),
    10: ("recoverable", "bool"), 11: ("join_leave", "bool"), 12: ("delta", "str"),
    14: ("flag", "int64"),
}
_SERVER_SUB: _Schema = {3: ("recover", "bool"), 6: ("epoch", "str"), 7: ("offset", "uint"),
                        12: ("delta", "str")}
_CONNECT: _Schema = {
    1: ("token", "str"), 2: ("data", "json"), 4: ("name", "str"), 5: ("version", "str"),
    3: ("subs", _map(lambda data: cf.ServerSubscriptionRequest(**_read(_SERVER_SUB, data)))),
    6: ("headers", _map(_utf8)),
}
_HISTORY: _Schema = {
    1: ("channel", "str"), 7: ("limit", "int32"), 9: ("reverse", "bool"),
    8: ("since", _struct({1: ("offset", "uint"), 2: ("epoch", "str")}, cf.StreamPosition)),
}
_CHANNEL: _Schema = {1: ("channel", "str")}
_COMMAND: _Schema = {
    1: ("id", "uint"),
    4: ("connect", _struct(_CONNECT, cf.ConnectRequest)),
    5: ("subscribe", _struct(_SUBSCRIBE, cf.SubscribeRequest)),
    6: ("unsubscribe", _struct(_CHANNEL, cf.UnsubscribeRequest)),
    7: ("publish", _struct({1: ("channel", "str"), 2: ("data", "json")}, cf.PublishRequest,
                           ("data",))),
    8: ("presence", _struct(_CHANNEL, cf.PresenceRequest)),
    9: ("presence_stats", _struct(_CHANNEL, cf.PresenceStatsRequest)),
    10: ("history", _struct(_HISTORY, cf.HistoryRequest)),
    11: ("ping", _present),
    12: ("send", _present),
    # rpc data are any bytes (they go to the rpc hook as b64data, never into a channel)
    13: ("rpc", _struct({1: ("data", "bytes"), 2: ("method", "str")}, cf.RpcRequest)),
    14: ("refresh", _struct({1: ("token", "str")}, cf.RefreshRequest)),
    15: ("sub_refresh", _struct({1: ("channel", "str"), 2: ("token", "str")},
                                cf.SubRefreshRequest)),
}


def decode_command(message: bytes) -> cf.Command:
    """One `Command` (without its length). Raises cf.BadCommand, with the id when the id
    could be read, as the JSON decoder does."""
    try:
        values = _read(_COMMAND, message)
        command_id = values.get("id", 0)
        if command_id >= 2**32:
            raise _Malformed("id out of range")
        return cf.Command(**values)
    except (_Malformed, TypeError, msgspec.ValidationError) as exc:
        raise cf.BadCommand(str(exc), _id_of(message)) from None


def _id_of(message: bytes) -> int | None:
    """The id of a command that did not decode, when it comes first and reads."""
    try:
        key, position = _read_varint(message, 0)
        if key != 1 << 3:
            return None
        value, _ = _read_varint(message, position)
    except _Malformed:
        return None
    return value if 0 < value < 2**32 else None


def split_frame(frame: bytes) -> tuple[list[bytes], str | None]:
    """The delimited messages of one binary frame, and what was wrong after the last good
    one (None: nothing)."""
    messages: list[bytes] = []
    position, end = 0, len(frame)
    while position < end:
        try:
            size, start = _read_varint(frame, position)
        except _Malformed as exc:
            return messages, str(exc)
        if start + size > end:
            return messages, "length past the end of the frame"
        messages.append(frame[start:start + size])
        position = start + size
    return messages, None


_EMULATION: _Schema = {1: ("node", "str"), 2: ("session", "str"), 3: ("data", "bytes")}


def decode_emulation_request(body: bytes) -> tuple[str, str, bytes]:
    """A `POST /emulation` body in the Protobuf encoding (Centrifugo's `EmulationRequest`:
    node 1, session 2, data 3, the commands as they would fill a binary frame): node,
    session and data. Raises ValueError, saying what is wrong."""
    try:
        values = _read(_EMULATION, body)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None
    return values.get("node", ""), values.get("session", ""), values.get("data", b"")
