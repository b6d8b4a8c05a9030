"""Real nodes for tests: in-process uvicorn on a free port, or `python -m hub serve`
subprocesses; a small WebSocket client that reads JSON frames with bounded waits; the one
polling loop of the tests (`eventually`, and `eventually_sync` for code without an event
loop); and `FakeClock`, for the clocks a test moves instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, overload

import httpx
import msgspec
import uvicorn
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from hub.app import create_app
from hub.node import Node, node_of
from hub.server import uvicorn_config
from hub.settings import Settings

WAIT = 5.0
POLL = 0.02
T = TypeVar("T")
SECRET = "test-secret-0123456789-abcdefghijklmnop"
API_KEY = "test-api-key"


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "port": 0, "node_id": "test-node", "jwt_secret": SECRET, "api_key": API_KEY,
        "drain_delay": 0, "drain_seconds": 0.5,
    }
    base.update(overrides)
    return msgspec.convert(base, Settings)


@dataclass
class RunningNode:
    url: str
    ws_url: str
    node: Node
    server: uvicorn.Server
    http: httpx.AsyncClient  # with the API key; closed with the node

    def api(self, **headers: str) -> httpx.AsyncClient:
        """A client of its own (with other headers, say); the caller closes it."""
        return httpx.AsyncClient(
            base_url=self.url, headers={"X-API-Key": API_KEY, **headers}, timeout=WAIT
        )


@contextlib.asynccontextmanager
async def running_node(settings: Settings) -> AsyncIterator[RunningNode]:
    """A real uvicorn server with the hub app, in this event loop, on a free port."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    task = asyncio.create_task(server.serve())
    try:
        await started(server, task)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        running = RunningNode(url, f"ws://127.0.0.1:{port}/ws", node_of(app), server,
                              http_client(url))
        try:
            yield running
        finally:
            await running.http.aclose()
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


async def started(server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
    """Until uvicorn has bound its sockets (it offers no event for it); a server that
    stopped during start-up fails the wait with its own error."""

    def up() -> bool:
        if serving.done():
            serving.result()
            raise RuntimeError("server stopped during start-up")
        return server.started

    await eventually(up, within=WAIT, what="uvicorn started")


class FakeClock:
    """A monotonic clock that moves only when told: injected where a test would otherwise
    sleep for time to pass."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.monotonic() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Client:
    """A `websockets` connection that speaks JSON frames."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.welcome: dict[str, Any] = {}
        self._next_id = 0

    async def send(self, frame: Mapping[str, Any]) -> None:
        await self.connection.send(json.dumps(frame))

    async def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.connection.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def request(self, frame: Mapping[str, Any]) -> dict[str, Any]:
        """Send a command with a fresh id and return its reply (or error), skipping
        other frames (which are returned by `recv` later only if kept: they are not)."""
        self._next_id += 1
        frame_id = self._next_id
        await self.send({**frame, "id": frame_id})
        async with asyncio.timeout(WAIT):
            while True:
                reply = await self.recv()
                if reply.get("id") == frame_id:
                    return reply

    async def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        reply = await self.request({"type": "subscribe", "channel": channel, **extra})
        assert reply["type"] == "subscribed", reply
        return reply

    async def expect(self, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next frame, which must be of type `kind`."""
        frame = await self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def closed(self, timeout: float = WAIT) -> int:
        """Wait for the server to close; returns the close code (frames before are dropped)."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await self.connection.recv()
        code = self.connection.close_code
        assert code is not None
        return code

    async def close(self) -> None:
        await self.connection.close()


@contextlib.asynccontextmanager
async def connect(
    ws_url: str,
    token: str | None = None,
    *,
    query: str = "",
    header: bool = True,
    welcome: bool = True,
) -> AsyncIterator[Client]:
    """Open a connection; by default with the token in the Authorization header and the
    welcome frame read."""
    headers = {"Authorization": f"Bearer {token}"} if token and header else {}
    url = ws_url
    params = [query] if query else []
    if token and not header:
        params.append(f"token={token}")
    if params:
        url += "?" + "&".join(params)
    connection = await websockets.connect(url, additional_headers=headers, open_timeout=WAIT,
                                          max_size=None)
    client = Client(connection)
    try:
        if welcome:
            client.welcome = await client.expect("welcome")
        yield client
    finally:
        await connection.close()


# Nodes as processes, for cluster, fault and shutdown tests.

_LISTENING = re.compile(r"hub listening on http://([^ ]+)")


class NodeProcess:
    def __init__(
        self,
        env: Mapping[str, str],
        args: list[str] | None = None,
        *,
        stderr: Path | None = None,
    ) -> None:
        """`stderr`: a file that gets the node's stderr (its logs); by default it is dropped."""
        self.env = {**os.environ, **env}
        self.args = args or []
        self.stderr = stderr
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.ws_url = ""

    def start(self, timeout: float = 15.0) -> NodeProcess:
        with contextlib.ExitStack() as files:
            stderr: IO[bytes] | int = subprocess.DEVNULL
            if self.stderr is not None:
                stderr = files.enter_context(self.stderr.open("ab"))
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hub", "serve", "--port", "0", *self.args],
                env=self.env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        deadline = time.monotonic() + timeout
        process, stdout = self.process, self.process.stdout
        assert stdout is not None

        def listening() -> re.Match[str] | None:  # one line a try: no sleep between them
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"node exited early with {process.wait()}")
            return _LISTENING.search(line)

        found = eventually_sync(listening, within=timeout, what="node listening", every=0)
        assert found is not None
        self.url = "http://" + found.group(1)
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"
        self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def status() -> int:
            return httpx.get(self.url + "/readyz", timeout=1).status_code

        eventually_sync(status, lambda code: code == 200, timeout, "node ready",
                        ignoring=(httpx.HTTPError,), every=0.05)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def token(user: str = "alice", **claims: Any) -> str:
    """An HS256 token for `user`; by default it may subscribe and publish anywhere."""
    from hub.auth import mint_token

    return mint_token(
        SECRET, user, ttl=claims.get("ttl", 3600), channels=claims.get("channels", ["*"]),
        publish=claims.get("publish", ["*"]), info=claims.get("info"),
    )


def http_client(base_url: str = "") -> httpx.AsyncClient:
    """An HTTP client with the API key."""
    return httpx.AsyncClient(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=WAIT)


def api(running: RunningNode) -> httpx.AsyncClient:
    return running.http


def metric_of(text: str, name: str, **labels: str) -> float:
    """A sample of a Prometheus text exposition, 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def metric(running: RunningNode, name: str, **labels: str) -> float:
    """A sample of the node's /metrics, 0 when absent."""
    return metric_of((await running.http.get("/metrics")).text, name, **labels)


async def publish(
    api: RunningNode | httpx.AsyncClient,
    channel: str,
    data: Any,
    *,
    event: str | None = None,
    url: str = "",
) -> Any:
    """Publish through the HTTP API (of `url`, when the client has no base URL), which must
    answer 200; returns its reply."""
    http = api.http if isinstance(api, RunningNode) else api
    body: dict[str, Any] = {"channel": channel, "data": data}
    if event is not None:
        body["event"] = event
    response = await http.post(url + "/api/publish", json=body)
    assert response.status_code == 200, response.text
    return response.json()


class _Attempts:
    """The bookkeeping of one bounded wait, shared by `eventually` and `eventually_sync`
    so that both accept, remember and give up alike: only their sleeping differs."""

    def __init__(self, check: Callable[[Any], bool] | None, within: float, what: str) -> None:
        self.check = check
        self.within = within
        self.what = what
        self.deadline = time.monotonic() + within
        self.last: object = "<no attempt>"

    def accepts(self, value: object) -> bool:
        self.last = value
        return self.check(value) if self.check is not None else bool(value)

    def refused(self, error: BaseException) -> None:
        self.last = error

    def go_on(self) -> None:
        """Fails the wait once its time is up, with what was seen last."""
        if time.monotonic() >= self.deadline:
            raise AssertionError(
                f"{self.what} not reached within {self.within} s; last: {self.last!r}"
            )


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool] | None = None,
    within: float = 10.0,
    what: str = "condition",
    *,
    ignoring: tuple[type[BaseException], ...] = (),
    every: float = POLL,
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T],
    check: Callable[[T], bool] | None = None,
    within: float = 10.0,
    what: str = "condition",
    *,
    ignoring: tuple[type[BaseException], ...] = (),
    every: float = POLL,
) -> T: ...


