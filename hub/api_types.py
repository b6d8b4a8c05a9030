"""Bodies and replies of the HTTP API (PROTOCOL §9) as msgspec Structs.

One set of types, used three ways: `hub.endpoints` decodes the bodies and encodes the replies
with them, `hub.openapi` builds `/openapi.json` from their JSON schemas, and `hub.api`'s
client sends the bodies and decodes the replies into them. So the document, the server and
the client cannot drift apart.

Constraints that the endpoints check themselves, with the contract's own error codes
(a channel name is `invalid_channel`, not `bad_request`), are given to the schema only
(`extra_json_schema`), never to the decoder.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from hub.errors import CloseCode, ErrorCode
from hub.presence import NodeStats
from hub.protocol import ConnectionSummary
from hub.settings import Namespace

CHANNEL_PATTERN = r"^(?:[A-Za-z0-9_\-:.=/]{1,255}|@[\s\S]{1,128})$"
"""What `hub.channels.is_valid` accepts: a name, or `@` and a user id of 1-128 characters."""

Channel = Annotated[str, msgspec.Meta(extra_json_schema={
    "pattern": CHANNEL_PATTERN,
    "description": "1-255 characters of A-Z a-z 0-9 _ - : . = /, or a personal channel @<user>",
})]
User = Annotated[str, msgspec.Meta(extra_json_schema={
    "minLength": 1, "maxLength": 128, "description": "a user id (a token's `sub`)",
})]
Data = Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={
    "description": "any JSON value, delivered as it is",
})]
AnyData = Annotated[Any, msgspec.Meta(extra_json_schema={"description": "any JSON value"})]
ErrorName = Annotated[str, msgspec.Meta(extra_json_schema={
    "enum": [str(code) for code in ErrorCode] + ["unauthorized"],
})]
# A JSON Schema integer includes 4003.0, so the decoder takes a float too; the endpoint
# refuses one with a fraction.
CloseCodeNumber = Annotated[int | float, msgspec.Meta(extra_json_schema={
    "type": "integer",
    "oneOf": [{"const": 1000}, {"minimum": 3000, "maximum": 4999}],
    "description": "WebSocket close code: 1000 or 3000-4999",
})]
ConnInfo = Annotated[Any, msgspec.Meta(extra_json_schema={
    "anyOf": [{"type": "object"}, {"type": "null"}],
    "description": "the token's `info` claim",
})]


# request bodies


class PublishBody(msgspec.Struct, omit_defaults=True):
    channel: Channel
    data: Data
    event: str | None = None


class BroadcastBody(msgspec.Struct, omit_defaults=True):
    # No pattern on the items: a bad channel fails its own item of the reply, not the call.
    channels: list[str]
    data: Data
    event: str | None = None


class SendBody(msgspec.Struct, omit_defaults=True):
    user: User
    data: Data
    event: str | None = None


MAX_BATCH_COMMANDS = 10_000


# In a batch a bad channel or user fails its own command (`invalid_channel`, `bad_request`),
# not the request: so no pattern or length on them here.
class BatchPublish(msgspec.Struct, omit_defaults=True):
    channel: str
    data: Data
    event: str | None = None


class BatchSend(msgspec.Struct, omit_defaults=True):
    user: str
    data: Data
    event: str | None = None


class BatchCommand(msgspec.Struct, omit_defaults=True):
    """Exactly one of the three, with the body of its own call (another number of them
    fails that command with `bad_request`)."""

    publish: BatchPublish | None = None
    broadcast: BroadcastBody | None = None
    send: BatchSend | None = None


class BatchBody(msgspec.Struct):
    """Up to 10,000 commands (and 1 MiB), answered in order; publications to one channel
    keep their order, those to different channels go to the broker together."""

    commands: list[BatchCommand]


class DisconnectBody(msgspec.Struct, omit_defaults=True):
    user: User
    code: CloseCodeNumber = int(CloseCode.DISCONNECTED_BY_API)
    reason: Annotated[str, msgspec.Meta(extra_json_schema={
        "description": "close reason; cut to the 123 bytes a close frame holds",
    })] = ""
    client: Annotated[str, msgspec.Meta(extra_json_schema={
        "minLength": 1, "maxLength": 128,
        "description": "only this connection of the user (a `client` id), not all of them",
    })] | None = None


class Position(msgspec.Struct):
    """A place in a channel's history: the messages after `offset` in `epoch`."""

    offset: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    epoch: str


