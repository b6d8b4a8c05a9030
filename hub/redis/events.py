"""`RedisLedger`: events decided once for the cluster, in Redis (PROTOCOL §14).

Subjects (a channel, a user, a user in a presence channel) are spread over `BUCKETS`
buckets by a CRC32 of the channel (or, for a user, the user name). Each bucket's keys share
one hash tag, `{evN}`, so on a Redis Cluster every script of a bucket runs on one shard,
and the buckets spread over the shards:

- `hub:ev:{evN}:s:<kind>:<name>` (hash): who holds the subject, holder -> node. A channel
  or a user is held by nodes (holder = node id); a member by its client ids.
- `hub:ev:{evN}:h:<node>` (hash): what a node holds in the bucket (holder NUL subject key
  -> the JSON of the event its loss would send), so survivors can count it out.
- `hub:ev:{evN}:alive` (zset): the nodes holding something in the bucket, node -> expiry
  (ms on the Redis clock), pushed forward by each node's beat (`HUB_PRESENCE_TTL` / 3).
- `hub:ev:{evN}:x` (stream): the events, waiting to be sent. Consumer group `hub-events`;
  the consumer is the node id.
- `hub:ev:{evN}:owner` (string, PX `HUB_PRESENCE_TTL`): the node that sends the bucket.

A node's first local subscriber of a channel (or last gone, and so on) is one script
(`HOLD_LUA`) on the subject's bucket: it records the holder, and when the subject got its
first holder or lost its last, adds the event to the stream in the same step. The scripts
are idempotent (holding what is held changes nothing), so a node keeps, per subject, only
whether it holds it now, and sends that state until Redis has taken it: retries after an
outage are safe, and what waits is bounded by the number of subjects.

One node at a time sends each bucket (its lease), so its events go out in stream order:
in order per channel and per user. A node's one sender reads every bucket it owns in one
pipelined round trip and sends what it found in POSTs of up to `BATCH_SIZE` events. A new
owner first claims (`XAUTOCLAIM`) what the last one had read but not acknowledged, and sends
it again, with the same `id`s. The owner also counts out nodes whose entry in `alive` has
lapsed (`REAP_LUA`): what they held is released and the events they owed are recorded, once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import random
import time
import zlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from hub.events import (
    BATCH_SIZE,
    BATCH_WINDOW,
    NAMES,
    STOP_SECONDS,
    Delivery,
    Overflow,
    Pending,
    Subject,
    encoder,
    new_event_id,
    subject_tails,
)
from hub.incident import Incident
from hub.metrics import Metrics
from hub.redis.scripts import NOW_LUA, Call, Script, run_scripts, ttl_ms
from hub.redis.topology import REDIS_ERRORS, Topology

log = logging.getLogger("hub.events")

BUCKETS = 16
GROUP = "hub-events"
_APPLY_BATCH = 500  # scripts per pipelined round trip
_APPLY_WINDOW = 0.005  # s: how long a change waits for others to share its round trip
_REAP_BUDGET = 1000  # holdings released per reap script
_TRIM_BUDGET = 1000  # entries looked at per trim script
_TRIM_EVERY, _TRIM_EVERY_MIN = 60.0, 0.25  # s: a quarter of the age, within these

# KEYS: stream, subject, node's holdings, alive. ARGV: 1 held / 0 released, holder, node,
# max_len, first event's subject JSON, last event's, field of the node's holdings.
# Returns 1 (an event recorded), 0 (no transition), -1 (a transition whose event was dropped:
# the stream is full), -2 (the node is not registered in the bucket: it was counted out).
HOLD_LUA = """
local stream, subject, holdings, alive = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if not redis.call('ZSCORE', alive, ARGV[3]) then return -2 end
local function record(tail)
  if redis.call('XLEN', stream) >= tonumber(ARGV[4]) then return -1 end
  redis.call('XADD', stream, '*', 'e', tail)
  return 1
end
if ARGV[1] == '1' then
  if redis.call('HSET', subject, ARGV[2], ARGV[3]) == 1 then
    redis.call('HSET', holdings, ARGV[7], ARGV[6])
    if redis.call('HLEN', subject) == 1 then return record(ARGV[5]) end
  end
