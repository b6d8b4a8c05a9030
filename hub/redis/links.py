"""One supervised pub/sub connection to one shard (the only server, the Sentinel master, or
one master of a Cluster): PROTOCOL §5-§6 in practice.

The link subscribes the topics its owner wants on that shard, reads publications, probes a
silent connection with PING (a half-open one is taken for dead within two intervals),
asks its owner whether the server is still the shard's master, and reconnects. It tells
its owner when it goes down and comes back, with the topics concerned, so the node can
fill their gap from history.

PROTOCOL §5: a link that died without a word is noticed within 1 s, and service resumes
within 200 ms of Redis answering again. So a silent link is pinged every
`PROBE_INTERVAL` and given up after two; a server that cannot be reached is tried again
every `UNREACHABLE_RETRY` (each attempt is the probe: connect and TIME, bounded by
`PROBE_TIMEOUT`), and the link comes up as soon as one answers. Backoff only spaces
attempts that reached Redis and failed after (a server that refuses, or is loading).

`CommandProbe` does the same for the command client's way to a shard: a PING every
`PROBE_INTERVAL`, down when one goes unanswered for `PROBE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from hub.errors import BrokerUnavailable
from hub.incident import Incident
from hub.redis.patience import LATE, LATE_RETRIES, PatientTimeout
from hub.redis.topology import REDIS_ERRORS
from hub.tasks import cancel

log = logging.getLogger("hub.redis")

PROBE_INTERVAL = 0.25  # a silent link is pinged this often
PROBE_TIMEOUT = 0.5  # a probe (PING, or connect and TIME) unanswered this long: down
UNREACHABLE_RETRY = 0.05  # a server that could not be reached is tried again this soon
STILL_SERVES_SECONDS = 2.5  # how often a silent link asks whether its server is the master
# A wait that ended more than `LATE` later than it should have: the event loop was held up
# (a busy or starved process), and an answer that arrived meanwhile is still unread. Silence
# then proves nothing: the probe is made again, at most `LATE_RETRIES` times in a row (the
# same rule as `hub.redis.patience` for command replies).
_BATCH = 1000  # topics per (S)SUBSCRIBE command
_READ_BATCH = 1000  # replies taken at once from what has arrived
# Answers of a Cluster whose shards are changing under the link.
_UNSETTLED = (AskError, ClusterDownError, TryAgainError)  # MovedError is an AskError


class LinkOwner(Protocol):
    def wanted(self, link: Link) -> list[bytes]:
        """The topics this link must carry now."""

    def deliver(self, publications: list[tuple[bytes, bytes]]) -> None:
        """(topic, payload) of what arrived together, in the order it arrived."""

    def went_up(self, link: Link, topics: list[bytes], reconnected: bool) -> None: ...

    def went_down(self, link: Link, topics: list[bytes]) -> None: ...

    def lost_topic(self, link: Link, topic: bytes) -> None:
        """Redis unsubscribed a wanted topic by itself (its slot moved away)."""

    def failed(self, link: Link, exc: BaseException) -> None:
        """A connection attempt or a connection failed: the shards may have changed."""

    async def still_serves(self, link: Link, connection: AbstractConnection) -> bool: ...


class Link:
    def __init__(
        self,
        shard: str,
        connect: Callable[[], AbstractConnection],
        owner: LinkOwner,
        *,
        sharded: bool,
        ping_interval: float,
        timeout: float,
        backoff_cap: float,
    ) -> None:
        self.shard = shard
        self._new_connection = connect
        self._owner = owner
        self._subscribe, self._unsubscribe = (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        )
        self._sharded = sharded
        self._confirm_kind = b"ssubscribe" if sharded else b"subscribe"
        self._message_kind = b"smessage" if sharded else b"message"
        self._unsubscribed_kind = b"sunsubscribe" if sharded else b"unsubscribe"
        self._ping_interval = ping_interval
        self._timeout = timeout
        self._backoff_cap = backoff_cap
        self.up = False
        self._was_up = False
        # Redis clock minus ours (ms), measured at each connect.
        self.clock_skew_ms = 0.0
        self._conn: AbstractConnection | None = None  # set once subscribed to all wanted
        self.sent: set[bytes] = set()
        self._confirms: dict[bytes, deque[asyncio.Future[bool]]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.first_attempt = asyncio.Event()
        self._reached = False  # this attempt got an answer from Redis
        self._incident = Incident(log, f"Redis pub/sub connection to {shard}")

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"hub-redis-{self.shard}")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The loop only ends by `close`; anything else is a bug, logged, and restarted (a
        backoff later) so the node does not lose its relay for good."""
        if task is not self._task or task.cancelled():
            return
        log.error("Redis pub/sub loop ended unexpectedly (%r); restarting it", task.exception())
        asyncio.get_running_loop().call_later(self._backoff_cap, self._restart, task)

    def _restart(self, ended: asyncio.Task[None]) -> None:
        if self._task is ended:  # not closed meanwhile
            self.start()

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel(task)
        self.up = False

    # subscriptions

    async def subscribe(self, topic: bytes) -> None:
        """Returns once Redis confirmed it, so a history read that follows misses nothing.
        Raises BrokerUnavailable while the link is down or when Redis did not confirm in
        time. Calls for one topic reach Redis in the order they were made: the lock is
        taken before anything else awaits."""
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise BrokerUnavailable(f"the pub/sub connection to {self.shard} is down")
            pending = self._confirms.get(topic)
            if topic in self.sent:
                waiter = pending[-1] if pending else None
            else:
                waiter = asyncio.get_running_loop().create_future()
                self._confirms.setdefault(topic, deque()).append(waiter)
                self.sent.add(topic)
                try:
                    await conn.send_command(self._subscribe, topic)
                except REDIS_ERRORS as exc:
                    self.sent.discard(topic)
                    raise BrokerUnavailable("cannot subscribe: Redis is unreachable") from exc
        if waiter is None:
            return
        try:
            async with PatientTimeout(self._timeout):  # a late loop is not a silent Redis
                confirmed = await asyncio.shield(waiter)
        except TimeoutError:
            confirmed = False
        if not confirmed:
            # If Redis does subscribe it after all, what it relays is delivered: the node
            # drops what it no longer wants.
            self.sent.discard(topic)
            raise BrokerUnavailable("Redis did not confirm the subscription")

    async def unsubscribe(self, topic: bytes) -> None:
        """Never raises: if the connection is broken, the reconnect forgets the topic."""
        async with self._lock:
            conn = self._conn
            if conn is None or topic not in self.sent:
                return
            self.sent.discard(topic)
            try:
                await conn.send_command(self._unsubscribe, topic)
            except REDIS_ERRORS as exc:
                log.debug("%s failed, the reconnect will drop it: %s", self._unsubscribe, exc)

    # the loop

    async def _supervise(self) -> None:
        failures = 0  # attempts in a row that reached Redis and failed after
        while True:
            conn: AbstractConnection | None = None
            self._reached = False
            try:
                conn = self._new_connection()
                backlog = await self._connect(conn)
                failures = 0
                self._went_up(backlog)
                await self._read(conn)
            except _UNSETTLED as exc:
                # The shard moved (a replica being promoted, a slot migrating): try again
                # soon, once the owner has read the shards again.
                failures = min(failures + 1, 2)
                self._went_down(exc)
            except REDIS_ERRORS as exc:
                failures += 1
                self._went_down(exc)
            except Exception as exc:
                # A bug, not an outage; still, the node must not lose its relay for good.
                log.exception("Redis pub/sub loop failed")
                failures += 1
                self._went_down(exc)
            finally:
                await self._drop(conn)
                self.first_attempt.set()
            if not self._reached or failures <= 1:
                # Unreachable, or it was up until now: the next attempt is the probe, and
                # the link is up again as soon as one answers.
                retry = min(UNREACHABLE_RETRY, self._backoff_cap)  # the cap bounds every pause
                await asyncio.sleep(random.uniform(retry / 2, retry))
                continue
            # The exponent is capped: 2**1024 overflows a float after a long outage.
            delay = min(self._backoff_cap, 0.05 * 2 ** min(failures, 16))
            await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _connect(self, conn: AbstractConnection) -> list[list[Any]]:
        """Connect and subscribe every wanted topic; return the publications that arrived
        before all confirmations, to be delivered after the owner heard of the link."""
        async with asyncio.timeout(PROBE_TIMEOUT):
            # `connect` is untyped in redis-py's own annotations.
            await cast(Any, conn).connect()
            await self._measure_clock(conn)
        self._reached = True
        async with self._lock:
            topics = self._owner.wanted(self)
            for batch in self._batches(topics):
                await conn.send_command(self._subscribe, *batch)
            unconfirmed = set(topics)
            backlog: list[list[Any]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._timeout + len(topics) / 10_000
            while unconfirmed:
                remaining = deadline - loop.time()
                reply: Any = await conn.read_response(timeout=max(remaining, 0.001))
                if reply is None:
                    raise TimeoutError("Redis did not confirm the resubscription")
                kind = _kind(reply)
                if kind == self._confirm_kind:
                    unconfirmed.discard(reply[1])
                elif kind == self._message_kind:
                    backlog.append(reply)
            self.sent = set(topics)
            self._conn = conn
        return backlog

    def _batches(self, topics: list[bytes]) -> list[list[bytes]]:
        """Topics per (S)SUBSCRIBE command: SSUBSCRIBE takes one slot's channels only."""
        if not self._sharded:
            return [topics[start : start + _BATCH] for start in range(0, len(topics), _BATCH)]
        by_slot: dict[int, list[bytes]] = {}
        for topic in topics:
            by_slot.setdefault(key_slot(topic), []).append(topic)
        return list(by_slot.values())

    async def _measure_clock(self, conn: AbstractConnection) -> None:
        sent = time.time() * 1000
        await conn.send_command("TIME")
        seconds, micros = await conn.read_response(timeout=PROBE_TIMEOUT)
        received = time.time() * 1000
        redis_ms = int(seconds) * 1000 + int(micros) / 1000
        self.clock_skew_ms = redis_ms - (sent + received) / 2

    async def _read(self, conn: AbstractConnection) -> None:
        """Read until the connection fails. A connection silent for a ping interval gets a
        PING, and its owner is asked whether the server still serves the shard; one still
        silent an interval later is taken for dead (half-open socket)."""
        pinged = False
        loop = asyncio.get_running_loop()
        asked = loop.time()
        late = 0
        while True:
            waited_from = loop.time()
            reply: Any = await conn.read_response(timeout=self._ping_interval)
            if reply is None:
                if loop.time() - waited_from > self._ping_interval + LATE and late < LATE_RETRIES:
                    late += 1
                    continue  # the loop was late: read what arrived meanwhile first
                late = 0
                if pinged:
                    raise TimeoutError("Redis did not answer PING on the pub/sub connection")
                await conn.send_command("PING")
                pinged = True
                if loop.time() - asked >= STILL_SERVES_SECONDS:
                    asked = loop.time()
                    if not await self._owner.still_serves(self, conn):
                        raise ConnectionError(f"{self.shard} moved to another server")
                continue
            pinged = False
            replies = [reply]
            # What else has arrived already goes with it: a burst is delivered as one, and
            # each socket gets it in one write.
            while len(replies) < _READ_BATCH:
                more = await conn.read_response(timeout=0)
                if more is None:
                    break
                replies.append(more)
            self._handle(replies)

    def _handle(self, replies: list[Any]) -> None:
        publications: list[tuple[bytes, bytes]] = []
        for reply in replies:
            if _kind(reply) == self._message_kind:
                publications.append((reply[1], reply[2]))
            else:
                self._handle_other(reply)
        if publications:
            self._owner.deliver(publications)

    def _handle_other(self, reply: Any) -> None:
        kind = _kind(reply)
        if kind == self._confirm_kind:
            pending = self._confirms.get(reply[1])
            if pending:
                waiter = pending.popleft()
                if not waiter.done():
                    waiter.set_result(True)
            if pending is not None and not pending:
                del self._confirms[reply[1]]
        elif kind == self._unsubscribed_kind and reply[1] in self.sent:
            self.sent.discard(reply[1])  # not asked for: Redis moved its slot away
            self._owner.lost_topic(self, reply[1])

    def _went_up(self, backlog: list[list[Any]]) -> None:
        reconnected, self._was_up, self.up = self._was_up, True, True
        self._incident.recovered(for_sure=True)  # the incident's end, with its duration
        self.first_attempt.set()
        if not reconnected:
            log.info("Redis pub/sub to %s up", self.shard)
        _notify(self._owner.went_up, self, sorted(self.sent), reconnected)
        if backlog:
            self._owner.deliver([(reply[1], reply[2]) for reply in backlog])

    def _went_down(self, exc: BaseException) -> None:
        self._incident.failed(exc)
        _notify(self._owner.failed, self, exc)
        if self.up:
            self.up = False
            _notify(self._owner.went_down, self, sorted(self.sent))

    async def _drop(self, conn: AbstractConnection | None) -> None:
        self._conn = None
        self.sent = set()
        for pending in self._confirms.values():
            for waiter in pending:
                if not waiter.done():
                    waiter.set_result(False)
        self._confirms.clear()
        if conn is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await conn.disconnect(nowait=True)


class CommandProbe:
    """Whether commands reach one shard: a PING every `PROBE_INTERVAL`, down when one is
    unanswered for `PROBE_TIMEOUT` or fails, and then tried every `UNREACHABLE_RETRY` until
    one answers (up at once). `changed` is called on each turn.

    The probe has a connection of its own to the shard's server (the command client's
    address, credentials and TLS): not one of the pool's, which a cancelled PING would leave
    with an unread reply, and not through redis-py's RedisCluster, which closes every
    shard's connections when one node times out (a hung master would then cost the healthy
    shards their connections)."""

    def __init__(
        self,
        shard: str,
        connect: Callable[[], AbstractConnection],
        changed: Callable[[], None],
    ) -> None:
        self.shard = shard
        self._new_connection = connect
        self._conn: AbstractConnection | None = None
        self._changed = changed
        self.up = False
        self.first_attempt = asyncio.Event()
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._incident = Incident(log, f"Redis commands to {shard}")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"hub-redis-probe-{self.shard}")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel(task)
        await self._drop()
        self.up = False

    async def _ping(self) -> None:
        conn = self._conn
        if conn is None:
            conn = self._new_connection()
            self._conn = conn
            await cast(Any, conn).connect()
        await conn.send_command("PING")
        if await conn.read_response(timeout=PROBE_TIMEOUT) is None:
            raise TimeoutError("Redis did not answer PING")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await conn.disconnect(nowait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        late = 0
        while True:
            started = loop.time()
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self._ping()
            except Exception as exc:  # REDIS_ERRORS, and a bug counts as down too
                await self._drop()  # a new connection for the next PING
                if (isinstance(exc, TimeoutError) and late < LATE_RETRIES
                        and loop.time() - started > PROBE_TIMEOUT + LATE):
                    late += 1  # the loop was late, not Redis: ask again at once
                    continue
                late = 0
                self._incident.failed(exc)
                self._turn(False)
                delay = random.uniform(UNREACHABLE_RETRY / 2, UNREACHABLE_RETRY)
            else:
                late = 0
                self._incident.recovered(for_sure=True)
                self._turn(True)
                delay = PROBE_INTERVAL
            self.first_attempt.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._poked.wait()
            self._poked.clear()

    def poke(self) -> None:
        """Probe now (the shard's pub/sub link just came up: Redis is likely back)."""
        self._poked.set()

    def _turn(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            _notify(self._changed)


def _notify(callback: Callable[..., object], *args: Any) -> None:
    """A failing owner callback is a bug: logged, and the relay goes on."""
    try:
        callback(*args)
    except Exception:
        log.exception("broker event handler %s failed", getattr(callback, "__qualname__", ""))


def _kind(reply: Any) -> bytes:
    if isinstance(reply, list) and reply:
        head = reply[0]
        return head.lower() if isinstance(head, bytes) else b""
    return reply.lower() if isinstance(reply, bytes) else b""

