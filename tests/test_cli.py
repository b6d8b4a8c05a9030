"""`hub` as a user runs it: real processes, flags and HUB_* variables, and the graceful
shutdown of PROTOCOL §7 (PROTOCOL §10)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import jwt
import pytest
import websockets

from hub import __version__
from tests.support import (
    API_KEY,
    SECRET,
    WAIT,
    Client,
    NodeProcess,
    connect,
    eventually,
    make_settings,
    running_node,
    token,
)

BASE_ENV = {"HUB_JWT_SECRET": SECRET, "HUB_API_KEY": API_KEY}
# Variables of the environment running the tests must not leak into the nodes started here.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
LISTENING = re.compile(r"^hub listening on http://127\.0\.0\.1:(\d+) \(ws://127\.0\.0\.1:\1/ws\)$")


def run_hub(*args: str, env: Mapping[str, str] | None = None,
            timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """`python -m hub ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "hub", *args], env={**CLEAN_ENV, **(env or {})},
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@contextlib.contextmanager
def hub_process(env: Mapping[str, str], args: list[str] | None = None) -> Iterator[NodeProcess]:
    """A started `hub serve --port 0` with a secret and an API key, stopped afterwards."""
    process = NodeProcess({}, args)
    process.env = {**CLEAN_ENV, **BASE_ENV, **env}  # NodeProcess would pass HUB_* through
    process.start()
    try:
        yield process
    finally:
        process.kill()


def serve_briefly(env: Mapping[str, str], while_up: Callable[[str], object] = str) -> str:
    """`hub serve --port 0` with exactly `env` (and no drain wait) until it listens, then
    `while_up(its URL)`, then SIGTERM: it must exit 0. Returns what it logged."""
    with subprocess.Popen(
        [sys.executable, "-m", "hub", "serve", "--port", "0"],
        env={**env, "HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            found = LISTENING.match(process.stdout.readline().rstrip("\n"))
            assert found
            while_up(f"http://127.0.0.1:{found.group(1)}")
            process.send_signal(signal.SIGTERM)
            assert process.wait(WAIT + 5) == 0
            return process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return str(path)


# version and token


def test_version() -> None:
    result = run_hub("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hub {__version__}"


def test_token_prints_exactly_the_claims_asked_for() -> None:
    before = int(time.time())
    result = run_hub("token", "--sub", "u", "--channels", "a:*", "--channels", "b",
                     "--publish", "x", "--ttl", "60", "--info", '{"k":1}',
                     env={"HUB_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.count(".") == 2 and "\n" not in printed
    assert jwt.get_unverified_header(printed)["alg"] == "HS256"
    claims = jwt.decode(printed, SECRET, algorithms=["HS256"])
    assert set(claims) == {"sub", "channels", "publish", "info", "iat", "exp"}
    assert claims["sub"] == "u"
    assert claims["channels"] == ["a:*", "b"]
    assert claims["publish"] == ["x"]
    assert claims["info"] == {"k": 1}
    assert claims["exp"] - claims["iat"] == 60
    assert before <= claims["iat"] <= int(time.time())


def test_token_without_options_has_only_sub_and_an_hour() -> None:
    result = run_hub("token", "--sub", "solo", env={"HUB_JWT_SECRET": SECRET})
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert set(claims) == {"sub", "iat", "exp"}
    assert claims["exp"] - claims["iat"] == 3600


async def test_token_is_accepted_by_a_node() -> None:
    result = run_hub("token", "--sub", "u", "--channels", "a:*", "--info", '{"k":1}',
                     env={"HUB_JWT_SECRET": SECRET})
    async with running_node(make_settings()) as node, \
            connect(node.ws_url, result.stdout.strip()) as client:
        assert client.welcome["user"] == "u"
        assert (await client.request({"type": "subscribe", "channel": "a:1"}))["type"] == \
            "subscribed"
        denied = await client.request({"type": "subscribe", "channel": "c"})
        assert denied["type"] == "error" and denied["code"] == "forbidden"


def test_token_without_secret_exits_2_with_a_message() -> None:
    result = run_hub("token", "--sub", "u")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "HUB_JWT_SECRET" in result.stderr


@pytest.mark.parametrize("info", ["{not json", "[1, 2]", '"text"'])
def test_token_with_bad_info_exits_2(info: str) -> None:
    result = run_hub("token", "--sub", "u", "--info", info, env={"HUB_JWT_SECRET": SECRET})
    assert result.returncode == 2
    assert "--info" in result.stderr and result.stdout == ""


def test_token_needs_sub() -> None:
    result = run_hub("token", env={"HUB_JWT_SECRET": SECRET})
    assert result.returncode == 2 and "--sub" in result.stderr


# serve: refusals before listening


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--dev", "--host", "0.0.0.0"], {}),
        ([], {"HUB_DEV": "1", "HUB_HOST": "0.0.0.0"}),
        (["--dev"], {"HUB_HOST": "10.1.2.3"}),
    ],
    ids=["flags", "variables", "flag-and-variable"],
)
def test_dev_mode_refuses_a_non_loopback_address(args: list[str], env: dict[str, str]) -> None:
    result = run_hub("serve", "--port", "0", *args, env=env)
    assert result.returncode != 0
    assert "listening" not in result.stdout
    assert "dev" in result.stderr and "loopback" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [("HUB_PORT", "eighty"), ("HUB_PORT", "70000"), ("HUB_MAX_CONNECTIONS", "-1"),
     ("HUB_DEV", "perhaps"), ("HUB_LOG_FORMAT", "xml"), ("HUB_CONFIG", "/nonexistent.toml")],
)
def test_bad_variable_exits_2_naming_it(variable: str, value: str) -> None:
    result = run_hub("serve", env={**BASE_ENV, variable: value})
    assert result.returncode == 2
    assert variable in result.stderr, result.stderr
    assert "listening" not in result.stdout


def test_bad_port_flag_exits_2_naming_it() -> None:
    result = run_hub("serve", "--port", "70000", env=BASE_ENV)
    assert result.returncode == 2 and "HUB_PORT" in result.stderr
    result = run_hub("serve", "--port", "eighty", env=BASE_ENV)
    assert result.returncode == 2 and "--port" in result.stderr


@pytest.mark.parametrize(
    "text",
    ["[namespaces.chat\n", '[namespaces.chat]\nsubscribe = "everyone"\n',
     "[namespaces.chat]\nbogus = true\n"],
    ids=["syntax", "bad-value", "unknown-option"],
)
def test_bad_config_exits_2_naming_it(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)
    for args, env in (([], {"HUB_CONFIG": path}), (["--config", path], {})):
        result = run_hub("serve", "--port", "0", *args, env={**BASE_ENV, **env})
        assert result.returncode == 2
        assert "HUB_CONFIG" in result.stderr or "namespaces.chat" in result.stderr
        assert "listening" not in result.stdout


# serve: running nodes


def test_serve_prints_one_line_and_gets_ready() -> None:
    process = NodeProcess({})
    process.env = {**CLEAN_ENV, **BASE_ENV, "HUB_DRAIN_DELAY": "0"}
    process.start()
    try:
        port = int(process.url.rsplit(":", 1)[1])
        assert port > 0
        assert httpx.get(process.url + "/readyz", timeout=WAIT).status_code == 200
        assert httpx.get(process.url + "/healthz", timeout=WAIT).status_code == 200
        process.signal(signal.SIGTERM)
        assert process.wait(WAIT + 5) == 0
        assert process.process is not None and process.process.stdout is not None
        assert process.process.stdout.read() == ""  # nothing but the one line
    finally:
        process.kill()


def test_listening_line_format() -> None:
    """The exact line: address, port and the WebSocket URL."""
    with subprocess.Popen(
        [sys.executable, "-m", "hub", "serve", "--port", "0"],
        env={**CLEAN_ENV, **BASE_ENV, "HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0"},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().rstrip("\n")
            assert LISTENING.match(line), line
            process.send_signal(signal.SIGTERM)
            assert process.wait(WAIT + 5) == 0
        finally:
            if process.poll() is None:
                process.kill()


async def test_node_id_variable_shows_in_welcome_stats_and_metrics() -> None:
    with hub_process({"HUB_NODE_ID": "node-from-env"}) as process:
        async with connect(process.ws_url, token("alice")) as client, \
                httpx.AsyncClient(base_url=process.url, headers={"X-API-Key": API_KEY},
                                  timeout=WAIT) as api:
            assert client.welcome["node"] == "node-from-env"
            stats = (await api.get("/api/stats")).json()
            assert [entry["node"] for entry in stats["nodes"]] == ["node-from-env"]
            metrics = (await api.get("/metrics")).text
            assert 'node="node-from-env"' in metrics


async def test_flags_beat_variables_in_a_process() -> None:
    env = {"HUB_NODE_ID": "node-from-env", "HUB_PORT": "1"}
    with hub_process(env, ["--node-id", "node-from-flag"]) as process:
        assert not process.url.endswith(":1")  # --port 0 beat HUB_PORT=1
        async with connect(process.ws_url, token("alice")) as client:
            assert client.welcome["node"] == "node-from-flag"


CONFIG = """
[namespaces.default]
subscribe = "any"
publish = "any"

[namespaces.feed]
history_size = 10
history_ttl = 60
"""


async def check_config_took_effect(process: NodeProcess) -> None:
    """Without the file the default namespace is token-only and API-only, and feed has
    no history; with it, a token without claims may subscribe and publish, and feed
    inherits that and keeps history."""
    async with connect(process.ws_url, token("alice", channels=[], publish=[])) as client:
        assert (await client.request({"type": "subscribe", "channel": "room"}))["type"] == \
            "subscribed"
        await client.send({"type": "publish", "channel": "room", "data": 1, "id": 99})
        frames = [await client.recv(), await client.recv()]  # the message may come first
        assert sorted(f["type"] for f in frames) == ["message", "published"], frames
        in_feed = await client.request({"type": "publish", "channel": "feed:x", "data": 2})
        assert in_feed["type"] == "published" and in_feed["offset"] == 1, in_feed


async def test_config_variable_namespaces_take_effect(tmp_path: Path) -> None:
    with hub_process({"HUB_CONFIG": write_config(tmp_path, CONFIG)}) as process:
        await check_config_took_effect(process)


async def test_config_flag_namespaces_take_effect(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONFIG)
    with hub_process({"HUB_CONFIG": "/nonexistent.toml"}, ["--config", path]) as process:
        await check_config_took_effect(process)


async def test_variables_reach_the_running_node() -> None:
    """A few more variables, each visible from outside."""
    env = {"HUB_MAX_CONNECTIONS": "1", "HUB_PING_INTERVAL": "7", "HUB_API_KEY": "other-key",
           "HUB_MAX_FRAME_BYTES": "1024"}
    with hub_process(env) as process:
        async with connect(process.ws_url, token("alice")) as client:
            assert client.welcome["ping_interval"] == 7
            async with connect(process.ws_url, token("bob"), welcome=False) as refused:
                assert await refused.closed() == 1013
            await client.send({"type": "ping", "pad": "x" * 2000})
            assert await client.closed() == 1009
        async with httpx.AsyncClient(base_url=process.url, timeout=WAIT) as http:
            assert (await http.get("/api/stats", headers={"X-API-Key": API_KEY})).status_code \
                == 401
            assert (await http.get("/api/stats",
                                   headers={"X-API-Key": "other-key"})).status_code == 200


@contextlib.contextmanager
def listening(args: list[str], env: Mapping[str, str]) -> Iterator[str]:
    """`hub serve --port 0 ARGS` until it printed its address (yielded); killed afterwards.
    Unlike NodeProcess it does not wait for /readyz 200."""
    with subprocess.Popen(
        [sys.executable, "-m", "hub", "serve", "--port", "0", *args],
        env={**CLEAN_ENV, **BASE_ENV, **env},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as process:
        try:
            assert process.stdout is not None
            found = LISTENING.match(process.stdout.readline().rstrip("\n"))
            assert found, "no listening line"
            yield f"http://127.0.0.1:{found.group(1)}"
        finally:
            process.kill()


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--redis-url", UNREACHABLE_REDIS], {}), ([], {"HUB_REDIS_URL": UNREACHABLE_REDIS})],
    ids=["flag", "variable"],
)
def test_redis_url_is_read(args: list[str], env: dict[str, str]) -> None:
    """A node whose Redis is unreachable serves but is not ready (the in-process broker
    would be)."""
    with listening(args, env) as url:
        assert httpx.get(url + "/healthz", timeout=WAIT).status_code == 200
        readyz = httpx.get(url + "/readyz", timeout=WAIT)
        assert readyz.status_code == 503
        assert readyz.json() == {"status": "broker unavailable"}


def test_dev_mode_and_json_logs() -> None:
    env = {**CLEAN_ENV, "HUB_DEV": "1", "HUB_LOG_FORMAT": "json", "HUB_NODE_ID": "logger"}
    log = serve_briefly(env, lambda url: httpx.get(url + "/api/stats", timeout=WAIT)
                        .raise_for_status())  # no key
    lines = [line for line in log.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert entries, "no log lines"
    assert all({"time", "level", "node", "logger", "event"} <= set(e) for e in entries)
    assert all(e["node"] == "logger" for e in entries)
    assert any(e["level"] == "warning" and "dev mode" in e["event"] for e in entries)


# graceful shutdown (PROTOCOL §7)


async def wait_readyz(url: str, status: int, within: float = WAIT) -> float:
    """Poll /readyz until it answers `status` (from outside, as a load balancer does);
    returns when it did."""
    async with httpx.AsyncClient(timeout=1) as http:
        async def readyz() -> int:
            return (await http.get(url + "/readyz")).status_code

        await eventually(readyz, lambda code: code == status, within, f"/readyz {status}")
    return time.monotonic()


async def closed_at(client: Client) -> tuple[int, float]:
    code = await client.closed(timeout=15)
    return code, time.monotonic()


async def test_sigterm_drains_then_exits_0() -> None:
    delay, seconds, clients_n = 0.5, 2.0, 10
    env = {"HUB_DRAIN_DELAY": str(delay), "HUB_DRAIN_SECONDS": str(seconds)}
    with hub_process(env) as process:
        async with contextlib.AsyncExitStack() as stack, \
                httpx.AsyncClient(base_url=process.url, headers={"X-API-Key": API_KEY},
                                  timeout=WAIT) as api:
            clients = [await stack.enter_async_context(connect(process.ws_url, token(f"u{i}")))
                       for i in range(clients_n)]
            for client in clients:
                await client.subscribe("room")
            watchers = [asyncio.create_task(closed_at(client)) for client in clients]
            signalled = time.monotonic()
            process.signal(signal.SIGTERM)

            unready = await wait_readyz(process.url, 503)
            assert (await api.get("/healthz")).status_code == 200
            async with connect(process.ws_url, token("late"), welcome=False) as late:
                assert await late.closed() == 1013
            response = await api.post("/api/publish", json={"channel": "room", "data": 1})
            assert response.status_code == 200  # the API serves during the drain

            results = await asyncio.gather(*watchers)
            assert [code for code, _ in results] == [1012] * clients_n
            times = sorted(at - signalled for _, at in results)
            assert unready - signalled < times[0]  # at once, before any connection closed
            assert times[0] >= delay - 0.1, times  # nothing closed before the delay
            assert times[-1] <= delay + seconds + 1, times
            assert times[-1] - times[0] >= seconds / 2, times  # spread, not all at once
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert max(gaps) < seconds / 2, times  # and roughly evenly

            answered = 0

            async def gone() -> bool:
                nonlocal answered
                if process.process is None or process.process.poll() is not None:
                    return True
                try:
                    stats = await api.get("/api/stats")
                except httpx.TransportError:
                    return True  # the process is going away
                assert stats.status_code == 200
                answered += 1
                return False

            await eventually(gone, within=delay + seconds + 5, what="the process gone",
                             every=0.05)
            assert answered or process.process is None or process.process.poll() is not None

        code = await asyncio.to_thread(process.wait, delay + seconds + 5)
        assert code == 0
        assert time.monotonic() - signalled <= delay + seconds + 5


async def test_second_sigterm_ends_the_drain_sooner() -> None:
    env = {"HUB_DRAIN_DELAY": "5", "HUB_DRAIN_SECONDS": "10"}
    with hub_process(env) as process:
        async with connect(process.ws_url, token("a")) as client:
            process.signal(signal.SIGTERM)
            await wait_readyz(process.url, 503)
            again = time.monotonic()
            process.signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 5)
            assert time.monotonic() - again < 3
            assert code == 0
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                await client.closed(timeout=2)
            assert client.connection.close_code is not None



# check, help, start-up warnings (issue 17)


def test_check_prints_the_effective_configuration_with_secrets_masked(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[namespaces.chat]\nsubscribe = "any"\npresence = true\n')
    result = run_hub("check", "--port", "9001", env={
        **BASE_ENV, "HUB_CONFIG": path, "HUB_EVENTS_URL": "http://127.0.0.1:9/events",
        "HUB_EVENTS_SECRET": "events-secret",
        "HUB_REDIS_URL": "redis+sentinel://:data-pw@s1:26379/mymaster?sentinel_password=s-pw",
    })
    assert result.returncode == 0, result.stderr
    shown = dict(line.split(None, 1) for line in result.stdout.splitlines()
                 if line.startswith("HUB_"))
    assert shown["HUB_PORT"] == "9001"  # a flag, as `serve` takes it
    assert shown["HUB_JWT_SECRET"] == shown["HUB_API_KEY"] == "********"
    for secret in (SECRET, API_KEY, "data-pw", "s-pw", "events-secret"):
        assert secret not in result.stdout
    assert "[namespaces.chat]" in result.stdout and 'subscribe = "any"' in result.stdout
    assert "no warnings" in result.stdout


def test_check_warns_about_a_node_that_serves_nobody() -> None:
    result = run_hub("check")
    assert result.returncode == 0
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "4001" in warnings[0] and "HUB_JWT_SECRET" in warnings[0]
    assert "HUB_API_KEY" in warnings[1] and "403" in warnings[1]


def test_check_exits_2_on_an_error_as_serve_does() -> None:
    result = run_hub("check", env={**BASE_ENV, "HUB_QUEUE_LIMIT": "0"})
    assert result.returncode == 2 and "HUB_QUEUE_LIMIT" in result.stderr


def test_serve_help_names_every_variable() -> None:
    from hub.settings import variables

    result = run_hub("serve", "--help")
    assert result.returncode == 0
    for variable in variables().values():
        assert f"  {variable}=" in result.stdout, variable


def test_serve_warns_at_start_about_what_it_cannot_do() -> None:
    log = serve_briefly(CLEAN_ENV)
    assert "every client connection will be closed 4001" in log
    assert "HUB_API_KEY" in log


def test_a_port_in_use_exits_1() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_hub("serve", "--port", str(port), env=BASE_ENV)
    assert result.returncode == 1
    assert "listening" not in result.stdout
    assert "address already in use" in result.stderr


def test_a_node_on_redis_logs_no_library_warning(redis_url: str) -> None:
    log = serve_briefly(
        {**CLEAN_ENV, **BASE_ENV, "HUB_REDIS_URL": redis_url},
        lambda url: httpx.get(url + "/readyz", timeout=WAIT).raise_for_status(),
    )
    assert "Warning" not in log and "warnings.warn" not in log, log


async def test_the_readmes_token_posts_in_the_readmes_chat(tmp_path: Path) -> None:
    """README.md's TOML and its `hub token` line, as a reader copies them: the token reads and
    posts in a chat room, and reads nothing outside `chat`."""
    import shlex

    toml = re.search(r"```toml\n(.*?)```", README, re.DOTALL)
    line = re.search(r"^\s*HUB_JWT_SECRET=\.\.\. (hub token .*)$", README, re.MULTILINE)
    assert toml and line, "the README no longer shows its namespaces and token line"
    minted = run_hub(*shlex.split(line.group(1))[1:], env={"HUB_JWT_SECRET": SECRET})
    assert minted.returncode == 0, minted.stderr
    with hub_process({"HUB_CONFIG": write_config(tmp_path, toml.group(1))}) as process:
        async with connect(process.ws_url, minted.stdout.strip()) as client:
            assert (await client.subscribe("chat:lobby"))["type"] == "subscribed"
            posted = await client.request({"type": "publish", "channel": "chat:lobby",
                                           "data": {"text": "hi"}})
            assert posted["type"] in {"published", "message"}, posted
            outside = await client.request({"type": "subscribe", "channel": "news"})
            assert outside["type"] == "error" and outside["code"] == "forbidden"


# file descriptors: the node raises its own soft limit


def _open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard) if hard != "unlimited" else -1
    raise AssertionError("no Max open files line")


def test_serve_raises_its_soft_fd_limit_to_the_hard_one_and_says_so() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    env = {**CLEAN_ENV, **BASE_ENV, "HUB_LOG_LEVEL": "info", "HUB_MAX_CONNECTIONS": str(hard),
           "HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0"}
    # Started as a runtime that leaves the soft limit at 1024 would start it.
    with subprocess.Popen(
        ["sh", "-c", 'ulimit -Sn 1024 && exec "$0" -m hub serve --port 0', sys.executable],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            assert LISTENING.match(process.stdout.readline().rstrip("\n"))
            soft_now, hard_now = _open_files_limits(process.pid)
            assert (soft_now, hard_now) == (hard, hard)
            process.send_signal(signal.SIGTERM)
            assert process.wait(WAIT + 5) == 0
            log = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
    assert f"file descriptor limit {hard} (hard {hard})" in log
    # HUB_MAX_CONNECTIONS at the limit leaves no room for the node's own descriptors
    assert f"HUB_MAX_CONNECTIONS={hard} but the file descriptor limit ({hard})" in log


def test_fd_limit_problems() -> None:
    from hub.fdlimit import RESERVE, problem

    assert problem(20_000, 0) is None
    assert problem(20_000, 20_000 - RESERVE) is None
    assert "leaves room for about" in (problem(20_000, 20_000) or "")
    assert "HUB_MAX_CONNECTIONS is unset" in (problem(1024, 0) or "")
    assert problem(1024, 500) is None  # a limit the operator chose below the descriptors
