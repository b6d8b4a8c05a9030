"""Requests and results of Centrifugo's server HTTP API (PROTOCOL §16) as msgspec Structs,
with its error codes: what `hub.centrifugo_api` decodes and encodes, and what
`/openapi.json` describes (as `api_types` is for the hub's own API).

Field names and what is left out when empty mirror Centrifugo's api.proto; unknown request
fields are ignored, as Centrifugo's decoder does. Integer fields are checked in
`__post_init__` (`_whole`), so a body that breaks them is unreadable (HTTP 400).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from hub import centrifugo_frames as cf
from hub import protocol as p
from hub.errors import ErrorCode

# A JSON Schema integer includes 4.0, so a whole number with a fraction part of zero is
# taken as well (as §9 takes a close code); `_whole` checks each one in `__post_init__`.
Whole = Annotated[int | float, msgspec.Meta(extra_json_schema={
    "type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1})]
Offset = Annotated[int | float, msgspec.Meta(extra_json_schema={
    "type": "integer", "minimum": 0, "maximum": 2**63 - 1})]
NO_RAW = p.NO_RAW

# Error codes of Centrifugo's server API (apiproto/errors.go).
INTERNAL, UNKNOWN_CHANNEL, NOT_FOUND, BAD_REQUEST, NOT_AVAILABLE, UNRECOVERABLE = (
    100, 102, 104, 107, 108, 112
)
MESSAGES = {
    INTERNAL: "internal server error", UNKNOWN_CHANNEL: "unknown channel",
    NOT_FOUND: "not found", BAD_REQUEST: "bad request", NOT_AVAILABLE: "not available",
    UNRECOVERABLE: "unrecoverable position",
}
# `X-Centrifugo-Error-Mode: transport`: the HTTP status of each code (MapErrorToHTTPCode).
TRANSPORT_STATUS = {INTERNAL: 500, UNKNOWN_CHANNEL: 404, NOT_FOUND: 404, BAD_REQUEST: 400,
                    NOT_AVAILABLE: 400, UNRECOVERABLE: 416}
HUB_CODES = {
    ErrorCode.BAD_REQUEST: BAD_REQUEST,
    ErrorCode.INVALID_CHANNEL: UNKNOWN_CHANNEL,
    ErrorCode.FORBIDDEN: NOT_AVAILABLE,  # a feature off in the channel's namespace
    ErrorCode.UNAVAILABLE: INTERNAL,  # Centrifugo answers a broker failure 100 too
    ErrorCode.INTERNAL: INTERNAL,
}


class CallFailed(Exception):
    """A call answered `{"error": ...}`."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = f"{MESSAGES[code]}: {message}" if message else MESSAGES[code]


class Unreadable(CallFailed):
    """The body (or a batch command) does not decode into the method's request: 107 in a
    batch's reply, HTTP 400 for a whole call, as Centrifugo answers it."""

    def __init__(self, message: str) -> None:
        super().__init__(BAD_REQUEST, message)


# requests (api.proto's fields; unknown ones are ignored, as Centrifugo's decoder does)


def _whole(value: int | float, what: str, low: int = -(2**63), high: int = 2**63 - 1) -> int:
    """An integer field's value; ValueError (the body is unreadable: 400) otherwise."""
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"`{what}` must be an integer")
    if not low <= value <= high:
        raise ValueError(f"`{what}` must be between {low} and {high}")
    return int(value)


def _absent() -> msgspec.Raw:
    """A raw field left out (a factory, not a default: /openapi.json's schemas hold no
    default that is not JSON)."""
    return NO_RAW



class StreamPosition(msgspec.Struct):
    offset: Offset = 0
    epoch: str = ""

    def __post_init__(self) -> None:
        self.offset = _whole(self.offset, "offset", 0)


class PublishRequest(msgspec.Struct, kw_only=True):
    channel: str = ""
    data: msgspec.Raw = msgspec.field(default_factory=_absent)
    b64data: str = ""
    skip_history: bool = False
    tags: dict[str, str] | None = None
    idempotency_key: str = ""
    delta: bool = False
    version: Offset = 0
    version_epoch: str = ""

    def __post_init__(self) -> None:
        self.version = _whole(self.version, "version", 0)


