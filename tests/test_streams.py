"""PROTOCOL §15 on one node, with real clients: the one-way transports (SSE, HTTP stream,
WebSocket) and the bidirectional emulation (a stream and `POST /emulation`), their bad
input, slow consumers, keepalive and drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from centrifuge.codecs import _varint_decode, _varint_encode
from centrifuge.protocol import client_pb2 as pb

from tests.conftest import NAMESPACES
from tests.needs import need
from tests.support import (
    WAIT,
    RunningNode,
    eventually,
    make_settings,
    metric,
    publish,
    running_node,
    token,
)


class Events:
    """An SSE or NDJSON stream read line by line, with bounded waits."""

    def __init__(self, response: httpx.Response, sse: bool) -> None:
        self.response = response
        self.sse = sse
        self.lines = response.aiter_lines()
        self.last_id: str | None = None

    async def next(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next message (keepalives skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.next_raw()
                if item not in ({}, None):
                    assert isinstance(item, dict)
                    return item

    async def next_raw(self) -> dict[str, Any] | None:
        """The next message, `{}` for a ping line, None for an SSE comment."""
        if not self.sse:
            line = await anext(self.lines)
            return json.loads(line) if line else None
        data: str | None = None
        while True:
            line = await anext(self.lines)
            if line == "":
                if data is not None:
                    result: dict[str, Any] = json.loads(data)
                    return result
                continue
            if line.startswith(":"):
                return None
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data = value
            elif field == "id":
                self.last_id = value


@contextlib.asynccontextmanager
async def uni_stream(
    url: str, connect: dict[str, Any], *, sse: bool = True, headers: dict[str, str] | None = None
) -> AsyncIterator[Events]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as http:
        if sse:
            request = http.build_request(
                "GET", url + "/connection/uni_sse", params={"cf_connect": json.dumps(connect)},
                headers=headers)
        else:
            request = http.build_request("POST", url + "/connection/uni_http_stream",
                                         json=connect, headers=headers)
        response = await http.send(request, stream=True)
        try:
            assert response.status_code == 200, (await response.aread()).decode()
            yield Events(response, sse)
        finally:
            await response.aclose()


@pytest.fixture
async def history_node() -> AsyncIterator[RunningNode]:
    async with running_node(make_settings(namespaces=NAMESPACES, ping_interval=0.5)) as node:
        yield node


@pytest.mark.parametrize("sse", [True, False], ids=["uni_sse", "uni_http_stream"])
async def test_uni_stream_gets_pushes_of_token_channels(
    history_node: RunningNode, sse: bool
) -> None:
    """The connect push first, with the token's channels (wildcards left out); then the
    channels' publications, one push each; history channels carry their offset as id."""
    tok = token("ann", channels=["feed:a", "news", "feed:*"])
    async with uni_stream(history_node.url, {"token": tok}, sse=sse) as events:
        connect = (await events.next())["connect"]
        assert set(connect["subs"]) == {"#ann", "@ann", "feed:a", "news"}
        assert connect["subs"]["feed:a"]["recoverable"] is True
        assert connect["session"] and connect["client"]
        await publish(history_node, "feed:a", {"n": 1})
        push = await events.next()
        assert push["channel"] == "feed:a"
        assert push["pub"]["data"] == {"n": 1} and push["pub"]["offset"] == 1
        if sse:
            assert events.last_id == "1"
        await publish(history_node, "news", {"n": 2})
        assert (await events.next())["pub"]["data"] == {"n": 2}
        await history_node.http.post("/api/send", json={"user": "ann", "data": {"hi": 1}})
        pushes = [await events.next(), await events.next()]  # under both its names
        assert {push["channel"] for push in pushes} == {"@ann", "#ann"}
        assert all(push["pub"]["data"] == {"hi": 1} for push in pushes)


