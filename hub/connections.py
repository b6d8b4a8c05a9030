"""`/api/connections` (PROTOCOL §9): the connections of the cluster, filtered and paged.

Each node knows only its own connections, and nothing about them is written to Redis: at
100,000 connections a node, rewriting a summary of each within the presence TTL would cost
Redis more than the rest of the hub does, for a list an operator reads now and then. So a
call asks the nodes instead, one after another in node id order, through the broker: a
`ConnectionsQuery` on the asked node's control channel (`#node:<id>`, a name no client can
use), answered by a `ConnectionsPage` on the asker's. Each node answers from its own
indexes (by user, by channel) with the first `limit` matches after a client id, so one call
reads at most `limit` summaries however large the cluster, and costs nothing while nobody
asks.

The order is (node id, client id); the cursor (`next`) names the last (node, client) of a
page. A node that does not answer within `ANSWER_SECONDS` is skipped and named in
`unanswered`, so one dead node does not hide the others.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec

from hub import protocol as p
from hub.channels import is_personal
from hub.errors import BrokerUnavailable, ErrorCode, HubError

if TYPE_CHECKING:
    from hub.hub import Subscriber
    from hub.node import Node

log = logging.getLogger("hub.connections")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
ANSWER_SECONDS = 2.0
CONTROL_PREFIX = "#node:"


class Origin(msgspec.Struct, frozen=True, gc=False):
    """Where a connection came from, kept with it for the operator (one small object per
    connection; user agents are interned, most connections share a few)."""

    remote: str
    user_agent: str
    since: int  # unix s

    @classmethod
    def of_scope(cls, scope: dict[str, object]) -> Origin:
        client = scope.get("client")
        remote = ""
        if isinstance(client, list | tuple) and len(client) == 2:
            host, port = client
            remote = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        user_agent = ""
        headers = scope.get("headers")
        if isinstance(headers, list | tuple):
            for name, value in headers:
                if name == b"user-agent":
                    user_agent = sys.intern(bytes(value)[:256].decode("latin-1"))
                    break
        return cls(remote, user_agent, int(time.time()))


UNKNOWN_ORIGIN = Origin("", "", 0)


class Query(msgspec.Struct, frozen=True):
    user: str | None = None
    channel: str | None = None
    node: str | None = None
    limit: int = DEFAULT_LIMIT
    after: tuple[str, str] | None = None  # (node, client): the last of the previous page


class Page(msgspec.Struct):
    connections: list[p.ConnectionSummary]
    next: tuple[str, str] | None = None
    unanswered: list[str] = msgspec.field(default_factory=list)


CURSOR_PATTERN = r"^[A-Za-z0-9_-]+@[\s\S]+$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(position: tuple[str, str]) -> str:
    """`<client>@<node>`: client ids are URL-safe base64, so the first `@` ends one."""
    node, client = position
    return f"{client}@{node}"


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (node, client) a `next` names; `bad_request` for anything of another form."""
    if not _CURSOR.match(cursor):
        raise HubError(ErrorCode.BAD_REQUEST, "`after` is not a cursor this API gave")
    client, _, node = cursor.partition("@")
    return node, client


def control_channel(node_id: str) -> str:
    return CONTROL_PREFIX + node_id


class Directory:
    """This node's part: answer other nodes' queries from its own connections, and ask the
    others for a call made here. The futures of the questions in flight are its only state."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.channel = control_channel(node.node_id)
        self._waiting: dict[str, asyncio.Future[p.ConnectionsPage]] = {}

    # this node's connections

    def local(
        self, user: str | None, channel: str | None, after: str, limit: int
    ) -> tuple[list[p.ConnectionSummary], bool]:
        """The first `limit` matches with a client id above `after`, and whether more match.
        Candidates come from the narrowest index: the user's connections, else the
        channel's members, else all (a heap selection, not a sort, over those)."""
        node = self._node
        subscriptions = node.subscriptions
        by_id: Mapping[str, Subscriber]
        if user is None and channel is None:
            by_id = node.hub.sessions
        else:
            candidates: Iterable[Subscriber]
            if user is not None:
                candidates = node.hub.sessions_of(user)
                if channel is not None:
                    candidates = [s for s in candidates if subscriptions.has(s, channel)]
            else:
                assert channel is not None
                candidates = subscriptions.members(channel)
            by_id = {session.client_id: session for session in candidates}
        # Ids, not sessions, through the selection: strings compare in C, without a key
        # function.
        ids: Iterable[str] = (client for client in by_id if client > after) if after else by_id
        chosen = heapq.nsmallest(limit + 1, ids)
        return [self.summary(by_id[client]) for client in chosen[:limit]], len(chosen) > limit

    def summary(self, session: Subscriber) -> p.ConnectionSummary:
        origin: Origin = getattr(session, "origin", UNKNOWN_ORIGIN)
        channels = [
            name for name in self._node.subscriptions.channels_of(session)
            if not is_personal(name)
        ]
        return p.ConnectionSummary(
            client=session.client_id, user=session.user, node=self._node.node_id,
            remote=origin.remote, user_agent=origin.user_agent,
            protocol=session.codec.protocol, subscriptions=channels, since=origin.since,
        )

    # the cluster

    async def page(self, query: Query) -> Page:
        node = self._node
        nodes = [stats.node for stats in await node.presence.nodes(node.snapshot())]
        if query.node is not None:
            nodes = [query.node] if query.node in nodes else []
        start_node, after = query.after if query.after is not None else ("", "")
        found: list[p.ConnectionSummary] = []
        unanswered: list[str] = []
        for index, node_id in enumerate(sorted(nodes)):
            if node_id < start_node:
                continue
            since = after if node_id == start_node else ""
            wanted = query.limit - len(found)
            try:
                items, more = await self._ask(node_id, query, since, wanted)
            except TimeoutError:
                unanswered.append(node_id)
                continue
            found.extend(items)
            if len(found) >= query.limit and (more or index + 1 < len(nodes)):
                last = found[-1]
                return Page(found, (last.node, last.client), unanswered)
        return Page(found, None, unanswered)

    async def _ask(
        self, node_id: str, query: Query, after: str, limit: int
    ) -> tuple[list[p.ConnectionSummary], bool]:
        if node_id == self._node.node_id:
            return self.local(query.user, query.channel, after, limit)
        request = secrets.token_hex(8)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[request] = waiter
        try:
            await self._node.broker.publish(control_channel(node_id), p.ConnectionsQuery(
                request=request, reply_to=self.channel, limit=limit, after=after,
                user=query.user, channel=query.channel,
            ))
            async with asyncio.timeout(ANSWER_SECONDS):
                answer = await waiter
        finally:
            self._waiting.pop(request, None)
        return answer.connections, answer.more

    def relayed(self, items: list[p.Relayed]) -> None:
        """What came on this node's control channel: questions to answer, answers awaited."""
        for item in items:
            if isinstance(item, p.ConnectionsQuery):
                self._node.spawn(self._answer(item))
            elif isinstance(item, p.ConnectionsPage):
                waiter = self._waiting.get(item.request)
                if waiter is not None and not waiter.done():
                    waiter.set_result(item)

    async def _answer(self, query: p.ConnectionsQuery) -> None:
        limit = max(0, min(query.limit, MAX_LIMIT))
        items, more = self.local(query.user, query.channel, query.after, limit)
        answer = p.ConnectionsPage(query.request, self._node.node_id, items, more)
        try:
            await self._node.broker.publish(query.reply_to, answer)
        except BrokerUnavailable as exc:
            log.warning("could not answer a connections query: %s", exc)
