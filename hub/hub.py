"""The local connections of one node: what a connection is to the rest of the hub
(`Subscriber`, and the `Codec` of its wire protocol), and the registry by id and by user."""

from __future__ import annotations

from typing import Protocol

from hub.broker import StreamPosition
from hub.protocol import Join, Leave, Message


class Codec(Protocol):
    """How one wire protocol writes what a channel carries. One object per protocol, so the
    fan-out builds a frame once per message per protocol, whatever the recipients."""

    def message(self, message: Message) -> bytes: ...

    def event(self, event: Join | Leave) -> bytes: ...


class Subscriber(Protocol):
    """What the hub needs of a connection: where to put a frame, how to end it, and what a
    `reset` of one of its channels means to its protocol."""

    client_id: str
    user: str

    @property
    def codec(self) -> Codec:
        """Its wire protocol's."""

    def push(self, frame: bytes) -> bool:
        """Hand over a frame without awaiting; False when it was not delivered."""

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is queued."""

    def reset(self, channel: str, position: StreamPosition) -> bool:
        """Tell it messages of `channel` were lost (PROTOCOL §5); False: its protocol ends
        the subscription there (the client subscribes again), so drop it."""


class Hub:
    """Connections by id and by user: whom a drain closes, whom `/api/disconnect` reaches,
    what stats count."""

    def __init__(self) -> None:
        self.sessions: dict[str, Subscriber] = {}
        self.sessions_by_user: dict[str, set[Subscriber]] = {}

    def add(self, session: Subscriber) -> None:
        self.sessions[session.client_id] = session
        self.sessions_by_user.setdefault(session.user, set()).add(session)

    def remove(self, session: Subscriber) -> None:
        self.sessions.pop(session.client_id, None)
        user_sessions = self.sessions_by_user.get(session.user)
        if user_sessions is not None:
            user_sessions.discard(session)
            if not user_sessions:
                del self.sessions_by_user[session.user]

    def close_user(self, user: str, code: int, reason: str) -> None:
        for session in list(self.sessions_by_user.get(user, ())):
            session.close(code, reason)
