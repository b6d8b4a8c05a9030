"""The HTTP API, probes and metrics (PROTOCOL §1, §2, §8, §9), over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from hub.abuse import REASONS
from hub.hooks import HOOK_NAMES, OUTCOMES
from hub.metrics import EMULATION_OUTCOMES
from tests.support import (
    API_KEY,
    WAIT,
    RunningNode,
    connect,
    eventually,
    make_settings,
    metric,
    metric_of,
    next_message,
    running_node,
    token,
)

ONE_MIB = 1024 * 1024


def bare(node: RunningNode, **headers: str) -> httpx.AsyncClient:
    """An HTTP client without the API key."""
    return httpx.AsyncClient(base_url=node.url, headers=headers, timeout=WAIT)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.fixture
async def api(node: RunningNode) -> AsyncIterator[httpx.AsyncClient]:
    async with node.api() as client:
        yield client


# keys


async def test_api_key_in_x_api_key_header(node: RunningNode) -> None:
    async with bare(node, **{"X-API-Key": API_KEY}) as http:
        response = await http.post("/api/publish", json={"channel": "room", "data": 1})
    assert response.status_code == 200 and response.json() == {}


async def test_api_key_as_bearer(node: RunningNode) -> None:
    async with bare(node, Authorization=f"Bearer {API_KEY}") as http:
        response = await http.post("/api/publish", json={"channel": "room", "data": 1})
    assert response.status_code == 200 and response.json() == {}


BAD_KEYS: list[dict[str, str]] = [
    {}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {API_KEY}"}, {"X-API-Key": ""}, {"X-API-Key": API_KEY + "x"},
]


async def test_missing_or_wrong_key_is_401(node: RunningNode) -> None:
    for headers in BAD_KEYS:
        async with bare(node, **headers) as http:
            for response in [
                await http.post("/api/publish", json={"channel": "room", "data": 1}),
                await http.get("/api/stats"),
                await http.get("/api/channels"),
                await http.get("/api/history/feed:a"),
            ]:
                assert_error(response, 401, "unauthorized")


async def test_no_key_configured_is_403() -> None:
    async with running_node(make_settings(api_key=None)) as node:
        async with bare(node) as http:
            assert_error(await http.get("/api/stats"), 403, "forbidden")
        async with bare(node, **{"X-API-Key": "anything"}) as http:
            response = await http.post("/api/publish", json={"channel": "room", "data": 1})
            assert_error(response, 403, "forbidden")


async def test_dev_mode_opens_the_api_without_a_key() -> None:
    async with running_node(make_settings(api_key=None, dev=True)) as node, bare(node) as http:
        response = await http.post("/api/publish", json={"channel": "room", "data": 1})
        assert response.status_code == 200 and response.json() == {}


async def test_dev_mode_accepts_a_configured_key_and_no_key() -> None:
    async with running_node(make_settings(dev=True)) as node:
        async with bare(node) as http:
            assert (await http.get("/api/stats")).status_code == 200
        async with bare(node, **{"X-API-Key": API_KEY}) as http:
            assert (await http.get("/api/stats")).status_code == 200
        async with bare(node, Authorization=f"Bearer {API_KEY}") as http:
            assert (await http.get("/api/stats")).status_code == 200


async def test_probes_and_metrics_need_no_key(node: RunningNode) -> None:
    async with bare(node) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200


# bodies


async def test_malformed_body_is_400_bad_request(api: httpx.AsyncClient) -> None:
    for content in [b"{not json", b"", b"[]", b'"text"', b'{"channel": "room", "data": 1',
                    b"\xff\xfe"]:
        for path in ("/api/publish", "/api/broadcast", "/api/send", "/api/disconnect"):
            response = await api.post(path, content=content,
                                      headers={"Content-Type": "application/json"})
            assert_error(response, 400, "bad_request")


MISTYPED: list[tuple[str, dict[str, Any]]] = [
        ("/api/publish", {"data": 1}),
        ("/api/publish", {"channel": "room"}),
        ("/api/publish", {"channel": 5, "data": 1}),
        ("/api/publish", {"channel": "room", "data": 1, "event": 7}),
        ("/api/broadcast", {"data": 1}),
        ("/api/broadcast", {"channels": "room", "data": 1}),
        ("/api/broadcast", {"channels": ["room"]}),
        ("/api/send", {"data": 1}),
        ("/api/send", {"user": 5, "data": 1}),
        ("/api/send", {"user": "", "data": 1}),
        ("/api/send", {"user": "u" * 129, "data": 1}),
        ("/api/disconnect", {}),
        ("/api/disconnect", {"user": "bob", "code": "4003"}),
        ("/api/disconnect", {"user": "bob", "reason": 1}),
]


async def test_missing_or_mistyped_field_is_400(api: httpx.AsyncClient) -> None:
    for path, body in MISTYPED:
        assert_error(await api.post(path, json=body), 400, "bad_request")


async def test_bad_channel_is_400_invalid_channel(api: httpx.AsyncClient) -> None:
    for channel in ["", "has space", "ü", "x" * 256, "a*b", "@", "@" + "u" * 129]:
        response = await api.post("/api/publish", json={"channel": channel, "data": 1})
        assert_error(response, 400, "invalid_channel")


async def test_body_over_one_mib_is_413(api: httpx.AsyncClient) -> None:
    big = {"channel": "room", "data": "x" * ONE_MIB}
    response = await api.post("/api/publish", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"]


async def test_after_a_413_the_connection_serves_the_next_request(node: RunningNode) -> None:
    """The rest of a refused body is read and dropped, not taken for the next request's
    head (once answered with a 431 after the 413, and counted as http_head_too_big)."""
    address = httpx.URL(node.url)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        body = b'{"channel": "room", "data": "' + b"x" * (2 * ONE_MIB) + b'"}'
        writer.write(b"POST /api/publish HTTP/1.1\r\nhost: hub\r\nx-api-key: %s\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                     % (API_KEY.encode(), len(body)) + body)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: hub\r\n\r\n")
        async with asyncio.timeout(WAIT):
            first = await reader.readuntil(b"\r\n")
            await reader.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 413"), first
            answer = await reader.read(60)
            while not answer.endswith(b"}}"):
                answer += await reader.read(1)
            second = await reader.readuntil(b"\r\n")
        assert second.startswith(b"HTTP/1.1 200"), second
    finally:
        writer.close()
    assert await metric(node, "hub_protocol_errors_total", reason="http_head_too_big") == 0


async def test_chunked_body_over_one_mib_is_413(api: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"channel": "room", "data": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}'

    response = await api.post("/api/publish", content=chunks())
    assert response.status_code == 413


async def test_body_just_under_one_mib_is_accepted(api: httpx.AsyncClient) -> None:
    prefix = b'{"channel": "room", "data": "'
    content = prefix + b"x" * (ONE_MIB - len(prefix) - 2) + b'"}'
    assert len(content) == ONE_MIB
    response = await api.post("/api/publish", content=content)
    assert response.status_code == 200, response.text


# publish, broadcast, send, disconnect


async def test_publish_reaches_subscribers(node: RunningNode, api: httpx.AsyncClient) -> None:
    async with connect(node.ws_url, token("alice")) as alice:
        await alice.subscribe("room")
        response = await api.post("/api/publish",
                                  json={"channel": "room", "data": {"n": 1}, "event": "e"})
        assert response.status_code == 200 and response.json() == {}
        frame = await next_message(alice, "room")
    assert frame["data"] == {"n": 1} and frame["event"] == "e"
    assert isinstance(frame["ts"], int)
    assert "from" not in frame and "offset" not in frame and "epoch" not in frame


async def test_publish_on_history_channel_answers_offset_and_epoch(
    api: httpx.AsyncClient,
) -> None:
    first = (await api.post("/api/publish", json={"channel": "feed:a", "data": 1})).json()
    second = (await api.post("/api/publish", json={"channel": "feed:a", "data": 2})).json()
    assert set(first) == {"offset", "epoch"}
    assert first["offset"] == 1 and second["offset"] == 2
    assert isinstance(first["epoch"], str) and first["epoch"] == second["epoch"]


async def test_publish_without_subscribers_is_ok(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/publish", json={"channel": "nobody:here", "data": None})
    assert response.status_code == 200 and response.json() == {}


async def test_broadcast_bad_channel_fails_only_its_item(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("alice")) as alice:
        await alice.subscribe("room")
        await alice.subscribe("chat:x")
        body = {"channels": ["room", "bad channel", "feed:b", "chat:x"], "data": [1, 2]}
        response = await api.post("/api/broadcast", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert results[0] == {"channel": "room"}
        assert results[1]["channel"] == "bad channel"
        assert results[1]["error"]["code"] == "invalid_channel"
        assert results[1]["error"]["message"]
        assert results[2] == {"channel": "feed:b", "offset": 1, "epoch": results[2]["epoch"]}
        assert results[3] == {"channel": "chat:x"}
        assert (await next_message(alice, "room"))["data"] == [1, 2]
        assert (await next_message(alice, "chat:x"))["data"] == [1, 2]


async def test_broadcast_to_no_channels(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/broadcast", json={"channels": [], "data": 1})
    assert response.status_code == 200 and response.json() == {"results": []}


async def test_batch_runs_publish_broadcast_and_send_each_on_its_own_in_order(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("alice")) as alice:
        await alice.subscribe("room")
        await alice.subscribe("feed:a")
        commands: list[dict[str, Any]] = [
            {"publish": {"channel": "feed:a", "data": 1}},
            {"publish": {"channel": "room", "data": 1, "event": "e"}},
            {"publish": {"channel": "feed:a", "data": 2}},
            {"broadcast": {"channels": ["room", "bad name", "feed:a"], "data": 3}},
            {"send": {"user": "alice", "data": 4}},
            {},
            {"publish": {"channel": "room", "data": 9}, "send": {"user": "x", "data": 9}},
            {"publish": {"channel": "no good", "data": 9}},
            {"send": {"user": "", "data": 9}},
            {"publish": {"channel": "feed:a", "data": 5}},
        ]
        response = await api.post("/api/batch", json={"commands": commands})
        assert response.status_code == 200, response.text
        replies = response.json()["replies"]
        epoch = replies[0]["publish"]["epoch"]
        assert replies[:3] == [{"publish": {"offset": 1, "epoch": epoch}}, {"publish": {}},
                               {"publish": {"offset": 2, "epoch": epoch}}]
        room, bad, feed = replies[3]["broadcast"]["results"]
        assert room == {"channel": "room"} and bad["error"]["code"] == "invalid_channel"
        assert feed == {"channel": "feed:a", "offset": 3, "epoch": epoch}
        assert replies[4] == {"send": {}}
        assert [reply["error"]["code"] for reply in replies[5:9]] == [
            "bad_request", "bad_request", "invalid_channel", "bad_request"]
        assert replies[9] == {"publish": {"offset": 4, "epoch": epoch}}
        frames = [await alice.expect("message") for _ in range(7)]
    feed_frames = [(f["offset"], f["data"]) for f in frames if f["channel"] == "feed:a"]
    assert feed_frames == [(1, 1), (2, 2), (3, 3), (4, 5)]
    assert [f["data"] for f in frames if f["channel"] == "room"] == [1, 3]
    assert [f["data"] for f in frames if f["channel"] == "@alice"] == [4]


async def test_batch_bad_bodies_are_400(api: httpx.AsyncClient) -> None:
    for body in (b"[]", b'{"commands": 1}', b'{"commands": [{"publish": {"data": 1}}]}',
                 b'{"commands": [1]}'):
        assert_error(await api.post("/api/batch", content=body), 400, "bad_request")
    many = {"commands": [{"send": {"user": "u", "data": 1}}] * 10_001}
    assert_error(await api.post("/api/batch", json=many), 400, "bad_request")
    response = await api.post("/api/batch", json={"commands": []})
    assert response.status_code == 200 and response.json() == {"replies": []}


async def test_send_reaches_every_connection_of_the_user(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("bob")) as bob1, \
            connect(node.ws_url, token("bob")) as bob2, \
            connect(node.ws_url, token("carol")) as carol:
        response = await api.post("/api/send", json={"user": "bob", "data": {"hi": 1},
                                                     "event": "note"})
        assert response.status_code == 200 and response.json() == {}
        for client in (bob1, bob2):
            frame = await client.expect("message")
            assert frame["channel"] == "@bob" and frame["data"] == {"hi": 1}
            assert frame["event"] == "note" and "from" not in frame
        pong = await carol.request({"type": "ping"})
        assert pong["type"] == "pong"  # carol got nothing before her pong


async def test_send_to_an_absent_user_is_ok(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/send", json={"user": "nobody", "data": 1})
    assert response.status_code == 200 and response.json() == {}


async def test_publish_to_personal_channel_is_send(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("bob")) as bob:
        response = await api.post("/api/publish", json={"channel": "@bob", "data": "psst"})
        assert response.status_code == 200 and response.json() == {}
        frame = await bob.expect("message")
    assert frame["channel"] == "@bob" and frame["data"] == "psst" and "from" not in frame


async def test_disconnect_default_code_4003(node: RunningNode, api: httpx.AsyncClient) -> None:
    async with connect(node.ws_url, token("bob")) as bob1, \
            connect(node.ws_url, token("bob")) as bob2, \
            connect(node.ws_url, token("carol")) as carol:
        response = await api.post("/api/disconnect", json={"user": "bob"})
        assert response.status_code == 200 and response.json() == {}
        assert await bob1.closed() == 4003
        assert await bob2.closed() == 4003
        assert (await carol.request({"type": "ping"}))["type"] == "pong"


async def test_disconnect_custom_code_and_reason(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("bob")) as bob:
        body = {"user": "bob", "code": 4500, "reason": "banned"}
        assert (await api.post("/api/disconnect", json=body)).status_code == 200
        assert await bob.closed() == 4500
        assert bob.connection.close_reason == "banned"


async def test_disconnect_long_non_ascii_reason_still_closes_with_the_code(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    """A close reason holds 123 bytes; a longer one is cut, not a failed close (1006)."""
    async with connect(node.ws_url, token("bob")) as bob:
        body = {"user": "bob", "code": 4501, "reason": "é" * 100}
        assert (await api.post("/api/disconnect", json=body)).status_code == 200
        assert await bob.closed() == 4501
        reason = bob.connection.close_reason
    assert reason and set(reason) == {"é"} and len(reason.encode()) <= 123


async def test_disconnect_bad_code_is_400(node: RunningNode, api: httpx.AsyncClient) -> None:
    async with connect(node.ws_url, token("bob")) as bob:
        for code in [999, 1001, 1006, 2999, 5000, -1]:
            response = await api.post("/api/disconnect", json={"user": "bob", "code": code})
            assert_error(response, 400, "bad_request")
        assert (await bob.request({"type": "ping"}))["type"] == "pong"  # still connected


async def test_disconnect_absent_user_is_ok(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/disconnect", json={"user": "nobody"})
    assert response.status_code == 200 and response.json() == {}


# presence, history, channels, stats


async def test_presence_lists_client_user_node_info(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("alice", info={"name": "Alice"})) as alice, \
            connect(node.ws_url, token("bob")) as bob:
        await alice.subscribe("chat:lobby")
        await bob.subscribe("chat:lobby")
        response = await api.get("/api/presence/chat:lobby")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["channel"] == "chat:lobby"
        by_client = {entry["client"]: entry for entry in body["clients"]}
        assert by_client == {
            alice.welcome["client"]: {"client": alice.welcome["client"], "user": "alice",
                                      "node": "test-node", "info": {"name": "Alice"}},
            bob.welcome["client"]: {"client": bob.welcome["client"], "user": "bob",
                                    "node": "test-node"},
        }
        await bob.request({"type": "unsubscribe", "channel": "chat:lobby"})
        body = (await api.get("/api/presence/chat:lobby")).json()
        assert [entry["user"] for entry in body["clients"]] == ["alice"]


async def test_presence_of_an_empty_channel(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/presence/chat:empty")
    assert response.status_code == 200
    assert response.json() == {"channel": "chat:empty", "clients": []}


async def test_presence_drops_a_disconnected_client(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("alice")) as alice:
        await alice.subscribe("chat:gone")
        assert len((await api.get("/api/presence/chat:gone")).json()["clients"]) == 1
    async def clients() -> list[Any]:  # polling from outside: the server has no event for it
        found: list[Any] = (await api.get("/api/presence/chat:gone")).json()["clients"]
        return found

    await eventually(clients, lambda found: not found, WAIT, "no one present")


async def test_presence_on_namespace_without_presence_is_403(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/presence/room"), 403, "forbidden")
    assert_error(await api.get("/api/presence/feed:a"), 403, "forbidden")


async def test_presence_bad_channel_is_400(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/presence/bad%20name"), 400, "invalid_channel")


async def test_history_over_http(api: httpx.AsyncClient) -> None:
    for n in range(1, 6):
        await api.post("/api/publish", json={"channel": "feed:h", "data": n, "event": f"e{n}"})
    body = (await api.get("/api/history/feed:h")).json()
    assert body["channel"] == "feed:h" and body["offset"] == 5
    epoch = body["epoch"]
    assert [m["offset"] for m in body["messages"]] == [1, 2, 3, 4, 5]
    first = body["messages"][0]
    assert set(first) == {"offset", "data", "ts", "event"}
    assert first["data"] == 1 and first["event"] == "e1"
    newest = (await api.get("/api/history/feed:h", params={"limit": 2})).json()
    assert [m["data"] for m in newest["messages"]] == [4, 5]
    after = (await api.get("/api/history/feed:h",
                           params={"since": 1, "epoch": epoch, "limit": 2})).json()
    assert [m["offset"] for m in after["messages"]] == [2, 3]
    other = (await api.get("/api/history/feed:h", params={"since": 1, "epoch": "other"})).json()
    assert other == {"channel": "feed:h", "epoch": epoch, "offset": 5, "messages": []}


async def test_channel_names_with_slash_and_equals_in_api_paths(api: httpx.AsyncClient) -> None:
    await api.post("/api/publish", json={"channel": "feed:a/b=c.d", "data": 1})
    body = (await api.get("/api/history/feed:a/b=c.d")).json()
    assert body["channel"] == "feed:a/b=c.d" and body["offset"] == 1
    presence = (await api.get("/api/presence/chat:a/b=c")).json()
    assert presence == {"channel": "chat:a/b=c", "clients": []}


async def test_history_bad_query_is_400(api: httpx.AsyncClient) -> None:
    queries: list[dict[str, Any]] = [
        {"since": "x", "epoch": "e"}, {"limit": "many"}, {"since": 1}, {"limit": -1},
    ]
    for params in queries:
        response = await api.get("/api/history/feed:h", params=params)
        assert_error(response, 400, "bad_request")


async def test_history_of_channel_without_history_is_403(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/history/room"), 403, "forbidden")
    assert_error(await api.get("/api/history/@bob"), 403, "forbidden")


async def test_channels_with_counts_and_prefix(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("alice")) as alice, \
            connect(node.ws_url, token("bob")) as bob:
        for channel in ("chat:a", "chat:b", "room"):
            await alice.subscribe(channel)
        await bob.subscribe("chat:a")
        everything = (await api.get("/api/channels")).json()
        assert everything == {"channels": {"chat:a": 2, "chat:b": 1, "room": 1}}
        chats = (await api.get("/api/channels", params={"prefix": "chat:"})).json()
        assert chats == {"channels": {"chat:a": 2, "chat:b": 1}}
        none = (await api.get("/api/channels", params={"prefix": "zzz"})).json()
        assert none == {"channels": {}}


async def test_stats_shape(node: RunningNode, api: httpx.AsyncClient) -> None:
    async with connect(node.ws_url, token("alice")) as alice, \
            connect(node.ws_url, token("alice")) as alice2, \
            connect(node.ws_url, token("bob")) as bob:
        await alice.subscribe("chat:a")
        await alice2.subscribe("chat:a")
        await bob.subscribe("room")
        body = (await api.get("/api/stats")).json()
    assert set(body) == {"nodes", "total"}
    [entry] = body["nodes"]
    assert set(entry) == {"node", "connections", "users", "subscriptions", "channels",
                          "started", "updated", "version", "address", "state", "rss", "cpu",
                          "published", "delivered", "accepted"}
    assert entry["node"] == "test-node"
    assert (entry["connections"], entry["users"], entry["subscriptions"],
            entry["channels"]) == (3, 2, 3, 2)
    assert isinstance(entry["started"], int) and entry["started"] <= entry["updated"]
    assert body["total"] == {"nodes": 1, "connections": 3, "users": 2, "subscriptions": 3,
                             "channels": 2}


async def test_probes(api: httpx.AsyncClient) -> None:
    healthz = await api.get("/healthz")
    readyz = await api.get("/readyz")
    assert healthz.status_code == 200 and readyz.status_code == 200


async def test_unknown_api_path_is_404(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/nothing")).status_code == 404


# metrics


async def test_metrics_prometheus_text(api: httpx.AsyncClient) -> None:
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("hub_connections", "hub_subscriptions", "hub_channels",
                 "hub_connections_accepted_total", "hub_messages_delivered_total",
                 "hub_broker_up", "hub_broker_reconnects_total", "hub_publish_seconds_bucket",
                 "hub_delivery_lag_seconds_bucket"):
        assert re.search(rf"^{name}(\{{| )", text, re.MULTILINE), name
    # label sets known up front start at 0, so rate() works from the first scrape
    for source in ("api", "client"):
        assert f'hub_messages_published_total{{source="{source}"}} 0.0' in text
    assert 'hub_messages_dropped_total{reason="slow_consumer"} 0.0' in text
    assert metric_of(text, "hub_broker_up") == 1
    assert metric_of(text, "hub_node_info", node="test-node", version="0.1.0",
                  write_path="direct") == 1


async def test_metrics_openmetrics_when_asked(api: httpx.AsyncClient) -> None:
    accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    response = await api.get("/metrics", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "hub_connections" in response.text


async def scrape(api: httpx.AsyncClient) -> str:
    return (await api.get("/metrics")).text


async def test_delivered_counts_every_frame(node: RunningNode, api: httpx.AsyncClient) -> None:
    subscribers, messages = 3, 4
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(node.ws_url, token(f"user{i}")))
                   for i in range(subscribers)]
        for client in clients:
            await client.subscribe("chat:count")
        text = await scrape(api)
        before = metric_of(text, "hub_messages_delivered_total")
        assert metric_of(text, "hub_connections") == subscribers
        assert metric_of(text, "hub_subscriptions") == subscribers  # personal ones not counted
        assert metric_of(text, "hub_channels") == 1
        for n in range(messages):
            await api.post("/api/publish", json={"channel": "chat:count", "data": n})
        for client in clients:
            got = [(await next_message(client, "chat:count"))["data"] for _ in range(messages)]
            assert got == list(range(messages))
        after = metric_of(await scrape(api), "hub_messages_delivered_total")
    assert after - before == subscribers * messages


async def test_published_counts_by_source(node: RunningNode, api: httpx.AsyncClient) -> None:
    text = await scrape(api)
    api_before = metric_of(text, "hub_messages_published_total", source="api")
    client_before = metric_of(text, "hub_messages_published_total", source="client")
    async with connect(node.ws_url, token("alice")) as alice:
        for n in range(2):
            reply = await alice.request({"type": "publish", "channel": "chat:p", "data": n})
            assert reply["type"] == "published", reply
        denied = await alice.request({"type": "publish", "channel": "room", "data": 0})
        assert denied["type"] == "error"  # default namespace: API-only publish
    for n in range(3):
        await api.post("/api/publish", json={"channel": "chat:p", "data": n})
    await api.post("/api/send", json={"user": "alice", "data": 1})
    text = await scrape(api)
    assert metric_of(text, "hub_messages_published_total", source="api") - api_before == 4
    assert metric_of(text, "hub_messages_published_total", source="client") - client_before == 2


async def test_no_channel_or_user_names_in_metric_labels(
    node: RunningNode, api: httpx.AsyncClient
) -> None:
    async with connect(node.ws_url, token("secretuser")) as client:
        await client.subscribe("chat:secretroom")
        await client.request({"type": "publish", "channel": "chat:secretroom", "data": 1})
        await client.request({"type": "subscribe", "channel": "secretforbidden"})
        await api.post("/api/publish", json={"channel": "feed:secretfeed", "data": 1})
        await api.post("/api/send", json={"user": "secretuser", "data": 1})
        await api.post("/api/disconnect", json={"user": "secretuser"})
        await client.closed()
    async with connect(node.ws_url, welcome=False) as refused:
        await refused.send({"type": "auth", "token": token("secretbad")[:-3]})
        assert await refused.closed() == 4001
    for accept in (None, "application/openmetrics-text"):
        headers = {"Accept": accept} if accept else {}
        text = (await api.get("/metrics", headers=headers)).text
        assert "secret" not in text
        labels = re.findall(r'="([^"]*)"', text)
        assert set(labels) <= _ALLOWED_LABEL_VALUES | {"test-node", "0.1.0", "direct"}, set(labels)


_ALLOWED_LABEL_VALUES = {
    "api", "client", "slow_consumer", "ws", "centrifugo",
    # close codes and error codes, le buckets
    *(str(code) for code in (1000, 1001, 1003, 1005, 1006, 1008, 1009, 1011, 1012, 1013,
                             4001, 4002, 4003, 4008, 4029)),
    "bad_request", "unknown_type", "invalid_channel", "forbidden", "already_subscribed",
    "not_subscribed", "too_many_subscriptions", "rate_limited", "unavailable", "internal",
    "missing", "invalid", "expired", "timeout", *REASONS,
    "+Inf", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
    "1.0", "2.5", "5.0",
    *HOOK_NAMES, *OUTCOMES,  # hub_hook_calls_total (hook names are no channel or user)
    "10.0", "30.0", "60.0", "300.0",  # hub_event_delay_seconds: retries may take long
    # hub_events_total (PROTOCOL §14)
    "channel_occupied", "channel_vacated", "user_online", "user_offline", "member_added",
    "member_removed", "client_publish", "produced", "sent", "retried", "dropped",
    # hub_emulation_requests_total (PROTOCOL §15)
    *EMULATION_OUTCOMES,
}


# one write per response


class Recording:
    """What a transport is asked to write, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_one_write_joins_a_head_with_its_body_and_passes_the_rest() -> None:
    from hub.deadline import OneWrite

    raw = Recording()
    transport = OneWrite(raw)
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    transport.write(head)
    assert raw.writes == []
    transport.write(b"{}")
    assert raw.writes == [head + b"{}"]
    continue_ = b"HTTP/1.1 100 Continue\r\n\r\n"
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    transport.write(continue_)
    transport.write(chunked)
    assert raw.writes[1:] == [continue_, chunked]
    transport.write(head)  # a response cut short: its head still goes before the close
    transport.close()
    assert raw.writes[3:] == [head] and raw.closed and transport.is_closing()


async def test_responses_keep_working_over_one_connection(node: RunningNode) -> None:
    """Keep-alive, HEAD (no body at all), `Expect: 100-continue`, an error: each answered
    whole, in order, on one connection."""
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"channel":"room","data":1}'
    key = f"x-api-key: {API_KEY}\r\n".encode()
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
                 b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
                 b"POST /api/publish HTTP/1.1\r\nhost: x\r\n" + key +
                 b"expect: 100-continue\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % len(body))
    await writer.drain()
    async with asyncio.timeout(WAIT):
        for _ in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(re.search(rb"content-length: (\d+)", head)[1])  # type: ignore[index]
            if _ == 0:
                assert await reader.readexactly(length) == b'{"status":"ok"}'
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body + b"POST /api/publish HTTP/1.1\r\nhost: x\r\n" + key +
                     b"content-length: 1\r\n\r\n{")
        for status, expected in ((b"200", b"{}"), (b"400", b'{"error"')):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 " + status)
            length = int(re.search(rb"content-length: (\d+)", head)[1])  # type: ignore[index]
            assert (await reader.readexactly(length)).startswith(expected)
    writer.close()
