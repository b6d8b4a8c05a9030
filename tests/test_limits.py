"""Per-connection rate limit and the node's connection limit (PROTOCOL §3, §10)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import websockets

from tests.support import (
    WAIT,
    Client,
    FakeClock,
    RunningNode,
    connect,
    eventually,
    make_settings,
    running_node,
    token,
)

RATE = 5
GRACE = 0.5
NAMESPACES = {"chat": {"subscribe": "any", "publish": "any"}}


@pytest.fixture
async def limited() -> AsyncIterator[RunningNode]:
    settings = make_settings(rate_limit=RATE, rate_limit_grace=GRACE, namespaces=NAMESPACES)
    async with running_node(settings) as running:
        yield running


async def burst(client: Client, n: int) -> list[dict[str, object]]:
    """Send `n` pings at once and read `n` answers."""
    for i in range(1, n + 1):
        await client.send({"type": "ping", "id": i})
    return [await client.recv() for _ in range(n)]


async def test_burst_over_twice_the_rate_is_rate_limited(limited: RunningNode) -> None:
    async with connect(limited.ws_url, token("alice")) as alice:
        answers = await burst(alice, 3 * RATE)
    pongs = [a for a in answers if a["type"] == "pong"]
    errors = [a for a in answers if a["type"] == "error"]
    assert len(pongs) + len(errors) == 3 * RATE
    assert 2 * RATE <= len(pongs) < 3 * RATE  # the bucket holds twice the rate
    assert errors and all(e["code"] == "rate_limited" for e in errors)
    assert [p["id"] for p in pongs] == list(range(1, len(pongs) + 1))
    assert [e.get("id") for e in errors] == list(range(len(pongs) + 1, 3 * RATE + 1))


async def test_connection_keeps_working_after_a_burst(limited: RunningNode) -> None:
    clock = limited.node.clock = FakeClock()
    async with connect(limited.ws_url, token("alice")) as alice, limited.api() as api:
        await alice.subscribe("chat:r")
        answers = await burst(alice, 3 * RATE)
        assert any(a["type"] == "error" for a in answers)
        clock.advance(2 / RATE)  # two tokens come back
        assert (await alice.request({"type": "ping"}))["type"] == "pong"
        await api.post("/api/publish", json={"channel": "chat:r", "data": 1})
        frame = await alice.expect("message")
        assert frame["data"] == 1


async def test_a_burst_after_a_pause_starts_a_new_stretch(limited: RunningNode) -> None:
    """Refusals long ago do not count toward the grace of new ones."""
    clock = limited.node.clock = FakeClock()
    async with connect(limited.ws_url, token("alice")) as alice:
        assert any(a["type"] == "error" for a in await burst(alice, 3 * RATE))
        clock.advance(1.2)  # past the 1 s gap that ends a stretch, and past the grace
        again = await burst(alice, 3 * RATE)
        assert [a["type"] for a in again].count("error") >= RATE
        clock.advance(2 / RATE)
        assert (await alice.request({"type": "ping"}))["type"] == "pong"


async def test_rate_limited_commands_are_not_carried_out(limited: RunningNode) -> None:
    async with connect(limited.ws_url, token("alice")) as alice, \
            connect(limited.ws_url, token("bob")) as bob:
        await bob.subscribe("chat:n")
        for n in range(3 * RATE):
            await alice.send({"type": "publish", "channel": "chat:n", "data": n, "id": n + 1})
        answers = [await alice.recv() for _ in range(3 * RATE)]
        published = [a for a in answers if a["type"] == "published"]
        got = [(await bob.expect("message"))["data"] for _ in published]
        assert got == [a["id"] - 1 for a in published]
        assert (await bob.request({"type": "ping"}))["type"] == "pong"  # nothing more came


async def commands_until_closed(client: Client, clock: FakeClock, every: float) -> int:
    """Pings one after another, the node's clock moved `every` seconds after each answer
    (instead of sleeping between them), until the server closes; returns the close code.
    Bounded: the grace and 3 s more of the node's time, as the sleeping form allowed."""
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(int((GRACE + 3) / every)):
            await client.request({"type": "ping"})
            clock.advance(every)
    return await client.closed()


async def test_sustained_abuse_closes_with_4029(limited: RunningNode) -> None:
    clock = limited.node.clock = FakeClock()
    async with connect(limited.ws_url, token("alice")) as alice:
        started = clock()
        code = await commands_until_closed(alice, clock, 0.005)  # about 40 times the rate
    assert code == 4029
    assert clock() - started >= GRACE


