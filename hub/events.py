"""Events: the hub tells the application (PROTOCOL §14).

What happens, as events: a channel's first subscriber anywhere in the cluster and its last
gone (`channel_occupied` / `channel_vacated`), a user's first connection and last gone
(`user_online` / `user_offline`), a user's first and last connection in a presence channel
(`member_added` / `member_removed`), and client publications (`client_publish`, in
namespaces with `events_client_publish`). They are POSTed to `HUB_EVENTS_URL` in signed
batches (or handed to a callable in an embedded hub), at least once, in order per channel
and per user, retried with backoff and jitter until 2xx.

The node tells `Events` what changed *on this node* (a channel's first local subscriber,
its last local one gone, a user's first local connection...); whether that is a transition
of the cluster is a `Ledger`'s decision:

- `MemoryLedger` (the single node of the in-process broker): this node is the cluster.
- `hub.redis.events.RedisLedger`: decided once, atomically, by a Lua script per subject
  that keeps which node (or client) holds it, and that records the event in a Redis stream
  in the same step; every node's sender reads those streams as a consumer group.

`Delivery` is the sender's half both share: a batch, signed, retried until delivered.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import msgspec

from hub.channels import is_personal
from hub.incident import Incident
from hub.metrics import Metrics
from hub.settings import Settings

if TYPE_CHECKING:
    from hub.hub import Subscriber
    from hub.node import Node

log = logging.getLogger("hub.events")

SIGNATURE_HEADER = "X-Hub-Signature"
BATCH_SIZE = 100  # events per POST at most
BATCH_WINDOW = 0.1  # s: how long an event waits for others to share its POST, at most
POST_TIMEOUT = 5.0  # s: a receiver slower than this is a failed attempt (retried)
RETRY_FIRST = 0.2  # s: the first retry's delay; doubled each time, up to RETRY_CAP
RETRY_CAP = 10.0
STOP_SECONDS = 2.0  # at shutdown: how long what waits may take to go out
OVERFLOW_LOG_SECONDS = 10.0  # one log line per this many seconds of overflow

EVENT_NAMES = (
    "channel_occupied", "channel_vacated", "user_online", "user_offline",
    "member_added", "member_removed", "client_publish",
)
OUTCOMES = ("produced", "sent", "retried", "dropped")

# What each kind of holding announces when its subject gets its first holder, and its last.
# c: a channel, held by nodes; u: a user, held by nodes; m: a user in a presence channel,
# held by client ids.
NAMES = {
    "c": ("channel_occupied", "channel_vacated"),
    "u": ("user_online", "user_offline"),
    "m": ("member_added", "member_removed"),
}

# A callable of an embedded hub: gets a batch (the events as dicts); raising means "retry".
EventsCallable = Callable[[list[dict[str, Any]]], Awaitable[None]]


# signatures


def sign(body: bytes, secret: str) -> str:
    """The `X-Hub-Signature` value of a body: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, signature: str | None, secret: str) -> bool:
    """True when `signature` (the `X-Hub-Signature` header) is the body's, with `secret`:
    what a receiver checks before it trusts a batch (constant-time comparison)."""
    if not signature or not secret:
        return False
    return hmac.compare_digest(sign(body, secret), signature.strip())


# events as JSON


class Subject(msgspec.Struct, omit_defaults=True):
    """An event without its `id` and `time_ms` (which the ledger adds), the fields of its
    kind set."""

    name: str
    channel: str | None = None
    user: str | None = None
    clients: list[str] | None = None
    client: str | None = None
    data: msgspec.Raw | None = None


encoder = msgspec.json.Encoder()


class Pending(msgspec.Struct, frozen=True, array_like=True):
    """An event as it waits: its name and time (for the metrics), and its JSON."""

    name: str
    time_ms: int
    body: bytes


def event_json(event_id: str, time_ms: int, subject: bytes) -> bytes:
    """`{"id", "time_ms", ...subject}` from the subject's own JSON object."""
    return b'{"id":"%s","time_ms":%d,%s' % (event_id.encode(), time_ms, subject[1:])


