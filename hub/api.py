"""`HubClient`: a typed async client of the HTTP API (PROTOCOL §9), for backends that run
outside the hub's process. (An application that embeds the hub publishes in-process:
`hub.embed`.)

    async with HubClient("http://127.0.0.1:8000", api_key="...") as hub:
        reply = await hub.publish("feed:news", {"text": "hello"})
        print(reply.offset, reply.epoch)

Replies are the Structs of `hub.api_types`, the ones the endpoints encode; an error reply
raises `HubApiError` with the contract's code and the HTTP status.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from hub.api_types import (
    BatchBody,
    BatchCommand,
    BatchItemReply,
    BatchPublish,
    BatchReply,
    BatchSend,
    BroadcastBody,
    BroadcastItem,
    BroadcastReply,
    ChannelsReply,
    ConnectionsReply,
    DisconnectBody,
    Empty,
    ErrorReply,
    HistoryMessage,
    HistoryReply,
    NamespacesReply,
    Position,
    PresenceClient,
    PresenceReply,
    PublishBody,
    PublishReply,
    SendBody,
    StatsReply,
    StatsTotal,
    SubscribeBody,
    UnsubscribeBody,
)
from hub.errors import CloseCode
from hub.presence import NodeStats
from hub.protocol import ConnectionSummary

__all__ = [
    "BatchCommand", "BatchItemReply", "BatchReply", "BroadcastItem", "BroadcastReply",
    "ChannelsReply", "ConnectionSummary", "ConnectionsReply", "HistoryMessage", "HistoryReply",
    "HubApiError", "HubClient", "NamespacesReply", "NodeStats", "PresenceClient",
    "PresenceReply", "PublishReply", "StatsReply", "StatsTotal",
    "broadcast_command", "publish_command", "send_command",
]

ReplyT = TypeVar("ReplyT", bound=msgspec.Struct)
_encoder = msgspec.json.Encoder()


class HubApiError(Exception):
    """The API answered an error: `code` is the contract's (`bad_request`,
    `invalid_channel`, `unauthorized`, `forbidden`, `unavailable`, ...), `status` the HTTP
    status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def channel_path(channel: str) -> str:
    """A channel as one path segment. `/` is escaped too, and `.`, so that `.` and `..` are
    not dot segments an HTTP client would remove."""
    return quote(channel, safe="").replace(".", "%2E")


def publish_command(channel: str, data: Any, event: str | None = None) -> BatchCommand:
    return BatchCommand(publish=BatchPublish(channel, _raw(data), event))


def broadcast_command(channels: list[str], data: Any, event: str | None = None) -> BatchCommand:
    return BatchCommand(broadcast=BroadcastBody(channels, _raw(data), event))


def send_command(user: str, data: Any, event: str | None = None) -> BatchCommand:
    return BatchCommand(send=BatchSend(user, _raw(data), event))


def _raw(data: Any) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(data))


