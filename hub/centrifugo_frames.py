"""Frames of Centrifugo's client protocol v2 in its JSON encoding (PROTOCOL §11), as msgspec
Structs: the decoding of commands and the encoding of replies and pushes of
`/connection/websocket` happen here and nowhere else. What the SDKs do with them is in
docs/centrifugo-notes.md.

Framing. A WebSocket *text* frame holds one or more JSON messages separated by exactly one
`\\n` (centrifuge-js sends `connect` and its `subscribe`s in one frame). Client to server every
message is a `Command`: `{"id": N, "<method>": {...}}`, and `{}` (no id, no method) is the
client's pong. Server to client every message is a `Reply`: `{"id": N, "<method>": {...}}`
or `{"id": N, "error": {...}}` answering command N, `{"push": {...}}` for everything
asynchronous, and `{}` (`PING`) for the server's ping. Several replies and pushes may share
one frame (`join_frame`).

Field names and defaults mirror centrifugal/protocol's client.proto: every outgoing field
equal to its default is left out (Go's easyjson does the same), except the fields the SDKs
index without a fallback, which have no default here and so are always written (a
`ClientInfo`'s `user` and `client`, a push's `reason`, `info` of join and leave, `message` of
an error, the whole of the presence, presence_stats and history results). Incoming unknown
fields are ignored (the SDKs send `name`, `version`, `flag`, `delta`, `join_leave`...).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import msgspec

from hub import protocol as p
from hub.errors import CloseCode, HubError
from hub.errors import ErrorCode as HubErrorCode

# Codes


class ErrorCode(enum.IntEnum):
    """`error.code` of a reply (centrifuge errors.go)."""

    INTERNAL = 100
    UNAUTHORIZED = 101
    UNKNOWN_CHANNEL = 102
    PERMISSION_DENIED = 103
    METHOD_NOT_FOUND = 104
    ALREADY_SUBSCRIBED = 105
    LIMIT_EXCEEDED = 106
    BAD_REQUEST = 107
    NOT_AVAILABLE = 108
    TOKEN_EXPIRED = 109
    EXPIRED = 110
    TOO_MANY_REQUESTS = 111
    UNRECOVERABLE_POSITION = 112


ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INTERNAL: "internal server error",
    ErrorCode.UNAUTHORIZED: "unauthorized",
    ErrorCode.UNKNOWN_CHANNEL: "unknown channel",
    ErrorCode.PERMISSION_DENIED: "permission denied",
    ErrorCode.METHOD_NOT_FOUND: "method not found",
    ErrorCode.ALREADY_SUBSCRIBED: "already subscribed",
    ErrorCode.LIMIT_EXCEEDED: "limit exceeded",
    ErrorCode.BAD_REQUEST: "bad request",
    ErrorCode.NOT_AVAILABLE: "not available",
    ErrorCode.TOKEN_EXPIRED: "token expired",
    ErrorCode.EXPIRED: "expired",
    ErrorCode.TOO_MANY_REQUESTS: "too many requests",
    ErrorCode.UNRECOVERABLE_POSITION: "unrecoverable position",
}

TEMPORARY_ERRORS = frozenset({ErrorCode.INTERNAL, ErrorCode.TOO_MANY_REQUESTS})
"""Errors Centrifuge marks `temporary`. The SDKs retry (reconnect, resubscribe, refresh
again) only on a temporary error, a code below 100, or 109; any other error in a connect,
subscribe or refresh reply stops the connection or the subscription for good."""


class DisconnectCode(enum.IntEnum):
    """WebSocket close codes (centrifuge disconnect.go). 3000-3499 and 4000-4499: the SDKs
    reconnect; 3500-3999 and 4500-4999: they stop (centrifuge-js only when the close reason
    is non-empty, see `reason_for`)."""

    CONNECTION_CLOSED = 3000
    SHUTDOWN = 3001
    SERVER_ERROR = 3004
    EXPIRED = 3005
    SUB_EXPIRED = 3006
    SLOW = 3008
    WRITE_ERROR = 3009
    INSUFFICIENT_STATE = 3010
    FORCE_RECONNECT = 3011
    NO_PONG = 3012
    TOO_MANY_REQUESTS = 3013
    STATE_INVALIDATED = 3014
    INVALID_TOKEN = 3500
    BAD_REQUEST = 3501
    STALE = 3502
    FORCE_NO_RECONNECT = 3503
    CONNECTION_LIMIT = 3504
    CHANNEL_LIMIT = 3505
    INAPPROPRIATE_PROTOCOL = 3506
    PERMISSION_DENIED = 3507
    NOT_AVAILABLE = 3508
    TOO_MANY_ERRORS = 3509


DISCONNECT_REASONS: dict[DisconnectCode, str] = {
    DisconnectCode.CONNECTION_CLOSED: "connection closed",
    DisconnectCode.SHUTDOWN: "shutdown",
    DisconnectCode.SERVER_ERROR: "internal server error",
    DisconnectCode.EXPIRED: "connection expired",
    DisconnectCode.SUB_EXPIRED: "subscription expired",
    DisconnectCode.SLOW: "slow",
    DisconnectCode.WRITE_ERROR: "write error",
    DisconnectCode.INSUFFICIENT_STATE: "insufficient state",
    DisconnectCode.FORCE_RECONNECT: "force reconnect",
    DisconnectCode.NO_PONG: "no pong",
    DisconnectCode.TOO_MANY_REQUESTS: "too many requests",
    DisconnectCode.STATE_INVALIDATED: "state invalidated",
    DisconnectCode.INVALID_TOKEN: "invalid token",
    DisconnectCode.BAD_REQUEST: "bad request",
    DisconnectCode.STALE: "stale",
    DisconnectCode.FORCE_NO_RECONNECT: "force disconnect",
    DisconnectCode.CONNECTION_LIMIT: "connection limit",
    DisconnectCode.CHANNEL_LIMIT: "channel limit",
    DisconnectCode.INAPPROPRIATE_PROTOCOL: "inappropriate protocol",
    DisconnectCode.PERMISSION_DENIED: "permission denied",
    DisconnectCode.NOT_AVAILABLE: "not available",
    DisconnectCode.TOO_MANY_ERRORS: "too many errors",
}


class UnsubscribeCode(enum.IntEnum):
    """`code` of an unsubscribe push (centrifuge unsubscribe.go). Below 2500 the SDK
    subscription becomes unsubscribed; from 2500 on it resubscribes at once."""

    SERVER = 2000
    INSUFFICIENT_STATE = 2500
    EXPIRED = 2501
    STATE_INVALIDATED = 2502


def is_terminal(close_code: int) -> bool:
    """Whether the SDKs stop instead of reconnecting after this close code (given a
    non-empty reason). Below 3000 both reconnect, except that centrifuge-js stops on 1009."""
    return 3500 <= close_code < 4000 or 4500 <= close_code < 5000


# The hub's own codes in this protocol.

HUB_ERRORS: dict[HubErrorCode, tuple[ErrorCode, bool]] = {
    HubErrorCode.BAD_REQUEST: (ErrorCode.BAD_REQUEST, False),
    HubErrorCode.UNKNOWN_TYPE: (ErrorCode.METHOD_NOT_FOUND, False),
    HubErrorCode.INVALID_CHANNEL: (ErrorCode.UNKNOWN_CHANNEL, False),
    HubErrorCode.FORBIDDEN: (ErrorCode.PERMISSION_DENIED, False),
    HubErrorCode.ALREADY_SUBSCRIBED: (ErrorCode.ALREADY_SUBSCRIBED, False),
    # Never for `unsubscribe`: Centrifuge answers an unsubscribe from a channel the client
    # is not in with success, and both SDKs reconnect on an unsubscribe error.
    HubErrorCode.NOT_SUBSCRIBED: (ErrorCode.UNKNOWN_CHANNEL, False),
    HubErrorCode.TOO_MANY_SUBSCRIPTIONS: (ErrorCode.LIMIT_EXCEEDED, False),
    HubErrorCode.RATE_LIMITED: (ErrorCode.TOO_MANY_REQUESTS, True),
    # Broker down: temporary, or the SDK subscription stops for good on a subscribe that
    # failed during an outage (108 alone means "feature not enabled" to Centrifugo).
    HubErrorCode.UNAVAILABLE: (ErrorCode.NOT_AVAILABLE, True),
    HubErrorCode.INTERNAL: (ErrorCode.INTERNAL, True),
}
"""(code, temporary) of each hub error code (PROTOCOL §3) on `/connection/websocket`."""

HUB_CLOSES: dict[int, tuple[int, str]] = {
    CloseCode.GOING_AWAY: (DisconnectCode.SHUTDOWN, "shutdown"),
    CloseCode.BINARY_FRAME: (DisconnectCode.BAD_REQUEST, "bad request"),
    CloseCode.POLICY_VIOLATION: (DisconnectCode.TOO_MANY_ERRORS, "too many errors"),
    # Kept: centrifuge-js stops on it ("message size limit exceeded"), centrifuge-python
    # reconnects.
    CloseCode.FRAME_TOO_BIG: (CloseCode.FRAME_TOO_BIG, "message too big"),
    CloseCode.INTERNAL_ERROR: (DisconnectCode.SERVER_ERROR, "internal server error"),
    CloseCode.RESTARTING: (DisconnectCode.SHUTDOWN, "shutdown"),
    CloseCode.TRY_AGAIN_LATER: (DisconnectCode.SHUTDOWN, "try again later"),
    CloseCode.UNAUTHORIZED: (DisconnectCode.INVALID_TOKEN, "invalid token"),
    CloseCode.TOKEN_EXPIRED: (DisconnectCode.EXPIRED, "connection expired"),
    CloseCode.DISCONNECTED_BY_API: (DisconnectCode.FORCE_NO_RECONNECT, "force disconnect"),
    CloseCode.SLOW_CONSUMER: (DisconnectCode.SLOW, "slow"),
    CloseCode.TOO_MANY_COMMANDS: (DisconnectCode.TOO_MANY_REQUESTS, "too many requests"),
}
"""(close code, reason) on `/connection/websocket` for each close code of `/ws` (PROTOCOL
§3); a no-pong close is `DisconnectCode.NO_PONG`, an auth timeout `DisconnectCode.STALE`."""


def reason_for(code: int) -> str:
    """A non-empty reason for a close code: centrifuge-js takes 3500-3999 and 4500-4999 for
    terminal only with a reason, and centrifuge-python reads it as the disconnect reason.
    The reason is plain words, never valid JSON: centrifuge-js first parses the reason as
    a legacy `{"reason", "reconnect"}` object."""
    for mapped, reason in HUB_CLOSES.values():
        if mapped == code:
            return reason
    try:
        return DISCONNECT_REASONS[DisconnectCode(code)]
    except ValueError:
        return "disconnect"


# Client → server

Offset = Annotated[int, msgspec.Meta(ge=0)]
CommandId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
NO_RAW = msgspec.Raw()
"""An incoming raw field that was not sent (msgspec decodes no `Raw | None` union)."""


class StreamPosition(msgspec.Struct, frozen=True):
    offset: Offset = 0
    epoch: str = ""


class SubscribeRequest(msgspec.Struct, kw_only=True):
    """`{"channel", "recover"?, "offset"?, "epoch"?, ...}`. centrifuge-js leaves out a zero
    offset and an empty epoch; centrifuge-python always sends both with `recover`. An empty
    epoch means any epoch (Centrifuge's isStreamRecovered)."""

    channel: str
    recover: bool = False
    offset: Offset = 0
    epoch: str = ""
    # Tolerated, not acted on: subscription tokens, positioning and join/leave
    # asks, channel compaction (`flag` 1, sent on every subscribe) and fossil `delta`.
    token: str = ""
    positioned: bool = False
    recoverable: bool = False
    join_leave: bool = False
    delta: str = ""
    flag: int = 0
    data: msgspec.Raw = NO_RAW  # for the subscribe hook (PROTOCOL §13)

    @property
    def since(self) -> p.Since | None:
        """The position to recover from, when the client asks to recover."""
        return p.Since(self.offset, self.epoch) if self.recover else None


class ServerSubscriptionRequest(msgspec.Struct, kw_only=True):
    """A value of the connect command's `subs`, by channel: where the previous connection
    left a server-side subscription that the connect reply had marked `recoverable`.
    centrifuge-python sends `offset` and `epoch` even when 0 and ""."""

    recover: bool = False
    offset: Offset = 0
    epoch: str = ""
    delta: str = ""

    @property
    def since(self) -> p.Since | None:
        return p.Since(self.offset, self.epoch) if self.recover else None


class ConnectRequest(msgspec.Struct, kw_only=True):
    """`{"token"?, "name", "version"?, "data"?, "subs"?}`."""

    token: str = ""
    name: str = ""
    version: str = ""
    data: msgspec.Raw = NO_RAW
    subs: dict[str, ServerSubscriptionRequest] | None = None
    headers: dict[str, str] | None = None


class UnsubscribeRequest(msgspec.Struct):
    channel: str


class PublishRequest(msgspec.Struct):
    channel: str
    data: msgspec.Raw


class PresenceRequest(msgspec.Struct):
    channel: str


class PresenceStatsRequest(msgspec.Struct):
    channel: str


class HistoryRequest(msgspec.Struct, kw_only=True):
    """`limit` 0 (the default of both SDKs) asks for the position only; a negative limit
    for everything up to the server's cap; `reverse` for newest first."""

    channel: str
    limit: int = 0
    since: StreamPosition | None = None
    reverse: bool = False


class RefreshRequest(msgspec.Struct):
    token: str


class RpcRequest(msgspec.Struct, kw_only=True):
    """`{"method"?, "data"?}`: a call of the application's rpc hook (PROTOCOL §13). From a
    Protobuf client `data` holds its bytes as they came (any bytes: they go to the hook as
    `b64data`, never into a channel)."""

    method: str = ""
    data: msgspec.Raw = NO_RAW


class SubRefreshRequest(msgspec.Struct, kw_only=True):
    """A new subscription token for a channel subscribed with one."""

    channel: str
    token: str = ""


class Command(msgspec.Struct, kw_only=True):
    """One client message. Only the first method set counts (client.proto); a command with
    an id and no method served here is answered 104."""

    id: CommandId = 0
    connect: ConnectRequest | None = None
    subscribe: SubscribeRequest | None = None
    unsubscribe: UnsubscribeRequest | None = None
    publish: PublishRequest | None = None
    presence: PresenceRequest | None = None
    presence_stats: PresenceStatsRequest | None = None
    history: HistoryRequest | None = None
    refresh: RefreshRequest | None = None
    # Methods of the protocol the hub does not serve. `send` comes without an id and wants
    # no answer; the others get 104.
    ping: msgspec.Raw = NO_RAW
    send: msgspec.Raw = NO_RAW
    rpc: RpcRequest | None = None
    sub_refresh: SubRefreshRequest | None = None

    @property
    def method(self) -> str | None:
        """The name of the first method set, or None (a pong, or a method unknown here)."""
        for name in _METHODS:
            value = getattr(self, name)
            if value is not None and not (type(value) is msgspec.Raw and not value):
                return name
        return None

    @property
    def is_pong(self) -> bool:
        return self.id == 0 and self.method is None


_METHODS = (
    "connect", "subscribe", "unsubscribe", "publish", "presence", "presence_stats", "history",
    "ping", "send", "rpc", "refresh", "sub_refresh",
)
SERVED_METHODS = frozenset(
    {"connect", "subscribe", "unsubscribe", "publish", "presence", "presence_stats",
     "history", "refresh", "rpc", "sub_refresh"}
)


class _Head(msgspec.Struct):
    """What is read of a command that failed to decode, to answer it."""

    id: Any = None


_command_decoder = msgspec.json.Decoder(Command)
_head_decoder = msgspec.json.Decoder(_Head)


class BadCommand(HubError):
    """A message that is not a valid command. `command_id` is its id when one could be read
    (answer error 107 to it); without one, close with `DisconnectCode.BAD_REQUEST`."""

    def __init__(self, message: str, command_id: int | None) -> None:
        super().__init__(HubErrorCode.BAD_REQUEST, message)
        self.command_id = command_id


def split_frame(frame: str | bytes) -> list[bytes]:
    """The messages of one text frame, blank lines skipped."""
    data = frame.encode() if isinstance(frame, str) else frame
    if b"\n" not in data:
        return [data] if data.strip() else []
    return [line for line in data.split(b"\n") if line.strip()]


def decode_command(message: str | bytes) -> Command:
    try:
        command: Command = _command_decoder.decode(message)
    except (msgspec.DecodeError, RecursionError) as exc:  # too deep: RecursionError
        raise BadCommand(str(exc), _id_of(message)) from None
    return command


def iter_commands(frame: str | bytes) -> Iterator[Command]:
    """The commands of a frame in order; raises BadCommand at the first bad one, after the
    ones before it were taken."""
    for message in split_frame(frame):
        yield decode_command(message)


def _id_of(message: str | bytes) -> int | None:
    try:
        head = _head_decoder.decode(message)
    except (msgspec.DecodeError, RecursionError):
        return None
    value = head.id
    return value if type(value) is int and 0 < value < 2**32 else None


# Server → client


class ClientInfo(msgspec.Struct, omit_defaults=True, frozen=True):
    """A connection as others see it: in presence, join/leave and client publications.
    `conn_info` is the token's `info`."""

    user: str
    client: str
    conn_info: msgspec.Raw | None = None
    chan_info: msgspec.Raw | None = None


class Publication(msgspec.Struct, omit_defaults=True):
    """`tags` are strings only (`{"event": ..., "ts": "<unix ms>"}`); `time` (unix ms) is
    ignored by both SDKs."""

    data: msgspec.Raw
    info: ClientInfo | None = None
    offset: int = 0
    tags: dict[str, str] | None = None
    delta: bool = False
    time: int = 0


class Join(msgspec.Struct):
    info: ClientInfo


class Leave(msgspec.Struct):
    info: ClientInfo


class Unsubscribe(msgspec.Struct):
    code: int
    reason: str


class Disconnect(msgspec.Struct, omit_defaults=True):
    """Not sent over WebSocket: there a disconnect is the close frame (code, reason)."""

    code: int
    reason: str
    reconnect: bool = False


class Message(msgspec.Struct):
    data: msgspec.Raw


class SubscribePush(msgspec.Struct, omit_defaults=True):
    """A server-side subscription added while connected."""

    recoverable: bool = False
    epoch: str = ""
    offset: int = 0
    positioned: bool = False
    data: msgspec.Raw | None = None


class RefreshPush(msgspec.Struct, omit_defaults=True):
    """A new expiry the server API gave the connection (Centrifugo's server `refresh`)."""

    expires: bool = False
    ttl: int = 0


class Push(msgspec.Struct, omit_defaults=True):
    channel: str = ""
    pub: Publication | None = None
    join: Join | None = None
    leave: Leave | None = None
    unsubscribe: Unsubscribe | None = None
    message: Message | None = None
    subscribe: SubscribePush | None = None
    disconnect: Disconnect | None = None
    refresh: RefreshPush | None = None


class SubscribeResult(msgspec.Struct, omit_defaults=True):
    """Also the value type of the connect reply's `subs`. After a successful recovery
    `offset` is the position recovered from and `publications` follow it; after a failed
    one (`was_recovering` without `recovered`) `offset`/`epoch` are the stream's top and
    `publications` is empty. Without `recoverable: true` the SDKs never ask to recover."""

    expires: bool = False
    ttl: int = 0
    recoverable: bool = False
    epoch: str = ""
    publications: list[Publication] = msgspec.field(default_factory=list)
    recovered: bool = False
    offset: int = 0
    positioned: bool = False
    data: msgspec.Raw | None = None
    was_recovering: bool = False
    delta: bool = False


class ConnectResult(msgspec.Struct, omit_defaults=True):
    """With `expires` true `ttl` must be at least 1: centrifuge-python reads `ttl` without a
    fallback, and centrifuge-js refreshes at once on a missing one."""

    client: str
    version: str = ""
    expires: bool = False
    ttl: int = 0
    data: msgspec.Raw | None = None
    subs: dict[str, SubscribeResult] | None = None
    ping: int = 0
    pong: bool = False
    # Emulated and one-way connections: the session an `/emulation` POST names, and the
    # node that holds it (PROTOCOL §15).
    session: str = ""
    node: str = ""


class RefreshResult(msgspec.Struct, omit_defaults=True):
    client: str = ""
    version: str = ""
    expires: bool = False
    ttl: int = 0


class SubRefreshResult(msgspec.Struct, omit_defaults=True):
    expires: bool = False
    ttl: int = 0


class RPCResult(msgspec.Struct, omit_defaults=True):
    data: msgspec.Raw | None = None


class UnsubscribeResult(msgspec.Struct):
    pass


class PublishResult(msgspec.Struct):
    pass


class PresenceResult(msgspec.Struct):
    presence: dict[str, ClientInfo]
    """By client id."""


class PresenceStatsResult(msgspec.Struct):
    num_clients: int
    num_users: int


class HistoryResult(msgspec.Struct):
    publications: list[Publication]
    epoch: str
    offset: int


class Error(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    temporary: bool = False


class Reply(msgspec.Struct, omit_defaults=True):
    id: int = 0
    error: Error | None = None
    push: Push | None = None
    connect: ConnectResult | None = None
    subscribe: SubscribeResult | None = None
    unsubscribe: UnsubscribeResult | None = None
    publish: PublishResult | None = None
    presence: PresenceResult | None = None
    presence_stats: PresenceStatsResult | None = None
    history: HistoryResult | None = None
    rpc: RPCResult | None = None
    refresh: RefreshResult | None = None
    sub_refresh: SubRefreshResult | None = None


PING = b"{}"
"""The server's ping; the client answers `{}` when the connect reply said `pong: true`."""

_encoder = msgspec.json.Encoder()


def encode(reply: Reply) -> bytes:
    """One message. Raw newlines are stripped: `\\n` separates messages in a frame, and
    msgspec writes none itself, so any comes from a raw payload's whitespace (as
    centrifugal/protocol's Raw.MarshalJSON does)."""
    data = _encoder.encode(reply)
    return data.replace(b"\n", b"") if b"\n" in data else data


def encode_push(push: Push) -> bytes:
    return encode(Reply(push=push))


def join_frame(messages: Iterable[bytes]) -> bytes:
    """Several encoded messages as the payload of one text frame."""
    return b"\n".join(messages)


def error_reply(
    command_id: int, code: ErrorCode, message: str | None = None, temporary: bool | None = None
) -> Reply:
    """An error answer; `message` is never empty (centrifuge-python reads it without a
    fallback)."""
    return Reply(
        id=command_id,
        error=Error(
            code=code,
            message=message or ERROR_MESSAGES[code],
            temporary=code in TEMPORARY_ERRORS if temporary is None else temporary,
        ),
    )


def hub_error_reply(command_id: int, error: HubError) -> Reply:
    code, temporary = HUB_ERRORS[error.code]
    return error_reply(command_id, code, error.message or ERROR_MESSAGES[code], temporary)


def unsubscribe_push(
    channel: str, code: UnsubscribeCode = UnsubscribeCode.INSUFFICIENT_STATE
) -> Push:
    """How a `reset` (PROTOCOL §5) reaches these clients: the hub drops the subscription,
    the SDK resubscribes with recover from its last position and gets `recovered: false`."""
    reasons = {
        UnsubscribeCode.SERVER: "server unsubscribe",
        UnsubscribeCode.INSUFFICIENT_STATE: "insufficient state",
        UnsubscribeCode.EXPIRED: "subscription expired",
        UnsubscribeCode.STATE_INVALIDATED: "state invalidated",
    }
    return Push(channel=channel, unsubscribe=Unsubscribe(code=code, reason=reasons[code]))


def publication(
    data: msgspec.Raw,
    offset: int | None = None,
    ts: int | None = None,
    event: str | None = None,
    info: ClientInfo | None = None,
) -> Publication:
    """A publication with the hub's fields: `offset` (history channels), `info` (client
    publishes), `tags` with `event` and `ts` (unix ms as a string)."""
    tags: dict[str, str] = {}
    if event is not None:
        tags["event"] = event
    if ts is not None:
        tags["ts"] = str(ts)
    return Publication(data=data, info=info, offset=offset or 0, tags=tags or None)


def history_publication(item: p.HistoryItem, info: ClientInfo | None = None) -> Publication:
    return publication(item.data, item.offset, item.ts, item.event, info)


def message_publication(message: p.Message, info: ClientInfo | None = None) -> Publication:
    return publication(message.data, message.offset, message.ts, message.event, info)


TTL_MARGIN = 1.0
"""Seconds taken off a token's remaining life for `ttl`: the SDKs send `refresh` exactly
`ttl` seconds after the reply, and the hub closes the connection at `exp`."""


def token_ttl(expires_at: float, now: float, margin: float = TTL_MARGIN) -> int:
    """`ttl` for a connect or refresh reply, whole seconds, `margin` before `expires_at`.
    0 means the token is too close to its end to be taken: answer a connect 109, close a
    refresh with `DisconnectCode.EXPIRED`."""
    return max(0, math.floor(expires_at - now - margin))