async def eventually(
    probe: Callable[[], Any],
    check: Callable[[Any], bool] | None = None,
    within: float = 10.0,
    what: str = "condition",
    *,
    ignoring: tuple[type[BaseException], ...] = (),
    every: float = POLL,
) -> Any:
    """Call `probe` (sync or async) every `every` seconds until `check` accepts its value
    (by default: until it is truthy); returns that value, or fails with the last one after
    `within` seconds. An error of `ignoring` raised by the probe counts as "not yet" (a
    server still starting, say); any other error fails the test at once. The one polling
    loop of the tests: a wait with a domain meaning is a thin wrapper around it."""
    attempts = _Attempts(check, within, what)
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignoring as error:
            attempts.refused(error)
        else:
            if attempts.accepts(value):
                return value
        attempts.go_on()
        await asyncio.sleep(every)


def eventually_sync(
    probe: Callable[[], T],
    check: Callable[[T], bool] | None = None,
    within: float = 10.0,
    what: str = "condition",
    *,
    ignoring: tuple[type[BaseException], ...] = (),
    every: float = POLL,
) -> T:
    """`eventually` for code with no event loop (fixtures that start processes, the Redis
    cluster harness): the same rules, and it blocks its thread between attempts."""
    attempts = _Attempts(check, within, what)
    while True:
        try:
            value = probe()
        except ignoring as error:
            attempts.refused(error)
        else:
            if attempts.accepts(value):
                return value
        attempts.go_on()
        time.sleep(every)


async def took(waiting: Awaitable[object]) -> float:
    """Seconds `waiting` took to finish: for a test whose bound is on the time of a wait."""
    started_at = time.monotonic()
    await waiting
    return time.monotonic() - started_at


async def next_message(client: Client, channel: str | None = None) -> dict[str, Any]:
    """The next frame, which must be a `message`; with `channel`, the next `message` of
    that channel, other frames skipped (bounded)."""
    if channel is None:
        return await client.expect("message")
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.recv()
            if frame["type"] == "message" and frame["channel"] == channel:
                return frame