elseif redis.call('HDEL', subject, ARGV[2]) == 1 then
  redis.call('HDEL', holdings, ARGV[7])
  if redis.call('HLEN', subject) == 0 then return record(ARGV[6]) end
end
return 0
"""

# KEYS: stream. ARGV: max_len, subject JSON, event id. 1, or -1 when the stream is full.
EMIT_LUA = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
redis.call('XADD', KEYS[1], '*', 'e', ARGV[2], 'i', ARGV[3])
return 1
"""

# KEYS: alive. ARGV: node, ttl_ms. 1 when the node was registered, 0 when it is new (or was
# counted out meanwhile: it must tell what it holds again).
TOUCH_LUA = NOW_LUA + """
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if known then return 1 end
return 0
"""

# KEYS: stream, alive. ARGV: key prefix of a node's holdings, the node to retire ('' for
# every node whose entry lapsed), max_len, budget. Releases what those nodes held; a
# subject left without holders records its last event. Returns {more (0/1), names of the
# events recorded, names of those dropped (stream full)}, the names comma-separated.
REAP_LUA = NOW_LUA + """
local stream, alive = KEYS[1], KEYS[2]
local nodes
if ARGV[2] ~= '' then nodes = {ARGV[2]} else
  nodes = redis.call('ZRANGEBYSCORE', alive, '-inf', now) end
local budget, max_len = tonumber(ARGV[4]), tonumber(ARGV[3])
local members, others = {}, {}  -- the events owed: a member's removal before its channel's
local finished = {}
for _, node in ipairs(nodes) do
  local holdings = ARGV[1] .. node
  local cursor = '0'
  repeat
    local scan = redis.call('HSCAN', holdings, cursor, 'COUNT', 100)
    cursor = scan[1]
    local items = scan[2]
    for i = 1, #items, 2 do
      local field, tail = items[i], items[i + 1]
      local cut = string.find(field, '\\0', 1, true)
      local holder, subject = string.sub(field, 1, cut - 1), string.sub(field, cut + 1)
      redis.call('HDEL', holdings, field)
      if redis.call('HDEL', subject, holder) == 1 and redis.call('HLEN', subject) == 0 then
        if string.find(subject, ':s:m:', 1, true) then members[#members + 1] = tail
        else others[#others + 1] = tail end
      end
      budget = budget - 1
    end
  until cursor == '0' or budget <= 0
  if redis.call('HLEN', holdings) == 0 then finished[#finished + 1] = node end
  if budget <= 0 then break end
end
for _, node in ipairs(finished) do
  redis.call('DEL', ARGV[1] .. node)
  redis.call('ZREM', alive, node)
end
local recorded, dropped = {}, {}
for _, group in ipairs({members, others}) do
  for _, tail in ipairs(group) do
    local name = string.match(tail, '"name":"([a-z_]+)"') or 'unknown'
    if redis.call('XLEN', stream) < max_len then
      redis.call('XADD', stream, '*', 'e', tail)
      recorded[#recorded + 1] = name
    else
      dropped[#dropped + 1] = name
    end
  end
end
local more = 0
if #finished < #nodes then more = 1 end
return {more, table.concat(recorded, ','), table.concat(dropped, ',')}
"""

# KEYS: stream. ARGV: max age (ms), budget, group. Deletes the entries older than the age:
# those the group has not handed to a reader yet are dropped (their names are returned,
# comma-separated, to be counted); those handed out and no longer pending were delivered
# (acknowledged, but their XDEL was lost), and go silently. Entries still pending are left
# to their reader, which drops them for age when it would send them (counted there, once).
TRIM_LUA = NOW_LUA + """
local stream = KEYS[1]
local cutoff = now - tonumber(ARGV[1])
if cutoff <= 0 or redis.call('EXISTS', stream) == 0 then return '' end
local before = string.format('%d', cutoff - 1)
local budget = tonumber(ARGV[2])
local last = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[3] then last = fields['last-delivered-id'] end
end
local gone, names = {}, {}
if last then
  local pending = {}
  for _, item in ipairs(redis.call('XPENDING', stream, ARGV[3], '-', before, budget)) do
    pending[item[1]] = true
  end
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', last, 'COUNT', budget)) do
    local id = entry[1]
    local ms = tonumber(string.match(id, '^(%d+)'))
    if ms >= cutoff then break end
    if not pending[id] then gone[#gone + 1] = id end
  end
end
local start = '-'
if last then start = '(' .. last end
for _, entry in ipairs(redis.call('XRANGE', stream, start, before, 'COUNT', budget)) do
  gone[#gone + 1] = entry[1]
  local name = 'unknown'
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then name = string.match(fields[i + 1], '"name":"([a-z_]+)"') or name end
  end
  names[#names + 1] = name
end
if #gone > 0 then redis.call('XDEL', stream, unpack(gone)) end
return table.concat(names, ',')
"""

