"""Embedding (`hub.embed`): a Starlette application mounts the hub under /realtime, its
lifespan starts and stops the node, WebSocket and HTTP work under the mount, and the
application publishes in-process with plain Python data. Real uvicorn, real clients; and
examples/embedded_app.py run as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hub.api import publish_command
from hub.embed import EmbeddedHub
from hub.errors import HubError
from hub.presence import NodeStats
from tests.redis_server import free_port
from tests.support import (
    API_KEY,
    WAIT,
    connect,
    eventually,
    make_settings,
    next_message,
    running_node,
    started,
    token,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "embedded_app.py"
NAMESPACES = {"feed": {"subscribe": "any", "history_size": 10, "history_ttl": 60},
              "chat": {"subscribe": "any", "presence": True}}


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """`app` under a real uvicorn on a free port, in this event loop; yields its URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, ws="websockets-sansio",
                            lifespan="on", log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await started(server, task)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def host_app(realtime: EmbeddedHub, events: list[str]) -> Starlette:
    """A host with its own lifespan around the hub's, and a route that publishes."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("host start")
        async with realtime.running():
            events.append("hub running")
            yield
        events.append("hub stopped")

    async def announce(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        try:
            reply = await realtime.publish(body["channel"], body["data"], event="news")
        except HubError as exc:
            return JSONResponse({"error": exc.code}, 400)
        return JSONResponse({"offset": reply.offset})

    routes = [Route("/announce", announce, methods=["POST"]), realtime.mount("/realtime")]
    return Starlette(routes=routes, lifespan=lifespan)


async def test_mounted_hub_serves_websocket_and_http_under_the_prefix() -> None:
    realtime = EmbeddedHub(make_settings(namespaces=NAMESPACES, node_id="embedded"))
    events: list[str] = []
    async with serving(host_app(realtime, events)) as url:
        assert events == ["host start", "hub running"]
        ws_url = url.replace("http://", "ws://") + "/realtime/ws"
        async with connect(ws_url, token("alice")) as alice, \
                httpx.AsyncClient(base_url=url + "/realtime", timeout=WAIT,
                                  headers={"X-API-Key": API_KEY}) as api:
            assert alice.welcome["node"] == "embedded"
            await alice.subscribe("feed:news")
            await alice.subscribe("chat:room")

            # the application publishes in-process ...
            reply = await realtime.publish("feed:news", {"text": "hello"}, event="e")
            frame = await next_message(alice, "feed:news")
            assert frame["data"] == {"text": "hello"} and frame["event"] == "e"
            assert frame["offset"] == reply.offset == 1 and frame["epoch"] == reply.epoch
            # ... from its own routes too
            async with httpx.AsyncClient(base_url=url, timeout=WAIT) as host:
                answer = await host.post("/announce", json={"channel": "feed:news", "data": 2})
                assert answer.json() == {"offset": 2}
                assert (await next_message(alice, "feed:news"))["data"] == 2
                refused = await host.post("/announce", json={"channel": "no good", "data": 1})
                assert refused.json() == {"error": "invalid_channel"}

            await realtime.send("alice", [1, 2])
            assert (await next_message(alice, "@alice"))["data"] == [1, 2]
            history = await realtime.history("feed:news", since=(1, reply.epoch or ""))
            assert [m.data for m in history.messages] == [2]
            # many at once, in-process, as /api/batch runs them
            batch = await realtime.batch([publish_command("feed:news", 3),
                                          publish_command("no good", 1)])
            done, bad = batch.replies
            assert done.publish is not None and done.publish.offset == 3
            assert bad.error is not None and bad.error.code == "invalid_channel"
            assert (await next_message(alice, "feed:news"))["data"] == 3
            presence = await realtime.presence("chat:room")
            assert [(c.user, c.node) for c in presence.clients] == [("alice", "embedded")]

            # the HTTP API, probes and pages under the mount
            assert (await api.get("/readyz")).json() == {"status": "ready"}
            stats = (await api.get("/api/stats")).json()
            assert stats["total"]["connections"] == 1
            response = await api.post("/api/publish", json={"channel": "chat:room", "data": 3})
            assert response.status_code == 200
            assert (await next_message(alice, "chat:room"))["data"] == 3
            document = (await api.get("/openapi.json")).json()
            assert document["servers"] == [{"url": "/realtime"}]
            assert (await api.get("/admin")).status_code == 200
            assert "hub_node_info" in (await api.get("/metrics")).text

            # server-side subscriptions, in-process and through the Centrifugo API
            await realtime.subscribe("alice", "feed:moved")
            subscribed = await alice.expect("subscribed")
            assert (subscribed["channel"], subscribed["offset"]) == ("feed:moved", 0)
            await realtime.unsubscribe("alice", "feed:moved")
            assert (await alice.expect("unsubscribed"))["channel"] == "feed:moved"
            info = await api.post("/centrifugo/api/info", json={})
            assert info.json()["result"]["nodes"][0]["uid"] == "embedded"

            await realtime.disconnect("alice", 4500, "bye")
            assert await alice.closed() == 4500
        # outside the mount there is no hub
        with pytest.raises(websockets.InvalidStatus):
            async with connect(url.replace("http://", "ws://") + "/ws"):
                pass
    assert events == ["host start", "hub running", "hub stopped"]


async def test_disconnect_checks_the_code() -> None:
    realtime = EmbeddedHub(make_settings())
    async with realtime.running():
        with pytest.raises(HubError) as raised:
            await realtime.disconnect("bob", 1001)
    assert raised.value.code == "bad_request"


async def test_lifespan_joins_and_leaves_the_cluster(redis_url: str) -> None:
    """With Redis the embedded node is a cluster node like any: while the host runs, another
    node counts it in /api/stats; once the host's lifespan ends, it has left."""
    settings = make_settings(redis_url=redis_url, node_id="embedded")
    realtime = EmbeddedHub(settings)
    host = Starlette(routes=[realtime.mount("/realtime")], lifespan=realtime.lifespan)
    async with running_node(make_settings(redis_url=redis_url, node_id="plain")) as plain:

        async def nodes() -> list[str]:
            stats = (await plain.http.get("/api/stats")).json()
            return sorted(NodeStats(**entry).node for entry in stats["nodes"])

        async with serving(host) as url:
            ws_url = url.replace("http://", "ws://") + "/realtime/ws"
            async with connect(ws_url, token("alice")) as alice:
                await eventually(nodes, lambda ids: ids == ["embedded", "plain"], within=WAIT)
                response = await plain.http.post("/api/send",
                                                 json={"user": "alice", "data": "via redis"})
                assert response.status_code == 200
                assert (await next_message(alice, "@alice"))["data"] == "via redis"
        assert await nodes() == ["plain"]


