"""Local connections and subscriptions of one node, and the fan-out hot path.

A message is encoded once per node into one ASGI send event, which is put without awaiting
into the bounded queue of every local subscriber (`Session.push`); nothing here awaits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hub.broker import StreamPosition
from hub.channels import is_personal
from hub.presence import NodeSnapshot, NodeStats
from hub.protocol import Message
from hub.wire import frame_of

if TYPE_CHECKING:
    from hub.session import Session

def already_seen(message: Message, position: StreamPosition) -> bool:
    """`message` is at or below `position` in the same epoch: whoever is there has it."""
    return message.epoch == position.epoch and (message.offset or 0) <= position.offset


class Refill:
    """A channel catching up from history after a broker outage: live messages wait in
    `held`, and subscribes wait for `done`."""

    __slots__ = ("done", "held")

    def __init__(self) -> None:
        self.held: list[Message] = []
        self.done = asyncio.Event()


class Hub:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.sessions_by_user: dict[str, set[Session]] = {}
        self.subscribers_by_channel: dict[str, set[Session]] = {}
        # Sessions between asking to subscribe and getting `subscribed`: what the channel
        # carries meanwhile is held for them, then delivered after the reply.
        self.joining_by_channel: dict[str, dict[Session, list[Message]]] = {}
        # Channels being refilled from history after a broker outage: live messages wait.
        self.refilling: dict[str, Refill] = {}
        self.last_position_by_channel: dict[str, StreamPosition] = {}
        # New subscribers whose `subscribed` announced a position the node's own stream has
        # not reached yet (a lagging pub/sub link, a refill under way): what is at or below
        # it must not reach them again. Dropped at their first message past it.
        self.skip_through_by_channel: dict[str, dict[Session, StreamPosition]] = {}
        self.subscription_count = 0
        self.channel_count = 0

    # connections

    def add_session(self, session: Session) -> None:
        self.sessions[session.client_id] = session
        self.sessions_by_user.setdefault(session.user, set()).add(session)

    def remove_session(self, session: Session) -> None:
        self.sessions.pop(session.client_id, None)
        user_sessions = self.sessions_by_user.get(session.user)
        if user_sessions is not None:
            user_sessions.discard(session)
            if not user_sessions:
                del self.sessions_by_user[session.user]

    # subscriptions

    def has_interest(self, channel: str) -> bool:
        return channel in self.subscribers_by_channel or channel in self.joining_by_channel

    def begin_join(self, channel: str, session: Session) -> None:
        self.joining_by_channel.setdefault(channel, {})[session] = []

    def abort_join(self, channel: str, session: Session) -> None:
        joining = self.joining_by_channel.get(channel)
        if joining is not None:
            joining.pop(session, None)
            if not joining:
                del self.joining_by_channel[channel]
        if not self.has_interest(channel):
            self.last_position_by_channel.pop(channel, None)

    def finish_join(self, channel: str, session: Session) -> list[Message]:
        """Make `session` a subscriber; returns what the channel carried while it joined."""
        held: list[Message] = []
        joining = self.joining_by_channel.get(channel)
        if joining is not None:
            held = joining.pop(session, [])
            if not joining:
                del self.joining_by_channel[channel]
        subscribers = self.subscribers_by_channel.get(channel)
        if subscribers is None:
            subscribers = self.subscribers_by_channel[channel] = set()
            self.channel_count += not is_personal(channel)
        subscribers.add(session)
        self.subscription_count += not is_personal(channel)
        return held

    def remove_subscriber(self, channel: str, session: Session) -> bool:
        """True if `session` was subscribed."""
        subscribers = self.subscribers_by_channel.get(channel)
        if subscribers is None or session not in subscribers:
            return False
        subscribers.discard(session)
        skips = self.skip_through_by_channel.get(channel)
        if skips is not None:
            skips.pop(session, None)
            if not skips:
                del self.skip_through_by_channel[channel]
        if not subscribers:
            del self.subscribers_by_channel[channel]
            self.last_position_by_channel.pop(channel, None)
            self.channel_count -= not is_personal(channel)
        self.subscription_count -= not is_personal(channel)
        return True

    def note_position(self, channel: str, position: StreamPosition) -> None:
        known = self.last_position_by_channel.get(channel)
        if known is None or known.epoch != position.epoch or known.offset < position.offset:
            self.last_position_by_channel[channel] = position

    # fan-out

    def fan_out_message(self, channel: str, message: Message) -> int:
        """Deliver a relayed publication to local subscribers; returns how many got it."""
        if message.offset is not None and message.epoch is not None:
            refill = self.refilling.get(channel)
            if refill is not None:
                refill.held.append(message)
                return 0
            self.note_position(channel, StreamPosition(message.offset, message.epoch))
        joining = self.joining_by_channel.get(channel)
        if joining:
            for held in joining.values():
                held.append(message)
        subscribers = self.subscribers_by_channel.get(channel)
        if not subscribers:
            return 0
        return self.fan_out_positioned(channel, subscribers, message)

    def fan_out_positioned(
        self, channel: str, subscribers: Iterable[Session], message: Message
    ) -> int:
        """`fan_out`, minus the subscribers that already have this message."""
        skips = self.skip_through_by_channel.get(channel)
        if not skips:
            return self.fan_out(subscribers, frame_of(message))
        frame = frame_of(message)
        delivered = 0
        for session in subscribers:
            skip = skips.get(session)
            if skip is not None:
                if already_seen(message, skip):
                    continue
                del skips[session]
            delivered += session.push(frame)
        if not skips:
            del self.skip_through_by_channel[channel]
        return delivered

    def skip_through(self, channel: str, session: Session, position: StreamPosition) -> None:
        """`session` announced `position`: if the node's stream is behind it, the messages
        up to it still on their way must not reach this session."""
        known = self.last_position_by_channel.get(channel)
        if known is None:
            self.last_position_by_channel[channel] = position
        if known is None or known.epoch != position.epoch or known.offset < position.offset:
            self.skip_through_by_channel.setdefault(channel, {})[session] = position

    def fan_out(self, sessions: Iterable[Session], frame: bytes) -> int:
        """The hot path: one frame, already on the wire's terms, to every session."""
        delivered = 0
        for session in sessions:
            delivered += session.push(frame)
        return delivered

    # statistics

    def snapshot(self, node_id: str, started: int) -> NodeSnapshot:
        """This node as presence and stats see it."""
        stats = NodeStats(
            node=node_id,
            connections=len(self.sessions),
            users=len(self.sessions_by_user),
            subscriptions=self.subscription_count,
            channels=self.channel_count,
            started=started,
            updated=int(time.time()),
        )
        return NodeSnapshot(stats, self.channel_counts(), frozenset(self.sessions_by_user))

    def channel_counts(self) -> dict[str, int]:
        return {
            channel: len(subscribers)
            for channel, subscribers in self.subscribers_by_channel.items()
            if not is_personal(channel)
        }
