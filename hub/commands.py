"""What a connection may do, whichever wire protocol it speaks: connect, subscribe,
unsubscribe, publish, presence, history, refresh, disconnect.

Permissions and limits live here; subscription state lives in `hub.subscriptions`, what
follows from it (presence, join/leave) in `hub.membership`, connections in `hub.hub`. A session
decodes its protocol's frames, calls these, and encodes the answers its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec

from hub import protocol as p
from hub.auth import AuthFailed, Identity
from hub.broker import StreamPosition
from hub.channels import (
    Permissions,
    check_client_channel,
    is_personal,
    is_valid,
    personal_channel,
)
from hub.errors import BrokerUnavailable, ErrorCode, HubError
from hub.hooks import (
    Context,
    HookDisconnected,
    HookFailed,
    HookRefused,
    PublishRequest,
    RPCRequest,
    SubRefreshRequest,
    SubscribeRequest,
    payload,
    result_payload,
)
from hub.hub import Connection
from hub.metrics import close_code_label
from hub.node import Node
from hub.subscriptions import Joined

log = logging.getLogger("hub.commands")
T = TypeVar("T")
# A refresh or sub_refresh hook call that failed is made again this much later.
HOOK_RETRY_SECONDS = 5
# The hook context of a connection that has none (a transport that keeps no upgrade
# headers): its calls forward no header and carry no `meta`.
NO_CONTEXT = Context([], None)


class Client(Connection, Protocol):
    """A connection as commands see it."""

    identity: Identity
    permissions: Permissions
    hook: Context | None

    def subscription_expired(self, channel: str) -> None:
        """A hooked subscription ended at its `expire_at`: tell the client."""


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
        data: msgspec.Raw | None = None,
    ) -> None:
        """`joined` gets what the subscription starts from (for the reply) before any
        message of the channel reaches the client. `granted`: a subscription token allows
        it; `delta`: publications go as fossil deltas (the client's codec writes them);
        `data`: the client's, for the subscribe hook (Centrifugo's subscribe `data`)."""
        namespace = client.permissions.check_subscribe(channel, granted)
        if self._subscriptions.has(client, channel):
            raise HubError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel}")
        # A proxy namespace asks the hook, unless a subscription token grants it.
        hooked = namespace.subscribe == "proxy" and not self.settings.dev and not granted
        await self._join(client, channel, since, joined, delta=delta,
                         hooked=hooked, data=data)

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
        hooked: bool = False,
        data: msgspec.Raw | None = None,
    ) -> None:
        """`hooked`: ask the subscribe hook first (a client's subscribe in a `proxy`
        namespace, PROTOCOL §13)."""
        subscriptions = self._subscriptions
        limit = self.settings.max_subscriptions
        if limit and subscriptions.count_of(client) >= limit:
            raise HubError(ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions")
        if not self.node.broker.up:
            raise BrokerUnavailable()
        expire_at = await self._subscribe_hook(client, channel, data) if hooked else 0
        position = StreamPosition(since.offset, since.epoch) if since is not None else None
        if await subscriptions.join(client, channel, position, joined, delta=delta):
            if expire_at:
                self._expire_subscription_at(client, channel, expire_at)
            await self.node.membership.settled()  # its next command sees it in presence

    async def subscribe_server_side(
        self, client: Client, channels: list[str],
        joined: Callable[[str], Callable[[Joined], None]],
    ) -> None:
        """The connect hook's `channels`, as the server API subscribes (no permission
        check); a name that is not a client channel, or one over the limit, is skipped
        (and logged)."""
        for channel in channels:
            if not is_valid(channel) or is_personal(channel):
                log.warning("connect hook: skipped channel %r (not a client channel)", channel)
                continue
            try:
                await self.server_subscribe(client, channel, None, joined(channel))
            except HubError as exc:
                log.warning("connect hook: channel %r skipped: %s", channel, exc.message)

    def check_read(self, client: Client, channel: str, granted: bool = False) -> None:
        """Presence and history: what subscribe allows (`granted`: whatever the token
        says); on a `proxy` namespace, being subscribed (the hook let it in)."""
        namespace = client.permissions.check_subscribe(channel, granted)
        if namespace.subscribe == "proxy" and not self.settings.dev \
                and not self._subscriptions.has(client, channel):
            raise HubError(ErrorCode.FORBIDDEN, f"not subscribed to {channel}")

    async def rpc(self, client: Client, method: str, data: msgspec.Raw) -> msgspec.Raw:
        """The rpc hook's `data` for the call (PROTOCOL §13)."""
        hooks = self.node.hooks
        if not hooks.has("rpc"):
            raise HubError(ErrorCode.UNAVAILABLE, "rpc is not available: no rpc hook")
        hook = client.hook or NO_CONTEXT
        request = RPCRequest(**hook.wire, client=client.client_id, user=client.user,
                             method=method, **payload(data, hook), meta=hook.meta)
        result = await self._hooked(client, hooks.rpc(hook, request))
        return result_payload(result.data, result.b64data)

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
        if namespace.publish == "proxy" and not self.settings.dev:
            data = await self._publish_hook(client, channel, data)
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
        self.check_read(client, channel, granted)
        members = await self.node.presence_of(channel)
        return [p.ClientInfo(m.client, m.user, None, m.info) for m in members]

    async def history(
        self, client: Client, channel: str, since: p.Since | None, limit: int | None
    ) -> p.HistoryReply:
        self.check_read(client, channel)
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

    # hooks (PROTOCOL §13)

    async def _hooked(self, client: Client, call: Awaitable[T]) -> T:
        """A hook's result; its `disconnect` closes the connection (and the command is
        answered `internal`: the close follows)."""
        try:
            return await call
        except HookDisconnected as disconnect:
            client.close(disconnect.code, disconnect.reason)
            raise HubError(ErrorCode.INTERNAL, "disconnected by the application") from None

    async def _subscribe_hook(
        self, client: Client, channel: str, data: msgspec.Raw | None
    ) -> int:
        """Ask the subscribe hook; its `expire_at` (0: none) ends the subscription."""
        hook = client.hook or NO_CONTEXT
        request = SubscribeRequest(**hook.wire, client=client.client_id, user=client.user,
                                   channel=channel, **payload(data, hook), meta=hook.meta)
        result = await self._hooked(client, self.node.hooks.subscribe(hook, request))
        return result.expire_at

    async def _publish_hook(self, client: Client, channel: str, data: msgspec.Raw) -> msgspec.Raw:
        """Ask the publish hook; a result with `data` replaces the client's."""
        hook = client.hook or NO_CONTEXT
        request = PublishRequest(**hook.wire, client=client.client_id, user=client.user,
                                 channel=channel, **payload(data, hook), meta=hook.meta)
        result = await self._hooked(client, self.node.hooks.publish(hook, request))
        if result.data is msgspec.UNSET and result.b64data is None:
            return data
        return result_payload(result.data, result.b64data)

    def _expire_subscription_at(self, client: Client, channel: str, expire_at: float) -> None:
        """At `expire_at` the sub_refresh hook extends the subscription or ends it (without
        that hook it ends); a failed call is made again HOOK_RETRY_SECONDS later."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, expire_at - time.time())
        loop.call_later(delay, lambda: self.node.spawn(self._sub_refresh(client, channel)))

    async def _sub_refresh(self, client: Client, channel: str) -> None:
        if not self._subscriptions.has(client, channel):
            return
        hooks = self.node.hooks
        expire_at = 0
        if hooks.has("sub_refresh"):
            hook = client.hook or NO_CONTEXT
            request = SubRefreshRequest(**hook.wire, client=client.client_id,
                                        user=client.user,
                                        channel=channel, meta=hook.meta)
            try:
                result = await hooks.sub_refresh(hook, request)
            except HookDisconnected as disconnect:
                client.close(disconnect.code, disconnect.reason)
                return
            except (HookFailed, HookRefused):
                self._expire_subscription_at(client, channel, time.time() + HOOK_RETRY_SECONDS)
                return
            if not result.expired:
                expire_at = result.expire_at
        if expire_at > time.time():
            self._expire_subscription_at(client, channel, expire_at)
            return
        with contextlib.suppress(HubError):
            await self.unsubscribe(client, channel)
            client.subscription_expired(channel)
