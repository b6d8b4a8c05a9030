"""The real centrifuge-python SDK (PyPI) against `/connection/websocket` (PROTOCOL §11):
connect with a hub token, subscribe, publications from the HTTP API and from `/ws` clients
(and the other way), permissions, history, recovery after a dropped transport and after a
node restart behind Redis, a reset seen as `recovered: false`, presence, join and leave,
personal messages, `/api/disconnect`, and token refresh through the SDK's callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from centrifuge import (
    Client,
    ClientEventHandler,
    ClientState,
    ConnectingContext,
    DisconnectedContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    ReplyError,
    ServerPublicationContext,
    StreamPosition,
    SubscribedContext,
    Subscription,
    SubscriptionEventHandler,
    SubscriptionState,
    UnsubscribedContext,
)

from hub.centrifugo_session import CentrifugoSession
from tests.conftest import NAMESPACES
from tests.redis_server import RedisServer, free_port
from tests.support import (
    WAIT,
    NodeProcess,
    RunningNode,
    connect,
    eventually,
    make_settings,
    publish,
    running_node,
    token,
)
from tests.test_cluster import node_env, write_config

Factory = Callable[..., RedisServer]


def address(ws_url: str) -> str:
    return ws_url.removesuffix("/ws") + "/connection/websocket"


class ClientEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.disconnected: list[tuple[int, str]] = []
        self.connecting: list[tuple[int, str]] = []
        self.personal: list[tuple[str, Any, dict[str, str]]] = []

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.disconnected.append((ctx.code, ctx.reason))

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.connecting.append((ctx.code, ctx.reason))

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.personal.append((ctx.channel, ctx.pub.data, ctx.pub.tags))


class SubEvents(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.publications: list[tuple[int, Any, str | None]] = []  # offset, data, user
        self.subscribed: list[SubscribedContext] = []
        self.unsubscribed: list[tuple[int, str]] = []
        self.joins: list[str] = []
        self.leaves: list[str] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        user = ctx.pub.info.user if ctx.pub.info is not None else None
        self.publications.append((ctx.pub.offset, ctx.pub.data, user))

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.unsubscribed.append((ctx.code, ctx.reason))

    async def on_join(self, ctx: JoinContext) -> None:
        self.joins.append(ctx.info.user)

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.leaves.append(ctx.info.user)


@contextlib.asynccontextmanager
async def sdk(
    url: str, user: str | None = "alice", *, raw_token: str | None = None,
    get_token: Callable[[], Awaitable[str]] | None = None, connected: bool = True,
) -> AsyncIterator[tuple[Client, ClientEvents]]:
    events = ClientEvents()
    jwt = raw_token if raw_token is not None else token(user) if user else ""
    client = Client(address(url), events=events, token=jwt, get_token=get_token,
                    min_reconnect_delay=0.05, max_reconnect_delay=0.5, timeout=WAIT)
    try:
        if connected:
            await client.connect()
            await client.ready(timeout=WAIT)
        yield client, events
    finally:
        await client.disconnect()


async def subscribed(client: Client, channel: str) -> tuple[Subscription, SubEvents]:
    events = SubEvents()
    sub = client.new_subscription(channel, events=events)
    await sub.subscribe()
    await sub.ready(timeout=WAIT)
    return sub, events


# connecting and delivering


async def test_the_sdk_connects_and_gets_publications_of_the_api_and_of_ws_clients(
    node: RunningNode,
) -> None:
    async with sdk(node.ws_url, "alice") as (client, _), \
            connect(node.ws_url, token("wsuser", info={"name": "W"})) as ws:
        assert client.state == ClientState.CONNECTED
        sub, events = await subscribed(client, "feed:both")
        assert events.subscribed[-1].recoverable and events.subscribed[-1].positioned
        await ws.subscribe("feed:both")
        await publish(node, "feed:both", {"from": "api"})
        await ws.request({"type": "publish", "channel": "feed:both", "data": {"from": "ws"}})
        await eventually(lambda: len(events.publications) == 2, what="both publications")
        assert events.publications == [(1, {"from": "api"}, None), (2, {"from": "ws"}, "wsuser")]
        await sub.publish({"from": "sdk"})
        async with asyncio.timeout(WAIT):
            while (got := await ws.expect("message"))["offset"] < 3:
                pass
        assert (got["data"], got["from"], got["offset"]) == ({"from": "sdk"}, "alice", 3)
        assert "client" not in got and "info" not in got  # /ws frames as PROTOCOL §3 has them


async def test_a_bad_token_is_terminal(node: RunningNode) -> None:
    async with sdk(node.ws_url, raw_token="not-a-jwt", connected=False) as (client, events):
        await client.connect()
        await eventually(lambda: events.disconnected, what="the SDK to stop")
        assert events.disconnected == [(3500, "invalid token")]
        assert client.state == ClientState.DISCONNECTED


async def test_a_channel_the_token_does_not_allow_is_permission_denied(
    node: RunningNode,
) -> None:
    only = token("carol", channels=["feed:*"])
    async with sdk(node.ws_url, raw_token=only) as (client, _):
        events = SubEvents()
        sub = client.new_subscription("secret", events=events)
        await sub.subscribe()
        await eventually(lambda: events.unsubscribed, what="the refusal")
        assert events.unsubscribed[0][0] == 103 and sub.state == SubscriptionState.UNSUBSCRIBED


async def test_history_newest_oldest_and_position(node: RunningNode) -> None:
    for n in range(1, 6):
        await publish(node, "feed:hist", n)
    async with sdk(node.ws_url) as (client, _):
        everything = await client.history("feed:hist", limit=10)
        assert [p.data for p in everything.publications] == [1, 2, 3, 4, 5]
        position = await client.history("feed:hist")  # limit 0: the position only
        assert (position.offset, position.publications) == (5, [])
        newest = await client.history("feed:hist", limit=2, reverse=True)
        assert [p.offset for p in newest.publications] == [5, 4]
        here = StreamPosition(offset=4, epoch=position.epoch)
        before = await client.history("feed:hist", limit=2, since=here, reverse=True)
        assert [p.offset for p in before.publications] == [3, 2]
        elsewhere = StreamPosition(offset=4, epoch="another")
        for reverse in (False, True):
            with pytest.raises(ReplyError) as refused:
                await client.history("feed:hist", limit=2, since=elsewhere, reverse=reverse)
            assert refused.value.code == 112


# recovery


async def test_a_dropped_transport_recovers_every_missed_publication_once(
    node: RunningNode,
) -> None:
    async with sdk(node.ws_url, "rita") as (client, events):
        _, sub_events = await subscribed(client, "feed:drop")
        for n in (1, 2):
            await publish(node, "feed:drop", n)
        await eventually(lambda: len(sub_events.publications) == 2)
        (session,) = [s for s in node.node.hub.sessions.values()
                      if isinstance(s, CentrifugoSession)]
        session._outbound.abort()  # the TCP connection dies without a close frame
        await eventually(lambda: events.connecting, what="the SDK to notice")
        for n in (3, 4, 5):
            await publish(node, "feed:drop", n)
        await eventually(lambda: len(sub_events.subscribed) == 2, what="the resubscribe")
        again = sub_events.subscribed[-1]
        assert (again.was_recovering, again.recovered) == (True, True)
        await publish(node, "feed:drop", 6)
        await eventually(lambda: len(sub_events.publications) == 6)
        assert [(o, d) for o, d, _ in sub_events.publications] == [(n, n) for n in range(1, 7)]


async def test_a_node_restart_behind_redis_is_recovered_exactly_once(
    redis_factory: Factory, tmp_path: Path
) -> None:
    server = redis_factory()
    config = write_config(tmp_path)
    port = free_port()
    a = NodeProcess(node_env(server.url, "cf-a", config), ["--port", str(port)])
    b = NodeProcess(node_env(server.url, "cf-b", config))
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    try:
        async with sdk(a.ws_url, "ned") as (client, events):
            _, sub_events = await subscribed(client, "feed:restart")
            api = node_api(b)
            for n in (1, 2):
                await api(n)
            await eventually(lambda: len(sub_events.publications) == 2)
            await asyncio.to_thread(a.stop)  # drain: 3001, the SDK comes back
            for n in (3, 4, 5):
                await api(n)
            await asyncio.to_thread(a.start)
            await eventually(lambda: len(sub_events.subscribed) == 2, within=15,
                             what="the SDK back on the restarted node")
            assert (sub_events.subscribed[-1].was_recovering,
                    sub_events.subscribed[-1].recovered) == (True, True)
            await api(6)
            await eventually(lambda: len(sub_events.publications) == 6)
            assert [(o, d) for o, d, _ in sub_events.publications] == [
                (n, n) for n in range(1, 7)
            ]
            assert (3001, "shutdown") in events.connecting
    finally:
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))


def node_api(node: NodeProcess) -> Callable[[Any], Awaitable[Any]]:
    from tests.support import http_client

    async def send(data: Any) -> Any:
        async with http_client(node.url) as http:
            return await publish(http, "feed:restart", data)

    return send


async def test_a_reset_reaches_the_app_as_recovered_false(redis_factory: Factory) -> None:
    server = redis_factory()
    settings = make_settings(redis_url=server.url, namespaces=NAMESPACES)
    async with running_node(settings) as running, sdk(running.ws_url, "rose") as (client, _):
        _, events = await subscribed(client, "feed:lost")
        await publish(running, "feed:lost", 1)
        await eventually(lambda: len(events.publications) == 1)
        admin = redis.asyncio.Redis.from_url(server.url)
        try:
            await admin.flushall()  # history gone: a new epoch
            await admin.client_kill_filter(_type="pubsub")  # the node refills, and resets
        finally:
            await admin.aclose()
        await eventually(lambda: len(events.subscribed) == 2, what="the SDK to resubscribe")
        again = events.subscribed[-1]
        assert (again.was_recovering, again.recovered) == (True, False)
        assert again.stream_position is not None and again.stream_position.offset == 0
        await publish(running, "feed:lost", "new")
        await eventually(lambda: len(events.publications) == 2)
        assert events.publications[-1][:2] == (1, "new")


# presence, personal messages, the server's say


async def test_presence_stats_join_and_leave(node: RunningNode) -> None:
    async with sdk(node.ws_url, "pia") as (first, _), sdk(node.ws_url, "pat") as (second, _):
        _, events = await subscribed(first, "chat:room")
        sub, _ = await subscribed(second, "chat:room")
        await eventually(lambda: "pat" in events.joins, what="pat's join")
        presence = await first.presence("chat:room")
        assert sorted(c.user for c in presence.clients.values()) == ["pat", "pia"]
        stats = await first.presence_stats("chat:room")
        assert (stats.num_clients, stats.num_users) == (2, 2)
        await sub.unsubscribe()
        await eventually(lambda: "pat" in events.leaves, what="pat's leave")


async def test_personal_messages_are_server_side_publications(node: RunningNode) -> None:
    async with sdk(node.ws_url, "paul") as (_, events):
        response = await node.http.post(
            "/api/send", json={"user": "paul", "data": {"hello": 1}, "event": "greet"}
        )
        assert response.status_code == 200
        await eventually(lambda: events.personal, what="the personal message")
        channel, data, tags = events.personal[0]
        assert (channel, data, tags["event"]) == ("@paul", {"hello": 1}, "greet")


async def test_api_disconnect_is_terminal(node: RunningNode) -> None:
    async with sdk(node.ws_url, "dan") as (client, events):
        response = await node.http.post("/api/disconnect", json={"user": "dan"})
        assert response.status_code == 200
        await eventually(lambda: events.disconnected, what="the SDK to stop")
        assert events.disconnected[0][0] == 3503
        assert client.state == ClientState.DISCONNECTED


async def test_a_token_is_refreshed_through_the_sdk_callback(node: RunningNode) -> None:
    asked: list[float] = []

    async def get_token() -> str:
        asked.append(asyncio.get_running_loop().time())
        return token("tess", ttl=3600)

    async with sdk(node.ws_url, raw_token=token("tess", ttl=3), get_token=get_token) as (
        client, events
    ):
        await eventually(lambda: asked, within=WAIT, what="the SDK to ask for a new token")
        await asyncio.sleep(3)  # past the first token's exp: the connection must hold
        assert client.state == ClientState.CONNECTED
        assert events.connecting == [(0, "connect called")]  # never reconnected


@pytest.mark.parametrize("line", ["not json", json.dumps({"subscribe": {"channel": "x"}})])
async def test_a_command_the_hub_cannot_read_closes_with_bad_request(
    node: RunningNode, line: str
) -> None:
    import websockets

    url = address(node.ws_url)
    async with websockets.connect(url, open_timeout=WAIT) as raw:
        await raw.send(json.dumps({"id": 1, "connect": {"token": token("eve")}}))
        reply = json.loads(await raw.recv())
        assert reply["id"] == 1 and reply["connect"]["pong"] is True
        await raw.send(line)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                while True:
                    await raw.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501


async def test_the_example_chat_service_answers_in_the_room(node: RunningNode) -> None:
    """examples/chat_service.py as a user runs it, with a token in HUB_TOKEN: it answers
    every `!time`, before and after the hub drops its connection (the SDK reconnects)."""
    import os
    import sys

    script = Path(__file__).parent.parent / "examples" / "chat_service.py"
    service = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--url", address(node.ws_url), "--seconds", str(3 * WAIT),
        env={**os.environ, "HUB_TOKEN": token("timebot")}, stdout=asyncio.subprocess.PIPE,
    )
    assert service.stdout is not None
    try:
        async with connect(node.ws_url, token("asker")) as asker:
            await asker.subscribe("chat:lobby")
            async with asyncio.timeout(WAIT):
                while b"in chat:lobby" not in await service.stdout.readline():
                    pass


            async def ask() -> None:
                await asker.request({"type": "publish", "channel": "chat:lobby",
                                     "data": {"text": "!time"}})
                async with asyncio.timeout(WAIT):
                    while (got := await asker.recv()).get("from") != "timebot":
                        pass
                assert got["data"]["text"].startswith("it is ")

            await ask()
            await ask()
            async with node.api() as api:  # 3000: a close after which the SDK reconnects
                reply = await api.post("/api/disconnect", json={"user": "timebot",
                                                                "code": 3000})
                assert reply.status_code == 200
            async with asyncio.timeout(WAIT):
                while b"in chat:lobby" not in await service.stdout.readline():
                    pass
            await ask()
    finally:
        service.terminate()
        await service.wait()
