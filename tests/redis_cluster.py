"""Real local Redis Cluster and Sentinel deployments for tests.

Every process is a `redis-server` started by the test on free 127.0.0.1 ports, with its
own directory under one temp dir (`--save '' --appendonly no`), and stopped by its pid
(SIGKILL/SIGTERM/SIGSTOP/SIGCONT to that pid only). The machine's own Redis (6379) is
never touched. On Linux a process started from the main thread (as sync fixtures do) also
gets PR_SET_PDEATHSIG=SIGKILL, so it dies with pytest even when pytest itself is killed
(pytest-timeout's thread method, kill -9); processes started from other threads rely on
`cleanup()` alone.

`RedisCluster`: N masters with R replicas each, formed with `redis-cli --cluster create`,
tuned for fast failovers (`cluster-node-timeout` 1000 ms, `cluster-replica-validity-factor
0` so that any replica may be promoted however long it was cut off, no replica migration,
diskless replication without delay: a killed master is replaced in ~2.5 s).
`RedisSentinel`: one master, its replicas and three Sentinels (quorum 2,
`down-after-milliseconds` 1000).

A promoted replica that lacks the last writes (what a failover does to writes that were
not replicated yet), reliably:

    cluster.pause_replication(replica)   # SIGSTOP it and cut its link on the master side
    ...write to its master...            # answered by the master, never replicated
    cluster.kill(master)
    cluster.promote(replica, takeover=True)   # SIGCONT, CLUSTER FAILOVER TAKEOVER

SIGSTOP alone is not enough: the master's replication stream keeps landing in the stopped
replica's kernel socket buffer and is applied on SIGCONT. Closing the replica's link on
the master (CLIENT KILL ADDR) while the replica is stopped means nothing written after it
ever leaves the master.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.retry import Retry

from tests.needs import need
from tests.redis_server import free_port, require_redis_server, write_tls_files
from tests.support import eventually_sync

REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"
POLL = 0.05
T = TypeVar("T")

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def require_redis_cli() -> str:
    """The redis-cli binary (and redis-server), or skip (fail with HUB_REQUIRE_REDIS=1)."""
    require_redis_server()
    need(REDIS_CLI, "redis-cli (Debian package redis-tools)")
    assert REDIS_CLI is not None
    return REDIS_CLI


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (never 6379)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def slot_of(key_or_slot: str | bytes | int) -> int:
    if isinstance(key_or_slot, int):
        assert 0 <= key_or_slot < REDIS_CLUSTER_HASH_SLOTS, key_or_slot
        return key_or_slot
    key = key_or_slot.encode() if isinstance(key_or_slot, str) else key_or_slot
    return key_slot(key)


def until(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """`condition`'s first result other than None/False (0 and [] count), within `timeout`
    seconds; Redis and socket errors count as "not yet"."""
    found = eventually_sync(condition, _found, timeout, what,
                            ignoring=(redis.RedisError, OSError), every=POLL)
    assert found is not None and found is not False
    return found


def _found(result: object) -> bool:
    return result is not None and result is not False


def _pdeathsig_safe() -> bool:
    """PR_SET_PDEATHSIG fires when the starting *thread* ends: only from the main thread."""
    return _LIBC is not None and threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class RedisProcess:
    """One redis-server (data node or Sentinel) run by the test, stopped by its pid."""

    def __init__(
        self, port: int, directory: Path, args: list[str], *, tls_ca: Path | None = None
    ) -> None:
        self.port = port
        self.dir = directory
        self.args = args
        self.tls_ca = tls_ca
        self.dir.mkdir(parents=True, exist_ok=True)
        self.paused = False
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pid(self) -> int:
        assert self._process is not None, f"redis on port {self.port} is not running"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, f"redis on port {self.port} is already running"
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                self.args,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if _pdeathsig_safe() else None,  # noqa: PLW1509
            )
        self.paused = False
        with contextlib.suppress(AssertionError):
            if eventually_sync(self._serving_or_gone, within=timeout, what="redis started",
                               ignoring=(OSError,), every=POLL) == "serving":
                return
        tail = self.log_tail()
        self.kill()
        raise RuntimeError(f"redis on port {self.port} did not start:\n{tail}")

    def _serving_or_gone(self) -> str | None:
        """Ready when it answers PING (NOAUTH counts: it is serving); "gone" if it exited."""
        if not self.running:
            return "gone"
        return "serving" if self._ping().startswith((b"+PONG", b"-NOAUTH")) else None

    def kill(self) -> None:
        """SIGKILL: gone without a word."""
        self._end(signal.SIGKILL)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: a clean shutdown (a master first lets its replicas catch up)."""
        self._end(signal.SIGTERM, timeout)

    def pause(self) -> None:
        """SIGSTOP: its sockets stay open but nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _end(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        process = self._process
        self._process = None
        self.paused = False
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10.0)

    def _ping(self) -> bytes:
        with socket.create_connection((HOST, self.port), timeout=0.5) as raw:
            if self.tls_ca is None:
                raw.sendall(b"PING\r\n")
                return raw.recv(64)
            context = ssl.create_default_context(cafile=self.tls_ca)
            with context.wrap_socket(raw, server_hostname=HOST) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64)


class _Deployment:
    """Processes and admin clients shared by RedisCluster and RedisSentinel."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.processes: dict[int, RedisProcess] = {}
        self._clients: dict[int, redis.Redis] = {}
        self._down_since: dict[int, float] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    def pids(self) -> dict[int, int]:
        """Port -> pid of every running process."""
        return {port: p.pid for port, p in self.processes.items() if p.running}

    def cleanup(self) -> None:
        """Kill every process (SIGCONT + SIGKILL by pid) and remove the directory."""
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for process in self.processes.values():
            with contextlib.suppress(Exception):
                process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {port} ---\n{p.log_tail(chars)}" for port, p in self.processes.items()
        )

    def _reachable(self) -> list[int]:
        return [port for port, p in self.processes.items() if p.running and not p.paused]

    def _make_client(self, port: int, **options: Any) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=port,
            decode_responses=True,
            socket_timeout=2.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            **options,
        )

    def _client_options(self, port: int) -> dict[str, Any]:
        return {}

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) sync client of one process, decoding responses."""
        if port not in self._clients:
            self._clients[port] = self._make_client(port, **self._client_options(port))
        return self._clients[port]

    def command(self, port: int, *args: str | int) -> Any:
        """Run one raw command on one process (no response parsing)."""
        return self.client(port).execute_command(*args)  # type: ignore[no-untyped-call]

    def _mark_down(self, port: int) -> None:
        self._down_since[port] = time.monotonic()

    def _link_up(self, port: int) -> bool:
        return self.client(port).info("replication").get("master_link_status") == "up"


@dataclass(frozen=True)
class NodeInfo:
    """One cluster node as the cluster sees it (a running node describes itself)."""

    port: int
    pid: int | None  # None when its process is not running
    node_id: str
    role: str  # "master" or "replica"
    master_port: int | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # inclusive ranges
    flags: frozenset[str]
    paused: bool = False

    @property
    def running(self) -> bool:
        return self.pid is not None

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


@dataclass(frozen=True)
class Failover:
    old_master: int
    new_master: int
    promoted_after: float  # seconds from the old master going down to the replica's promotion
    ok_after: float  # ... to every reachable node agreeing, cluster_state ok everywhere


def parse_cluster_nodes(text: str) -> dict[int, NodeInfo]:
    """CLUSTER NODES -> port -> NodeInfo (pid None; callers fill it in)."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    port_of = {row[0]: int(row[1].split("@")[0].rsplit(":", 1)[1]) for row in rows}
    nodes: dict[int, NodeInfo] = {}
    for row in rows:
        flags = frozenset(row[2].split(","))
        slots: list[tuple[int, int]] = []
        for item in row[8:]:
            if item.startswith("["):  # migrating/importing markers
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        port = port_of[row[0]]
        nodes[port] = NodeInfo(
            port=port,
            pid=None,
            node_id=row[0],
            role="master" if "master" in flags else "replica",
            master_port=port_of.get(row[3]) if row[3] != "-" else None,
            slots=tuple(slots),
            flags=flags,
        )
    return nodes


