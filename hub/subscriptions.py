"""Who is subscribed where on this node, at which stream position, and the one rule that
decides what each subscription gets (PROTOCOL §5).

Owner: `Subscriptions` owns all per-channel subscription state of a node (the members of
each channel, grouped in cohorts by stream position; the joiners and what they hold; the
holds of cohorts catching up from history; and the broker subscription of every channel
that has a member or a joiner), and nothing else keeps a copy of any of it.

The rule, the same for live fan-out, refills, recovery and new subscribes: a subscription on
a channel with history stands at a position (offset, epoch). A message at or below it in
the same epoch is skipped (the subscription has it); the next offset is delivered and
becomes the position; anything else (an offset further on, another epoch) means a stretch
was lost, and the subscription holds what comes from then on while it catches up from
history, or gets `reset` when history no longer has the stretch. Channels without history
have no positions: every message passes.

Subscriptions that stand at the same position share one `Cohort` (usually a channel has
one), so the fan-out compares offsets once per cohort, not once per subscriber.

Everything that follows from membership (presence entries, join/leave events, heartbeats;
cluster-wide events) is derived from it by `MembershipWatcher`s: each hears every admit and
every drop, on every path (subscribe, unsubscribe, disconnect, a `reset` that ends a
subscription), and the node-level transitions (a channel's first local member, its last
gone; for a personal channel `@user`: the user's first local connection, its last gone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator
from typing import Any, NamedTuple, Protocol, cast

from hub.broker import Broker, HistoryOptions, HistoryPage, StreamPosition
from hub.channels import is_personal
from hub.errors import BrokerUnavailable
from hub.fossil import create as fossil_delta
from hub.hub import Codec, DeltaCodec, Subscriber
from hub.metrics import Metrics
from hub.protocol import Join, Leave, Message
from hub.refill import Read, Refiller
from hub.settings import Settings
from hub.tasks import cancel

log = logging.getLogger("hub.subscriptions")

_SKIP, _DELIVER, _GAP = 0, 1, 2
RELAY_RETRY_CAP = 5.0


class Frames:
    """What a channel carries, as a frame in each wire protocol, each built once (on first
    need) however many subscribers speak it. For delta subscriptions, a run of
    publications also has its fossil patches (each against the one before, the first
    against `base`), computed once whatever the encodings, and a frame per encoding for
    those that hold the base and for those that do not yet."""

    __slots__ = ("_base", "_build", "_built", "_built_deltas", "_messages", "_patches", "count")

    def __init__(
        self,
        build: Callable[[Codec], bytes],
        count: int = 1,
        messages: list[Message] | None = None,
        base: Message | None = None,
    ) -> None:
        self._build = build
        self._built: dict[Codec, bytes] = {}
        self.count = count  # frames in the run, for the queue limit
        self._messages = messages or []
        self._base = base
        # Only for channels with delta subscriptions: made on first need, not per message.
        self._patches: dict[int, bytes | None] | None = None
        self._built_deltas: dict[tuple[Codec, bool], bytes] | None = None

    @classmethod
    def of_messages(cls, messages: list[Message], base: Message | None = None) -> Frames:
        """Several publications as one run of frames: one write per recipient. `base`: the
        publication before the first, which delta subscriptions were sent."""
        if len(messages) == 1:
            (message,) = messages
            return cls(lambda codec: codec.message(message), 1, messages, base)
        return cls(
            lambda codec: b"".join([codec.message(message) for message in messages]),
            len(messages), messages, base,
        )

    def delta_frame(self, codec: Codec, has_base: bool) -> bytes:
        """The run for a delta subscription: patches, except a first full payload for one
        that holds no base yet."""
        key = (codec, has_base)
        if self._built_deltas is None:
            self._built_deltas = {}
        built = self._built_deltas.get(key)
        if built is None:
            writer = cast(DeltaCodec, codec)
            built = self._built_deltas[key] = b"".join([
                writer.delta(message, self._patch(index) if index or has_base else None)
                for index, message in enumerate(self._messages)
            ])
        return built

    def _patch(self, index: int) -> bytes | None:
        """The patch of message `index` against the one before it; None where there is
        none to make (no base) or it would not be smaller than the payload."""
        if self._patches is None:
            self._patches = {}
        elif index in self._patches:
            return self._patches[index]
        message = self._messages[index]
        before = self._messages[index - 1] if index else self._base
        patch: bytes | None = None
        if before is not None and _follows(before, message):
            patch = fossil_delta(bytes(before.data), bytes(message.data))
            if len(patch) >= len(message.data):
                patch = None
        self._patches[index] = patch
        return patch

    @classmethod
    def of_event(cls, event: Join | Leave) -> Frames:
        return cls(lambda codec: codec.event(event))

    def frame(self, codec: Codec) -> bytes:
        built = self._built.get(codec)
        if built is None:
            built = self._built[codec] = self._build(codec)
        return built


def fan_out(subscribers: Iterable[Subscriber], frames: Frames) -> int:
    """The hot path: a frame built once per node (per protocol) to every subscriber without
    awaiting; one that fails never stops the others (as in websockets' `broadcast()`).
    Returns how many took it."""
    delivered = 0
    codec: Codec | None = None
    frame = b""
    count = frames.count
    for subscriber in subscribers:
        try:
            if subscriber.codec is not codec:  # most share one: no lookup per recipient
                codec = subscriber.codec
                frame = frames.frame(codec)
            delivered += subscriber.push(frame, count)
        except Exception:
            log.exception("delivery to one connection failed; the others go on")
    return delivered


def fan_out_deltas(
    subscribers: Iterable[Subscriber], frames: Frames, deltas: dict[Subscriber, bool]
) -> int:
    """`fan_out` on a channel with delta subscriptions (`deltas`: whether each holds a
    base): they get the delta form of the run, and hold a base from then on."""
    delivered = 0
    count = frames.count
    codec: Codec | None = None
    base: bool | None = None
    frame = b""
    holds = deltas.get
    for subscriber in subscribers:
        try:
            has_base = holds(subscriber)
            if subscriber.codec is not codec or has_base is not base or not frame:
                codec, base = subscriber.codec, has_base
                frame = (frames.frame(codec) if has_base is None
                         else frames.delta_frame(codec, has_base))
            if subscriber.push(frame, count):
                delivered += 1
                if has_base is False:
                    deltas[subscriber] = True
        except Exception:
            log.exception("delivery to one connection failed; the others go on")
    return delivered


def _follows(before: Message, message: Message) -> bool:
    """Whether `message` comes right after `before` (always so without offsets)."""
    if before.offset is None or message.offset is None:
        return True
    return before.offset + 1 == message.offset and before.epoch == message.epoch


def history_options(settings: Settings, channel: str) -> HistoryOptions | None:
    namespace = settings.namespace_of(channel)
    if is_personal(channel) or not namespace.has_history:
        return None
    return HistoryOptions(namespace.history_size, namespace.history_ttl)


class Joined(NamedTuple):
    """What a new subscription starts from: the channel's position (None without history),
    whether `since` was recovered (None when not asked), and the recovered messages."""

    position: StreamPosition | None
    recovered: bool | None
    messages: list[Message]


class Cohort:
    """Subscriptions of one channel that stand at the same position. `held` is not None
    while the cohort catches up: live messages wait there, in order."""

    __slots__ = ("epoch", "held", "last", "members", "offset")

    def __init__(self, members: set[Subscriber], position: StreamPosition | None) -> None:
        self.members = members
        self.offset = position.offset if position is not None else 0
        self.epoch = position.epoch if position is not None else None
        self.held: list[Message] | None = None
        # The message at `offset`, when the cohort was sent it: a history read after an
        # outage checks that the broker still holds that message there.
        self.last: Message | None = None

    @property
    def position(self) -> StreamPosition | None:
        return None if self.epoch is None else StreamPosition(self.offset, self.epoch)

    def advance(self, message: Message) -> int:
        """The rule: _SKIP, _DELIVER (and move on to the message), or _GAP."""
        epoch, offset = self.epoch, message.offset
        if epoch is None or offset is None:
            return _DELIVER
        if message.epoch == epoch:
            if offset <= self.offset:
                return _SKIP
            if offset == self.offset + 1:
                self.offset = offset
                self.last = message
                return _DELIVER
        return _GAP


class Channel:
    __slots__ = (
        "cohorts", "deltas", "generation", "history", "joiners", "name", "relayed", "size",
    )

    def __init__(self, name: str, history: HistoryOptions | None) -> None:
        self.name = name
        self.history = history
        self.cohorts: list[Cohort] = []
        # Subscribes in flight: what the channel carried meanwhile, for after the reply.
        self.joiners: dict[Subscriber, list[Message]] = {}
        self.relayed = False  # the broker confirmed its subscription
        self.size = 0  # members of all cohorts
        # Broker reconnects this channel went through: a history read that began before
        # the latest one may predate the newest gap, and is redone.
        self.generation = 0
        # Members whose publications go as fossil deltas, and whether each holds a base
        # (was sent a publication of this subscription): None while there are none.
        self.deltas: dict[Subscriber, bool] | None = None

    def members(self) -> Iterator[Subscriber]:
        for cohort in self.cohorts:
            yield from cohort.members


Hold = tuple[Channel, Cohort]


class MembershipWatcher(Protocol):
    """Hears membership change; called synchronously, in the order things happen, and must
    not raise (nor await: what it does with the Redis is its own task's business)."""

    def admitted(self, subscriber: Subscriber, channel: str) -> None:
        """`subscriber` became a member of `channel` (personal channels included)."""

    def dropped(self, subscriber: Subscriber, channel: str) -> None:
        """`subscriber` is a member no more, whatever the path."""

    def occupied(self, channel: str) -> None:
        """The channel's first local member (for `@user`: the user's first connection)."""

    def vacated(self, channel: str) -> None:
        """Its last local member is gone (for `@user`: the user's last connection)."""


class Subscriptions:
    def __init__(self, broker: Broker, settings: Settings, metrics: Metrics) -> None:
        self._broker = broker
        self._settings = settings
        self._delivered = metrics.messages_delivered
        self._channels: dict[str, Channel] = {}
        # A list, not a set: most connections are on few channels, and a set costs a
        # connection 216 bytes at least.
        self._channels_of: dict[Subscriber, list[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refiller: Refiller[Hold] = Refiller(broker, self)
        self.subscription_count = 0  # members, personal channels left out
        self.channel_count = 0  # channels with a member, personal channels left out
        # `channel_counts()` as last built; None once a shared channel's membership changed.
        # A heartbeat then walks the channels only when something changed: on an idle node
        # of 100,000 connections that walk (every personal channel looked at) was a fifth
        # of its CPU.
        self._counts: dict[str, int] | None = None
        self.watchers: list[MembershipWatcher] = []

    # reading

    @property
    def channels(self) -> list[str]:
        """Channels the broker must relay to this node: those with a member or a joiner."""
        return list(self._channels)

    def has(self, subscriber: Subscriber, channel: str) -> bool:
        return channel in self._channels_of.get(subscriber, ())

    def channels_of(self, subscriber: Subscriber) -> list[str]:
        """The channels `subscriber` is in or joining, personal ones left out."""
        return [name for name in self._channels_of.get(subscriber, ()) if not is_personal(name)]

    def count_of(self, subscriber: Subscriber) -> int:
        """Subscriptions of `subscriber` that count toward its limit (joiners included)."""
        return sum(not is_personal(name) for name in self._channels_of.get(subscriber, ()))

    def members(self, channel: str) -> Iterator[Subscriber]:
        found = self._channels.get(channel)
        return found.members() if found is not None else iter(())

    def generation_of(self, channel: str) -> int:
        """Broker reconnects a channel went through (0 for one without local interest)."""
        found = self._channels.get(channel)
        return found.generation if found is not None else 0

    def cohorts_of(self, channel: str) -> list[Cohort]:
        """A channel's cohorts as they stand, for tests and debugging."""
        found = self._channels.get(channel)
        return list(found.cohorts) if found is not None else []

    def memberships(self) -> Iterator[tuple[str, Iterator[Subscriber]]]:
        """Every channel with members, and its members (joiners are not members yet)."""
        for name, channel in self._channels.items():
            if channel.size:
                yield name, channel.members()

    def channel_counts(self) -> dict[str, int]:
        """Members per shared channel (personal channels left out); the same dict until
        membership changes, so callers must not change it."""
        if self._counts is None:
            self._counts = {
                name: channel.size
                for name, channel in self._channels.items()
                if channel.size and not is_personal(name)
            }
        return self._counts

    # joining and leaving

    async def join(
        self,
        subscriber: Subscriber,
        name: str,
        since: StreamPosition | None,
        joined: Callable[[Joined], None],
        *,
        delta: bool = False,
    ) -> bool:
        """Subscribe. `joined` is called without awaiting, before anything of the channel
        reaches `subscriber`, with what its subscription starts from. Raises what the broker
        raised (nothing joined then); False when the subscriber left meanwhile. `delta`:
        its publications go as fossil deltas, the recovered ones (in the reply) its base."""
        channel = self._enter(subscriber, name)
        held = channel.joiners[subscriber] = []
        generation = channel.generation
        page: HistoryPage | None = None
        try:
            await self._relay(channel)
            if channel.history is not None:
                page = await self._read_start(name, channel.history, since)
        except BaseException:
            if channel.joiners.get(subscriber) is held:
                await self._remove(subscriber, channel)
            raise
        if channel.joiners.get(subscriber) is not held:
            return False
        del channel.joiners[subscriber]
        start = self._start_of(page, since)
        joined(start)
        if delta:
            if channel.deltas is None:
                channel.deltas = {}
            channel.deltas[subscriber] = bool(start.messages)
        cohort = Cohort({subscriber}, start.position)
        cohort.last = start.messages[-1] if start.messages else None
        self._admit(channel, cohort, held, generation)
        return True

    async def _read_start(
        self, name: str, history: HistoryOptions, since: StreamPosition | None
    ) -> HistoryPage:
        """A new subscription's start. A `since` past the broker's offset in the same
        epoch means the broker lost messages somebody was sent (a failover): the channel
        starts a new epoch, and `since` is not recovered."""
        limit = self._settings.recovery_max + 1 if since is not None else 0
        page = await self._broker.history(name, history, since, limit)
        position = page.position
        if since is not None and since.epoch == position.epoch and since.offset > position.offset:
            position = await self._broker.restart_epoch(name, history, position)
            return HistoryPage(position, [], complete=False)
        return page

    async def join_personal(self, subscriber: Subscriber, name: str) -> None:
        """Like `join` for `@user` (no history, no reply); a broker that does not confirm
        the subscription is asked again in the background, with backoff."""
        channel = self._enter(subscriber, name)
        held = channel.joiners[subscriber] = []
        try:
            await self._relay(channel)
        except BrokerUnavailable:
            log.warning("personal channel not subscribed yet; retrying in the background")
            self._spawn(self._relay_until_confirmed(channel))
        except BaseException:
            await self._remove(subscriber, channel)
            raise
        if channel.joiners.get(subscriber) is held:
            del channel.joiners[subscriber]
            self._admit(channel, Cohort({subscriber}, None), held, channel.generation)

    async def leave(self, subscriber: Subscriber, name: str) -> bool:
        """False when `subscriber` was not subscribed (nor joining)."""
        channel = self._channels.get(name)
        if channel is None:
            return False
        return await self._remove(subscriber, channel)

    async def leave_all(self, subscriber: Subscriber) -> list[str]:
        """Unsubscribe from everything at once, then release the channels side by side;
        returns the channels (personal ones left out) it was a member of."""
        left: list[str] = []
        emptied: list[Channel] = []
        for name in self._channels_of.pop(subscriber, ()):
            channel = self._channels[name]
            if self._drop(subscriber, channel) and not is_personal(name):
                left.append(name)
            if not (channel.cohorts or channel.joiners):
                emptied.append(channel)
        await asyncio.gather(*(self._release(channel) for channel in emptied))
        return left

    async def close(self) -> None:
        await self.refiller.stop()
        await asyncio.gather(*(cancel(task) for task in list(self._tasks)))

    def _enter(self, subscriber: Subscriber, name: str) -> Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(name, history_options(self._settings, name))
        names = self._channels_of.get(subscriber)
        if names is None:
            self._channels_of[subscriber] = [name]
        elif name not in names:
            names.append(name)
        return channel

    async def _remove(self, subscriber: Subscriber, channel: Channel) -> bool:
        was_member = self._drop(subscriber, channel)
        self._unlist(subscriber, channel.name)
        if not (channel.cohorts or channel.joiners):
            await self._release(channel)
        return was_member or was_member is None

    def _unlist(self, subscriber: Subscriber, name: str) -> None:
        names = self._channels_of.get(subscriber)
        if names is not None and name in names:
            names.remove(name)
            if not names:
                del self._channels_of[subscriber]

    def _drop(self, subscriber: Subscriber, channel: Channel) -> bool | None:
        """True: it was a member; None: a joiner; False: neither."""
        self._forget_delta(channel, subscriber)
        if channel.joiners.pop(subscriber, None) is not None:
            return None
        for cohort in channel.cohorts:
            if subscriber in cohort.members:
                cohort.members.discard(subscriber)
                if not cohort.members:
                    channel.cohorts.remove(cohort)
                self._tell_dropped(subscriber, channel.name)
                self._count(channel, -1)
                return True
        return False

    @staticmethod
    def _forget_delta(channel: Channel, subscriber: Subscriber) -> None:
        deltas = channel.deltas
        if deltas is not None and deltas.pop(subscriber, None) is not None and not deltas:
            channel.deltas = None

    def _count(self, channel: Channel, change: int) -> None:
        """Every change of membership passes here (the one place that counts it)."""
        channel.size += change
        if not is_personal(channel.name):
            self._counts = None
            self.subscription_count += change
            if channel.size == (1 if change > 0 else 0):
                self.channel_count += change
        if change > 0 and channel.size == change:
            for watcher in self.watchers:
                _tell(watcher.occupied, channel.name)
        elif change < 0 and channel.size == 0:
            for watcher in self.watchers:
                _tell(watcher.vacated, channel.name)

    def _tell_dropped(self, subscriber: Subscriber, name: str) -> None:
        for watcher in self.watchers:
            _tell(watcher.dropped, subscriber, name)

    async def _relay(self, channel: Channel) -> None:
        if not channel.relayed:
            await self._broker.subscribe(channel.name)
            channel.relayed = True

    async def _release(self, channel: Channel) -> None:
        """The channel has nobody left: forget it, and stop hearing it. Looks again first,
        as `leave_all` releases in tasks: somebody may have joined it meanwhile. What is
        forgotten and the broker's unsubscribe are one step, so a join that comes after
        subscribes at the broker after this unsubscribe."""
        if self._channels.get(channel.name) is not channel or channel.cohorts or channel.joiners:
            return
        del self._channels[channel.name]
        try:
            await self._broker.unsubscribe(channel.name)
        except Exception:
            log.exception("unsubscribing from the broker failed")

    async def _relay_until_confirmed(self, channel: Channel) -> None:
        delay = 0.25
        while self._channels.get(channel.name) is channel and not channel.relayed:
            await asyncio.sleep(delay)
            try:
                await self._relay(channel)
            except BrokerUnavailable:
                delay = min(delay * 2, RELAY_RETRY_CAP)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_of(self, page: HistoryPage | None, since: StreamPosition | None) -> Joined:
        if page is None:
            return Joined(None, None, [])
        if since is None:
            return Joined(page.position, None, [])
        recovered = page.complete and len(page.messages) <= self._settings.recovery_max
        return Joined(page.position, recovered, page.messages if recovered else [])

    def _admit(
        self, channel: Channel, cohort: Cohort, held: list[Message], generation: int
    ) -> None:
        """A new member goes live from its position: what it holds passes the rule; if its
        read predates the latest reconnect, it catches up first."""
        channel.cohorts.append(cohort)
        self._count(channel, len(cohort.members))
        for watcher in self.watchers:
            for member in cohort.members:
                _tell(watcher.admitted, member, channel.name)
        if channel.history is not None and generation != channel.generation:
            self._hold(channel, cohort, held)
        else:
            self._replay(channel, cohort, held)

    # delivery

    def deliver(self, name: str, messages: list[Message]) -> None:
        """Live publications of one channel, in order, as the broker relayed them (all it
        had at hand): the hot path. Each subscriber gets those that pass the rule in one
        write (PROTOCOL §5; a burst costs one syscall per socket, not one per message)."""
        channel = self._channels.get(name)
        if channel is None:
            return  # unsubscribed while they were on their way
        for held in channel.joiners.values():
            held.extend(messages)
        cohorts = channel.cohorts
        if len(cohorts) == 1 and cohorts[0].epoch is None:  # no history: no positions
            self._send(channel, cohorts[0], messages)
            return
        for cohort in cohorts:
            if cohort.held is not None:
                cohort.held.extend(messages)
            else:
                self._deliver_in_turn(channel, cohort, messages)
        if len(cohorts) > 1:
            self._merge(channel)

    def deliver_event(self, name: str, event: Join | Leave) -> None:
        """Join and leave: no positions, to every member."""
        channel = self._channels.get(name)
        if channel is not None:
            fan_out(list(channel.members()), Frames.of_event(event))

    def _deliver_in_turn(self, channel: Channel, cohort: Cohort, messages: list[Message]) -> None:
        """`messages` through the rule, in order, to the cohort in one write; at a gap it
        holds the rest and catches up."""
        passed: list[Message] = []
        base = cohort.last
        for index, message in enumerate(messages):
            step = cohort.advance(message)
            if step == _DELIVER:
                passed.append(message)
            elif step == _GAP:
                self._hold(channel, cohort, messages[index:])
                break
        if passed:
            self._send(channel, cohort, passed, base)

    def _send(
        self, channel: Channel, cohort: Cohort, messages: list[Message],
        base: Message | None = None,
    ) -> None:
        """`messages` as one run of frames to each member of `cohort`, counted per frame.
        `base`: what the cohort was sent before them (for delta subscriptions)."""
        deltas = channel.deltas
        if deltas is None:
            delivered = fan_out(cohort.members, Frames.of_messages(messages))
        else:
            if cohort.epoch is None:  # no positions: the base is the last one sent
                base, cohort.last = cohort.last, messages[-1]
            frames = Frames.of_messages(messages, base)
            delivered = fan_out_deltas(cohort.members, frames, deltas)
        self._delivered.inc(delivered * len(messages))

    def _replay(self, channel: Channel, cohort: Cohort, messages: list[Message]) -> None:
        self._deliver_in_turn(channel, cohort, messages)
        self._merge(channel)

    def _merge(self, channel: Channel) -> None:
        """Live cohorts that reached the same position become one."""
        cohorts = channel.cohorts
        if len(cohorts) < 2:
            return
        by_position: dict[tuple[int, str | None], Cohort] = {}
        kept: list[Cohort] = []
        for cohort in cohorts:
            if cohort.held is not None:
                kept.append(cohort)
                continue
            into = by_position.setdefault((cohort.offset, cohort.epoch), cohort)
            if into is cohort:
                kept.append(cohort)
            elif len(into.members) >= len(cohort.members):
                into.members |= cohort.members
            else:
                cohort.members |= into.members
                into.members = cohort.members
        channel.cohorts = kept

    # catching up

    def _hold(self, channel: Channel, cohort: Cohort, held: list[Message]) -> None:
        cohort.held = held
        self.refiller.request((channel, cohort))

    def broker_reconnected(self, names: Collection[str]) -> None:
        """The broker subscribed `names` again after losing them: whatever the node missed
        meanwhile, every cohort on those with history holds live messages and catches up."""
        for name in names:
            channel = self._channels.get(name)
            if channel is None:
                continue
            channel.relayed = True
            channel.generation += 1
            if channel.history is None:
                continue
            for cohort in channel.cohorts:
                if cohort.held is None:
                    cohort.held = []
                self.refiller.request((channel, cohort))

    def resume(self) -> None:
        """The broker serves (more) again: cohorts still holding catch up. A catch-up stops
        while the broker is down, and a link that stayed up while the command client's way
        was down brings no reconnect to start it again."""
        for channel in self._channels.values():
            if channel.history is None:
                continue
            for cohort in channel.cohorts:
                if cohort.held is not None:
                    self.refiller.request((channel, cohort))

    # the refiller's target

    def generation(self, hold: Hold) -> int:
        return hold[0].generation

    def wanted(self, hold: Hold) -> Read | None:
        """Read from one before the cohort's position when it knows the message there, so
        the answer shows whether the broker still holds that very message."""
        channel, cohort = hold
        position = cohort.position
        if (
            cohort.held is None
            or position is None
            or channel.history is None
            or self._channels.get(channel.name) is not channel
            or all(cohort is not other for other in channel.cohorts)
        ):
            return None
        if cohort.last is not None and position.offset > 0:
            position = StreamPosition(position.offset - 1, position.epoch)
        return Read(channel.name, channel.history, position, self._settings.recovery_max + 2)

    def refilled(self, hold: Hold, page: HistoryPage) -> StreamPosition | None:
        """A catch-up read came back: the stretch, then what was held; or `reset` when the
        stretch is gone (or too long to replay), then what was held. When the broker has
        lost what the cohort was sent (below its offset, or another message at it: a
        failover to a replica that lacked the last writes) nothing is applied, and the
        stale position comes back: the channel needs a new epoch (`restarted`)."""
        channel, cohort = hold
        messages = page.messages
        if cohort.last is not None and cohort.offset > 0:
            first = messages[0] if messages else None
            if first is not None and first.offset == cohort.offset:
                if not _same(first, cohort.last):
                    return cohort.position
                messages = messages[1:]
        top = page.position
        if cohort.epoch == top.epoch and top.offset < cohort.offset:
            return cohort.position
        held, cohort.held = cohort.held or [], None
        if page.complete and len(messages) <= self._settings.recovery_max:
            self._replay(channel, cohort, messages + held)
            return None
        self._reset(channel, cohort, top)
        self._replay(channel, cohort, held)
        return None

    def restarted(self, hold: Hold, position: StreamPosition) -> None:
        """The channel went on in a new epoch at `position`: `reset` there, then what was
        held (of the new epoch)."""
        channel, cohort = hold
        log.warning("the broker lost messages that were delivered; the channel starts a "
                    "new epoch (reset)")
        held, cohort.held = cohort.held or [], None
        self._reset(channel, cohort, position)
        self._replay(channel, cohort, held)

    def give_up(self, hold: Hold) -> None:
        """History stayed unreadable: `reset` to just before the first held message (or
        where the cohort stood), then go on live."""
        channel, cohort = hold
        held, cohort.held = cohort.held or [], None
        first = held[0] if held else None
        if first is not None and first.offset is not None and first.epoch is not None:
            position = StreamPosition(first.offset - 1, first.epoch)
        else:
            position = cohort.position or StreamPosition(0, "")
        log.warning("gave up refilling a channel; sent reset")
        self._reset(channel, cohort, position)
        self._replay(channel, cohort, held)

    def _reset(self, channel: Channel, cohort: Cohort, position: StreamPosition) -> None:
        """Each member hears of it in its protocol's terms; those whose protocol ends the
        subscription there (Centrifugo's clients subscribe again) leave the channel."""
        cohort.offset, cohort.epoch, cohort.last = position.offset, position.epoch, None
        for member in list(cohort.members):
            try:
                kept = member.reset(channel.name, position)
            except Exception:
                log.exception("telling one connection of a reset failed")
                kept = True
            if not kept:
                cohort.members.discard(member)
                self._forget_delta(channel, member)
                self._unlist(member, channel.name)
                self._tell_dropped(member, channel.name)
                self._count(channel, -1)
        if not cohort.members:
            channel.cohorts.remove(cohort)
            if not (channel.cohorts or channel.joiners):
                self._spawn(self._release(channel))


def _tell(callback: Callable[..., None], *args: Any) -> None:
    """A watcher that raises is a bug: logged, and membership goes on."""
    try:
        callback(*args)
    except Exception:
        log.exception("membership watcher %s failed", getattr(callback, "__qualname__", ""))


def _same(one: Message, other: Message) -> bool:
    """The same publication: a reused offset carries another one."""
    return (one.ts, bytes(one.data), one.event, one.from_) == (
        other.ts, bytes(other.data), other.event, other.from_
    )
