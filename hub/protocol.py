"""Frames of PROTOCOL §3 as msgspec Structs: decoding of client frames and encoding of
server frames happen here and nowhere else.

`Message`, `Join`, `Leave` and `Disconnect` are also what travels between nodes through
the broker, so a node decodes a relayed publication once and encodes its frame once.
"""

from __future__ import annotations

from typing import Any

import msgspec

from hub.errors import ErrorCode, HubError


class Since(msgspec.Struct, frozen=True):
    offset: int
    epoch: str


# Client → server

NO_RAW = msgspec.Raw()
"""An absent raw field. msgspec decodes no `Raw | None`, and it leaves a default out of an
encoding only when it is this very object (an empty Raw of one's own encodes as nothing)."""


class _Command(msgspec.Struct, tag_field="type", kw_only=True):
    id: int | None = None


# Fields without a default are required: a frame without them fails to decode and is
# answered `bad_request`, while a present but empty `channel` is `invalid_channel`.


class Auth(_Command, tag="auth"):
    token: str


class Subscribe(_Command, tag="subscribe"):
    channel: str
    since: Since | None = None


class Unsubscribe(_Command, tag="unsubscribe"):
    channel: str


class Publish(_Command, tag="publish"):
    channel: str
    data: msgspec.Raw
    event: str | None = None


class PresenceRequest(_Command, tag="presence"):
    channel: str


class HistoryRequest(_Command, tag="history"):
    channel: str
    since: Since | None = None
    limit: int | None = None


class Refresh(_Command, tag="refresh"):
    token: str


class Ping(_Command, tag="ping"):
    pass


class Rpc(_Command, tag="rpc"):
    """A call of the application's rpc hook (PROTOCOL §13); `data` is any JSON value."""

    method: str
    data: msgspec.Raw = NO_RAW


Command = (
    Auth | Subscribe | Unsubscribe | Publish | PresenceRequest | HistoryRequest | Refresh | Ping
    | Rpc
)
COMMAND_TYPES = frozenset(
    {"auth", "subscribe", "unsubscribe", "publish", "presence", "history", "refresh", "ping",
     "rpc"}
)


class _Head(msgspec.Struct):
    """What is read of a frame that failed to decode, to answer it properly."""

    type: Any = None
    id: Any = None


_command_decoder = msgspec.json.Decoder(Command)
_head_decoder = msgspec.json.Decoder(_Head)


class BadFrame(HubError):
    def __init__(self, code: ErrorCode, message: str, frame_id: int | None) -> None:
        super().__init__(code, message)
        self.frame_id = frame_id


def decode_command(text: str | bytes) -> Command:
    """Decode one client frame; raise BadFrame with the code the contract gives."""
    try:
        command: Command = _command_decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise _explain(text, exc) from None
    except RecursionError:  # nested deeper than msgspec follows
        raise BadFrame(ErrorCode.BAD_REQUEST, "frame nested too deeply", None) from None
    return command


def _read_head(text: str | bytes) -> _Head | None:
    try:
        return _head_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None


def frame_id_of(text: str | bytes) -> int | None:
    """The `id` of a frame refused unread (rate limit), so its error still echoes it."""
    head = _read_head(text)
    return head.id if head is not None and type(head.id) is int else None