class BroadcastRequest(msgspec.Struct, kw_only=True):
    channels: list[str] = msgspec.field(default_factory=list)
    data: msgspec.Raw = msgspec.field(default_factory=_absent)
    b64data: str = ""
    skip_history: bool = False
    tags: dict[str, str] | None = None
    idempotency_key: str = ""
    delta: bool = False
    version: Offset = 0
    version_epoch: str = ""

    def __post_init__(self) -> None:
        self.version = _whole(self.version, "version", 0)


class SubscribeRequest(msgspec.Struct, kw_only=True):
    channel: str = ""
    user: str = ""
    expire_at: Whole = 0
    info: msgspec.Raw = msgspec.field(default_factory=_absent)
    b64info: str = ""
    client: str = ""
    data: msgspec.Raw = msgspec.field(default_factory=_absent)
    b64data: str = ""
    recover_since: StreamPosition | None = None
    override: msgspec.Raw = msgspec.field(default_factory=_absent)
    session: str = ""

    def __post_init__(self) -> None:
        self.expire_at = _whole(self.expire_at, "expire_at")


class UnsubscribeRequest(msgspec.Struct, kw_only=True):
    channel: str = ""
    user: str = ""
    client: str = ""
    session: str = ""


class DisconnectSpec(msgspec.Struct, kw_only=True):
    code: Whole = 0
    reason: str = ""

    def __post_init__(self) -> None:
        self.code = _whole(self.code, "code")


class DisconnectRequest(msgspec.Struct, kw_only=True):
    user: str = ""
    disconnect: DisconnectSpec | None = None
    client: str = ""
    whitelist: list[str] | None = None
    session: str = ""


class ChannelRequest(msgspec.Struct, kw_only=True):
    """presence, presence_stats, history_remove."""

    channel: str = ""


class HistoryRequest(msgspec.Struct, kw_only=True):
    channel: str = ""
    limit: Whole = 0
    since: StreamPosition | None = None
    reverse: bool = False

    def __post_init__(self) -> None:
        self.limit = _whole(self.limit, "limit")


class RefreshRequest(msgspec.Struct, kw_only=True):
    user: str = ""
    client: str = ""
    expired: bool = False
    expire_at: Whole = 0
    info: msgspec.Raw = msgspec.field(default_factory=_absent)
    session: str = ""

    def __post_init__(self) -> None:
        self.expire_at = _whole(self.expire_at, "expire_at")


class ChannelsRequest(msgspec.Struct, kw_only=True):
    pattern: str = ""


class InfoRequest(msgspec.Struct):
    pass


class BatchRequest(msgspec.Struct, kw_only=True):
    """Each command is `{"<method>": {...}}`; the first method key it has counts."""

    commands: list[dict[str, msgspec.Raw]] = msgspec.field(default_factory=list)
    parallel: bool = False


# results (fields Centrifugo leaves out when empty are left out; those the SDKs index are
# always written)


class Empty(msgspec.Struct):
    pass


class PublishResult(msgspec.Struct, omit_defaults=True):
    offset: int = 0
    epoch: str = ""


class ErrorBody(msgspec.Struct):
    code: int
    message: str


class PublishResponse(msgspec.Struct, omit_defaults=True):
    """One channel of a broadcast."""

    error: ErrorBody | None = None
    result: PublishResult | None = None


class BroadcastResult(msgspec.Struct):
    responses: list[PublishResponse]


class PresenceResult(msgspec.Struct):
    presence: dict[str, cf.ClientInfo]  # by client id


class PresenceStatsResult(msgspec.Struct):
    num_clients: int
    num_users: int


class HistoryResult(msgspec.Struct):
    publications: list[cf.Publication]  # as the client protocol's
    epoch: str
    offset: int


class ChannelInfo(msgspec.Struct):
    num_clients: int


class ChannelsResult(msgspec.Struct):
    channels: dict[str, ChannelInfo]


class NodeResult(msgspec.Struct, omit_defaults=True):
    uid: str
    name: str
    version: str = ""
    num_clients: int = 0
    num_users: int = 0
    num_subs: int = 0
    num_channels: int = 0
    uptime: int = 0


class InfoResult(msgspec.Struct):
    nodes: list[NodeResult]


class Reply(msgspec.Struct, omit_defaults=True):
    error: ErrorBody | None = None
    result: Any = None


class ErrorReply(msgspec.Struct):
    """Every error: `{"error": {"code": ..., "message": ...}}`."""

    error: ErrorBody


class BatchResult(msgspec.Struct):
    replies: list[dict[str, Any]]