def batch_body(events: list[Pending]) -> bytes:
    return b'{"events":[' + b",".join(event.body for event in events) + b"]}"


def subject_tails(kind: str, name: str, user: str, holder: str) -> tuple[bytes, bytes]:
    """The subject JSON of a holding's first and last event."""
    first, last = NAMES[kind]
    if kind == "c":
        return encoder.encode(Subject(first, channel=name)), encoder.encode(
            Subject(last, channel=name))
    if kind == "u":
        return encoder.encode(Subject(first, user=name)), encoder.encode(
            Subject(last, user=name))
    clients = [holder]
    return (
        encoder.encode(Subject(first, channel=name, user=user, clients=clients)),
        encoder.encode(Subject(last, channel=name, user=user, clients=clients)),
    )


def new_event_id() -> str:
    """96 random bits: unique without a syscall per event."""
    return f"{random.getrandbits(96):024x}"


# the sender


class Delivery:
    """Sends one batch until it is delivered: POSTed to the URL (signed) and answered 2xx,
    or handed to the callable without it raising. Bad answers (5xx, timeouts, a closed
    port, a slow body) are retried with exponential backoff and full jitter, until every
    event of the batch is delivered or older than `max_age` seconds (dropped, `Expiry`);
    they never touch client traffic (the caller is a task of its own). `clock`: the wall
    clock (s) events' `time_ms` are judged by (and, in memory, stamped with)."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        url: str | None = None,
        secret: str = "",
        call: EventsCallable | None = None,
        max_age: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._url = url
        self._secret = secret
        self._call = call
        self.clock = clock
        self.expiry = Expiry(metrics, max_age)
        self._http: httpx.AsyncClient | None = None
        self._incident = Incident(log, "events receiver")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def send(self, events: list[Pending], still: Callable[[], bool] = lambda: True) -> bool:
        """Until delivered (True; also when every event of the batch expired meanwhile),
        or until `still()` turns False between attempts (False: this sender gave the batch
        up, somebody else sends it)."""
        body = b""
        attempt = 0
        expired = False
        while True:
            fresh = self.expiry.fresh(events, self.clock())
            if fresh is not events:
                expired = True
                events, body = fresh, b""
            if not events:
                return True  # every one dropped for age (counted and logged)
            if not body:
                body = batch_body(events)
            try:
                await self._attempt(body)
                break
            except Exception as exc:
                self._incident.failed(exc)
                for event in events:
                    self._metrics.events.labels(event.name, "retried").inc()
                attempt += 1
                delay = random.uniform(0, min(RETRY_CAP, RETRY_FIRST * 2 ** attempt))
                await asyncio.sleep(max(delay, RETRY_FIRST / 2))
                if not still():
                    return False
        self._incident.recovered(for_sure=True)
        if not expired:
            self.expiry.delivered()
        now = self.clock()
        for event in events:
            self._metrics.events.labels(event.name, "sent").inc()
            self._metrics.event_delay.observe(max(0.0, now - event.time_ms / 1000))
        return True

    async def _attempt(self, body: bytes) -> None:
        if self._call is not None:
            await self._call(msgspec.json.decode(body)["events"])
            return
        assert self._url is not None
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=POST_TIMEOUT)
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: sign(body, self._secret)}
        response = await self._http.post(self._url, content=body, headers=headers)
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"receiver answered {response.status_code}")


class Overflow:
    """Counts events dropped because too many wait, and says so in the log (once per
    `OVERFLOW_LOG_SECONDS`, with how many)."""

    def __init__(self, metrics: Metrics, limit: int) -> None:
        self._metrics = metrics
        self._limit = limit
        self._unlogged = 0
        self._logged_at = -OVERFLOW_LOG_SECONDS

    def dropped(self, name: str) -> None:
        self._metrics.events.labels(name, "dropped").inc()
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= OVERFLOW_LOG_SECONDS:
            log.error("events: %d waiting already (HUB_EVENTS_MAX_PENDING); dropped %d "
                      "event(s), the last a %s", self._limit, self._unlogged, name)
            self._unlogged = 0
            self._logged_at = now


class Expiry:
    """Events dropped because they are older than `HUB_EVENTS_MAX_AGE` when they would be
    sent (or, on Redis, found unread in a stream past it): counted as `dropped`, and logged
    once per incident: a line when dropping starts, and one with the count when a batch
    none of whose events had expired is delivered again."""

    def __init__(self, metrics: Metrics, max_age: float) -> None:
        self._metrics = metrics
        self.max_age = max_age
        self._max_age_ms = max_age * 1000
        self._count = 0

    def fresh(self, events: list[Pending], now: float) -> list[Pending]:
        """`events` without those past the age (each counted as dropped); `events` itself
        when none is."""
        oldest_ms = now * 1000 - self._max_age_ms
        if all(event.time_ms >= oldest_ms for event in events):
            return events
        kept = []
        for event in events:
            if event.time_ms >= oldest_ms:
                kept.append(event)
            else:
                self.dropped(event.name)
        return kept

    def dropped(self, name: str) -> None:
        self._metrics.events.labels(name, "dropped").inc()
        if not self._count:
            log.error("events: dropping events older than HUB_EVENTS_MAX_AGE (%g s) that "
                      "the receiver has not taken, the first a %s", self.max_age, name)
        self._count += 1

    def delivered(self) -> None:
        """A batch with nothing past the age was delivered: the incident, if any, ended."""
        if self._count:
            log.warning("events: delivering again; %d event(s) were dropped for being "
                        "older than HUB_EVENTS_MAX_AGE (%g s)", self._count, self.max_age)
            self._count = 0


# ledgers


class Ledger(Protocol):
    """Decides which local changes are cluster transitions, and sends their events."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def hold(self, kind: str, name: str, user: str, holder: str, held: bool) -> None:
        """`holder` (this node, or a client of it) holds the subject (`kind`, `name`,
        `user`) now, or no longer. Never awaits."""

    def emit(self, route: str, subject: Subject) -> None:
        """An event that is no transition (`client_publish`), ordered with `route`'s."""


