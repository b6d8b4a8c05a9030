"""The cluster broker: Redis pub/sub relays publications between nodes, Redis streams hold
history (PROTOCOL §5, §6).

Each node SUBSCRIBEs to a channel's topic only while it has a local subscriber, on one
dedicated connection read by a supervised loop: it probes a silent connection with PING,
reconnects with backoff and jitter, resubscribes, and tells the node (`BrokerEvents`) when
Redis goes and comes back so it can fill the gap from history. Publishing with history is
one Lua script (epoch check, offset, XADD, EXPIRE, PUBLISH) in one round trip; without
history a small script around PUBLISH. Both refuse to run past a deadline on the Redis
clock, so a publish answered `unavailable` (timed out) is never carried out later.
Commands go through one connection pool shared with presence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import msgspec
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.retry import Retry

from hub.broker import BrokerEvents, HistoryOptions, HistoryPage, StreamPosition
from hub.errors import BrokerUnavailable
from hub.protocol import Message, Relayed, decode_relayed, encode
from hub.redis_presence import REDIS_ERRORS, RedisClient, RedisPresence, ttl_ms
from hub.redis_support import HISTORY_LUA, PUBLISH_LUA, RELAY_LUA, Incident
from hub.settings import Settings
from hub.tasks import cancel

log = logging.getLogger("hub.redis")

DEFAULT_PREFIX = "hub:"


def create_redis_backends(
    settings: Settings, *, prefix: str = DEFAULT_PREFIX, max_connections: int = 64
) -> tuple[RedisBroker, RedisPresence]:
    """Broker and presence sharing one connection pool; the broker adds its own pub/sub
    connection."""
    if not settings.redis_url:
        raise ValueError("create_redis_backends needs settings.redis_url")
    client = create_redis_client(settings.redis_url, max_connections=max_connections)
    broker = RedisBroker(client, prefix=prefix)
    presence = RedisPresence(client, settings.node_id, settings.presence_ttl, prefix=prefix)
    return broker, presence


def create_redis_client(url: str, *, max_connections: int = 64) -> RedisClient:
    """A client on a pool of at most `max_connections` (waiting at most 2 s for one).

    Timeouts are short so that a command to an unreachable Redis fails within a few seconds
    instead of hanging; no command is retried, so a publish is never sent twice. TLS
    (`rediss://`), user, password and db number come from the URL.

    RESP2: with redis-py 8's default RESP3 (and hiredis) a pooled connection that Redis
    closed (a restart) is handed out again and fails once (redis-py #4252); with RESP2 the
    pool notices the EOF and reconnects.
    """
    client: RedisClient = Redis(
        connection_pool=BlockingConnectionPool.from_url(
            url,
            protocol=2,
            max_connections=max_connections,
            timeout=2.0,
            socket_connect_timeout=1.5,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
    )
    return client


class RedisBroker:
    """`Broker` over Redis. Channel names are used as bytes inside keys and topics, which
    Redis treats as opaque (no pattern subscriptions), so any name is safe. Topics carry
    the db number: Redis pub/sub ignores databases, and hubs on different dbs of one
    server must not hear each other."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        ping_interval: float = 2.5,
        timeout: float = 2.0,
        backoff_cap: float = 2.0,
    ) -> None:
        self._client = client
        self._prefix = prefix
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self._topic_prefix = f"{prefix}c:{db}:"
        self._topic_prefix_length = len(self._topic_prefix.encode())
        self._ping_interval = ping_interval
        self._timeout = timeout
        self._backoff_cap = backoff_cap
        self._publish_script = client.register_script(PUBLISH_LUA)
        self._relay_script = client.register_script(RELAY_LUA)
        # Redis clock minus ours (ms), measured at each connect: publish deadlines are
        # judged on the Redis clock.
        self._clock_skew_ms = 0.0
        self._history_script = client.register_script(HISTORY_LUA)
        self._events: BrokerEvents | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._up = False
        self._was_up = False
        # The live pub/sub connection once it is subscribed to every channel the node
        # wants (`BrokerEvents.channels`), and the topics sent on it since.
        self._conn: AbstractConnection | None = None
        self._sent: set[bytes] = set()
        self._confirms: dict[bytes, deque[asyncio.Future[bool]]] = {}
        self._lock = asyncio.Lock()
        self._link = Incident(log, "Redis pub/sub connection")
        self._commands = Incident(log, "Redis commands")

    # Broker protocol

    @property
    def up(self) -> bool:
        return self._up

    async def start(self, events: BrokerEvents) -> None:
        """Start the pub/sub loop and wait for its first attempt to connect. If Redis is not
        there yet, the node starts anyway (not ready) and the loop keeps trying."""
        self._events = events
        self._start_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), timeout=3 * self._timeout)

    def _start_loop(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="hub-redis-pubsub")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The loop only ends by `close`; anything else is a bug, logged, and restarted so
        the node does not lose its relay for good."""
        if task is not self._task or task.cancelled():
            return
        log.error("Redis pub/sub loop ended unexpectedly (%r); restarting it", task.exception())
        self._start_loop()

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel(task)
        self._events = None
        self._up = False
        await self._client.connection_pool.disconnect()

    async def subscribe(self, channel: str) -> None:
        """Idempotent. Returns once Redis confirmed the subscription, so a history read that
        follows cannot miss a publication. While Redis is down it does nothing: the loop
        subscribes every channel the node wants on reconnect, before
        `on_broker_up(reconnected=True)`. Raises BrokerUnavailable when Redis seems up but
        did not confirm in time. Calls for one channel reach Redis in the order they were
        made (the lock is taken before anything else awaits)."""
        topic = self._topic(channel)
        async with self._lock:
            conn = self._conn
            if conn is None:
                return
            pending = self._confirms.get(topic)
            if topic in self._sent:
                waiter = pending[-1] if pending else None
            else:
                waiter = asyncio.get_running_loop().create_future()
                self._confirms.setdefault(topic, deque()).append(waiter)
                self._sent.add(topic)
                try:
                    await conn.send_command("SUBSCRIBE", topic)
                except REDIS_ERRORS as exc:
                    self._sent.discard(topic)
                    raise BrokerUnavailable("cannot subscribe: Redis is unreachable") from exc
        if waiter is None:
            return
        try:
            confirmed = await asyncio.wait_for(asyncio.shield(waiter), self._timeout)
        except TimeoutError:
            confirmed = False
        if not confirmed:
            # If Redis does subscribe it after all, its publications are delivered: the node
            # drops those of channels it no longer wants.
            self._sent.discard(topic)
            raise BrokerUnavailable("Redis did not confirm the subscription")

    async def unsubscribe(self, channel: str) -> None:
        """Idempotent; never raises: if the connection is broken, the reconnect forgets the
        channel anyway."""
        topic = self._topic(channel)
        async with self._lock:
            conn = self._conn
            if conn is None or topic not in self._sent:
                return
            self._sent.discard(topic)
            try:
                await conn.send_command("UNSUBSCRIBE", topic)
            except REDIS_ERRORS as exc:
                log.debug("UNSUBSCRIBE failed, the reconnect will drop it: %s", exc)

    async def publish(
        self, channel: str, relayed: Relayed, history: HistoryOptions | None = None
    ) -> StreamPosition | None:
        self._check_up()
        try:
            if history is not None and isinstance(relayed, Message):
                position = await self._publish_with_history(channel, relayed, history)
            else:
                topic = self._topic(channel)
                args: list[bytes | int] = [self._deadline_ms(), topic, encode(relayed)]
                if await self._relay_script(keys=[], args=args) is None:
                    raise TimeoutError("publish reached Redis after its deadline")
                position = None
        except REDIS_ERRORS as exc:
            self._commands.failed(exc)
            raise BrokerUnavailable("publish failed: Redis is unreachable") from exc
        self._commands.recovered()
        return position

    def _deadline_ms(self) -> int:
        """Redis must run a publish before the client gives up on the reply; a quarter of
        the timeout is left for the reply's way back."""
        return int(time.time() * 1000 + self._clock_skew_ms + self._timeout * 750)

    async def history(
        self,
        channel: str,
        history: HistoryOptions,
        since: StreamPosition | None = None,
        limit: int = 1000,
    ) -> HistoryPage:
        self._check_up()
        args: list[bytes | str | int] = [ttl_ms(history.ttl), secrets.token_hex(4), max(limit, 0)]
        args += [1, since.offset, since.epoch] if since is not None else [0, 0, ""]
        try:
            reply = await self._history_script(keys=self._history_keys(channel), args=args)
        except REDIS_ERRORS as exc:
            self._commands.failed(exc)
            raise BrokerUnavailable("history failed: Redis is unreachable") from exc
        self._commands.recovered()
        epoch, offset, complete, *payloads = reply
        position = StreamPosition(int(offset), epoch.decode())
        messages = [m for m in map(decode_relayed, payloads) if isinstance(m, Message)]
        return HistoryPage(position, messages, complete=bool(complete))

    # Keys and publishing

    def _topic(self, channel: str) -> bytes:
        return (self._topic_prefix + channel).encode(errors="surrogatepass")

    def _history_keys(self, channel: str) -> list[bytes]:
        name = channel.encode(errors="surrogatepass")
        prefix = self._prefix.encode()
        return [prefix + b"s:" + name, prefix + b"m:" + name]

    def _check_up(self) -> None:
        if not self._up:
            raise BrokerUnavailable("Redis is unreachable")

    async def _publish_with_history(
        self, channel: str, message: Message, history: HistoryOptions
    ) -> StreamPosition:
        # The script adds offset and epoch to the encoded object; a stale pair must not be
        # encoded as well.
        message.offset = message.epoch = None
        args: list[bytes | str | int] = [
            ttl_ms(history.ttl),
            secrets.token_hex(4),
            encode(message),
            max(history.size, 1),
            self._topic(channel),
            self._deadline_ms(),
        ]
        reply = await self._publish_script(keys=self._history_keys(channel), args=args)
        if reply is None:
            raise TimeoutError("publish reached Redis after its deadline")
        offset, epoch = reply
        message.offset, message.epoch = int(offset), epoch.decode()
        return StreamPosition(message.offset, message.epoch)

    # The pub/sub loop

    async def _supervise(self) -> None:
        failures = 0
        while True:
            conn = self._new_connection()
            try:
                backlog = await self._connect(conn)
                failures = 0
                self._went_up(backlog)
                await self._read(conn)
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
                self._first_attempt.set()
            # The exponent is capped: 2**1024 overflows a float after a long outage.
            delay = min(self._backoff_cap, 0.05 * 2 ** min(failures, 16))
            await asyncio.sleep(random.uniform(delay / 2, delay))

    def _new_connection(self) -> AbstractConnection:
        pool = self._client.connection_pool
        # RESP2: subscribed-mode replies come back as plain arrays read below.
        kwargs = {**pool.connection_kwargs, "protocol": 2}
        conn: AbstractConnection = pool.connection_class(**kwargs)
        return conn

    async def _connect(self, conn: AbstractConnection) -> list[list[Any]]:
        """Connect and subscribe every wanted topic; return the publications that arrived
        before all confirmations, to be delivered after `on_broker_up`."""
        # `connect` is untyped in redis-py's own annotations.
        await cast(Any, conn).connect()
        await self._measure_clock(conn)
        async with self._lock:
            wanted = self._events.channels if self._events is not None else ()
            topics = [self._topic(channel) for channel in wanted]
            for start in range(0, len(topics), 1000):
                await conn.send_command("SUBSCRIBE", *topics[start : start + 1000])
            unconfirmed = set(topics)
            backlog: list[list[Any]] = []
            allowed = self._timeout + len(topics) / 10_000
            deadline = asyncio.get_running_loop().time() + allowed
            while unconfirmed:
                remaining = deadline - asyncio.get_running_loop().time()
                reply: Any = await conn.read_response(timeout=max(remaining, 0.001))
                if reply is None:
                    raise TimeoutError("Redis did not confirm the resubscription")
                if _kind(reply) == b"subscribe":
                    unconfirmed.discard(reply[1])
                elif _kind(reply) == b"message":
                    backlog.append(reply)
            self._sent = set(topics)
            self._conn = conn
        return backlog

    async def _measure_clock(self, conn: AbstractConnection) -> None:
        sent = time.time() * 1000
        await conn.send_command("TIME")
        seconds, micros = await conn.read_response(timeout=self._timeout)
        received = time.time() * 1000
        redis_ms = int(seconds) * 1000 + int(micros) / 1000
        self._clock_skew_ms = redis_ms - (sent + received) / 2

    async def _read(self, conn: AbstractConnection) -> None:
        """Read until the connection fails. A connection silent for a ping interval gets a
        PING; one still silent an interval later is taken for dead (half-open socket)."""
        pinged = False
        while True:
            reply: Any = await conn.read_response(timeout=self._ping_interval)
            if reply is None:
                if pinged:
                    raise TimeoutError("Redis did not answer PING on the pub/sub connection")
                await conn.send_command("PING")
                pinged = True
                continue
            pinged = False
            self._handle(reply)

    def _handle(self, reply: Any) -> None:
        kind = _kind(reply)
        if kind == b"message":
            self._deliver(reply[1], reply[2])
        elif kind == b"subscribe":
            pending = self._confirms.get(reply[1])
            if pending:
                waiter = pending.popleft()
                if not waiter.done():
                    waiter.set_result(True)
            if pending is not None and not pending:
                del self._confirms[reply[1]]

    def _deliver(self, topic: bytes, payload: bytes) -> None:
        if self._events is None:
            return
        channel = topic[self._topic_prefix_length :].decode(errors="surrogatepass")
        try:
            relayed = decode_relayed(payload)
        except msgspec.DecodeError as exc:
            log.warning("dropped an undecodable publication on %r: %s", channel, exc)
            return
        try:
            self._events.on_relayed(channel, relayed)
        except Exception:
            log.exception("on_relayed failed for channel %r", channel)

    def _went_up(self, backlog: list[list[Any]]) -> None:
        reconnected, self._was_up, self._up = self._was_up, True, True
        self._link.recovered()
        self._first_attempt.set()
        log.info("Redis pub/sub %s", "reconnected" if reconnected else "connected")
        if self._events is not None:
            _notify(self._events.on_broker_up, reconnected)
        for reply in backlog:
            self._deliver(reply[1], reply[2])

    def _went_down(self, exc: BaseException) -> None:
        self._link.failed(exc)
        if self._up:
            self._up = False
            if self._events is not None:
                _notify(self._events.on_broker_down)

    async def _drop(self, conn: AbstractConnection) -> None:
        self._conn = None
        self._sent = set()
        for pending in self._confirms.values():
            for waiter in pending:
                if not waiter.done():
                    waiter.set_result(False)
        self._confirms.clear()
        with contextlib.suppress(*REDIS_ERRORS):
            await conn.disconnect(nowait=True)


def _notify(callback: Callable[..., None], *args: Any) -> None:
    """A failing node callback is the node's bug: logged, and the relay goes on."""
    try:
        callback(*args)
    except Exception:
        log.exception("broker event handler %s failed", callback.__qualname__)


def _kind(reply: Any) -> bytes:
    if isinstance(reply, list) and reply:
        head = reply[0]
        return head.lower() if isinstance(head, bytes) else b""
    return reply.lower() if isinstance(reply, bytes) else b""