class HubClient:
    """One hub node or load balancer; `api_key` is `HUB_API_KEY` (None in dev mode).

    Pass `http` to bring your own `httpx.AsyncClient` (its base URL is ignored; this client
    then does not close it)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # the calls

    async def publish(self, channel: str, data: Any, event: str | None = None) -> PublishReply:
        """Publish to one channel; `data` is any JSON-encodable value (or `msgspec.Raw`)."""
        body = PublishBody(channel, _raw(data), event)
        return await self._post("/api/publish", body, PublishReply)

    async def broadcast(
        self, channels: list[str], data: Any, event: str | None = None
    ) -> BroadcastReply:
        """The same data to many channels; a bad channel fails its own item only."""
        body = BroadcastBody(channels, _raw(data), event)
        return await self._post("/api/broadcast", body, BroadcastReply)

    async def send(self, user: str, data: Any, event: str | None = None) -> None:
        """A personal message to every connection of `user`, on any node."""
        await self._post("/api/send", SendBody(user, _raw(data), event), Empty)

    async def batch(self, commands: list[BatchCommand]) -> BatchReply:
        """Many publish, broadcast and send commands (`publish_command(...)`, ...) in one
        request: one reply per command, in order, a failed one with its own `error`.
        Publications to one channel keep their order; the node sends those to different
        channels to the broker together."""
        return await self._post("/api/batch", BatchBody(commands), BatchReply)

    async def disconnect(
        self,
        user: str,
        code: int = int(CloseCode.DISCONNECTED_BY_API),
        reason: str = "",
        *,
        client: str | None = None,
    ) -> None:
        """Close every connection of `user` (or only its connection `client`), on any node."""
        await self._post("/api/disconnect", DisconnectBody(user, code, reason, client), Empty)

    async def subscribe(
        self,
        user: str,
        channel: str,
        *,
        since: tuple[int, str] | None = None,
        client: str | None = None,
    ) -> None:
        """Subscribe every connection of `user` (only `client`, when given), on any node, to
        `channel`; `since` is `(offset, epoch)`: each recovers the messages after it."""
        position = Position(*since) if since is not None else None
        await self._post("/api/subscribe", SubscribeBody(user, channel, position, client), Empty)

    async def unsubscribe(self, user: str, channel: str, *, client: str | None = None) -> None:
        """Unsubscribe every connection of `user` (only `client`, when given), on any node."""
        await self._post("/api/unsubscribe", UnsubscribeBody(user, channel, client), Empty)

    async def presence(self, channel: str) -> PresenceReply:
        return await self._get(f"/api/presence/{channel_path(channel)}", {}, PresenceReply)

    async def history(
        self,
        channel: str,
        *,
        since: tuple[int, str] | None = None,
        limit: int | None = None,
    ) -> HistoryReply:
        """Stored messages, oldest first; `since` is `(offset, epoch)`: the messages after it."""
        params: dict[str, str | int] = {}
        if since is not None:
            params["since"], params["epoch"] = since
        if limit is not None:
            params["limit"] = limit
        return await self._get(f"/api/history/{channel_path(channel)}", params, HistoryReply)

    async def remove_history(self, channel: str) -> None:
        """Drop the channel's stored messages; its epoch and offset stay (a recovery from
        before now is not recovered)."""
        response = await self._http.delete(
            f"{self.url}/api/history/{channel_path(channel)}", headers=self._headers
        )
        _reply(response, Empty)

    async def namespaces(self) -> NamespacesReply:
        """`.namespaces`: each namespace's options, `default` among them."""
        return await self._get("/api/namespaces", {}, NamespacesReply)

    async def channels(self, prefix: str = "") -> ChannelsReply:
        """`.channels`: channel name → subscriber count, cluster-wide."""
        params: dict[str, str | int] = {"prefix": prefix} if prefix else {}
        return await self._get("/api/channels", params, ChannelsReply)

    async def stats(self) -> StatsReply:
        return await self._get("/api/stats", {}, StatsReply)

    async def connections(
        self,
        *,
        user: str | None = None,
        channel: str | None = None,
        node: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> ConnectionsReply:
        """One page of the cluster's connections; pass its `.next` as `after` for the next."""
        given = {"user": user, "channel": channel, "node": node, "limit": limit, "after": after}
        params = {name: value for name, value in given.items() if value is not None}
        return await self._get("/api/connections", params, ConnectionsReply)

    # plumbing

    async def _post(self, path: str, body: msgspec.Struct, kind: type[ReplyT]) -> ReplyT:
        headers = {**self._headers, "Content-Type": "application/json"}
        response = await self._http.post(
            self.url + path, content=_encoder.encode(body), headers=headers
        )
        return _reply(response, kind)

    async def _get(
        self, path: str, params: dict[str, str | int], kind: type[ReplyT]
    ) -> ReplyT:
        response = await self._http.get(self.url + path, params=params, headers=self._headers)
        return _reply(response, kind)


def _reply(response: httpx.Response, kind: type[ReplyT]) -> ReplyT:
    if response.is_success:
        return msgspec.json.decode(response.content, type=kind)
    try:
        error = msgspec.json.decode(response.content, type=ErrorReply).error
    except msgspec.DecodeError:
        raise HubApiError(response.status_code, "http_error", response.text[:200]) from None
    raise HubApiError(response.status_code, error.code, error.message)
