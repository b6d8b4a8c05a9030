"""The node: owns the hub, broker, presence, authenticator and metrics, and carries out
what sessions and the HTTP API ask (subscribe, publish, history, presence, stats).

It is also the broker's listener (`BrokerEvents`): relayed messages are fanned out here,
and after a broker outage it refills its channels from history before going live again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from hub import protocol as p
from hub.auth import Authenticator
from hub.broker import Broker, HistoryPage, StreamPosition
from hub.channels import check_client_channel, check_name, is_personal, personal_channel
from hub.errors import BrokerUnavailable, ErrorCode, HubError
from hub.hub import Hub, already_seen
from hub.metrics import Metrics, close_code_label
from hub.presence import NodeSnapshot, Presence
from hub.refill import Refiller, history_options
from hub.relay import RelaySubscriptions
from hub.session import CLOSE_HANDSHAKE_SECONDS
from hub.settings import Namespace, Settings
from hub.tasks import cancel
from hub.wire import frame_of

if TYPE_CHECKING:
    from hub.session import Session

log = logging.getLogger("hub.node")

HISTORY_LIMIT = 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def node_of(app: Any) -> Node:
    """The node an app built by `create_app` carries."""
    node: Node = app.state.node
    return node


class Node:
    def __init__(
        self, settings: Settings, broker: Broker, presence: Presence, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.broker = broker
        self.presence = presence
        self.metrics = metrics
        self.hub = Hub()
        self.relay = RelaySubscriptions(broker)
        self.refiller = Refiller(self.hub, broker, settings, metrics, self.on_relayed)
        self.authenticator = Authenticator(settings)
        self.started = int(time.time())
        self.draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # set while no connection is open
        self._idle.set()
        hub = self.hub
        metrics.connections.set_function(lambda: len(hub.sessions))
        metrics.subscriptions.set_function(lambda: hub.subscription_count)
        metrics.channels.set_function(lambda: hub.channel_count)
        metrics.broker_up.set_function(lambda: int(broker.up))

    @property
    def ready(self) -> bool:
        return self.broker.up and not self.draining

    # lifecycle

    async def start(self) -> None:
        await self.presence.start()
        await self.broker.start(self)
        self.spawn(self._heartbeat_loop())

    async def stop(self) -> None:
        await self.refiller.stop()
        await asyncio.gather(*(cancel(task) for task in list(self._tasks)),
                             return_exceptions=True)
        for step in (self.presence.leave, self.broker.close, self.presence.close):
            try:
                await step()
            except Exception:
                log.exception("shutdown step %s failed", step.__qualname__)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.presence_ttl / 3
        while True:
            try:
                await self.presence.heartbeat(self.snapshot())
            except Exception as exc:  # logged, retried on the next beat
                log.warning("presence heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    # broker events

    def on_relayed(self, channel: str, relayed: p.Relayed) -> None:
        hub = self.hub
        if type(relayed) is p.Message:
            delivered = hub.fan_out_message(channel, relayed)
            if delivered:
                self.metrics.messages_delivered.inc(delivered)
                lag = time.time() - relayed.ts / 1000
                self.metrics.delivery_lag_seconds.observe(max(0.0, lag))
        elif isinstance(relayed, p.Join | p.Leave):
            subscribers = hub.subscribers_by_channel.get(channel)
            if subscribers:
                hub.fan_out(subscribers, frame_of(relayed))
        elif isinstance(relayed, p.Disconnect):
            for session in list(hub.sessions_by_user.get(relayed.user, ())):
                session.close(relayed.code, relayed.reason)

    def on_broker_up(self, reconnected: bool) -> None:
        if reconnected:
            self.metrics.broker_reconnects.inc()
            self.refiller.start()

    def on_broker_down(self) -> None:
        log.warning("broker connection lost; serving connections, commands answer unavailable")

    def _recovered(self, page: HistoryPage) -> bool:
        return page.complete and len(page.messages) <= self.settings.recovery_max

    # connections

    async def connect(self, session: Session) -> None:
        """Register a welcomed session and subscribe it to its personal channel."""
        hub = self.hub
        hub.add_session(session)
        self._idle.clear()
        self.metrics.connections_accepted.inc()
        channel = personal_channel(session.user)
        hub.begin_join(channel, session)
        try:
            await self.relay.ensure(channel)
        except BrokerUnavailable:
            log.warning("personal channel not subscribed yet; retrying in the background")
            self.spawn(self._retry_relay(channel))
        except BaseException:
            hub.abort_join(channel, session)
            raise
        for held in hub.finish_join(channel, session):
            session.reply(held)

    async def _retry_relay(self, channel: str) -> None:
        """A SUBSCRIBE that failed while the broker seemed up is tried again, with backoff,
        for as long as a local connection wants the channel."""
        delay = 0.25
        while self.hub.has_interest(channel) and channel not in self.relay.channels:
            await asyncio.sleep(delay)
            with contextlib.suppress(BrokerUnavailable):
                await self.relay.ensure(channel)
            delay = min(delay * 2, 5.0)
        if not self.hub.has_interest(channel):
            await self._release(channel)  # the last connection left while we retried

    async def disconnect(self, session: Session, code: int) -> None:
        hub = self.hub
        hub.remove_session(session)
        if not hub.sessions:
            self._idle.set()
        self.metrics.disconnections.labels(close_code_label(code)).inc()
        for channel in list(session.joining):
            hub.abort_join(channel, session)
        # Local bookkeeping first and at once; then the broker work side by side, so a
        # connection on hundreds of channels leaves in one round of round trips.
        channels = list(session.subscriptions)
        session.subscriptions.clear()
        personal = personal_channel(session.user)
        for channel in (*channels, personal):
            hub.remove_subscriber(channel, session)
        await asyncio.gather(*(self._release(channel) for channel in (*channels, personal)))
        if self.broker.up:  # else presence expires by TTL, and leave events cannot go out
            await asyncio.gather(*(
                self._announce(session, channel, self.settings.namespace_of(channel), False)
                for channel in channels
            ))

    async def _release(self, channel: str) -> None:
        try:
            await self.relay.release(channel, lambda: self.hub.has_interest(channel))
        except BrokerUnavailable:
            pass  # the broker forgets subscriptions it cannot keep; nothing to undo
        except Exception:
            log.exception("unsubscribing from the broker failed")

    # subscriptions

    async def subscribe(
        self, session: Session, channel: str, since: p.Since | None, frame_id: int | None
    ) -> None:
        namespace = session.permissions.check_subscribe(channel)
        if channel in session.subscriptions or channel in session.joining:
            raise HubError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel}")
        limit = self.settings.max_subscriptions
        if limit and len(session.subscriptions) + len(session.joining) >= limit:
            raise HubError(ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions")
        if not self.broker.up:
            raise BrokerUnavailable()
        try:
            await self.refiller.wait(channel)
        except TimeoutError:
            raise BrokerUnavailable("the channel is still catching up; try again") from None
        options = history_options(self.settings, channel)
        hub = self.hub
        session.joining.add(channel)
        hub.begin_join(channel, session)
        page: HistoryPage | None = None
        try:
            await self.relay.ensure(channel)
            if options is not None:
                position = StreamPosition(since.offset, since.epoch) if since else None
                limit = self.settings.recovery_max + 1 if since else 0
                page = await self.broker.history(channel, options, position, limit)
        except BaseException:
            session.joining.discard(channel)
            hub.abort_join(channel, session)
            await self._release(channel)
            raise
        session.joining.discard(channel)
        if session.close_code is not None:
            hub.abort_join(channel, session)
            await self._release(channel)
            return
        held = hub.finish_join(channel, session)
        session.subscriptions.add(channel)
        self._reply_subscribed(session, channel, frame_id, since, page, held)
        await self._announce(session, channel, namespace, joined=True)

    def _reply_subscribed(
        self,
        session: Session,
        channel: str,
        frame_id: int | None,
        since: p.Since | None,
        page: HistoryPage | None,
        held: list[p.Message],
    ) -> None:
        if page is None:
            session.reply(p.Subscribed(channel=channel, id=frame_id))
            last: StreamPosition | None = None
        else:
            last = page.position
            recovered = self._recovered(page) if since is not None else None
            session.reply(p.Subscribed(
                channel=channel, id=frame_id, offset=last.offset, epoch=last.epoch,
                recovered=recovered,
            ))
            for message in page.messages if recovered else ():
                session.reply(message)
            self.hub.skip_through(channel, session, last)
        for item in held:
            if last is not None and already_seen(item, last):
                continue
            session.reply(item)

    async def unsubscribe(self, session: Session, channel: str) -> None:
        check_client_channel(channel)
        if channel not in session.subscriptions:
            raise HubError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel}")
        await self._leave(session, channel)

    async def _leave(self, session: Session, channel: str) -> None:
        session.subscriptions.discard(channel)
        self.hub.remove_subscriber(channel, session)
        await self._release(channel)
        await self._announce(session, channel, self.settings.namespace_of(channel), joined=False)

    async def _announce(
        self, session: Session, channel: str, namespace: Namespace, joined: bool
    ) -> None:
        """Presence and join/leave are best effort: a broker outage must not fail them."""
        try:
            if namespace.presence:
                if joined:
                    member = p.ClientInfo(
                        session.client_id, session.user, self.node_id, session.identity.info
                    )
                    await self.presence.add(channel, member)
                else:
                    await self.presence.remove(channel, session.client_id)
            if namespace.join_leave:
                kind = p.Join if joined else p.Leave
                event = kind(channel=channel, user=session.user, client=session.client_id)
                await self.broker.publish(channel, event)
        except Exception as exc:
            log.warning("presence or join/leave update failed: %s", exc)

    # publishing

    async def publish_from_client(
        self, session: Session, channel: str, data: msgspec.Raw, event: str | None
    ) -> StreamPosition | None:
        session.permissions.check_publish(channel)
        return await self.publish(channel, data, event, from_user=session.user, source="client")

    async def publish(
        self,
        channel: str,
        data: msgspec.Raw,
        event: str | None = None,
        *,
        from_user: str | None = None,
        source: str = "api",
    ) -> StreamPosition | None:
        check_name(channel)
        options = None if is_personal(channel) else history_options(self.settings, channel)
        message = p.Message(channel=channel, data=data, ts=now_ms(), event=event, from_=from_user)
        started = time.perf_counter()
        position = await self.broker.publish(channel, message, options)
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.messages_published.labels(source).inc()
        return position

    async def send_to_user(self, user: str, data: msgspec.Raw, event: str | None) -> None:
        await self.publish(personal_channel(user), data, event)

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        channel = personal_channel(user)
        check_name(channel)
        await self.broker.publish(channel, p.Disconnect(user=user, code=code, reason=reason))

    # reading

    async def presence_of(self, channel: str) -> list[p.ClientInfo]:
        check_name(channel)
        if not self.settings.namespace_of(channel).presence:
            raise HubError(ErrorCode.FORBIDDEN, "presence is off for this channel's namespace")
        return await self.presence.members(channel)

    async def history(
        self, channel: str, since: p.Since | None, limit: int | None
    ) -> p.HistoryReply:
        check_name(channel)
        options = history_options(self.settings, channel)
        if options is None or is_personal(channel):
            raise HubError(ErrorCode.FORBIDDEN, "history is off for this channel's namespace")
        if limit is not None and limit < 0:
            raise HubError(ErrorCode.BAD_REQUEST, "limit must be >= 0")
        limit = HISTORY_LIMIT if limit is None else min(limit, HISTORY_LIMIT)
        position = StreamPosition(since.offset, since.epoch) if since else None
        page = await self.broker.history(channel, options, position, limit)
        return p.HistoryReply(
            channel=channel,
            epoch=page.position.epoch,
            offset=page.position.offset,
            messages=[p.history_item(message) for message in page.messages],
        )

    def snapshot(self) -> NodeSnapshot:
        return self.hub.snapshot(self.node_id, self.started)

    # shutdown

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
            await asyncio.wait_for(self._idle.wait(), CLOSE_HANDSHAKE_SECONDS)
        try:
            await self.presence.leave()
        except Exception as exc:
            log.warning("leaving presence failed: %s", exc)
