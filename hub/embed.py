"""The hub inside another Starlette (or FastAPI) application: mounted under a path, started
and stopped by the host's lifespan, and published to in-process, without an HTTP round trip.

    from hub.embed import EmbeddedHub
    from hub.settings import load_settings

    realtime = EmbeddedHub(load_settings({"dev": True}))
    app = Starlette(routes=[..., realtime.mount("/realtime")], lifespan=realtime.lifespan)

    # in a handler:
    await realtime.publish("news", {"text": "hello"})

Starlette does not run a mounted app's lifespan, so the host runs it: pass
`realtime.lifespan` as the host's lifespan, or `async with realtime.running():` inside the
host's own. Under the mount every path of the hub moves with it: `/realtime/ws`,
`/realtime/api/...`, `/realtime/admin`, `/realtime/openapi.json`.

Graceful shutdown: `hub serve` drains on SIGTERM (PROTOCOL §7). An embedding application's
server closes connections its own way on shutdown (uvicorn: 1012); to drain as `hub serve`
does, `await realtime.drain()` before the server stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.routing import Mount

from hub.api_types import (
    BatchCommand,
    BatchReply,
    HistoryMessage,
    HistoryReply,
    PresenceClient,
    PresenceReply,
    PublishReply,
)
from hub.app import create_app
from hub.channels import check_name
from hub.endpoints import run_batch
from hub.errors import CloseCode, ErrorCode, HubError, close_reason
from hub.events import EventsCallable
from hub.hooks import Hooks
from hub.node import Node, node_of
from hub.protocol import Since
from hub.settings import Settings

_encoder = msgspec.json.Encoder()


class EmbeddedHub:
    """One hub node in this process: its ASGI app (`app`, or `mount(path)`), its lifespan,
    and the server-side calls of the HTTP API as methods that take plain Python data.

    Errors are `hub.errors.HubError` with the contract's code (`invalid_channel`,
    `forbidden`, `unavailable`, ...)."""

    def __init__(
        self, settings: Settings, *, hooks: Hooks | None = None,
        on_events: EventsCallable | None = None,
    ) -> None:
        """`hooks`: async callables for the hooks of PROTOCOL §13 (`hub.hooks.Hooks`); they
        get the upgrade request as Starlette's `HTTPConnection`, so the host's session
        and auth work in them. `on_events`: an async callable that gets each batch of
        events (PROTOCOL §14, a list of dicts) instead of `HUB_EVENTS_URL`; raising means
        "send it again"."""
        self.settings = settings
        self.app: Starlette = create_app(settings, hooks=hooks, on_events=on_events)
        self.node: Node = node_of(self.app)

    def mount(self, path: str = "/realtime", name: str | None = "hub") -> Mount:
        """A route for the host's route list."""
        return Mount(path, app=self.app, name=name)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EmbeddedHub]:
        """Start the node (broker, presence, heartbeat); stop it on exit."""
        async with self.app.router.lifespan_context(self.app):
            yield self

    @contextlib.asynccontextmanager
    async def lifespan(self, host: Any) -> AsyncIterator[None]:
        """A lifespan for a host that has no other: `Starlette(lifespan=hub.lifespan)`."""
        async with self.running():
            yield

    async def drain(self) -> None:
        """PROTOCOL §7: refuse new connections, close the open ones with 1012 spread over
        `HUB_DRAIN_SECONDS`, leave presence."""
        await self.node.drain()

    # in-process calls

    async def publish(self, channel: str, data: Any, event: str | None = None) -> PublishReply:
        """Publish to a channel (`@user` included); `data` is any JSON-encodable value.
        The reply has `offset` and `epoch` on a channel with history."""
        position = await self.node.publish(channel, _raw(data), event)
        if position is None:
            return PublishReply()
        return PublishReply(offset=position.offset, epoch=position.epoch)

    async def send(self, user: str, data: Any, event: str | None = None) -> None:
        """A personal message to every connection of `user`, on any node."""
        await self.node.send_to_user(user, _raw(data), event)

    async def batch(self, commands: list[BatchCommand]) -> BatchReply:
        """Many publish, broadcast and send commands (`hub.api.publish_command(...)`, ...),
        as `/api/batch` runs them: one reply per command, in order, a failed one with its
        own `error`; publications to different channels go to the broker together."""
        return BatchReply(await run_batch(self.node, commands))

    async def disconnect(
        self, user: str, code: int = int(CloseCode.DISCONNECTED_BY_API), reason: str = ""
    ) -> None:
        """Close every connection of `user`, on any node."""
        if not (code == 1000 or 3000 <= code <= 4999):
            raise HubError(ErrorCode.BAD_REQUEST, "`code` must be 1000 or 3000-4999")
        await self.node.disconnect_user(user, code, close_reason(reason))

    async def subscribe(
        self,
        user: str,
        channel: str,
        *,
        since: tuple[int, str] | None = None,
        client: str | None = None,
    ) -> None:
        """Subscribe every connection of `user` (only `client`, when given), on any node,
        to `channel` (PROTOCOL §15); `since` is `(offset, epoch)`."""
        await self.node.subscribe_user(user, channel, Since(*since) if since else None,
                                       client=client)

    async def unsubscribe(self, user: str, channel: str, *, client: str | None = None) -> None:
        """Unsubscribe every connection of `user` (only `client`, when given), on any node."""
        check_name(channel)
        await self.node.unsubscribe_user(user, channel, client=client)

    async def presence(self, channel: str) -> PresenceReply:
        """Who is subscribed to `channel`, cluster-wide."""
        members = await self.node.presence_of(channel)
        return PresenceReply(channel, [
            PresenceClient(member.client, member.user, member.node or self.node.node_id,
                           None if member.info is None else msgspec.json.decode(member.info))
            for member in members
        ])

    async def history(
        self, channel: str, *, since: tuple[int, str] | None = None, limit: int | None = None
    ) -> HistoryReply:
        """Stored messages, oldest first, with their data decoded."""
        reply = await self.node.history(channel, Since(*since) if since else None, limit)
        messages = [
            HistoryMessage(item.offset, msgspec.json.decode(item.data), item.ts, item.event,
                           item.from_)
            for item in reply.messages
        ]
        return HistoryReply(reply.channel, reply.epoch, reply.offset, messages)


def _raw(data: Any) -> msgspec.Raw:
    return data if isinstance(data, msgspec.Raw) else msgspec.Raw(_encoder.encode(data))