# KEYS: lease. ARGV: node, ttl_ms, may take (1/0). 1: renewed; 2: taken (it was free, and
# the node may take more); 0: another's (or free, and the node has its share).
LEASE_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not owner and ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

# KEYS: a bucket's alive. The live nodes there (every node beats in every bucket).
NODES_LUA = NOW_LUA + """
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf')
"""

# KEYS: lease. ARGV: node.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Hold = tuple[str, str, str, str]  # kind, name, user, holder


def bucket_of(kind: str, name: str) -> int:
    """A subject's bucket: by the channel's name (member events go with their channel's),
    or the user's."""
    return zlib.crc32(name.encode(errors="surrogatepass")) % BUCKETS


class RedisLedger:
    """`Ledger` over Redis: transitions decided by scripts, sent by the bucket's owner."""

    def __init__(
        self,
        topology: Topology,
        delivery: Delivery,
        metrics: Metrics,
        node_id: str,
        ttl: float,
        max_pending: int,
        *,
        max_age: float = 86400.0,
        prefix: str = "hub:",
    ) -> None:
        self._topology = topology
        self._delivery = delivery
        self._metrics = metrics
        self._node = node_id
        self._ttl = ttl
        self._ttl_ms = ttl_ms(ttl)
        self._max_pending = max_pending
        self._bases = [f"{prefix}ev:{{ev{b}}}:".encode() for b in range(BUCKETS)]
        self._hold, self._emit, self._touch, self._reap, self._lease, self._release = (
            Script.of(source)
            for source in (HOLD_LUA, EMIT_LUA, TOUCH_LUA, REAP_LUA, LEASE_LUA, RELEASE_LUA)
        )
        self._nodes = Script.of(NODES_LUA)
        self._trim = Script.of(TRIM_LUA)
        self._max_age_ms = max(1, int(max_age * 1000))
        # How often the streams of the buckets this node sends are trimmed by age.
        self._trim_every = min(_TRIM_EVERY, max(_TRIM_EVERY_MIN, max_age / 4))
        self._share = BUCKETS  # buckets this node may send: its part of the live nodes'
        self._surplus = 0  # buckets it holds past its share, to hand back
        # What this node holds now, by bucket: the one truth it tells Redis.
        self._held: list[set[Hold]] = [set() for _ in range(BUCKETS)]
        # Holdings whose state Redis has not taken yet, by the change's number.
        self._dirty: dict[Hold, int] = {}
        self._changes = itertools.count()
        self._emits: collections.deque[tuple[int, bytes, str, str]] = collections.deque()
        self._unregistered: set[int] = set(range(BUCKETS))
        self._wake = asyncio.Event()
        self._owned = [False] * BUCKETS
        self._fresh = [False] * BUCKETS  # just taken: claim what the last owner left
        # This consumer may hold entries it read and did not acknowledge: read those first.
        self._claimed = [False] * BUCKETS
        self._idle = asyncio.Event()  # the sender found nothing to send
        self._idle.set()
        self._applied = asyncio.Event()  # Redis has taken every change of this node
        self._applied.set()
        self._healthy_since: float | None = None  # Redis answered every beat since
        self._overflow = Overflow(metrics, max_pending)
        self._incident = Incident(log, "events in Redis")
        self._tellers: list[asyncio.Task[None]] = []  # tell Redis what this node holds
        self._senders: list[asyncio.Task[None]] = []  # send what Redis recorded

    # keys

    def _stream(self, bucket: int) -> bytes:
        return self._bases[bucket] + b"x"

    def _alive(self, bucket: int) -> bytes:
        return self._bases[bucket] + b"alive"

    def _holdings(self, bucket: int) -> bytes:
        return self._bases[bucket] + b"h:" + self._node.encode()

    def _owner(self, bucket: int) -> bytes:
        return self._bases[bucket] + b"owner"

    def _subject(self, bucket: int, hold: Hold) -> bytes:
        kind, name, user, _ = hold
        key = self._bases[bucket] + b"s:" + kind.encode() + b":" + name.encode(
            errors="surrogatepass")
        if user:
            key += b"\0" + user.encode(errors="surrogatepass")
        return key

    # Ledger

    async def start(self) -> None:
        self._tellers = [asyncio.create_task(loop, name="hub-events")
                         for loop in (self._apply_loop(), self._beat_loop())]
        senders = [self._lease_loop(), self._send_loop(), self._trim_loop()]
        self._senders = [asyncio.create_task(loop, name="hub-events") for loop in senders]

    async def stop(self) -> None:
        """Tell Redis what is left, count this node out (its last events are recorded),
        give what this node sends a moment to go out, and hand the buckets over."""
        if not self._tellers:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._applied.wait(), STOP_SECONDS)
        await _cancel(self._tellers)  # nothing may tell Redis of holdings after this
        try:
            await self._retire()
        except REDIS_ERRORS as exc:
            log.warning("events: could not count this node out (%s); the others will "
                        "once its entries lapse", exc)
        self._idle.clear()  # the sender looks once more (what the count-out recorded)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), STOP_SECONDS)
        await _cancel(self._senders)
        self._tellers, self._senders = [], []
        with contextlib.suppress(*REDIS_ERRORS):  # else the leases lapse by themselves
            await self._run([
                (self._release, [self._owner(b)], [self._node])
                for b in range(BUCKETS) if self._owned[b]
            ])
        await self._delivery.close()

    def hold(self, kind: str, name: str, user: str, holder: str, held: bool) -> None:
        hold = (kind, name, user, holder)
        holds = self._held[bucket_of(kind, name)]
        if held:
            holds.add(hold)
        else:
            holds.discard(hold)
        self._dirty.pop(hold, None)  # to the end: Redis takes changes in their order
        self._dirty[hold] = next(self._changes)
        self._applied.clear()
        self._wake.set()

    def emit(self, route: str, subject: Subject) -> None:
        if len(self._emits) >= self._max_pending:
            self._overflow.dropped(subject.name)
            return
        self._emits.append(
            (bucket_of("c", route), encoder.encode(subject), new_event_id(), subject.name))
        self._applied.clear()
        self._wake.set()

    # telling Redis

    async def _apply_loop(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(_APPLY_WINDOW)  # changes close together: one round trip
            self._wake.clear()
            while self._dirty or self._emits or self._unregistered:
                try:
                    await self._apply_some()
                    failures = 0
                except REDIS_ERRORS as exc:
                    self._incident.failed(exc)
                    failures += 1
                    await asyncio.sleep(min(2.0, 0.05 * 2 ** failures) * random.uniform(0.5, 1))
            self._applied.set()

    async def _apply_some(self) -> None:
        registering = sorted(self._unregistered)
        holds = list(itertools.islice(self._dirty.items(), _APPLY_BATCH))
        emits = [self._emits[i] for i in range(min(_APPLY_BATCH, len(self._emits)))]
        calls: list[Call] = [
            (self._touch, [self._alive(b)], [self._node, self._ttl_ms]) for b in registering
        ]
        for hold, _ in holds:
            calls.append(self._hold_call(hold))
        for bucket, subject, event_id, _ in emits:
            calls.append(
                (self._emit, [self._stream(bucket)], [self._max_pending, subject, event_id]))
        results = await self._run(calls)
        self._incident.recovered()
        for bucket, known in zip(registering, results, strict=False):
            self._unregistered.discard(bucket)
            if not known:
                self._resync(bucket)
        results = results[len(registering):]
        for (hold, change), result in zip(holds, results, strict=False):
            if self._dirty.get(hold) == change and result != -2:
                del self._dirty[hold]  # unless it changed again meanwhile
            if result == -2:
                self._unregistered.add(bucket_of(hold[0], hold[1]))
            elif result != 0:
                self._produced(hold, result)
        for (_, _, _, name), result in zip(emits, results[len(holds):], strict=False):
            self._emits.popleft()
            if result == 1:
                self._metrics.events.labels(name, "produced").inc()
            else:
                self._overflow.dropped(name)

    def _hold_call(self, hold: Hold) -> Call:
        kind, name, user, holder = hold
        bucket = bucket_of(kind, name)
        subject = self._subject(bucket, hold)
        held = hold in self._held[bucket]
        first, last = subject_tails(kind, name, user, holder)
        keys = [self._stream(bucket), subject, self._holdings(bucket), self._alive(bucket)]
        field = holder.encode(errors="surrogatepass") + b"\0" + subject
        args: list[bytes | str | int] = [
            int(held), holder, self._node, self._max_pending, first, last, field]
        return self._hold, keys, args

    def _produced(self, hold: Hold, result: int) -> None:
        kind = hold[0]
        name = NAMES[kind][0 if hold in self._held[bucket_of(kind, hold[1])] else 1]
        if result == 1:
            self._metrics.events.labels(name, "produced").inc()
        else:
            self._overflow.dropped(name)

    def _resync(self, bucket: int) -> None:
        """Redis does not know this node in `bucket` (it was counted out, or Redis lost its
        data): tell it everything the node holds there again."""
        if self._held[bucket]:
            log.warning("events: this node was counted out of bucket %d; telling Redis "
                        "its %d holdings again", bucket, len(self._held[bucket]))
        for hold in self._held[bucket]:
            self._dirty[hold] = next(self._changes)
        self._applied.clear()
        self._wake.set()

    async def _beat_loop(self) -> None:
        """Keep this node's `alive` entries fresh; a bucket where it turns out unknown is
        told again what the node holds there."""
        interval = self._ttl / 3
        while True:
            calls: list[Call] = [
                (self._touch, [self._alive(b)], [self._node, self._ttl_ms])
                for b in range(BUCKETS)
            ]
            try:
                results = await self._run(calls)
            except REDIS_ERRORS as exc:
                self._healthy_since = None
                self._incident.failed(exc)
            else:
                if self._healthy_since is None:
                    self._healthy_since = time.monotonic()
                for bucket, known in enumerate(results):
                    if not known:
                        self._resync(bucket)
            await asyncio.sleep(interval)

    async def _retire(self) -> None:
        buckets = list(range(BUCKETS))
        while buckets:
            buckets = await self._reap_buckets(buckets, self._node)

    async def _reap_buckets(self, buckets: list[int], node: str = "") -> list[int]:
        """Count out lapsed nodes (or `node`) in `buckets`, one round trip; returns the
        buckets where more is left to do."""
        calls: list[Call] = [
            (self._reap, [self._stream(b), self._alive(b)],
             [self._bases[b] + b"h:", node, self._max_pending, _REAP_BUDGET])
            for b in buckets
        ]
        more: list[int] = []
        for bucket, (unfinished, recorded, dropped) in zip(
            buckets, await self._run(calls), strict=True
        ):
            for name in filter(None, recorded.decode().split(",")):
                self._metrics.events.labels(name, "produced").inc()
            for name in filter(None, dropped.decode().split(",")):
                self._overflow.dropped(name)
            if recorded and not node:
                log.info("events: counted out nodes whose presence lapsed (bucket %d)", bucket)
            if unfinished:
                more.append(bucket)
        return more

    # sending

    async def _lease_loop(self) -> None:
        """Keep the buckets this node sends, and take free ones while it has fewer than
        its share (16 / live nodes, rounded up), every second (or TTL / 4, if less); what
        it holds past its share the sender hands back (so a cluster's buckets spread over
        its nodes; a bucket handed back waits for its next owner about a second)."""
        interval = min(1.0, self._ttl / 4)
        renewed = time.monotonic()
        while True:
            take = int(sum(self._owned) < self._share)
            calls: list[Call] = [
                (self._lease, [self._owner(b)], [self._node, self._ttl_ms, take])
                for b in range(BUCKETS)
            ]
            calls.append((self._nodes, [self._alive(0)], []))
            try:
                *results, nodes = await self._run(calls)
            except REDIS_ERRORS:
                if time.monotonic() - renewed > self._ttl / 2:
                    self._set_owned([0] * BUCKETS)
            else:
                renewed = time.monotonic()
                self._share = -(-BUCKETS // max(1, int(nodes)))
                self._set_owned([int(result) for result in results])
                self._surplus = max(0, sum(self._owned) - self._share)
            await asyncio.sleep(interval * random.uniform(0.8, 1.0))

    async def _trim_loop(self) -> None:
        """Every `_trim_every`, delete what is older than `HUB_EVENTS_MAX_AGE` from the
        streams of the buckets this node sends (`TRIM_LUA`), also while its sender is held
        up by a receiver that does not answer: Redis keeps no event past its age."""
        while True:
            await asyncio.sleep(self._trim_every)
            buckets = [b for b in range(BUCKETS) if self._owned[b]]
            try:
                while buckets:
                    buckets = await self._trim_buckets(buckets)
            except REDIS_ERRORS as exc:
                self._incident.failed(exc)

    async def _trim_buckets(self, buckets: list[int]) -> list[int]:
        """One round trip; returns the buckets that may have more to trim."""
        calls: list[Call] = [
            (self._trim, [self._stream(b)], [self._max_age_ms, _TRIM_BUDGET, GROUP])
            for b in buckets
        ]
        more = []
        for bucket, names in zip(buckets, await self._run(calls), strict=True):
            dropped = names.decode().split(",") if names else []
            for name in dropped:
                self._delivery.expiry.dropped(name)
            if len(dropped) >= _TRIM_BUDGET:
                more.append(bucket)
        return more

    async def _hand_back(self) -> None:
        """Release buckets past this node's share, among those with nothing read and not
        acknowledged (between two sends: the next owner has nothing to send again)."""
        spare = [b for b in range(BUCKETS)
                 if self._owned[b] and not (self._fresh[b] or self._claimed[b])]
        chosen = spare[-self._surplus:] if self._surplus else []
        self._surplus = 0
        if not chosen:
            return
        for bucket in chosen:
            self._owned[bucket] = False
        await self._run([(self._release, [self._owner(b)], [self._node]) for b in chosen])

    def _set_owned(self, states: list[int]) -> None:
        for bucket, state in enumerate(states):
            self._owned[bucket] = state > 0
            if state == 2:  # just taken: claim what the last owner left, first
                self._fresh[bucket] = True

    async def _send_loop(self) -> None:
        """The node's sender: reads what waits in every bucket it owns (one pipelined round
        trip), sends it in POSTs of at most `BATCH_SIZE` events (each bucket's in stream
        order), acknowledges and deletes each POST's entries; looks again at once while
        there was something, else after `BATCH_WINDOW`. Now and then it counts out lapsed
        nodes in those buckets."""
        reap_every = min(1.0, self._ttl / 3)
        reaped_at = 0.0
        failures = 0
        while True:
            self._idle.clear()
            try:
                if self._surplus:
                    await self._hand_back()
                buckets = [b for b in range(BUCKETS) if self._owned[b]]
                for bucket in buckets:
                    if self._fresh[bucket]:
                        await self._take_over(bucket)
                        self._fresh[bucket] = False
                        self._claimed[bucket] = True
                now, healthy = time.monotonic(), self._healthy_since
                if buckets and now - reaped_at >= reap_every and healthy is not None and (
                    now - healthy >= self._ttl
                ):
                    reaped_at = now
                    await self._reap_buckets(buckets)
                entries = await self._read_all(buckets)
                sent = await self._send_all(entries)
                failures = 0
            except REDIS_ERRORS as exc:
                self._incident.failed(exc)
                failures += 1
                sent = False
            except Exception:
                log.exception("events: the sender failed; trying again")
                failures += 1
                sent = False
            if failures:
                await asyncio.sleep(min(2.0, BATCH_WINDOW * 2 ** min(failures, 5)))
            elif not sent:
                self._idle.set()
                await asyncio.sleep(BATCH_WINDOW)

    async def _read_all(self, buckets: list[int]) -> list[tuple[int, bytes, Any]]:
        """What waits in `buckets`, oldest first per bucket: what this consumer read
        before and has not acknowledged (after a take-over or a failed send), else what is
        new. A bucket whose group Redis lost is taken over again."""
        if not buckets:
            return []
        async with self._topology.slots_for(self._stream(buckets[0])):
            pipe = self._topology.client.pipeline(transaction=False)
            for bucket in buckets:
                start = "0" if self._claimed[bucket] else ">"
                pipe.xreadgroup(GROUP, self._node, {self._stream(bucket): start},
                                count=BATCH_SIZE)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        entries: list[tuple[int, bytes, Any]] = []
        for bucket, reply in zip(buckets, replies, strict=True):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                self._fresh[bucket] = True  # Redis lost the group (and its data)
                continue
            if isinstance(reply, Exception):
                raise reply
            found = reply[0][1] if reply else []
            if not found:
                self._claimed[bucket] = False  # nothing left from before
            entries.extend((bucket, entry_id, fields) for entry_id, fields in found)
        return entries

    async def _send_all(self, entries: list[tuple[int, bytes, Any]]) -> bool:
        """POSTs of at most `BATCH_SIZE`, in turn; False when there was nothing."""
        for start in range(0, len(entries), BATCH_SIZE):
            chunk = entries[start:start + BATCH_SIZE]
            buckets = {bucket for bucket, _, _ in chunk}
            batch = [
                pending for bucket, entry_id, fields in chunk
                if (pending := self._pending(bucket, entry_id, fields)) is not None
            ]
            still = functools.partial(self._still_owned, buckets)
            if batch and not await self._delivery.send(batch, still):
                for bucket in buckets:
                    self._claimed[bucket] = True  # read again if it comes back
                return True
            await self._acknowledge(chunk)
        return bool(entries)

    def _still_owned(self, buckets: set[int]) -> bool:
        return all(self._owned[bucket] for bucket in buckets)

    async def _acknowledge(self, chunk: list[tuple[int, bytes, Any]]) -> None:
        """XACK and XDEL what was delivered; retried while this node owns the buckets (a
        node that lost them leaves it to the next owner, who sends it again)."""
        by_bucket: dict[int, list[bytes]] = {}
        for bucket, entry_id, _ in chunk:
            by_bucket.setdefault(bucket, []).append(entry_id)
        while True:
            try:
                async with self._topology.slots_for(self._stream(chunk[0][0])):
                    pipe = self._topology.client.pipeline(transaction=False)
                    for bucket, ids in by_bucket.items():
                        pipe.xack(self._stream(bucket), GROUP, *ids)
                        pipe.xdel(self._stream(bucket), *ids)
                    await pipe.execute()
                return
            except REDIS_ERRORS as exc:
                self._incident.failed(exc)
                if not self._still_owned(set(by_bucket)):
                    return
                await asyncio.sleep(0.5)

    async def _take_over(self, bucket: int) -> None:
        """The bucket is this node's now: claim what earlier owners read and did not
        acknowledge (their sends may not have arrived), to send it first."""
        stream = self._stream(bucket)
        client = self._topology.client
        async with self._topology.slots_for(stream):
            try:
                await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            start: Any = b"0-0"
            while True:  # (redis-py's justid=True drops the cursor)
                reply = await client.xautoclaim(
                    stream, GROUP, self._node, 0, start_id=start, count=BATCH_SIZE)
                start = reply[0]
                if start in (b"0-0", "0-0"):
                    break

    async def _read(self, stream: bytes, start: str) -> list[tuple[bytes, Any]]:
        async with self._topology.slots_for(stream):
            reply = await self._topology.client.xreadgroup(
                GROUP, self._node, {stream: start}, count=BATCH_SIZE)
        if not reply:
            return []
        entries: list[tuple[bytes, Any]] = reply[0][1]
        return entries

    def _pending(self, bucket: int, entry_id: bytes, fields: Any) -> Pending | None:
        """An entry as an event: its id is the node's (`i`, a client publish) or the
        bucket and entry id; its time the entry's (Redis's clock)."""
        if not fields:
            return None  # deleted meanwhile
        subject: bytes = fields.get(b"e", b"")
        if not subject.startswith(b"{"):
            return None
        event_id = fields.get(b"i") or b"%d-%s" % (bucket, entry_id)
        time_ms = int(entry_id.split(b"-")[0])
        name_at = subject.find(b'"name":"') + 8
        name = subject[name_at:subject.find(b'"', name_at)].decode()
        body = b'{"id":"%s","time_ms":%d,%s' % (event_id, time_ms, subject[1:])
        return Pending(name, time_ms, body)

    # Redis

    async def _run(self, calls: Sequence[Call]) -> list[Any]:
        """Scripts in one pipelined round trip (loaded once when Redis lacks them)."""
        return await run_scripts(self._topology, calls)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