async def wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    """Polling from outside, as a load balancer does; an example that exited fails it."""
    async with httpx.AsyncClient(timeout=1) as http:
        async def ready() -> bool:
            if process.returncode is not None:
                raise RuntimeError(f"the example exited with {process.returncode}")
            return (await http.get(url + "/realtime/readyz")).status_code == 200

        await eventually(ready, within=15, what="the example ready",
                         ignoring=(httpx.HTTPError,), every=0.05)


async def test_the_example_runs_as_documented() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--port", str(port), env=env, cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        ws_url = f"ws://127.0.0.1:{port}/realtime/ws"
        await wait_ready(url, process)
        async with connect(ws_url, query="user=alice") as alice, \
                connect(ws_url, query="user=bob") as bob, \
                httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
            await alice.subscribe("orders")
            await bob.subscribe("orders")
            answer = await http.post("/orders", json={"item": "tea", "user": "alice"})
            assert answer.json() == {"number": 1}
            for client in (alice, bob):
                order = await next_message(client, "orders")
                assert order["data"] == {"number": 1, "item": "tea"}
                assert order["event"] == "order"
            receipt = await next_message(alice, "@alice")
            assert receipt["data"] == {"receipt": 1} and receipt["event"] == "receipt"
            assert (await http.get("/realtime/admin")).status_code == 200
            assert (await http.get("/realtime/api/stats")).json()["total"]["users"] == 2
            process.send_signal(signal.SIGTERM)
            assert await alice.closed() in {1001, 1012}
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # uvicorn ends on SIGTERM by re-raising it once it has shut down
    assert process.returncode in {0, -signal.SIGTERM}, stderr
    assert b"Application shutdown complete." in stderr, stderr