async def test_steady_abuse_with_some_commands_let_through_closes_with_4029(
    limited: RunningNode,
) -> None:
    """A few times the rate, steadily: a command gets through now and then as tokens come
    back, but the refusals keep on, and that is abuse."""
    clock = limited.node.clock = FakeClock()
    async with connect(limited.ws_url, token("alice")) as alice:
        await burst(alice, 2 * RATE)  # empty the bucket
        code = await commands_until_closed(alice, clock, 1 / (4 * RATE))
    assert code == 4029


async def test_rate_limit_is_per_connection(limited: RunningNode) -> None:
    async with connect(limited.ws_url, token("alice")) as alice, \
            connect(limited.ws_url, token("alice")) as alice2:
        answers = await burst(alice, 3 * RATE)
        assert any(a["type"] == "error" for a in answers)
        assert all(a["type"] == "pong" for a in await burst(alice2, 2 * RATE))


async def test_rate_limit_zero_means_no_limit() -> None:
    async with running_node(make_settings(rate_limit=0)) as node, \
            connect(node.ws_url, token("alice")) as alice:
        answers = await burst(alice, 500)
    assert all(a["type"] == "pong" for a in answers)


# connection limit


async def wait_connections(api: httpx.AsyncClient, n: int) -> None:
    """Polling from outside: the server offers no event to await."""
    async def connections() -> int:
        return int((await api.get("/api/stats")).json()["total"]["connections"])

    await eventually(connections, lambda got: got == n, WAIT, f"{n} connections")


async def test_connection_past_the_limit_is_accepted_then_closed_1013() -> None:
    async with running_node(make_settings(max_connections=2)) as node, node.api() as api:
        async with connect(node.ws_url, token("a")) as first, \
                connect(node.ws_url, token("b")):
            async with connect(node.ws_url, token("c"), welcome=False) as third:
                assert await third.closed() == 1013
                assert third.connection.close_reason
            assert (await first.request({"type": "ping"}))["type"] == "pong"
        await wait_connections(api, 0)
        async with connect(node.ws_url, token("c")) as again:
            assert again.welcome["user"] == "c"
        metrics = (await api.get("/metrics")).text
        assert 'hub_disconnections_total{code="1013"} 1.0' in metrics


async def test_connection_limit_closes_every_websocket_endpoint_at_once() -> None:
    """One lifecycle for every WebSocket endpoint: a full node closes a Centrifugo client
    (/connection/websocket and /connection/uni_websocket) with Centrifugo's 3001 as soon as it
    is accepted, before its connect request, and counts it as /ws's refusal (1013)."""
    async with running_node(make_settings(max_connections=1)) as node, node.api() as api, \
            connect(node.ws_url, token("a")):
        base = node.url.replace("http://", "ws://")
        for path in ("/connection/websocket", "/connection/uni_websocket"):
            async with websockets.connect(base + path, open_timeout=WAIT) as connection:
                assert await Client(connection).closed() == 3001
                assert connection.close_reason == "try again later"
        metrics = (await api.get("/metrics")).text
        assert 'hub_disconnections_total{code="1013"} 2.0' in metrics


async def test_connection_limit_frees_a_place_when_one_leaves() -> None:
    async with running_node(make_settings(max_connections=2)) as node, node.api() as api, \
            connect(node.ws_url, token("a")):
        async with connect(node.ws_url, token("b")):
            pass
        await wait_connections(api, 1)
        async with connect(node.ws_url, token("c")) as third:
            assert third.welcome["user"] == "c"


async def test_connection_limit_holds_for_auth_frame_logins() -> None:
    """Sockets that all pass the check before any of them authenticated: the limit still
    holds once they send their `auth` frames."""
    async with running_node(make_settings(max_connections=2)) as node, \
            contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(node.ws_url, welcome=False))
                   for _ in range(3)]
        for i, client in enumerate(clients):
            await client.send({"type": "auth", "token": token(f"user{i}")})
        outcomes: list[object] = []
        for client in clients:
            try:
                outcomes.append((await client.recv())["type"])
            except websockets.ConnectionClosed:
                outcomes.append(client.connection.close_code)
    assert outcomes == ["welcome", "welcome", 1013]
