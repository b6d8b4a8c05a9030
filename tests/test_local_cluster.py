"""`deploy/local-cluster.sh` end to end: three node processes behind nginx, clients through
the balancer, a node killed hard, and its clients failing over to the others."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets

from tests.redis_server import free_port
from tests.support import (
    API_KEY,
    SECRET,
    Client,
    connect,
    eventually,
    eventually_sync,
    http_client,
    publish,
    token,
)

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "local-cluster.sh"
READY_WAIT = 45.0  # the script's own HUB_CLUSTER_READY_TIMEOUT is 30 s
STOP_WAIT = 30.0  # nodes drain (0 + 2 s here, + 5 s grace), then nginx and Redis stop
CLIENTS = 9


def _missing_binaries() -> list[str]:
    """The script installs what is missing with apt-get when root; a test must not."""
    return [
        name for name in ("nginx", "redis-server")
        if shutil.which(name) is None and not os.access(f"/usr/sbin/{name}", os.X_OK)
    ]


pytestmark = pytest.mark.skipif(
    bool(_missing_binaries()), reason=f"not installed: {_missing_binaries()}"
)


@dataclass
class Cluster:
    process: subprocess.Popen[str]
    state: Path
    lb_port: int
    node_ports: list[int]
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.lb_port}/ws"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def read_pids(self) -> None:
        for line in (self.state / "pids").read_text().splitlines():
            name, pid, _port = line.split()
            self.pids[name] = int(pid)

    def is_ours(self, pid: int) -> bool:
        """Alive and started by this cluster: its environment names our state dir."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return f"HUB_CLUSTER_DIR={self.state}".encode() in environ.split(b"\0")

    def node_pid(self, node: str) -> int:
        pid = int((self.state / f"{node}.pid").read_text())
        assert self.pids[node] == pid
        return pid

    def log_tail(self) -> str:
        parts = []
        for path in [*sorted(self.state.glob("*.log")), self.state / "stderr"]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n" + path.read_text()[-1500:])
        return "\n".join(parts)


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def wait_for_ready_line(cluster: Cluster, timeout: float) -> str:
    stdout = cluster.process.stdout
    assert stdout is not None

    def ready_line() -> str | None:  # the select is the wait between lines
        readable, _, _ = select.select([stdout], [], [], 0.1)
        line = stdout.readline() if readable else None
        if line == "":
            raise AssertionError(
                f"local-cluster.sh exited ({cluster.process.wait(5)}) before it was ready")
        return line if line is not None and line.startswith("cluster ready:") else None

    try:
        found = eventually_sync(ready_line, within=timeout, what="a `cluster ready:` line",
                                every=0)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.log_tail()}") from None
    assert found is not None
    return found


def stop(cluster: Cluster) -> int | None:
    """SIGTERM to the script and a bounded wait; if it hangs, kill it and whatever it left
    (only processes whose environment names our state dir)."""
    process = cluster.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
        for pid in cluster.pids.values():
            if cluster.is_ours(pid):
                os.kill(pid, signal.SIGKILL)
        return None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    lb_port, *node_ports = distinct_free_ports(4)
    state = tmp_path / "cluster"
    env = {
        **os.environ,
        "HUB_CMD": f"{sys.executable} -m hub",
        "HUB_LB_PORT": str(lb_port),
        "HUB_NODE_PORTS": " ".join(map(str, node_ports)),
        "HUB_CLUSTER_DIR": str(state),
        "HUB_JWT_SECRET": SECRET,
        "HUB_API_KEY": API_KEY,
        "HUB_DRAIN_DELAY": "0",
        "HUB_DRAIN_SECONDS": "2",
        "PYTHON": sys.executable,
    }
    tmp_path.joinpath("cluster").mkdir()
    with (state / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            stdin=subprocess.DEVNULL,
        )
    running = Cluster(process, state, lb_port, node_ports)
    try:
        line = wait_for_ready_line(running, READY_WAIT)
        assert f"ws://127.0.0.1:{lb_port}/ws" in line
        running.read_pids()
        assert set(running.pids) == {"redis", "node1", "node2", "node3", "nginx"}
        yield running
    finally:
        code = stop(running)
    assert code == 0, "local-cluster.sh did not stop cleanly\n" + running.log_tail()
    left = [name for name, pid in running.pids.items() if running.is_ours(pid)]
    assert not left, f"still running after the script stopped: {left}"


async def publish_news(cluster: Cluster, data: object) -> None:
    async with http_client(cluster.url) as api:
        await publish(api, "news", data)


async def join(stack: contextlib.AsyncExitStack, cluster: Cluster, user: str) -> Client:
    client = await stack.enter_async_context(connect(cluster.ws_url, token(user)))
    await client.subscribe("news")
    return client


async def rejoin(stack: contextlib.AsyncExitStack, cluster: Cluster, user: str,
                 dead: str) -> Client:
    """Reconnect through the balancer, as a client library would: bounded retries."""
    client = await eventually(
        lambda: join(stack, cluster, user), within=10, what=f"{user} reconnected",
        ignoring=(OSError, TimeoutError, websockets.InvalidHandshake,
                  websockets.ConnectionClosed),
        every=0.1,
    )
    assert client.welcome["node"] != dead
    return client


async def test_clients_spread_and_fail_over_through_nginx(cluster: Cluster) -> None:
    async with contextlib.AsyncExitStack() as stack:
        users = [f"user{i}" for i in range(CLIENTS)]
        clients = {user: await join(stack, cluster, user) for user in users}
        node_of = {user: client.welcome["node"] for user, client in clients.items()}
        assert set(node_of.values()) <= {"node1", "node2", "node3"}
        assert len(set(node_of.values())) >= 2, node_of

        await publish_news(cluster, {"n": 1})
        for client in clients.values():
            assert (await client.expect("message"))["data"] == {"n": 1}

        # Kill the node with the most clients, without a word.
        dead = max(set(node_of.values()), key=list(node_of.values()).count)
        pid = cluster.node_pid(dead)
        assert cluster.is_ours(pid)
        os.kill(pid, signal.SIGKILL)
        orphans = [user for user in users if node_of[user] == dead]
        for user in orphans:
            await clients[user].closed()  # the balancer drops the proxied connection
        for user in users:
            if user not in orphans:
                reply = await clients[user].request({"type": "ping"})
                assert reply["type"] == "pong"

        for user in orphans:
            clients[user] = await rejoin(stack, cluster, user, dead)
            node_of[user] = clients[user].welcome["node"]
        assert dead not in node_of.values()

        await publish_news(cluster, {"n": 2})
        for client in clients.values():
            assert (await client.expect("message"))["data"] == {"n": 2}
