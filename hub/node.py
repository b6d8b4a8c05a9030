"""The node: builds the pieces of one hub process and runs them (start, heartbeat, drain,
stop), hears the broker (`BrokerEvents`), and is the server-side API that the HTTP
endpoints and an embedding application call: publish, send, disconnect, history, presence.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from typing import Any, cast

import msgspec

from hub import __version__
from hub import protocol as p
from hub.auth import Authenticator
from hub.broker import Broker, HistoryPage, StreamPosition
from hub.channels import check_name, is_personal, personal_channel
from hub.connections import Directory
from hub.errors import BrokerUnavailable, ErrorCode, HubError
from hub.events import Events
from hub.expiry import Expiring, ExpiryClock
from hub.hooks import HookConfig, HookMetrics, HookRunner, Hooks
from hub.hub import Connection, Hub
from hub.membership import Membership
from hub.metrics import CLIENT_PROTOCOLS, Metrics
from hub.presence import NodeSnapshot, NodeStats, Presence
from hub.process import CpuMeter, rss_bytes
from hub.settings import Settings
from hub.subscriptions import Subscriptions, history_options
from hub.tasks import cancel
from hub.wire import CLOSE_HANDSHAKE_SECONDS

log = logging.getLogger("hub.node")

HISTORY_LIMIT = 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _all_up(health: tuple[int, int]) -> bool:
    reachable, known = health
    return known > 0 and reachable == known


def node_of(app: Any) -> Node:
    """The node an app built by `create_app` carries."""
    node: Node = app.state.node
    return node


class Node:
    def __init__(
        self, settings: Settings, broker: Broker, presence: Presence, metrics: Metrics,
        hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.broker = broker
        self.presence = presence
        self.metrics = metrics
        self.hub = Hub()
        # The hub's connections are sessions, which the clock may tell that they expired.
        sessions = cast(Callable[[str], Expiring | None], self.hub.sessions.get)
        self.expiries = ExpiryClock(sessions, lambda: len(self.hub.sessions))
        self.subscriptions = Subscriptions(broker, settings, metrics)
        # Presence, join/leave and heartbeats, derived from the subscriptions.
        self.membership = Membership(settings, self.subscriptions, presence, broker, self.snapshot)
        self.authenticator = Authenticator(settings)
        self.hooks = HookRunner(HookConfig.of(settings), HookMetrics(metrics.registry), hooks)
        self.hooks.check_namespaces(settings.namespaces)
        self.started = int(time.time())
        # Monotonic time of the node's sessions (rate limits): a test moves it instead of
        # sleeping.
        self.clock: Callable[[], float] = time.monotonic
        self.draining = False
        self.directory = Directory(self)
        self.cpu = CpuMeter()
        # Where clients reach this node: the configured address, or, when it is a wildcard,
        # the local address of the first request seen (`noticed_address`).
        wildcard = settings.host in ("0.0.0.0", "::", "")
        self.address = "" if wildcard or not settings.port else f"{settings.host}:{settings.port}"
        self._tasks: set[asyncio.Task[None]] = set()
        # Server API commands (PROTOCOL §15) waiting for a connection, while it has some.
        self._server_commands: dict[Connection, list[p.ServerCommand]] = {}
        self.idle = asyncio.Event()  # set while no connection is open
        self.events: Events | None = None  # PROTOCOL §14, when somebody listens (`attach`)
        self.idle.set()
        # Channels addressed to this node rather than to subscribers (an emulated
        # session's commands, `hub.emulation`), and who takes what they carry.
        self.inboxes: dict[str, Callable[[p.Relayed], None]] = {}
        hub, subscriptions = self.hub, self.subscriptions
        metrics.connections.set_function(lambda: len(hub.sessions))
        for protocol in CLIENT_PROTOCOLS:
            metrics.connections_by_protocol.labels(protocol).set_function(
                functools.partial(hub.count_speaking, protocol)
            )
        metrics.subscriptions.set_function(lambda: subscriptions.subscription_count)
        metrics.channels.set_function(lambda: subscriptions.channel_count)
        metrics.broker_up.set_function(lambda: int(_all_up(broker.health())))
        metrics.broker_shards_up.set_function(lambda: broker.health()[0])

    @property
    def ready(self) -> bool:
        return self.broker.up and not self.draining

    @property
    def state(self) -> str:
        """What `/readyz` says: `ready`, `draining` or `broker unavailable`."""
        if self.draining:
            return "draining"
        return "ready" if self.broker.up else "broker unavailable"

    # lifecycle

    async def start(self) -> None:
        await self.presence.start()
        await self.broker.start(self)
        if self.events is not None:
            await self.events.start()
        self.membership.start()
        self.spawn(self._hear_directory())

    async def _hear_directory(self) -> None:
        """The control channel of `/api/connections`; a broker not reachable now subscribes
        it with the others when it is (it is among `channels`)."""
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.subscribe(self.directory.channel)

    def noticed_address(self, scope: Mapping[str, Any]) -> None:
        if not self.address:
            server = scope.get("server")
            if server and len(server) == 2 and server[1] is not None:
                host, port = server
                self.address = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    async def stop(self) -> None:
        await self.subscriptions.close()
        if self.events is not None:
            await self.events.stop()
        await asyncio.gather(*(cancel(task) for task in list(self._tasks)),
                             return_exceptions=True)
        for step in (self.membership.leave, self.broker.close, self.presence.close,
                     self.hooks.aclose):
            try:
                await step()
            except Exception:
                log.exception("shutdown step %s failed", step.__qualname__)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """PROTOCOL §7: refuse new connections, then close existing ones with 1012 spread
        evenly over HUB_DRAIN_SECONDS, then leave presence."""
        self.draining = True
        log.info("draining: readyz 503, closing connections")
        settings = self.settings
        loop = asyncio.get_running_loop()
        await asyncio.sleep(settings.drain_delay)
        sessions = list(self.hub.sessions.values())
        started = loop.time()
        for index, session in enumerate(sessions):
            due = started + index * settings.drain_seconds / max(1, len(sessions))
            await asyncio.sleep(max(0.0, due - loop.time()))
            session.close(1012, "node restarting")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), CLOSE_HANDSHAKE_SECONDS)
        try:
            await self.membership.leave()
        except Exception as exc:
            log.warning("leaving presence failed: %s", exc)

    # broker events

    @property
    def channels(self) -> Iterable[str]:
        return [*self.subscriptions.channels, self.directory.channel, *self.inboxes]

    def on_relayed(self, channel: str, relayed: list[p.Relayed]) -> None:
        """What the broker relayed on one channel, in order; publications that came
        together are delivered together."""
        inbox = self.inboxes.get(channel)
        if inbox is not None:
            for item in relayed:
                inbox(item)
            return
        if channel == self.directory.channel:
            self.directory.relayed(relayed)
            return
        messages: list[p.Message] = []
        for item in relayed:
            if type(item) is p.Message:
                messages.append(item)
                continue
            if messages:
                self._deliver(channel, messages)
                messages = []
            if isinstance(item, p.Join | p.Leave):
                self.subscriptions.deliver_event(channel, item)
            elif isinstance(item, p.Disconnect):
                self.hub.close_user(item.user, item.code, item.reason, item.client,
                                    item.whitelist)
            elif isinstance(item, p.ServerSubscribe | p.ServerUnsubscribe | p.ServerRefresh):
                self._server_command(item)
        if messages:
            self._deliver(channel, messages)

    def _server_command(self, command: p.ServerCommand) -> None:
        """To each of the user's connections here, in the order they came: a connection
        with commands under way queues the next behind them (a subscribe and the
        unsubscribe after it stay in that order)."""
        for session in self.hub.sessions_of(command.user, command.client):
            pending = self._server_commands.get(session)
            if pending is not None:
                pending.append(command)
                continue
            self._server_commands[session] = [command]
            self.spawn(self._run_server_commands(session))

    async def _run_server_commands(self, session: Connection) -> None:
        pending = self._server_commands[session]
        try:
            while pending:
                await session.server_command(pending.pop(0))
        finally:
            del self._server_commands[session]

    def _deliver(self, channel: str, messages: list[p.Message]) -> None:
        self.subscriptions.deliver(channel, messages)
        now = time.time()
        for message in messages:
            self.metrics.delivery_lag_seconds.observe(max(0.0, now - message.ts / 1000))

    def on_broker_up(self, reconnected: bool, channels: Collection[str]) -> None:
        if reconnected:
            self.metrics.broker_reconnects.inc()
            self.subscriptions.broker_reconnected(channels)

    def on_broker_ready(self) -> None:
        self.membership.beat_soon()  # what Redis holds of this node becomes what it has
        self.subscriptions.resume()

    def on_broker_down(self, channels: Collection[str]) -> None:
        log.warning("broker connection lost (%d channels wait); connections stay open, "
                    "commands that need it answer unavailable", len(channels))

    # the server-side API

    async def publish(
        self,
        channel: str,
        data: msgspec.Raw,
        event: str | None = None,
        *,
        from_user: str | None = None,
        from_client: str | None = None,
        from_info: msgspec.Raw | None = None,
        source: str = "api",
        skip_history: bool = False,
    ) -> StreamPosition | None:
        """Publish to a channel (`@user` included); returns the offset and epoch on a
        channel with history. A client publish names its user, connection and token info.
        `skip_history` (Centrifugo's server API) publishes without storing or an offset."""
        check_name(channel)
        options = None if skip_history else history_options(self.settings, channel)
        message = p.Message(
            channel=channel, data=data, ts=now_ms(), event=event, from_=from_user,
            client=from_client, info=from_info if from_info is not None else p.NO_RAW,
        )
        started = time.perf_counter()
        position = await self.broker.publish(channel, message, options)
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.messages_published.labels(source).inc()
        return position

    async def send_to_user(self, user: str, data: msgspec.Raw, event: str | None) -> None:
        await self.publish(personal_channel(user), data, event)

    async def disconnect_user(
        self,
        user: str,
        code: int,
        reason: str,
        *,
        client: str | None = None,
        whitelist: list[str] | None = None,
    ) -> None:
        """Close the user's connections, on any node (only `client`, when given; never
        those in `whitelist`)."""
        await self._to_user(user, p.Disconnect(
            user=user, code=code, reason=reason, client=client, whitelist=whitelist or None,
        ))

    async def subscribe_user(
        self,
        user: str,
        channel: str,
        since: p.Since | None = None,
        *,
        client: str | None = None,
        data: msgspec.Raw = p.NO_RAW,
    ) -> None:
        """Subscribe the user's connections (only `client`, when given), on any node, to
        `channel`, whatever their token allows (PROTOCOL §15); each client is told."""
        check_name(channel)
        if is_personal(channel):
            raise HubError(ErrorCode.FORBIDDEN, "personal channels take no subscribers")
        await self._to_user(user, p.ServerSubscribe(
            user=user, channel=channel, client=client, since=since, data=data,
        ))

    async def unsubscribe_user(self, user: str, channel: str, *, client: str | None = None) -> None:
        """Unsubscribe the user's connections (only `client`, when given), on any node;
        an empty `channel` means from every channel (Centrifugo's server API)."""
        if channel:
            check_name(channel)
        if is_personal(channel):
            raise HubError(ErrorCode.FORBIDDEN, "personal channels cannot be left")
        await self._to_user(user, p.ServerUnsubscribe(user=user, channel=channel, client=client))

    async def refresh_user(
        self,
        user: str,
        *,
        client: str | None = None,
        expired: bool = False,
        expire_at: int | None = None,
        info: msgspec.Raw = p.NO_RAW,
    ) -> None:
        """A new expiry for the user's connections (only `client`, when given), on any
        node: `expired` closes them as expired, `expire_at` (unix s) is their new one, None
        none; `info` replaces their token's."""
        await self._to_user(user, p.ServerRefresh(
            user=user, client=client, expired=expired, expire_at=expire_at, info=info,
        ))

    async def _to_user(self, user: str, relayed: p.Relayed) -> None:
        """Through the user's personal channel: every node with a connection of the user
        hears it."""
        channel = personal_channel(user)
        check_name(channel)
        await self.broker.publish(channel, relayed)

    async def remove_history(self, channel: str) -> None:
        """Forget a channel's stored messages; its epoch and offset stay (a recovery from
        before now is not recovered)."""
        check_name(channel)
        options = history_options(self.settings, channel)
        if options is None:
            raise HubError(ErrorCode.FORBIDDEN, "history is off for this channel's namespace")
        await self.broker.remove_history(channel)

    async def presence_of(self, channel: str) -> list[p.ClientInfo]:
        check_name(channel)
        if not self.settings.namespace_of(channel).presence:
            raise HubError(ErrorCode.FORBIDDEN, "presence is off for this channel's namespace")
        return await self.presence.members(channel)

    async def history(
        self, channel: str, since: p.Since | None, limit: int | None
    ) -> p.HistoryReply:
        if limit is not None and limit < 0:
            raise HubError(ErrorCode.BAD_REQUEST, "limit must be >= 0")
        limit = HISTORY_LIMIT if limit is None else min(limit, HISTORY_LIMIT)
        page = await self.history_page(channel, since, limit)
        return p.HistoryReply(
            channel=channel,
            epoch=page.position.epoch,
            offset=page.position.offset,
            messages=[p.history_item(message) for message in page.messages],
        )

    async def history_page(
        self, channel: str, since: p.Since | None, limit: int
    ) -> HistoryPage:
        """Stored messages of a channel (PROTOCOL §5), whole: at most `limit`, after
        `since` or the newest."""
        check_name(channel)
        options = history_options(self.settings, channel)
        if options is None:
            raise HubError(ErrorCode.FORBIDDEN, "history is off for this channel's namespace")
        position = StreamPosition(since.offset, since.epoch) if since else None
        return await self.broker.history(channel, options, position, limit)

    def snapshot(self) -> NodeSnapshot:
        """This node as presence and stats see it."""
        hub, subscriptions = self.hub, self.subscriptions
        stats = NodeStats(
            node=self.node_id,
            connections=len(hub.sessions),
            users=len(hub.sessions_by_user),
            subscriptions=subscriptions.subscription_count,
            channels=subscriptions.channel_count,
            started=self.started,
            updated=int(time.time()),
            version=__version__,
            address=self.address,
            state=self.state,
            rss=rss_bytes(),
            cpu=self.cpu.percent(),
            published=self.metrics.published_count(),
            delivered=self.metrics.delivered_count(),
            accepted=self.metrics.accepted_count(),
        )
        return NodeSnapshot(stats, subscriptions.channel_counts(), hub.users())

