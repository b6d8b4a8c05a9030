"""What a connection may do, whichever wire protocol it speaks: connect, subscribe,
unsubscribe, publish, presence, history, refresh, disconnect.

Permissions and limits live here; subscription state lives in `hub.subscriptions`, what
follows from it (presence, join/leave) in `hub.membership`, connections in `hub.hub`. A session
decodes its protocol's frames, calls these, and encodes the answers its own way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import msgspec

from hub import protocol as p
from hub.auth import AuthFailed, Identity
from hub.broker import StreamPosition
from hub.channels import Permissions, check_client_channel, personal_channel
from hub.errors import BrokerUnavailable, ErrorCode, HubError
from hub.hub import Connection
from hub.metrics import close_code_label
from hub.node import Node
from hub.subscriptions import Joined

log = logging.getLogger("hub.commands")


class Client(Connection, Protocol):
    """A connection as commands see it."""

    identity: Identity
    permissions: Permissions


class ClientCommands:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.metrics = node.metrics
        self._subscriptions = node.subscriptions

    # a connection's life

    async def connect(self, client: Client) -> None:
        """Register a welcomed connection and subscribe it to its personal channel."""
        node = self.node
        node.hub.add(client)
        node.idle.clear()
        self.metrics.connections_accepted.inc()
        if client.user:  # an anonymous connection (Centrifugo's protocol) has none
            await self._subscriptions.join_personal(client, personal_channel(client.user))

    async def disconnect(self, client: Client, code: int) -> None:
        node = self.node
        node.hub.remove(client)
        if not node.hub.sessions:
            node.idle.set()
        self.metrics.disconnections.labels(close_code_label(code)).inc()
        # Presence and leave events follow from the subscriptions (hub.membership).
        await self._subscriptions.leave_all(client)

    # commands

    async def subscribe(
        self,
        client: Client,
        channel: str,
        since: p.Since | None,
        joined: Callable[[Joined], None],
        *,
        granted: bool = False,
        delta: bool = False,
    ) -> None:
        """`joined` gets what the subscription starts from (for the reply) before any
        message of the channel reaches the client. `granted`: a subscription token allows
        it; `delta`: publications go as fossil deltas (the client's codec writes them)."""
        client.permissions.check_subscribe(channel, granted)
        if self._subscriptions.has(client, channel):
            raise HubError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel}")
        await self._join(client, channel, since, joined, delta=delta)

    async def server_subscribe(
        self,
        client: Client,
        channel: str,
        since: p.Since | None,
        joined: Callable[[Joined], None],
    ) -> bool:
        """A subscribe the server API asks for (PROTOCOL §15): the backend decides, so no
        permission is checked, but the subscription limit holds. False: it was subscribed
        already, and nothing changes."""
        if self._subscriptions.has(client, channel):
            return False
        await self._join(client, channel, since, joined)
        return True

    async def _join(
        self,
        client: Client,
        channel: str,
        since: p.Since | None,
        joined: Callable[[Joined], None],
        *,
        delta: bool = False,
    ) -> None:
        subscriptions = self._subscriptions
        limit = self.settings.max_subscriptions
        if limit and subscriptions.count_of(client) >= limit:
            raise HubError(ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions")
        if not self.node.broker.up:
            raise BrokerUnavailable()
        position = StreamPosition(since.offset, since.epoch) if since is not None else None
        if await subscriptions.join(client, channel, position, joined, delta=delta):
            await self.node.membership.settled()  # its next command sees it in presence

    async def unsubscribe(self, client: Client, channel: str) -> None:
        check_client_channel(channel)
        if not await self._subscriptions.leave(client, channel):
            raise HubError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel}")
        await self.node.membership.settled()

    async def server_unsubscribe(self, client: Client, channel: str) -> bool:
        """An unsubscribe the server API asks for; False: it was not subscribed."""
        if not await self._subscriptions.leave(client, channel):
            return False
        await self.node.membership.settled()
        return True

    async def publish(
        self, client: Client, channel: str, data: msgspec.Raw, event: str | None
    ) -> StreamPosition | None:
        namespace = client.permissions.check_publish(channel)
        position = await self.node.publish(
            channel, data, event, from_user=client.user, from_client=client.client_id,
            from_info=client.identity.info, source="client",
        )
        events = self.node.events
        if events is not None and namespace.events_client_publish:
            events.client_publish(channel, client.user, client.client_id, data)
        return position

    async def presence(
        self, client: Client, channel: str, *, granted: bool = False
    ) -> list[p.ClientInfo]:
        """Members without their node: that is the operators' business. `granted`: the
        protocol allows it whatever the token says (Centrifugo's, to a subscriber)."""
        client.permissions.check_subscribe(channel, granted)
        members = await self.node.presence_of(channel)
        return [p.ClientInfo(m.client, m.user, None, m.info) for m in members]

    async def history(
        self, client: Client, channel: str, since: p.Since | None, limit: int | None
    ) -> p.HistoryReply:
        client.permissions.check_subscribe(channel)
        return await self.node.history(channel, since, limit)

    async def refresh(self, client: Client, token: str) -> Identity:
        """The identity a valid token for the same user gives; the client takes it on."""
        try:
            identity = await self.node.authenticator.verify(token)
        except AuthFailed as exc:
            raise HubError(ErrorCode.FORBIDDEN, f"refresh refused: {exc}") from None
        if identity.user != client.user:
            raise HubError(ErrorCode.FORBIDDEN, "refresh token is for another user")
        return identity
