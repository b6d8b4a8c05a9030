"""Presence entries, join/leave events and the presence heartbeat, derived from membership
(PROTOCOL §3, §6).

Owner: `hub.subscriptions.Subscriptions` is the only record of who is in which channel on
this node. `Membership` hears each admit and drop from it (a `MembershipWatcher`) and
writes what follows to the presence store and the broker; the heartbeat reads the members
from `Subscriptions` every time, so it can only write back who is there. What it keeps is
what is still to be written: the changes not yet sent, and the departures and events that
failed while Redis was away (bounded), sent again once it is back. A heartbeat after an
outage makes the store hold, for this node, exactly what the node has.

One writer task sends everything in the order it happened: a member's entry and its
removal, a join and its leave, never overtake each other, and the heartbeat never writes
back a member whose removal is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hub import protocol as p
from hub.broker import Broker
from hub.channels import is_personal
from hub.errors import BrokerUnavailable
from hub.hub import Subscriber
from hub.incident import Incident
from hub.presence import Departure, NodeSnapshot, Presence
from hub.settings import Settings
from hub.subscriptions import Subscriptions
from hub.tasks import cancel

log = logging.getLogger("hub.membership")

# Departures and join/leave events kept for after an outage; past these the oldest go (the
# departures then expire by the TTL; the events are lost, and that is logged).
MAX_OWED = 100_000
SETTLE_SECONDS = 2.0
EVENT_BATCH = 256  # join/leave events published side by side (of different members)
RETRY_SECONDS = 0.25  # a failed heartbeat is tried again this soon (the store may be back)


class Membership:
    """A `MembershipWatcher` of the node's `Subscriptions`."""

    def __init__(
        self,
        settings: Settings,
        subscriptions: Subscriptions,
        presence: Presence,
        broker: Broker,
        snapshot: Callable[[], NodeSnapshot],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._node_id = settings.node_id
        self._subscriptions = subscriptions
        self._presence = presence
        self._broker = broker
        self._snapshot = snapshot
        self._clock = clock
        self.interval = settings.presence_ttl / 3
        # Changes not sent yet, in order: ("+", channel, member), ("-", channel, client),
        # or (None, channel, event).
        self._pending: list[tuple[str | None, str, Any]] = []
        self._owed_departures: dict[Departure, None] = {}  # ordered, no duplicates
        self._owed_events: deque[tuple[str, p.Join | p.Leave]] = deque()
        self._queued = 0  # changes ever queued
        self._written = 0  # of those, handled (sent, or kept for later)
        self._progress = asyncio.Event()
        self._wake = asyncio.Event()
        self._beat_due = 0.0
        self.events_dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._store = Incident(log, "presence writes", clock=self._clock)
        self._events = Incident(log, "join/leave events", clock=self._clock)
        subscriptions.watchers.append(self)

    # MembershipWatcher

    def admitted(self, subscriber: Subscriber, channel: str) -> None:
        namespace = self._settings.namespace_of(channel)
        if is_personal(channel) or not (namespace.presence or namespace.join_leave):
            return
        info = _info_of(subscriber)
        if namespace.presence:
            member = p.ClientInfo(subscriber.client_id, subscriber.user, self._node_id, info)
            self._queue("+", channel, member)
        if namespace.join_leave:
            self._queue(None, channel, p.Join(
                channel=channel, user=subscriber.user, client=subscriber.client_id,
                info=info if info is not None else p.NO_RAW,
            ))

    def dropped(self, subscriber: Subscriber, channel: str) -> None:
        namespace = self._settings.namespace_of(channel)
        if is_personal(channel) or not (namespace.presence or namespace.join_leave):
            return
        if namespace.presence:
            self._queue("-", channel, subscriber.client_id)
        if namespace.join_leave:
            info = _info_of(subscriber)
            self._queue(None, channel, p.Leave(
                channel=channel, user=subscriber.user, client=subscriber.client_id,
                info=info if info is not None else p.NO_RAW,
            ))

    def occupied(self, channel: str) -> None:
        return None

    def vacated(self, channel: str) -> None:
        return None

    # the node's side

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_loop(), name="hub-membership")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    def beat_soon(self) -> None:
        """The store may be back (the broker reconnected): reconcile now."""
        self._beat_due = 0.0
        self._wake.set()

    async def settled(self) -> None:
        """Wait (at most SETTLE_SECONDS) until what was queued so far has been handled: a
        client's next command then sees its own subscribe in presence."""
        target = self._queued
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_SECONDS):
                while self._written < target and self._task is not None:
                    self._progress.clear()
                    await self._progress.wait()

    async def leave(self) -> None:
        """Graceful shutdown: this node and its members out of presence at once, after the
        leave events of the connections the drain closed (bounded)."""
        if self._task is not None:
            await self.settled()
        await self.stop()
        _, departed = self._drain_pending()
        try:
            await self._send_events()
        except Exception:
            log.exception("sending the last join/leave events failed")
        removed = list(self._owed_departures) + departed
        for channel, members in self._members().items():
            removed += [(channel, member.client) for member in members]
        self._owed_departures.clear()
        await self._presence.leave(removed)

    # writing

    def _queue(self, kind: str | None, channel: str, item: Any) -> None:
        self._pending.append((kind, channel, item))
        self._queued += 1
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            delay = self._beat_due - self._clock()
            if not self._pending and delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()
            try:
                if self._pending:
                    await self._write_pending()
                if self._clock() >= self._beat_due:
                    await self._beat()
            except Exception:  # a bug: logged, and the loop goes on
                log.exception("writing presence and join/leave failed")
                self._beat_due = self._clock() + RETRY_SECONDS

    def _drain_pending(self) -> tuple[list[tuple[str, p.ClientInfo]], list[Departure]]:
        """The pending changes of presence, net (a member added then removed is only
        removed); the events go to the owed queue, to be sent in order."""
        pending, self._pending = self._pending, []
        added: dict[Departure, p.ClientInfo] = {}
        removed: dict[Departure, None] = {}
        for kind, channel, item in pending:
            if kind == "+":
                removed.pop((channel, item.client), None)
                added[(channel, item.client)] = item
            elif kind == "-":
                added.pop((channel, item), None)
                removed[(channel, item)] = None
            else:
                self._owe_event(channel, item)
        return [(key[0], member) for key, member in added.items()], list(removed)

    async def _write_pending(self) -> None:
        handled = self._queued
        added, removed = self._drain_pending()
        if added or removed:
            try:
                await self._presence.update(added, removed)
            except Exception as exc:
                # Who joined is written by the next heartbeat (it reads the members);
                # who left is forgotten by it.
                self._store_failed(exc)
                self._owe_departures(removed)
                self._beat_due = min(self._beat_due, self._clock() + RETRY_SECONDS)
        await self._send_events()
        self._written = handled
        self._progress.set()

    async def _beat(self) -> None:
        removed = list(self._owed_departures)
        try:
            await self._presence.heartbeat(self._snapshot(), self._members(), removed)
        except Exception as exc:
            self._store_failed(exc)
            self._beat_due = self._clock() + min(RETRY_SECONDS, self.interval)
            return
        for departure in removed:
            self._owed_departures.pop(departure, None)
        self._store.recovered(for_sure=True)
        self._beat_due = self._clock() + self.interval
        await self._send_events()

    async def _send_events(self) -> None:
        """Join and leave events: one connection's in a channel in order (its join before its
        leave), the others side by side, up to EVENT_BATCH at a time (a crowd joining must
        not wait for one round trip per join, one after another). What failed, and what
        comes after it for the same connection, waits for the next write or heartbeat, in
        its place."""
        owed = self._owed_events
        while owed:
            batch = [owed.popleft() for _ in range(min(len(owed), EVENT_BATCH))]
            by_member: dict[tuple[str, str], list[tuple[str, p.Join | p.Leave]]] = {}
            for item in batch:
                by_member.setdefault((item[0], item[1].client), []).append(item)
            unsent_lists = await asyncio.gather(
                *(self._publish_in_order(items) for items in by_member.values())
            )
            unsent = {id(item) for items in unsent_lists for item in items}
            if unsent:
                owed.extendleft(reversed([item for item in batch if id(item) in unsent]))
                self._beat_due = min(self._beat_due, self._clock() + RETRY_SECONDS)
                return
            self._events.recovered(for_sure=True)

    async def _publish_in_order(
        self, items: list[tuple[str, p.Join | p.Leave]]
    ) -> list[tuple[str, p.Join | p.Leave]]:
        """Publish one member's events in order; returns those not sent."""
        for index, (channel, event) in enumerate(items):
            try:
                await self._broker.publish(channel, event)
            except Exception as exc:
                self._events.failed(exc)
                return items[index:]
        return []

    def _members(self) -> dict[str, list[p.ClientInfo]]:
        """Every member of a presence channel on this node, as Subscriptions has them."""
        settings, node_id = self._settings, self._node_id
        members: dict[str, list[p.ClientInfo]] = {}
        for channel, subscribers in self._subscriptions.memberships():
            if is_personal(channel) or not settings.namespace_of(channel).presence:
                continue
            members[channel] = [
                p.ClientInfo(s.client_id, s.user, node_id, _info_of(s)) for s in subscribers
            ]
        return members

    def _store_failed(self, exc: Exception) -> None:
        """The store logs its own outages (one line when it starts, one when it ends);
        anything else is a bug of ours, logged here the same way."""
        if not isinstance(exc, BrokerUnavailable):
            self._store.failed(exc)

    def _owe_departures(self, removed: list[Departure]) -> None:
        owed = self._owed_departures
        for departure in removed:
            owed[departure] = None
        while len(owed) > MAX_OWED:
            del owed[next(iter(owed))]

    def _owe_event(self, channel: str, event: p.Join | p.Leave) -> None:
        owed = self._owed_events
        owed.append((channel, event))
        if len(owed) > MAX_OWED:
            owed.popleft()
            self.events_dropped += 1
            if self.events_dropped == 1 or self.events_dropped % MAX_OWED == 0:
                log.warning("%d join/leave events dropped: more than %d waited for the "
                            "broker", self.events_dropped, MAX_OWED)


def _info_of(subscriber: Subscriber) -> Any:
    """The connection's token info (shown in presence), when it has an identity."""
    identity = getattr(subscriber, "identity", None)
    return getattr(identity, "info", None)