def _explain(text: str | bytes, exc: msgspec.DecodeError) -> BadFrame:
    head = _read_head(text)
    if head is None:
        return BadFrame(ErrorCode.BAD_REQUEST, "frame is not a JSON object", None)
    frame_id = head.id if type(head.id) is int else None
    if head.type is None:
        return BadFrame(ErrorCode.BAD_REQUEST, "missing field `type`", frame_id)
    if not isinstance(head.type, str) or head.type not in COMMAND_TYPES:
        return BadFrame(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {head.type!r}", frame_id)
    return BadFrame(ErrorCode.BAD_REQUEST, str(exc), frame_id)


# Server → client (and between nodes)


class _Frame(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class Welcome(_Frame, tag="welcome"):
    client: str
    user: str
    node: str
    expires: int | None
    ping_interval: float
    id: int | None = None
    data: msgspec.Raw = NO_RAW  # the connect hook's `data` (PROTOCOL §13)


class Message(_Frame, tag="message"):
    """A publication as it travels between nodes and is kept in history. `client` and
    `info` (the publishing connection and its token's `info`, for client publishes) are for
    protocols that show them (Centrifugo's); `/ws` frames leave them out (`on_ws`)."""

    channel: str
    data: msgspec.Raw
    ts: int
    event: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    offset: int | None = None
    epoch: str | None = None
    client: str | None = None
    info: msgspec.Raw = NO_RAW

    def on_ws(self) -> Message:
        """As a `/ws` frame shows it (PROTOCOL §3)."""
        if self.client is None and self.info is NO_RAW:
            return self
        return msgspec.structs.replace(self, client=None, info=NO_RAW)


class Join(_Frame, tag="join"):
    """`info` (the token's) travels between nodes for protocols that show it; `/ws` frames
    leave it out."""

    channel: str
    user: str
    client: str
    info: msgspec.Raw = NO_RAW


class Leave(_Frame, tag="leave"):
    channel: str
    user: str
    client: str
    info: msgspec.Raw = NO_RAW


class Disconnect(_Frame, tag="disconnect"):
    """Node-to-node only: close every connection of `user` (sent on its `@user` channel),
    or only `client`, sparing those in `whitelist`."""

    user: str
    code: int
    reason: str = ""
    client: str | None = None
    whitelist: list[str] | None = None


class ServerSubscribe(_Frame, tag="server_subscribe"):
    """Node-to-node only (on the `@user` channel): subscribe every connection of `user`
    (or only `client`) to `channel`, recovering from `since` (PROTOCOL §15). `data` goes
    to protocols that show it (Centrifugo's subscribe push)."""

    user: str
    channel: str
    client: str | None = None
    since: Since | None = None
    data: msgspec.Raw = NO_RAW


class ServerUnsubscribe(_Frame, tag="server_unsubscribe"):
    """Node-to-node only: unsubscribe every connection of `user` (or only `client`)."""

    user: str
    channel: str
    client: str | None = None


class ServerRefresh(_Frame, tag="server_refresh"):
    """Node-to-node only: a new expiry for every connection of `user` (or only `client`),
    as Centrifugo's server API `refresh`: `expired` closes it as expired, `expire_at`
    (unix s) moves its expiry, None removes it; `info` replaces its token's `info`."""

    user: str
    client: str | None = None
    expired: bool = False
    expire_at: int | None = None
    info: msgspec.Raw = NO_RAW


ServerCommand = ServerSubscribe | ServerUnsubscribe | ServerRefresh
"""What the server API asks of a user's connections, wherever they are."""


class ConnectionSummary(msgspec.Struct, frozen=True):
    """One connection as `/api/connections` lists it (PROTOCOL §9). `since` is unix s."""

    client: str
    user: str
    node: str
    remote: str
    user_agent: str
    protocol: str
    subscriptions: list[str]
    since: int


class ConnectionsQuery(_Frame, tag="connections_query"):
    """Node-to-node only, on the asked node's control channel: its connections after client
    id `after` (in client id order) that match, at most `limit`; answered on `reply_to`."""

    request: str
    reply_to: str
    limit: int
    after: str = ""
    user: str | None = None
    channel: str | None = None


class ConnectionsPage(_Frame, tag="connections_page"):
    """Node-to-node only: the answer to a `ConnectionsQuery`; `more` when matches are left."""

    request: str
    node: str
    connections: list[ConnectionSummary]
    more: bool = False


class Reset(_Frame, tag="reset"):
    channel: str
    epoch: str
    offset: int


class Subscribed(_Frame, tag="subscribed"):
    channel: str
    id: int | None = None
    offset: int | None = None
    epoch: str | None = None
    recovered: bool | None = None


class Unsubscribed(_Frame, tag="unsubscribed"):
    channel: str
    id: int | None = None


class Published(_Frame, tag="published"):
    channel: str
    id: int | None = None
    offset: int | None = None
    epoch: str | None = None


class ClientInfo(msgspec.Struct, omit_defaults=True, frozen=True):
    """One subscriber as presence shows it; `node` is dropped from client frames."""

    client: str
    user: str
    node: str | None = None
    info: msgspec.Raw | None = None


class PresenceReply(_Frame, tag="presence"):
    channel: str
    clients: list[ClientInfo]
    id: int | None = None


class HistoryItem(msgspec.Struct, omit_defaults=True):
    offset: int
    data: msgspec.Raw
    ts: int
    event: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")


class HistoryReply(_Frame, tag="history"):
    channel: str
    epoch: str
    offset: int
    messages: list[HistoryItem]
    id: int | None = None


class Refreshed(_Frame, tag="refreshed"):
    expires: int | None
    id: int | None = None


class RpcReply(_Frame, tag="rpc"):
    id: int | None = None
    data: msgspec.Raw = NO_RAW


class Pong(_Frame, tag="pong"):
    id: int | None = None


class Error(_Frame, tag="error"):
    code: str
    message: str
    id: int | None = None


class Emulation(_Frame, tag="emulation"):
    """Node-to-node only: a batch of commands for an emulated session (PROTOCOL §15), sent
    to the node that holds it on that node's inbox channel; that node answers `id` on the
    inbox channel of `reply_to`. `data` is a JSON batch's text; `binary`, when present, a
    Protobuf batch's bytes (base64 in the JSON of the relay) instead."""

    session: str
    data: str
    reply_to: str = ""
    id: int = 0
    binary: bytes | None = None

    @property
    def batch(self) -> str | bytes:
        return self.binary if self.binary is not None else self.data


class EmulationAnswer(_Frame, tag="emulation_answer"):
    """Node-to-node only: what became of a routed `Emulation` batch (an HTTP status)."""

    id: int
    status: int


Relayed = (
    Message | Join | Leave | Disconnect | ServerSubscribe | ServerUnsubscribe | ServerRefresh
    | ConnectionsQuery | ConnectionsPage | Emulation | EmulationAnswer
)
"""What one node hands to the others through the broker."""

_encoder = msgspec.json.Encoder()
_relayed_decoder = msgspec.json.Decoder(Relayed)


def encode(frame: msgspec.Struct) -> bytes:
    return _encoder.encode(frame)


def decode_relayed(payload: bytes) -> Relayed:
    relayed: Relayed = _relayed_decoder.decode(payload)
    return relayed


def history_item(message: Message) -> HistoryItem:
    assert message.offset is not None
    return HistoryItem(message.offset, message.data, message.ts, message.event, message.from_)

