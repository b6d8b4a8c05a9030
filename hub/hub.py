"""The local connections of one node: what a connection is to the rest of the hub
(`Subscriber`, `Connection`, and the `Codec` of its wire protocol), and the registry by id
and by user."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from hub.broker import StreamPosition
from hub.protocol import Join, Leave, Message, ServerCommand


class Codec(Protocol):
    """How one wire protocol writes what a channel carries. One object per protocol, so the
    fan-out builds a frame once per message per protocol, whatever the recipients."""

    protocol: str  # its name, the `protocol` label of hub_connections_by_protocol

    def message(self, message: Message) -> bytes: ...

    def event(self, event: Join | Leave) -> bytes: ...


class DeltaCodec(Codec, Protocol):
    """A protocol that writes publications as fossil deltas (Centrifugo's)."""

    def delta(self, message: Message, patch: bytes | None) -> bytes:
        """`message` for a delta subscription: `patch` against the previous publication
        it was sent, or (None) its full payload."""


class Subscriber(Protocol):
    """What the hub needs of a connection: where to put a frame, how to end it, and what a
    `reset` of one of its channels means to its protocol."""

    client_id: str
    user: str

    @property
    def codec(self) -> Codec:
        """Its wire protocol's."""

    @property
    def expires(self) -> int | None:
        """Its token's `exp` (unix s), None without one: the node's expiry clock reads it."""

    def push(self, frame: bytes, count: int = 1) -> bool:
        """Hand over a frame (or a run of `count` frames in one piece of bytes) without
        awaiting; False when it was not delivered."""

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is queued."""

    def reset(self, channel: str, position: StreamPosition) -> bool:
        """Tell it messages of `channel` were lost (PROTOCOL §5); False: its protocol ends
        the subscription there (the client subscribes again), so drop it."""



class Connection(Subscriber, Protocol):
    """A client connection, as the hub holds it: a subscriber the server API can move."""

    async def server_command(self, command: ServerCommand) -> None:
        """Carry out what the server API asks of it (subscribe, unsubscribe, refresh:
        PROTOCOL §15, §16) and tell its client in its protocol's terms; never raises."""


class Hub:
    """Connections by id and by user: whom a drain closes, whom `/api/disconnect` reaches,
    what stats count."""

    def __init__(self) -> None:
        self.sessions: dict[str, Connection] = {}
        # A user's one connection, or the set of them: most users have one, and a set costs
        # a connection 216 bytes at least.
        self.sessions_by_user: dict[str, Connection | set[Connection]] = {}
        self._users: frozenset[str] | None = None  # `users()` until a user comes or goes
        # Told of a user's first connection here (True) and of its last gone (events).
        self.on_user: Callable[[str, bool], None] | None = None

    def add(self, session: Connection) -> None:
        self.sessions[session.client_id] = session
        found = self.sessions_by_user.get(session.user)
        if found is None:
            self.sessions_by_user[session.user] = session
            self._users = None
            if self.on_user is not None:
                self.on_user(session.user, True)
        elif isinstance(found, set):
            found.add(session)
        elif found is not session:
            self.sessions_by_user[session.user] = {found, session}

    def remove(self, session: Connection) -> None:
        self.sessions.pop(session.client_id, None)
        found = self.sessions_by_user.get(session.user)
        if found is session:
            del self.sessions_by_user[session.user]
            self._users = None
            if self.on_user is not None:
                self.on_user(session.user, False)
        elif isinstance(found, set):
            found.discard(session)
            if len(found) == 1:
                self.sessions_by_user[session.user] = found.pop()

    def users(self) -> frozenset[str]:
        """The users connected here; built again only after one came or went (the presence
        heartbeat asks every few seconds)."""
        if self._users is None:
            self._users = frozenset(self.sessions_by_user)
        return self._users

    def count_speaking(self, protocol: str) -> int:
        """Connections whose wire protocol is `protocol` (a scrape's work, not the hot path)."""
        return sum(session.codec.protocol == protocol for session in self.sessions.values())

    def sessions_of(self, user: str, client: str | None = None) -> list[Connection]:
        """The user's connections on this node; only `client` (when it is the user's)
        when given."""
        if client is not None:
            session = self.sessions.get(client)
            return [session] if session is not None and session.user == user else []
        found = self.sessions_by_user.get(user)
        if found is None:
            return []
        return list(found) if isinstance(found, set) else [found]

    def close_user(
        self,
        user: str,
        code: int,
        reason: str,
        client: str | None = None,
        whitelist: list[str] | None = None,
    ) -> None:
        """Close the user's connections (only `client`, when given), but those in
        `whitelist`."""
        spared = frozenset(whitelist or ())
        for session in self.sessions_of(user, client):
            if session.client_id not in spared:
                session.close(code, reason)