# Builds the cluster's ledger from the node's delivery and metrics (`create_events`).
LedgerFactory = Callable[[Delivery, Metrics], Ledger]


class MemoryLedger:
    """One node is the cluster: a subject's holders are counted here, and the events wait
    in a bounded queue for the one sender task."""

    def __init__(self, delivery: Delivery, metrics: Metrics, max_pending: int) -> None:
        self._delivery = delivery
        self._metrics = metrics
        self._max_pending = max_pending
        self._holders: dict[tuple[str, str, str], set[str]] = {}
        self._queue: collections.deque[Pending] = collections.deque()
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()  # nothing waits
        self._empty.set()
        self._overflow = Overflow(metrics, max_pending)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._send_loop(), name="hub-events")

    async def stop(self) -> None:
        """Gives what waits a moment to go out, then stops."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._empty.wait(), STOP_SECONDS)
        except TimeoutError:
            log.warning("events: %d not sent at shutdown", len(self._queue))
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        await self._delivery.close()

    def hold(self, kind: str, name: str, user: str, holder: str, held: bool) -> None:
        key = (kind, name, user)
        holders = self._holders.get(key)
        if held:
            if holders is None:
                self._holders[key] = {holder}
                self._record(NAMES[kind][0], subject_tails(kind, name, user, holder)[0])
            else:
                holders.add(holder)
        elif holders is not None and holder in holders:
            holders.discard(holder)
            if not holders:
                del self._holders[key]
                self._record(NAMES[kind][1], subject_tails(kind, name, user, holder)[1])

    def emit(self, route: str, subject: Subject) -> None:
        self._record(subject.name, encoder.encode(subject))

    def _record(self, name: str, subject: bytes) -> None:
        if len(self._queue) >= self._max_pending:
            self._overflow.dropped(name)
            return
        time_ms = int(self._delivery.clock() * 1000)  # the clock the age is judged by
        self._queue.append(Pending(name, time_ms, event_json(new_event_id(), time_ms, subject)))
        self._metrics.events.labels(name, "produced").inc()
        self._empty.clear()
        self._wake.set()

    async def _send_loop(self) -> None:
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                batch = [queue[index] for index in range(min(BATCH_SIZE, len(queue)))]
                await self._delivery.send(batch)
                for _ in batch:
                    queue.popleft()
            self._empty.set()


class Events:
    """What the node tells: changes on this node, in the words of PROTOCOL §14. Each call
    is synchronous and cheap; the ledger does the rest in the background."""

    def __init__(self, ledger: Ledger, node_id: str) -> None:
        self.ledger = ledger
        self._node_id = node_id

    async def start(self) -> None:
        await self.ledger.start()

    async def stop(self) -> None:
        await self.ledger.stop()

    def channel(self, channel: str, occupied: bool) -> None:
        """The channel's first local subscriber (True), or its last local one gone."""
        self.ledger.hold("c", channel, "", self._node_id, occupied)

    def user(self, user: str, online: bool) -> None:
        """The user's first local connection (True), or its last gone."""
        self.ledger.hold("u", user, "", self._node_id, online)

    def member(self, channel: str, user: str, client: str, added: bool) -> None:
        """A connection joined a presence channel (True), or left it."""
        self.ledger.hold("m", channel, user, client, added)

    def client_publish(self, channel: str, user: str, client: str, data: msgspec.Raw) -> None:
        subject = Subject("client_publish", channel=channel, user=user, client=client, data=data)
        self.ledger.emit(channel, subject)