class RedisCluster(_Deployment):
    """A local Redis Cluster: `masters` (at least 3, as redis-cli requires) masters with
    `replicas` replicas each. `replica_validity_factor` 0 lets any replica be promoted
    however long it was cut off from its master (Redis' default, 10, refuses a replica
    disconnected for more than ~10 node timeouts).

    Start it with `start()` (or use the `redis_cluster*` fixtures), end it with `cleanup()`.
    Ports are the nodes' client ports; every method that takes a `port` means that node.
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        replica_validity_factor: int = 0,
        require_full_coverage: bool = False,
        allow_reads_when_down: bool = False,
        password: str | None = None,
        user: str | None = None,
        tls: bool = False,
        extra_args: Iterable[str] = (),
    ) -> None:
        require_redis_cli()
        assert masters >= 3 and replicas >= 0, "redis-cli needs at least 3 masters"
        assert user is None or password is not None, "a user needs a password"
        super().__init__("hub-redis-cluster-")
        self.master_count = masters
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self._cut_off_from: dict[int, int] = {}  # replica -> master, by pause_replication
        self.replica_validity_factor = replica_validity_factor
        self.require_full_coverage = require_full_coverage
        self.password = password
        self.user = user
        self.tls = tls
        self.ca: Path | None = None
        if tls:
            write_tls_files(self.dir / "tls")
            self.ca = self.dir / "tls" / "ca.pem"
        self.last_failover: Failover | None = None
        self._slots_when_down: dict[int, tuple[tuple[int, int], ...]] = {}
        total = masters * (1 + replicas)
        ports = free_ports(2 * total)
        self.ports = ports[:total]
        for port, bus_port in zip(ports[:total], ports[total:], strict=True):
            args = self._node_args(port, bus_port, allow_reads_when_down, list(extra_args))
            self.processes[port] = RedisProcess(port, self.dir / str(port), args, tls_ca=self.ca)

    # -- addresses --------------------------------------------------------------------

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [(HOST, port) for port in self.ports]

    @property
    def url(self) -> str:
        """`redis+cluster://[user:password@]127.0.0.1:p1,...` (`rediss+cluster://...
        ?ssl_ca_certs=CA` with TLS): every node is listed as a seed."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.user or '', safe='')}:{quote(self.password, safe='')}@"
        hosts = ",".join(f"{host}:{port}" for host, port in self.seeds)
        query = f"?ssl_ca_certs={self.ca}" if self.ca else ""
        return f"{scheme}://{auth}{hosts}{query}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `redis.asyncio.RedisCluster(startup_nodes=..., **these)`."""
        options: dict[str, Any] = {}
        if self.password is not None:
            options["password"] = self.password
            if self.user is not None:
                options["username"] = self.user
        if self.ca is not None:
            options["ssl"] = True
            options["ssl_ca_certs"] = str(self.ca)
        return options

    # -- lifecycle --------------------------------------------------------------------

    def start(self, port: int | None = None, *, timeout: float = 60.0) -> None:
        """`start()`: start every node, form the cluster (redis-cli --cluster create),
        wait until it is healthy. `start(port)`: bring a killed or stopped node back with
        its nodes.conf (its data is gone: no persistence) and wait until it has rejoined:
        known to every reachable node without pfail/fail, its own cluster_state ok, and,
        as a replica (what a failed-over master comes back as), its link up."""
        if port is None:
            self._form(timeout)
        else:
            self._restart(port, timeout)

    def _form(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            process.start()
        replicas = str(self.replicas_per_master)
        command = [*self._cli(), "--cluster", "create"]
        command += [f"{HOST}:{port}" for port in self.ports]
        command += ["--cluster-replicas", replicas, "--cluster-yes"]
        result = subprocess.run(
            command,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            out = (result.stdout + result.stderr).decode(errors="replace")[-3000:]
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out}")
        try:
            self.wait_healthy(max(1.0, deadline - time.monotonic()))
        except AssertionError as error:
            raise RuntimeError(f"{error}\n{self.logs()}") from None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every node runs, is known to every node without pfail/fail, says
        cluster_state:ok with all 16384 slots ok, and every replica's link is up."""
        until(self._healthy, timeout, f"cluster {self.ports} healthy")

    def _healthy(self) -> bool:
        if any(not p.running or p.paused for p in self.processes.values()):
            return False
        for port in self.ports:
            if not self._state_ok(port, full=True):
                return False
            view = parse_cluster_nodes(self._cluster_nodes(port))
            if set(view) != set(self.ports):
                return False
            if any(node.flags & {"fail", "fail?", "handshake", "noaddr"} for node in view.values()):
                return False
            masters = [n for n in view.values() if n.role == "master" and n.slots]
            if len(masters) != self.master_count:
                return False
            if view[port].role == "replica" and not self._link_up(port):
                return False
        return True

    def reset(self) -> None:
        """Bring back every stopped/paused node, wait healthy, FLUSHALL the masters and
        SCRIPT FLUSH every node (what the shared `redis_cluster` fixture does per test)."""
        for process in self.processes.values():
            if process.paused:
                process.resume()
            if not process.running:
                process.start()
        self.wait_healthy()
        self._down_since.clear()
        self._slots_when_down.clear()
        for node in self.masters():
            self.client(node.port).flushall()
        for port in self.ports:
            self.client(port).script_flush()

    # -- topology ---------------------------------------------------------------------

    def nodes(self) -> dict[int, NodeInfo]:
        """Every node, port -> NodeInfo: a reachable node as it describes itself, the
        others as the first reachable node that knows them does."""
        views: dict[int, dict[int, NodeInfo]] = {}
        for port in self._reachable():
            with contextlib.suppress(redis.RedisError, OSError):
                views[port] = parse_cluster_nodes(self._cluster_nodes(port))
        if not views:
            raise RuntimeError(f"no cluster node answers ({self.ports})")
        result: dict[int, NodeInfo] = {}
        for port in self.ports:
            info = views[port][port] if port in views else None
            if info is None:
                info = next((view[port] for view in views.values() if port in view), None)
            if info is None:
                continue
            process = self.processes[port]
            result[port] = NodeInfo(
                port=info.port,
                pid=process.pid if process.running else None,
                node_id=info.node_id,
                role=info.role,
                master_port=info.master_port,
                slots=info.slots,
                flags=info.flags,
                paused=process.paused,
            )
        return result

    def masters(self) -> list[NodeInfo]:
        """Masters that own slots (a failed master still owns its slots until a replica
        is promoted), in port order."""
        return [n for n in self.nodes().values() if n.role == "master" and n.slots]

    def replicas(self) -> list[NodeInfo]:
        return [n for n in self.nodes().values() if n.role == "replica"]

    def replicas_of(self, master_port: int) -> list[NodeInfo]:
        return [n for n in self.replicas() if n.master_port == master_port]

    def master_for(self, key_or_slot: str | bytes | int) -> NodeInfo:
        """The master that owns the key's (or slot number's) slot."""
        slot = slot_of(key_or_slot)
        owners = [n for n in self.masters() if n.owns(slot)]
        assert owners, f"slot {slot} is not covered"
        return next((n for n in owners if n.running), owners[0])

    # -- faults -----------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL that node."""
        self._mark_down(port)
        self.processes[port].kill()

    def stop(self, port: int) -> None:
        """SIGTERM that node (a clean shutdown)."""
        self._mark_down(port)
        self.processes[port].stop()

    def pause(self, port: int) -> None:
        """SIGSTOP that node: it holds its sockets and answers nothing."""
        self._mark_down(port)
        self.processes[port].pause()

    def resume(self, port: int) -> None:
        """SIGCONT a paused node."""
        self.processes[port].resume()

    def _mark_down(self, port: int) -> None:
        info = self.nodes().get(port)
        self._slots_when_down[port] = info.slots if info is not None else ()
        super()._mark_down(port)

    def wait_for_failover(self, old_master_port: int, timeout: float = 30.0) -> float:
        """Until a replica owns the slots the old master (killed, stopped or paused by
        this object) had, every reachable node's CLUSTER NODES says so and CLUSTER INFO
        says cluster_state:ok. Returns the seconds since the old master went down (the
        details are in `last_failover`)."""
        assert old_master_port in self._down_since, "kill/stop/pause it first"
        slots = self._slots_when_down[old_master_port]
        assert slots, f"{old_master_port} owned no slots when it went down"
        since = self._down_since[old_master_port]
        slot = slots[0][0]
        promoted: dict[int, float] = {}

        def done() -> int | None:
            reachable = self._reachable()
            owners: set[int] = set()
            for port in reachable:
                view = parse_cluster_nodes(self._cluster_nodes(port))
                if view[port].role == "master" and view[port].owns(slot):
                    promoted.setdefault(port, time.monotonic())
                owners |= {n.port for n in view.values() if n.role == "master" and n.owns(slot)}
            if len(owners) != 1:
                return None
            new = owners.pop()
            if new == old_master_port or new not in promoted:
                return None
            if not all(self._state_ok(port) for port in reachable):
                return None
            return new

        new = until(done, timeout, f"failover of {old_master_port}")
        now = time.monotonic()
        self.last_failover = Failover(old_master_port, new, promoted[new] - since, now - since)
        return now - since

    def promote(
        self,
        replica_port: int,
        *,
        force: bool = True,
        takeover: bool = False,
        timeout: float = 30.0,
    ) -> float:
        """CLUSTER FAILOVER [FORCE|TAKEOVER] on a replica (SIGCONT first if paused);
        waits until it owns its master's slots in every reachable node's view and
        cluster_state is ok. TAKEOVER needs no vote and no master: it promotes a stale
        replica on purpose. Returns the seconds taken."""
        started = time.monotonic()
        info = self.nodes()[replica_port]
        # A paused replica's role comes from the others' views, which can be odd once its
        # master is dead too (seen: "master" without slots, which failed an assertion here
        # although it was a replica): the master it was cut off from is remembered.
        master_port = info.master_port if info.role == "replica" else None
        master_port = master_port or self._cut_off_from.get(replica_port)
        assert master_port is not None, info
        slots = self.nodes()[master_port].slots
        if self.processes[replica_port].paused:
            self.resume(replica_port)
        mode = ["TAKEOVER"] if takeover else ["FORCE"] if force else []
        with contextlib.suppress(redis.ResponseError):  # it may have promoted itself
            self.command(replica_port, "CLUSTER", "FAILOVER", *mode)
        slot = slots[0][0]

        def done() -> bool:
            for port in self._reachable():
                view = parse_cluster_nodes(self._cluster_nodes(port))
                owners = {n.port for n in view.values() if n.role == "master" and n.owns(slot)}
                if owners != {replica_port} or not self._state_ok(port):
                    return False
            return True

        until(done, timeout, f"promotion of {replica_port}")
        return time.monotonic() - started

    def pause_replication(self, replica_port: int) -> int:
        """Make a replica stale: SIGSTOP it, then close its replication link on its master
        (CLIENT KILL ADDR), so that nothing written to the master from now on reaches it.
        Returns the master's port. `promote(replica, takeover=True)` after killing the
        master yields a promoted replica that lacks those writes; `resume(replica)` while
        the master lives lets it reconnect and catch up (PSYNC)."""
        info = self.nodes()[replica_port]
        assert info.role == "replica" and info.master_port is not None, info
        master = info.master_port
        links = self.client(replica_port).client_list(_type="master")
        assert links, f"{replica_port} has no link to its master"
        local = str(links[0]["laddr"])
        self.processes[replica_port].pause()  # not _mark_down: the replica is not "down"
        self._cut_off_from[replica_port] = master
        self.command(master, "CLIENT", "KILL", "ADDR", local)
        until(
            lambda: not self._replica_listed(master, replica_port),
            5.0,
            f"{master} dropping replica {replica_port}",
        )
        return master

    def _restart(self, port: int, timeout: float) -> None:
        process = self.processes[port]
        if process.paused:
            process.resume()
        if not process.running:
            process.start()

        def rejoined() -> bool:
            for other in self._reachable():
                view = parse_cluster_nodes(self._cluster_nodes(other))
                if port not in view or view[port].flags & {"fail", "fail?", "handshake"}:
                    return False
            own = parse_cluster_nodes(self._cluster_nodes(port))[port]
            if own.role == "replica" and not self._link_up(port):
                return False
            return self._state_ok(port)

        until(rejoined, timeout, f"node {port} rejoining")
        self._down_since.pop(port, None)
        self._slots_when_down.pop(port, None)

    # -- helpers ----------------------------------------------------------------------

    def _node_args(
        self, port: int, bus_port: int, allow_reads_when_down: bool, extra: list[str]
    ) -> list[str]:
        yes_no = {True: "yes", False: "no"}
        args = [require_redis_server(), "--bind", HOST, "--daemonize", "no"]
        if self.tls:
            tls = self.dir / "tls"
            args += ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(tls / "server.pem")]
            args += ["--tls-key-file", str(tls / "server.key")]
            args += ["--tls-ca-cert-file", str(tls / "ca.pem")]
            args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        else:
            args += ["--port", str(port)]
        args += ["--dir", str(self.dir / str(port)), "--save", "", "--appendonly", "no"]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-port", str(bus_port)]
        args += ["--cluster-node-timeout", str(self.node_timeout_ms)]
        args += ["--cluster-replica-validity-factor", str(self.replica_validity_factor)]
        args += ["--cluster-allow-replica-migration", "no"]
        args += ["--cluster-require-full-coverage", yes_no[self.require_full_coverage]]
        args += ["--cluster-allow-reads-when-down", yes_no[allow_reads_when_down]]
        args += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        args += ["--enable-debug-command", "local"]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
            if self.user is not None:
                args += ["--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all"]
        return args + extra

    def _cli(self) -> list[str]:
        command = [require_redis_cli()]
        if self.password is not None:
            command += ["--no-auth-warning", "-a", self.password]
        if self.ca is not None:
            command += ["--tls", "--cacert", str(self.ca)]
        return command

    def _client_options(self, port: int) -> dict[str, Any]:
        return self.client_kwargs()

    def _cluster_nodes(self, port: int) -> str:
        return str(self.command(port, "CLUSTER", "NODES"))

    def cluster_info(self, port: int) -> dict[str, str]:
        text = str(self.command(port, "CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def _state_ok(self, port: int, *, full: bool = False) -> bool:
        info = self.cluster_info(port)
        if info.get("cluster_state") != "ok":
            return False
        return not full or info.get("cluster_slots_ok") == str(REDIS_CLUSTER_HASH_SLOTS)

    def _replica_listed(self, master: int, replica: int) -> bool:
        info = self.client(master).info("replication")
        return any(
            isinstance(value, dict) and int(value.get("port", -1)) == replica
            for key, value in info.items()
            if key.startswith("slave")
        )


class RedisSentinel(_Deployment):
    """One master, `replicas` replicas and `sentinels` Sentinels monitoring it as
    `master_name` (quorum 2, down-after 1000 ms)."""

    def __init__(
        self,
        *,
        master_name: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 4000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        require_redis_server()
        super().__init__("hub-redis-sentinel-")
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.quorum = quorum
        ports = free_ports(1 + replicas + sentinels)
        self.data_ports = ports[: 1 + replicas]
        self.sentinel_ports = ports[1 + replicas :]
        self.initial_master = self.data_ports[0]
        self._old_master: int | None = None
        binary = require_redis_server()
        for port in self.data_ports:
            directory = self.dir / str(port)
            args = [binary, "--bind", HOST, "--port", str(port), "--daemonize", "no"]
            args += ["--dir", str(directory), "--save", "", "--appendonly", "no"]
            args += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
            if password is not None:
                args += ["--requirepass", password, "--masterauth", password]
            if port != self.initial_master:
                args += ["--replicaof", HOST, str(self.initial_master)]
            self.processes[port] = RedisProcess(port, directory, args)
        for port in self.sentinel_ports:
            directory = self.dir / str(port)
            directory.mkdir(parents=True)
            lines = [
                f"port {port}",
                f"bind {HOST}",
                f'dir "{directory}"',
                "daemonize no",
                f"sentinel monitor {master_name} {HOST} {self.initial_master} {quorum}",
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {master_name} 1",
            ]
            if password is not None:
                lines.append(f"sentinel auth-pass {master_name} {password}")
            if sentinel_password is not None:
                lines += [f"requirepass {sentinel_password}"]
                lines += [f"sentinel sentinel-pass {sentinel_password}"]
            config = directory / "sentinel.conf"
            config.write_text("\n".join(lines) + "\n")
            args = [binary, str(config), "--sentinel"]
            self.processes[port] = RedisProcess(port, directory, args)

    @property
    def url(self) -> str:
        """`redis+sentinel://[:password@]127.0.0.1:s1,.../mymaster[?sentinel_password=]`"""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        query = ""
        if self.sentinel_password is not None:
            query = f"?sentinel_password={quote(self.sentinel_password, safe='')}"
        return f"redis+sentinel://{auth}{hosts}/{self.master_name}{query}"

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(HOST, port) for port in self.sentinel_ports]

    def start(self, timeout: float = 30.0) -> None:
        """Start the data nodes, then the Sentinels; wait until every Sentinel knows the
        master, its replicas and the other Sentinels."""
        deadline = time.monotonic() + timeout
        for port in self.data_ports:
            self.processes[port].start()
        for port in self.data_ports[1:]:
            until(
                functools.partial(self._link_up, port),
                max(1.0, deadline - time.monotonic()),
                f"replica {port} in sync",
            )
        for port in self.sentinel_ports:
            self.processes[port].start()
        until(self._settled, max(1.0, deadline - time.monotonic()), "sentinels settled")

    def _settled(self) -> bool:
        master = self.master()
        replicas = len(self.data_ports) - 1
        for port in self._reachable_sentinels():
            state = self.sentinel_master_state(port)
            if int(state["port"]) != master or state["flags"] != "master":
                return False
            if int(state["num-slaves"]) != replicas:
                return False
            if int(state["num-other-sentinels"]) != len(self.sentinel_ports) - 1:
                return False
        return True

    def sentinel_master_state(self, sentinel_port: int) -> dict[str, str]:
        """SENTINEL MASTER <name> as a dict."""
        flat = self.command(sentinel_port, "SENTINEL", "MASTER", self.master_name)
        if isinstance(flat, dict):  # redis-py parses SENTINEL MASTER (typed values)
            return {str(k): str(v) for k, v in flat.items()}
        return {str(k): str(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}

    def master(self) -> int:
        """The master's port, as the first Sentinel that answers names it."""
        for port in self._reachable_sentinels():
            with contextlib.suppress(redis.RedisError, OSError):
                return self._named_master(port)
        raise RuntimeError("no Sentinel answers")

    def replicas(self) -> list[int]:
        master = self.master()
        return [port for port in self.data_ports if port != master]

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master()
        self._old_master = port
        self._mark_down(port)
        self.processes[port].kill()
        return port

    def wait_for_failover(self, timeout: float = 30.0) -> float:
        """Until every running Sentinel names a new master that says role:master.
        Returns the seconds since `kill_master()`."""
        old = self._old_master
        assert old is not None, "kill_master() first"

        def done() -> int | None:
            named = {self._named_master(port) for port in self._reachable_sentinels()}
            if len(named) != 1:
                return None
            new = named.pop()
            if new == old or self.client(new).info("replication").get("role") != "master":
                return None
            return new

        until(done, timeout, f"sentinel failover away from {old}")
        return time.monotonic() - self._down_since[old]

    def start_node(self, port: int, *, timeout: float = 30.0) -> None:
        """Bring a killed data node back (empty) as a replica of the current master and
        wait until its link is up. (Left alone, a Sentinel would convert a returning former
        master only after ~8-10 s: it waits 4 hello periods before acting on a role change.
        Until then that node is an empty master that no Sentinel names.)"""
        self.processes[port].start()
        master = self.master()
        if port == master:
            return
        self.command(port, "REPLICAOF", HOST, master)
        until(lambda: self._link_up(port), timeout, f"{port} replicating again")
        self._down_since.pop(port, None)

    def _named_master(self, sentinel_port: int) -> int:
        address = self.command(
            sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
        )
        return int(address[1])

    def _reachable_sentinels(self) -> list[int]:
        reachable = set(self._reachable())
        return [port for port in self.sentinel_ports if port in reachable]

    def _client_options(self, port: int) -> dict[str, Any]:
        secret = self.sentinel_password if port in self.sentinel_ports else self.password
        return {"password": secret} if secret is not None else {}


def iter_hash_tags(prefix: str = "t") -> Iterator[str]:
    """`{t0}`, `{t1}`, ... (hash tags to pick keys on given slots/masters)."""
    index = 0
    while True:
        yield f"{{{prefix}{index}}}"
        index += 1