ClientId = Annotated[str, msgspec.Meta(extra_json_schema={
    "description": "only this connection of the user (its `client` id)",
})]


class SubscribeBody(msgspec.Struct, omit_defaults=True):
    """Subscribe every connection of `user` (or only `client`), on any node, to `channel`;
    with `since`, each recovers the messages after it (PROTOCOL §5, §15)."""

    user: User
    channel: Channel
    since: Position | None = None
    client: ClientId | None = None


class UnsubscribeBody(msgspec.Struct, omit_defaults=True):
    """Unsubscribe every connection of `user` (or only `client`), on any node."""

    user: User
    channel: Channel
    client: ClientId | None = None


# replies


class ErrorDetail(msgspec.Struct):
    code: ErrorName
    message: str


class ErrorReply(msgspec.Struct):
    """Every error of the API: `{"error": {"code": ..., "message": ...}}`."""

    error: ErrorDetail


class Empty(msgspec.Struct):
    """`{}`: done (send, disconnect; publish on a channel without history)."""


class PublishReply(msgspec.Struct, omit_defaults=True):
    """`{}`, or the message's `offset` and `epoch` on a channel with history."""

    offset: int | None = None
    epoch: str | None = None


class BroadcastItem(msgspec.Struct, omit_defaults=True):
    """One channel of a broadcast: its position (on a channel with history), or its error."""

    channel: str
    offset: int | None = None
    epoch: str | None = None
    error: ErrorDetail | None = None


class BroadcastReply(msgspec.Struct):
    results: list[BroadcastItem]


class BatchItemReply(msgspec.Struct, omit_defaults=True):
    """The reply of the command's own call under its name, or `error` (that command's
    alone: the others were carried out)."""

    publish: PublishReply | None = None
    broadcast: BroadcastReply | None = None
    send: Empty | None = None
    error: ErrorDetail | None = None


class BatchReply(msgspec.Struct):
    replies: list[BatchItemReply]


class PresenceClient(msgspec.Struct, omit_defaults=True):
    client: str
    user: str
    node: str
    info: ConnInfo = None


class PresenceReply(msgspec.Struct):
    channel: str
    clients: list[PresenceClient]


class HistoryMessage(msgspec.Struct, omit_defaults=True):
    offset: int
    data: AnyData
    ts: Annotated[int, msgspec.Meta(extra_json_schema={"description": "unix ms"})]
    event: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")


class HistoryReply(msgspec.Struct):
    channel: str
    epoch: str
    offset: int
    messages: list[HistoryMessage]


class ChannelsReply(msgspec.Struct):
    channels: dict[str, int]


class StatsTotal(msgspec.Struct):
    nodes: int
    connections: int
    users: int
    subscriptions: int
    channels: int


class StatsReply(msgspec.Struct):
    nodes: list[NodeStats]
    total: StatsTotal


class ConnectionsReply(msgspec.Struct, omit_defaults=True):
    """A page of `/api/connections`, in (node, client) order. `next`: the cursor to pass as
    `after` for the following page, absent on the last one. `unanswered`: nodes that did
    not answer in time (their connections are missing from this page)."""

    connections: list[ConnectionSummary]
    next: str | None = None
    unanswered: list[str] = msgspec.field(default_factory=list)


class NamespacesReply(msgspec.Struct):
    """The options of every configured namespace, `default` always among them (what a
    channel whose prefix names no namespace gets)."""

    namespaces: dict[str, Namespace]


class HealthReply(msgspec.Struct):
    status: Literal["ok"]


class ReadyReply(msgspec.Struct):
    status: Literal["ready", "draining", "broker unavailable"]


BODIES: tuple[type[msgspec.Struct], ...] = (
    PublishBody, BroadcastBody, SendBody, DisconnectBody, SubscribeBody, UnsubscribeBody,
    BatchBody,
)
REPLIES: tuple[type[msgspec.Struct], ...] = (
    ErrorReply, Empty, PublishReply, BroadcastReply, BatchReply, PresenceReply, HistoryReply,
    ChannelsReply, StatsReply, ConnectionsReply, NamespacesReply, HealthReply, ReadyReply,
)