def create_events(
    settings: Settings, metrics: Metrics, call: EventsCallable | None = None,
    *, ledger: LedgerFactory | None = None,
) -> Events | None:
    """The node's events, or None when nobody listens (no `HUB_EVENTS_URL`, no callable):
    then no change of the node costs anything. `ledger` builds the cluster's ledger (the
    Redis broker's, `hub.redis.create_redis_ledger`); without it this node is the cluster."""
    if call is None and not settings.events_url:
        return None
    for name in EVENT_NAMES:  # known label values start at 0, so rate() sees the first
        for outcome in OUTCOMES:
            metrics.events.labels(name, outcome)
    delivery = Delivery(metrics, url=settings.events_url, secret=settings.events_secret or "",
                        call=call, max_age=settings.events_max_age)
    if ledger is not None:
        return Events(ledger(delivery, metrics), settings.node_id)
    return Events(MemoryLedger(delivery, metrics, settings.events_max_pending), settings.node_id)


class MembershipEvents:
    """The events that follow from membership (`hub.subscriptions.MembershipWatcher`): a
    channel's first local member and its last one gone, and members of presence channels
    coming and going. Subscriptions tells a drop before the vacancy it makes, so
    member_removed comes before channel_vacated by construction."""

    def __init__(self, events: Events, settings: Settings) -> None:
        self._events = events
        self._settings = settings

    def _member(self, subscriber: Subscriber, channel: str, added: bool) -> None:
        if not is_personal(channel) and self._settings.namespace_of(channel).presence:
            self._events.member(channel, subscriber.user, subscriber.client_id, added)

    def admitted(self, subscriber: Subscriber, channel: str) -> None:
        self._member(subscriber, channel, True)

    def dropped(self, subscriber: Subscriber, channel: str) -> None:
        self._member(subscriber, channel, False)

    def occupied(self, channel: str) -> None:
        if not is_personal(channel):
            self._events.channel(channel, True)

    def vacated(self, channel: str) -> None:
        if not is_personal(channel):
            self._events.channel(channel, False)


def attach(node: Node, events: Events | None) -> None:
    """Wire the node's transition points to `events` (nothing when None)."""
    node.events = events
    if events is not None:
        node.hub.on_user = events.user
        node.subscriptions.watchers.append(MembershipEvents(events, node.settings))