async def test_uni_sse_resumes_from_last_event_id(history_node: RunningNode) -> None:
    """A reconnecting EventSource sends Last-Event-ID: what it missed comes first, in
    order, then the live stream."""
    tok = token("bob", channels=["feed:r"])
    async with uni_stream(history_node.url, {"token": tok}) as events:
        await events.next()
        await publish(history_node, "feed:r", 1)
        await events.next()
        last = events.last_id
    assert last == "1"
    for n in (2, 3, 4):
        await publish(history_node, "feed:r", n)
    async with uni_stream(history_node.url, {"token": tok},
                          headers={"Last-Event-ID": last}) as events:
        connect = (await events.next())["connect"]
        assert connect["subs"]["feed:r"]["recovered"] is True
        assert [(await events.next())["pub"]["data"] for _ in range(3)] == [2, 3, 4]
        assert events.last_id == "4"
        await publish(history_node, "feed:r", 5)
        assert (await events.next())["pub"]["offset"] == 5


async def test_uni_http_stream_with_curl(history_node: RunningNode) -> None:
    """`curl -N` reads the newline-delimited pushes as they come."""
    curl = shutil.which("curl")
    need(curl, "curl (apt-get install curl)")
    assert curl is not None
    tok = token("cid", channels=["news"])
    process = await asyncio.create_subprocess_exec(
        curl, "-sN", "-X", "POST", "--max-time", "10", "-d", json.dumps({"token": tok}),
        history_node.url + "/connection/uni_http_stream", stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            first = json.loads(await process.stdout.readline())
            assert "news" in first["connect"]["subs"]
            await publish(history_node, "news", {"via": "curl"})
            while True:
                line = (await process.stdout.readline()).strip()
                if line and line != b"{}":
                    break
        push = json.loads(line)
        assert push["channel"] == "news" and push["pub"]["data"] == {"via": "curl"}
    finally:
        process.kill()
        await process.wait()


async def test_uni_keepalive(history_node: RunningNode) -> None:
    """An idle stream gets the framing's keepalive every HUB_PING_INTERVAL."""
    tok = token("kay", channels=["news"])
    async with uni_stream(history_node.url, {"token": tok}) as events:
        await events.next()
        async with asyncio.timeout(WAIT):
            assert await events.next_raw() is None  # an SSE comment
    async with uni_stream(history_node.url, {"token": tok}, sse=False) as events:
        await events.next()
        async with asyncio.timeout(WAIT):
            assert await events.next_raw() == {}


async def test_uni_websocket(history_node: RunningNode) -> None:
    ws_url = history_node.url.replace("http://", "ws://") + "/connection/uni_websocket"
    async with websockets.connect(ws_url) as ws:
        await ws.send(json.dumps({"token": token("wes", channels=["news"])}))
        connect = json.loads(await asyncio.wait_for(ws.recv(), WAIT))["connect"]
        assert "news" in connect["subs"]
        await publish(history_node, "news", "x")
        push = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert push["channel"] == "news" and push["pub"]["data"] == "x"
    async with websockets.connect(ws_url) as ws:
        await ws.send("not json")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501


async def test_uni_bad_input(history_node: RunningNode) -> None:
    """Malformed connect requests and bad tokens are answered before any stream, with
    Centrifugo's disconnect in the body."""
    url = history_node.url
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
        no_param = await http.get("/connection/uni_sse")
        assert no_param.status_code == 400 and "cf_connect" in no_param.text
        bad_json = await http.get("/connection/uni_sse", params={"cf_connect": "{nope"})
        assert bad_json.status_code == 400
        assert bad_json.json()["disconnect"]["code"] == 3501
        wrong_shape = await http.post("/connection/uni_http_stream", json=["token"])
        assert wrong_shape.status_code == 400
        empty = await http.post("/connection/uni_http_stream", content=b"")
        assert empty.status_code == 400
        bad_token = await http.post("/connection/uni_http_stream", json={"token": "x.y.z"})
        assert bad_token.status_code == 401
        assert bad_token.json()["disconnect"] == {"code": 3500, "reason": "invalid token"}
        expired = await http.post("/connection/uni_http_stream",
                                  json={"token": token("old", ttl=-10)})
        assert expired.status_code == 401 and expired.json()["disconnect"]["code"] == 3005
        huge = await http.post("/connection/uni_http_stream",
                               content=b'{"token": "' + b"a" * 300_000 + b'"}')
        assert huge.status_code == 413
        put = await http.put("/connection/uni_sse")
        assert put.status_code == 405
    assert history_node.node.hub.sessions == {}


async def test_cors_preflight_and_headers(history_node: RunningNode) -> None:
    async with httpx.AsyncClient(base_url=history_node.url, timeout=WAIT) as http:
        preflight = await http.options("/emulation", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        answer = await http.post("/emulation", json={"session": "s", "node": "test-node",
                                                     "data": "{}"},
                                 headers={"Origin": "https://app.example"})
        assert answer.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in answer.headers


# bidirectional emulation


class Emulated:
    """What centrifuge-js does over http_stream: POST the connect command, read replies
    from the stream, POST the other commands to /emulation."""

    def __init__(self, events: Events, post_url: str, http: httpx.AsyncClient) -> None:
        self.events, self.post_url, self.http = events, post_url, http
        self.session = self.node = ""
        self.next_id = 2

    async def command(self, **command: Any) -> dict[str, Any]:
        command_id = self.next_id
        self.next_id += 1
        await self.send({"id": command_id, **command})
        while True:
            reply = await self.events.next()
            if reply.get("id") == command_id:
                return reply

    async def send(self, *commands: dict[str, Any]) -> httpx.Response:
        data = "\n".join(json.dumps(c) for c in commands)
        response = await self.http.post(self.post_url + "/emulation", json={
            "session": self.session, "node": self.node, "data": data})
        assert response.status_code == 204, response.text
        return response


@contextlib.asynccontextmanager
async def emulated(stream_url: str, post_url: str, tok: str, *, sse: bool = False
                   ) -> AsyncIterator[Emulated]:
    connect = json.dumps({"id": 1, "connect": {"token": tok, "name": "test"}})
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as http:
        if sse:
            request = http.build_request("GET", stream_url + "/connection/sse",
                                         params={"cf_connect": connect})
        else:
            request = http.build_request("POST", stream_url + "/connection/http_stream",
                                         content=connect)
        response = await http.send(request, stream=True)
        try:
            assert response.status_code == 200
            client = Emulated(Events(response, sse), post_url, http)
            reply = await client.events.next()
            assert reply["id"] == 1, reply
            client.session, client.node = reply["connect"]["session"], reply["connect"]["node"]
            yield client
        finally:
            await response.aclose()


@pytest.mark.parametrize("sse", [False, True], ids=["http_stream", "sse"])
async def test_emulation_on_one_node(history_node: RunningNode, sse: bool) -> None:
    url = history_node.url
    async with emulated(url, url, token("eve"), sse=sse) as client:
        assert client.node == "test-node" and len(client.session) > 20
        reply = await client.command(subscribe={"channel": "feed:e", "recover": True})
        assert reply["subscribe"]["recoverable"] is True
        reply = await client.command(publish={"channel": "chat:x", "data": {"a": 1}})
        assert "error" not in reply
        await publish(history_node, "feed:e", {"n": 1})
        push = await client.events.next()
        assert push["push"]["channel"] == "feed:e"
        assert push["push"]["pub"]["data"] == {"n": 1}
        # a pong for the server's ping keeps the session; answer one
        while (await client.events.next_raw()) != {}:
            pass
        await client.send({})
        reply = await client.command(unsubscribe={"channel": "feed:e"})
        assert reply["unsubscribe"] == {}
    await eventually(lambda: not history_node.node.hub.sessions)


async def test_emulation_bad_input(history_node: RunningNode) -> None:
    url = history_node.url
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
        unknown = await http.post("/emulation", json={"session": "nope", "node": "test-node",
                                                      "data": "{}"})
        assert unknown.status_code == 404 and "unknown session" in unknown.json()["error"][
            "message"]
        other = await http.post("/emulation", json={"session": "s", "node": "gone-node",
                                                    "data": "{}"})
        assert other.status_code == 404
        malformed = await http.post("/emulation", content=b"{]")
        assert malformed.status_code == 400
        get = await http.get("/emulation")
        assert get.status_code == 405
        no_connect = await http.post("/connection/http_stream", content=b'{"id":1}')
        assert no_connect.status_code == 400
        sse_no_param = await http.get("/connection/sse")
        assert sse_no_param.status_code == 400
        protobuf = await http.post("/connection/http_stream", content=b"\x0a\x02",
                                   headers={"Content-Type": "application/octet-stream"})
        assert protobuf.status_code == 400  # Protobuf, but not a whole command
    async with emulated(url, url, token("mal")) as client:
        # a command without an id: closed as Centrifugo does (bad request, no reconnect)
        await client.send({"subscribe": {"channel": "feed:q"}})
        push = await client.events.next()
        assert push["push"]["disconnect"]["code"] == 3501
        with pytest.raises(StopAsyncIteration):
            await client.events.next()


async def test_emulation_invalid_token_streams_a_disconnect(history_node: RunningNode) -> None:
    """The SDK must learn it should stop: a disconnect push (3500, no reconnect)."""
    url = history_node.url
    connect = json.dumps({"id": 1, "connect": {"token": "bad.token.here"}})
    async with httpx.AsyncClient(timeout=WAIT) as http:
        response = await http.post(url + "/connection/http_stream", content=connect)
    assert response.status_code == 200
    push = json.loads(response.text.splitlines()[0])
    assert push["push"]["disconnect"] == {"code": 3500, "reason": "invalid token"}


async def test_emulation_off() -> None:
    async with running_node(make_settings(emulation=False)) as node, \
            httpx.AsyncClient(base_url=node.url, timeout=WAIT) as http:
        assert (await http.post("/emulation", json={})).status_code == 404
        assert (await http.get("/connection/sse")).status_code == 404
        # the one-way transports stay
        assert (await http.get("/connection/uni_sse")).status_code == 400


async def test_slow_stream_reader_is_closed_and_memory_bounded() -> None:
    """A client that never reads its stream: the session's queue fills, the connection is
    closed as a slow consumer (3008), nothing else waits for it."""
    settings = make_settings(namespaces=NAMESPACES, queue_limit=50)
    async with running_node(settings) as node:
        _reader, writer = await asyncio.open_connection(*node.url[7:].split(":"))
        tok = token("slo", channels=["news"])
        body = json.dumps({"token": tok}).encode()
        writer.write(b"POST /connection/uni_http_stream HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await eventually(lambda: len(node.node.hub.sessions) == 1)
        big = "x" * 60_000
        async with node.api() as http, asyncio.timeout(20):
            while not await metric(node, "hub_messages_dropped_total", reason="slow_consumer"):
                await publish(http, "news", big)
        # Closed as slow: the close cannot reach a reader that does not read, so the node
        # drops it after the close handshake's time, or as here when it goes.
        writer.close()
        await eventually(lambda: not node.node.hub.sessions)
        assert await metric(node, "hub_disconnections_total", code="4008") == 1


async def test_drain_ends_streams_with_a_reconnect_hint(history_node: RunningNode) -> None:
    """SIGTERM's drain: each stream gets Centrifugo's disconnect push (3001, reconnect)
    and its response ends."""
    url = history_node.url
    async with uni_stream(url, {"token": token("dre", channels=["news"])}) as events, \
            emulated(url, url, token("drb")) as client:
        await events.next()
        drain = asyncio.create_task(history_node.node.drain())
        push = await events.next()
        assert push["disconnect"] == {"code": 3001, "reason": "shutdown", "reconnect": True}
        push = await client.events.next()
        assert push["push"]["disconnect"]["code"] == 3001
        assert push["push"]["disconnect"]["reconnect"] is True
        await asyncio.wait_for(drain, WAIT)


async def test_a_server_side_subscription_reaches_a_stream(history_node: RunningNode) -> None:
    """A subscription made through the node's subscribe path while the stream is open (what
    /api/subscribe does on the node holding the connection) brings the channel's pushes."""
    from hub import centrifugo_frames as cf
    from hub.commands import ClientCommands
    from hub.uni import UniSession

    async with uni_stream(history_node.url, {"token": token("sub", channels=["news"])},
                          sse=False) as events:
        await events.next()
        (session,) = history_node.node.hub.sessions.values()
        assert isinstance(session, UniSession)
        started: list[Any] = []
        await ClientCommands(history_node.node).subscribe(
            session, "chat:later", None, started.append)
        assert started
        # what a server-side subscribe tells a Centrifugo client, bare on a one-way stream
        session.push(session.codec.push(
            cf.Push(channel="chat:later", subscribe=cf.SubscribePush())))
        # chat: announces joins; the join (membership's) and the push above race
        first, second = await events.next(), await events.next()
        join = first if "join" in first else second
        assert {"channel": "chat:later", "subscribe": {}} in (first, second)
        assert join["channel"] == "chat:later" and join["join"]["info"]["user"] == "sub"
        await publish(history_node, "chat:later", {"late": True})
        push = await events.next()
        assert push["channel"] == "chat:later" and push["pub"]["data"] == {"late": True}


def test_the_stream_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m benchmarks.streams`, tiny, on a one-way transport and on the Protobuf
    emulation: it reports its numbers."""
    from benchmarks.streams import main

    assert main(["--subscribers", "20", "--messages", "3", "--transports", "uni_sse",
                 "http_stream_protobuf"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["transport"] for line in lines] == ["uni_sse", "http_stream_protobuf"]
    for line in lines:
        assert line["subscribers"] == 20
        assert {"rss_per_connection_kib", "node_cpu_us_per_delivery"} <= set(line)


async def test_uni_subs_recover_several_history_channels(history_node: RunningNode) -> None:
    """With two history channels an event id cannot say where each stands: the connect
    request's `subs` does, and `Last-Event-ID` is not applied."""
    tok = token("two", channels=["feed:one", "feed:two"])
    positions = {}
    for channel in ("feed:one", "feed:two"):
        positions[channel] = (await publish(history_node, channel, "old"))["offset"]
    epochs = {c: (await history_node.http.get(f"/api/history/{c}")).json()["epoch"]
              for c in positions}
    for channel in positions:
        await publish(history_node, channel, f"missed {channel}")
    subs = {c: {"recover": True, "offset": positions[c], "epoch": epochs[c]} for c in positions}
    async with uni_stream(history_node.url, {"token": tok, "subs": subs},
                          headers={"Last-Event-ID": "0"}) as events:
        connect = (await events.next())["connect"]
        assert events.last_id is None  # no id for the connect push of two history channels
        assert all(connect["subs"][c]["recovered"] for c in positions)
        got = {(push["channel"], push["pub"]["data"]) for push in
               [await events.next(), await events.next()]}
        assert got == {(c, f"missed {c}") for c in positions}
    async with uni_stream(history_node.url, {"token": tok},
                          headers={"Last-Event-ID": "0"}) as events:
        connect = (await events.next())["connect"]
        assert not any(connect["subs"][c].get("was_recovering") for c in positions)


@pytest.mark.parametrize("sse", [True, False], ids=["uni_sse", "uni_http_stream"])
async def test_api_subscribe_moves_a_one_way_client(history_node: RunningNode, sse: bool
                                                    ) -> None:
    """/api/subscribe while the stream is open: a bare subscribe push (on SSE with the
    position as its id), then the channel's publications; /api/unsubscribe: a bare
    unsubscribe push, and nothing more of the channel."""
    async with uni_stream(history_node.url, {"token": token("mov", channels=["news"])},
                          sse=sse) as events:
        await events.next()
        await publish(history_node, "feed:moved", "before")
        answer = await history_node.http.post("/api/subscribe", json={
            "user": "mov", "channel": "feed:moved"})
        assert answer.status_code == 200, answer.text
        push = await events.next()
        assert push["channel"] == "feed:moved"
        assert push["subscribe"]["recoverable"] is True and push["subscribe"]["offset"] == 1
        if sse:
            assert events.last_id == "1"
        await publish(history_node, "feed:moved", "after")
        push = await events.next()
        assert push["pub"]["data"] == "after" and push["pub"]["offset"] == 2
        answer = await history_node.http.post("/api/unsubscribe", json={
            "user": "mov", "channel": "feed:moved"})
        assert answer.status_code == 200
        push = await events.next()
        assert push == {"channel": "feed:moved",
                        "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}}
        await publish(history_node, "feed:moved", "gone")
        await publish(history_node, "news", "still here")
        assert (await events.next())["pub"]["data"] == "still here"


async def test_api_subscribe_reaches_an_emulated_session(history_node: RunningNode) -> None:
    url = history_node.url
    async with emulated(url, url, token("emu", channels=["news"]), sse=True) as client:
        answer = await history_node.http.post("/api/subscribe", json={
            "user": "emu", "channel": "news"})
        assert answer.status_code == 200
        push = await client.events.next()
        assert push == {"push": {"channel": "news", "subscribe": {}}}
        await publish(history_node, "news", 1)
        assert (await client.events.next())["push"]["pub"]["data"] == 1


async def test_api_connections_lists_streams(history_node: RunningNode) -> None:
    url = history_node.url
    async with uni_stream(url, {"token": token("lis", channels=["news"])},
                          headers={"User-Agent": "dashboard/1"}) as events, \
            emulated(url, url, token("lis")):
        await events.next()
        answer = await history_node.http.get("/api/connections", params={"user": "lis"})
        assert answer.status_code == 200, answer.text
        rows = answer.json()["connections"]
        assert len(rows) == 2
        assert {row["protocol"] for row in rows} == {"centrifugo"}
        assert "dashboard/1" in {row["user_agent"] for row in rows}
        assert all(row["remote"].startswith("127.0.0.1:") for row in rows)


# The Protobuf encoding over the emulation (centrifuge-js's Protobuf build on http_stream)

OCTETS = {"Content-Type": "application/octet-stream"}


def delimited(*commands: Any) -> bytes:
    return b"".join(_varint_encode(len(data)) + data
                    for data in (c.SerializeToString() for c in commands))


class ProtobufEmulated:
    """What centrifuge-js's Protobuf build does over http_stream: POST the delimited connect
    command as application/octet-stream, read delimited `Reply`s from the stream, POST the
    other commands as Protobuf `EmulationRequest`s."""

    def __init__(self, response: httpx.Response, post_url: str, http: httpx.AsyncClient) -> None:
        self.chunks = response.aiter_bytes()
        self.buffer = b""
        self.post_url, self.http = post_url, http
        self.session = self.node = ""
        self.next_id = 2

    async def reply(self, timeout: float = WAIT) -> Any:
        """The next `Reply` (pings included: an empty one)."""
        async with asyncio.timeout(timeout):
            while True:
                if self.buffer:
                    with contextlib.suppress(IndexError):
                        size, start = _varint_decode(self.buffer, 0)
                        if start + size <= len(self.buffer):
                            reply = pb.Reply()
                            reply.ParseFromString(self.buffer[start:start + size])
                            self.buffer = self.buffer[start + size:]
                            return reply
                self.buffer += await anext(self.chunks)

    async def next(self) -> Any:
        """The next reply that is not a ping."""
        while True:
            reply = await self.reply()
            if reply.ByteSize():
                return reply

    async def command(self, **fields: Any) -> Any:
        command_id = self.next_id
        self.next_id += 1
        await self.send(pb.Command(id=command_id, **fields))
        while True:
            reply = await self.next()
            if reply.id == command_id:
                return reply

    async def send(self, *commands: Any) -> httpx.Response:
        request = pb.EmulationRequest(node=self.node, session=self.session,
                                      data=delimited(*commands))
        response = await self.http.post(self.post_url + "/emulation", headers=OCTETS,
                                        content=request.SerializeToString())
        assert response.status_code == 204, response.text
        return response


@contextlib.asynccontextmanager
async def protobuf_emulated(stream_url: str, post_url: str, tok: str
                            ) -> AsyncIterator[ProtobufEmulated]:
    connect = pb.Command(id=1, connect=pb.ConnectRequest(token=tok, name="test"))
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as http:
        request = http.build_request("POST", stream_url + "/connection/http_stream",
                                     content=delimited(connect), headers=OCTETS)
        response = await http.send(request, stream=True)
        try:
            assert response.status_code == 200, (await response.aread()).decode()
            assert response.headers["content-type"] == "application/octet-stream"
            client = ProtobufEmulated(response, post_url, http)
            reply = await client.next()
            assert reply.id == 1 and not reply.HasField("error"), reply
            client.session, client.node = reply.connect.session, reply.connect.node
            yield client
        finally:
            await response.aclose()


async def test_protobuf_emulation_on_one_node(history_node: RunningNode) -> None:
    """Connect, subscribe with recovery, publish, ping/pong, a JSON emulated client in the
    same channel: each sees the other's publications, payload bytes unchanged."""
    url = history_node.url
    async with protobuf_emulated(url, url, token("pro")) as client, \
            emulated(url, url, token("jso")) as json_client:
        assert client.node == "test-node" and len(client.session) > 20
        assert client.session != json_client.session
        reply = await client.command(subscribe=pb.SubscribeRequest(channel="chat:mix"))
        assert not reply.HasField("error"), reply
        await json_client.command(subscribe={"channel": "chat:mix"})
        reply = await client.command(publish=pb.PublishRequest(
            channel="chat:mix", data=b'{"from":"protobuf"}'))
        assert not reply.HasField("error"), reply
        while not (push := (await client.next()).push).HasField("pub"):
            pass
        assert push.channel == "chat:mix" and json.loads(push.pub.data) == {"from": "protobuf"}
        while "pub" not in (got := (await json_client.events.next())["push"]):
            pass  # joins and leaves of chat:
        assert got["pub"]["data"] == {"from": "protobuf"}
        await json_client.command(publish={"channel": "chat:mix", "data": {"from": "json"}})
        while not (push := (await client.next()).push).HasField("pub"):
            pass
        assert json.loads(push.pub.data) == {"from": "json"}
        assert push.pub.info.user == "jso"

        reply = await client.command(subscribe=pb.SubscribeRequest(channel="feed:p",
                                                                   recover=True))
        assert reply.subscribe.recoverable
        await publish(history_node, "feed:p", {"n": 1})
        while (push := (await client.next()).push).channel != "feed:p":
            pass
        assert push.pub.offset == 1
        # the server's ping (an empty Reply) is answered with an empty Command
        while (await client.reply(timeout=3 * WAIT)).ByteSize():
            pass
        await client.send(pb.Command())
        reply = await client.command(presence_stats=pb.PresenceStatsRequest(channel="chat:mix"))
        assert reply.presence_stats.num_users == 2
    await eventually(lambda: not history_node.node.hub.sessions)


async def test_protobuf_emulation_bad_input(history_node: RunningNode) -> None:
    """Malformed Protobuf bodies, and one encoding's batch for the other's session: clear
    400s, nothing else touched."""
    url = history_node.url
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
        for body, why in ((b"\x0a\x05ab", "bad connect command"),  # length past the end
                          (b"\x02\x08", "bad connect command"),  # a command cut short
                          (delimited(pb.Command(id=1, subscribe=pb.SubscribeRequest(
                              channel="x"))), "must be connect"),
                          (b"", "empty body")):
            answer = await http.post("/connection/http_stream", content=body, headers=OCTETS)
            assert answer.status_code == 400, (body, answer.text)
            assert why in answer.json()["error"]["message"], answer.text
        sse = await http.post("/connection/sse", headers=OCTETS,
                              content=delimited(pb.Command(id=1, connect=pb.ConnectRequest())))
        assert sse.status_code == 415 and "http_stream" in sse.json()["error"]["message"]
        # centrifuge-js's Protobuf build over SSE: its bytes as decimal numbers in cf_connect
        stringified = ",".join(str(b) for b in delimited(pb.Command(
            id=1, connect=pb.ConnectRequest(token="t"))))
        answer = await http.get("/connection/sse", params={"cf_connect": stringified})
        assert answer.status_code == 400 and "decimal" in answer.json()["error"]["message"]
        # an invalid token: a Protobuf disconnect push (3500, no reconnect), then the end
        refused = await http.post("/connection/http_stream", headers=OCTETS, content=delimited(
            pb.Command(id=1, connect=pb.ConnectRequest(token="bad.token.here"))))
        assert refused.status_code == 200
        size, start = _varint_decode(refused.content, 0)
        assert start + size == len(refused.content)
        reply = pb.Reply.FromString(refused.content[start:])
        assert (reply.push.disconnect.code, reply.push.disconnect.reconnect) == (3500, False)
        for body in (b"\x0a\x09test-node\x12", b"\xff\xff", b"\x1a\x01"):
            answer = await http.post("/emulation", content=body, headers=OCTETS)
            assert answer.status_code == 400, answer.text
            assert "EmulationRequest" in answer.json()["error"]["message"]
    async with protobuf_emulated(url, url, token("pbm")) as client, \
            emulated(url, url, token("jsm")) as json_client:
        async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
            wrong = await http.post("/emulation", json={
                "session": client.session, "node": client.node, "data": "{}"})
            assert wrong.status_code == 400 and "encoding" in wrong.json()["error"]["message"]
            request = pb.EmulationRequest(node=json_client.node, session=json_client.session,
                                          data=delimited(pb.Command()))
            wrong = await http.post("/emulation", headers=OCTETS,
                                    content=request.SerializeToString())
            assert wrong.status_code == 400
        # both sessions go on
        reply = await client.command(presence_stats=pb.PresenceStatsRequest(channel="chat:a"))
        assert not reply.HasField("error")
        reply = await json_client.command(presence_stats={"channel": "chat:a"})
        assert "error" not in reply
        # a malformed batch in a well-formed request closes its session as a bad binary
        # frame does on the WebSocket (3501, no reconnect)
        request = pb.EmulationRequest(node=client.node, session=client.session,
                                      data=b"\x0a\x05ab")
        async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
            answer = await http.post("/emulation", headers=OCTETS,
                                     content=request.SerializeToString())
            assert answer.status_code == 204
        while not (push := (await client.next()).push).HasField("disconnect"):
            pass
        assert push.disconnect.code == 3501 and not push.disconnect.reconnect
    assert await metric(history_node, "hub_emulation_requests_total", outcome="bad_request") >= 5


async def test_a_full_node_sends_every_stream_back_with_a_reconnect_hint() -> None:
    """The lifecycle's admission on the stream transports: a node full (HUB_MAX_CONNECTIONS)
    answers 200 with one disconnect push (3001, reconnect) and ends the stream, so an
    EventSource or an SDK comes back (to another node); counted as /ws's refusal, 1013."""
    settings = make_settings(namespaces=NAMESPACES, max_connections=1)
    async with running_node(settings) as node, \
            uni_stream(node.url, {"token": token("first")}) as first:
        await first.next()
        for sse in (True, False):
            async with uni_stream(node.url, {"token": token("late")}, sse=sse) as late:
                push = await late.next()
                assert push["disconnect"] == {"code": 3001, "reason": "try again later",
                                              "reconnect": True}
                with pytest.raises(StopAsyncIteration):  # and the stream ends
                    await late.next_raw()
        connect = json.dumps({"id": 1, "connect": {"token": token("late")}})
        async with httpx.AsyncClient(timeout=WAIT) as http:
            emulated_late = await http.post(node.url + "/connection/http_stream",
                                            content=connect)
        assert emulated_late.status_code == 200
        pushes = [json.loads(line) for line in emulated_late.text.splitlines() if line]
        assert [p["push"]["disconnect"]["code"] for p in pushes] == [3001]
        assert await metric(node, "hub_disconnections_total", code="1013") == 3
