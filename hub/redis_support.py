"""What the Redis broker and presence share: their Lua scripts and the incident log.

Kept apart from `hub.redis_broker` and `hub.redis_presence` so neither imports the other;
nothing here talks to Redis.

Every script reads the clock with Redis `TIME`, so expiry is judged by one clock for the
whole cluster, not by each node's own.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import NamedTuple

_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# The epoch of a channel and its last offset live in its meta hash as one field: the name is
# the epoch, the value offset + 1 (an epoch at offset 0 is worth 1). A publish names the
# epoch its node expects and increments that field blind, so one command reads and advances
# the offset; HINCRBY answering 1 means the field was not there (the node's guess is stale or
# the meta is gone), and the field it made is taken back. A channel whose meta is gone, or
# whose stream is gone while the meta says messages were published, lost its history: it
# starts a new epoch at offset 0. That is how "Redis restarted empty" (or evicted a key)
# turns into a new epoch, and only that. `meta_of` also reads the format before this one
# (fields `e` and `s`) and rewrites it in place, keeping the key's TTL.
_META = """
local function meta_of(meta_key)
  local fields = redis.call('HGETALL', meta_key)
  if #fields == 2 then return fields[1], tonumber(fields[2]) - 1 end
  local epoch, top = nil, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then epoch = fields[i + 1]
    elseif fields[i] == 's' then top = tonumber(fields[i + 1]) end
  end
  if epoch then
    redis.call('HSET', meta_key, epoch, top + 1)
    redis.call('HDEL', meta_key, 'e', 's')
    return epoch, top
  end
  if #fields > 0 then redis.call('DEL', meta_key) end
  return nil, 0
end
"""

_EPOCH = (
    _META
    + """
local stream_key, meta_key, ttl_ms = KEYS[1], KEYS[2], ARGV[1]
local epoch, top = meta_of(meta_key)
if not epoch or (top > 0 and redis.call('EXISTS', stream_key) == 0) then
  epoch, top = ARGV[2], 0
  redis.call('DEL', stream_key, meta_key)
  redis.call('HSET', meta_key, epoch, 1)
  redis.call('PEXPIRE', meta_key, ttl_ms)
end
"""
)

# Publications go to Redis in batches: whatever a node queued while its previous round trip
# was on its way goes as one script, run in queue order (`hub.redis_broker.Batcher`), so a crowd
# of publishes costs one round trip, one EVALSHA and one TIME between them.
#
# Each carries a deadline on the Redis clock: when Redis runs it later than that (it was
# frozen, or the command sat in a buffer), the node has already answered `unavailable`, and
# PROTOCOL §5 says such a publish reaches nobody. So it is refused here.
#
# KEYS: the stream and meta of each publication's channel (for a relay, unused but for
# routing: on a Cluster they say which shard runs the script; a batch there is one
# channel's). ARGV[1]: PUBLISH or SPUBLISH; then per publication its kind and arguments:
#   'r' (relay only), deadline_ms, pub/sub topic, payload; or
#   'h' (with history; 'H': and set the keys' TTL now), deadline_ms, pub/sub topic, payload,
#   expire_ms, stream size, expected epoch ('' = none), candidate epoch.
# A relay is the PUBLISH alone. With history, the payload is a JSON object without offset
# and epoch, to which the script adds them; the stream entry ID is the offset, so ranges by
# offset are plain XRANGEs; `t` is when it was added, so entries expire one by one like in
# MemoryBroker. PUBLISH happens here, in offset order, so every node sees offsets ascend.
# On the common path that is HINCRBY, XADD (NOMKSTREAM: a stream that is gone is noticed
# by it, not by an EXISTS) and PUBLISH. The keys' TTL is set to `expire_ms` when the node
# asks (once a minute per channel at most: `hub.redis_broker.ExpiryClock`) and at
# every epoch's first message.
# Returns one entry per publication: {offset, epoch}, 1 for a relay, false past its
# deadline, or {'err', message} when Redis refused one of its commands (the others ran).
PUBLISH_BATCH_LUA = (
    _NOW
    + _META
    + """
local command = ARGV[1]
local stamp = string.format('%d', now)

local function publish(stream_key, meta_key, a)
  local topic, payload, expire_ms, size = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local guess, refresh = ARGV[a + 6], ARGV[a] == 'H'
  local epoch, offset = nil, 0
  if guess ~= '' then
    offset = redis.call('HINCRBY', meta_key, guess, 1) - 1
    if offset > 0 then epoch = guess else redis.call('HDEL', meta_key, guess) end
  end
  if not epoch then
    epoch = meta_of(meta_key)
    if epoch then offset = redis.call('HINCRBY', meta_key, epoch, 1) - 1 end
  end
  local entry = nil
  if epoch then
    entry = string.sub(payload, 1, -2) .. ',"offset":' .. string.format('%d', offset)
      .. ',"epoch":"' .. epoch .. '"}'
    local id = string.format('%d', offset)
    if offset == 1 then
      refresh = true
      redis.call('XADD', stream_key, 'MAXLEN', size, id, 'd', entry, 't', stamp)
    elseif not redis.call('XADD', stream_key, 'NOMKSTREAM', 'MAXLEN', size, id,
        'd', entry, 't', stamp) then
      entry = nil  -- the stream is gone while the meta says messages were published
    end
  end
  if not entry then
    epoch, offset, refresh = ARGV[a + 7], 1, true
    redis.call('DEL', stream_key, meta_key)
    redis.call('HSET', meta_key, epoch, 2)
    entry = string.sub(payload, 1, -2) .. ',"offset":1,"epoch":"' .. epoch .. '"}'
    redis.call('XADD', stream_key, 'MAXLEN', size, '1', 'd', entry, 't', stamp)
  end
  if refresh then
    redis.call('PEXPIRE', stream_key, expire_ms)
    redis.call('PEXPIRE', meta_key, expire_ms)
  end
  redis.call(command, topic, entry)
  return {offset, epoch}
end

local function item(i, a)
  if now > tonumber(ARGV[a + 1]) then return false end
  if ARGV[a] == 'r' then
    redis.call(command, ARGV[a + 2], ARGV[a + 3])
    return 1
  end
  return publish(KEYS[2 * i - 1], KEYS[2 * i], a)
end

local results = {}
local a = 2
for i = 1, #KEYS / 2 do
  local ok, result = pcall(item, i, a)
  a = a + (ARGV[a] == 'r' and 4 or 8)
  if ok then
    results[i] = result
  else
    local text = type(result) == 'table' and result.err or tostring(result)
    results[i] = {'err', text}
  end
end
return results
"""
)

# KEYS: stream, meta. ARGV: ttl_ms, candidate epoch, limit, has_since (0/1), since offset,
# since epoch. Returns {epoch, offset, complete (0/1), payload...}, oldest first, with the
# semantics of MemoryBroker.history. Position and messages come from one atomic read.
HISTORY_LUA = (
    _NOW
    + _EPOCH
    + """
local cutoff = now - tonumber(ttl_ms)
local limit = tonumber(ARGV[3])
local result = {epoch, top, 1}
local function held(entry) return tonumber(entry[2][4]) > cutoff end
if ARGV[4] == '0' then
  if limit > 0 then
    local entries = redis.call('XREVRANGE', stream_key, '+', '-', 'COUNT', limit)
    for i = #entries, 1, -1 do
      if held(entries[i]) then result[#result + 1] = entries[i][2][2] end
    end
  end
  return result
end
local since = tonumber(ARGV[5])
if ARGV[6] ~= epoch or since > top then
  result[3] = 0
  return result
end
if since == top then return result end
local start = math.max(since + 1, 0)
local checked = false
repeat
  local entries = redis.call('XRANGE', stream_key, string.format('%d', start), '+',
    'COUNT', math.max(limit - (#result - 3), 1))
  if #entries == 0 then break end
  for _, entry in ipairs(entries) do
    local id = tonumber(string.match(entry[1], '^(%d+)'))
    if not checked then
      checked = true
      if id ~= since + 1 or not held(entry) then result[3] = 0 end
    end
    if held(entry) and #result - 3 < limit then result[#result + 1] = entry[2][2] end
    start = id + 1
  end
until #result - 3 >= limit
if not checked then result[3] = 0 end
return result
"""
)

# Presence: a hash (field -> value) and a zset (field -> expiry, ms on the Redis clock) per
# key pair, like Centrifuge's presence_redis.go. Entries that nobody refreshes expire one by
# one; the keys themselves expire when nobody refreshes anything.
_FORGET_EXPIRED = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #dead, 1000 do
  redis.call('HDEL', KEYS[1], unpack(dead, i, math.min(i + 999, #dead)))
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"""

# KEYS: hash, zset. ARGV: ttl_ms, field, value, field, value...
TOUCH_LUA = (
    _NOW
    + _FORGET_EXPIRED
    + """
local expire_at = string.format('%d', now + tonumber(ARGV[1]))
local scored = {}
for i = 2, #ARGV, 2 do
  scored[#scored + 1] = expire_at
  scored[#scored + 1] = ARGV[i]
end
if #scored > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  redis.call('ZADD', KEYS[2], unpack(scored))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return #scored / 2
"""
)

# KEYS: hash, zset. Returns field, value, field, value... of the live entries.
LIVE_LUA = (
    _NOW
    + _FORGET_EXPIRED
    + """
local alive = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. string.format('%d', now), '+inf')
local result = {}
for i = 1, #alive, 1000 do
  local last = math.min(i + 999, #alive)
  local values = redis.call('HMGET', KEYS[1], unpack(alive, i, last))
  for j = 1, #values do
    if values[j] then
      result[#result + 1] = alive[i + j - 1]
      result[#result + 1] = values[j]
    end
  end
end
return result
"""
)

# KEYS: hash, zset. ARGV: fields to drop.
FORGET_LUA = """
for i = 1, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, last))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, last))
end
return #ARGV
"""


# KEYS: stream, meta. ARGV: ttl_ms, candidate epoch, stale epoch. The node found the channel's
# offset below one it had delivered in `stale` (a failover lost writes): unless another node
# did it already, the channel starts a new epoch at offset 0. Returns {epoch, offset}.
RESTART_EPOCH_LUA = (
    _META
    + """
local stream_key, meta_key = KEYS[1], KEYS[2]
local epoch, top = meta_of(meta_key)
if epoch and epoch ~= ARGV[3] then return {epoch, top} end
redis.call('DEL', stream_key, meta_key)
redis.call('HSET', meta_key, ARGV[2], 1)
redis.call('PEXPIRE', meta_key, ARGV[1])
return {ARGV[2], 0}
"""
)


def epoch_candidate() -> str:
    """The epoch a script starts if the channel needs a new one: fresh for every call (a
    channel's new epoch must differ from its last), random enough (32 bits), and without
    the getrandom syscall that `secrets` makes on every publish."""
    return f"{random.getrandbits(32):08x}"


class Script(NamedTuple):
    """A Lua script run by its SHA1, loaded on the server that lacks it (a restarted or
    promoted one). A script that was not loaded did not run, so running it again is safe."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


class Incident:
    """Logs when something starts failing and when it works again, with how long it lasted,
    not every failure between: a Redis outage under load would otherwise write one line per
    message. It works again once it has not failed for `QUIET_SECONDS` (on a Cluster with
    one shard down, commands to the others succeed between the failures), or at once when
    the caller knows (`for_sure`: a connection is up again)."""

    QUIET_SECONDS = 2.0

    def __init__(
        self, logger: logging.Logger, what: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._what = what
        self._clock = clock
        self._failures = 0
        self._started_at = 0.0
        self._failed_at = 0.0

    @property
    def ongoing(self) -> bool:
        return self._failures > 0

    def failed(self, exc: BaseException) -> None:
        self._failures += 1
        self._failed_at = self._clock()
        if self._failures == 1:
            self._started_at = self._failed_at
            self._logger.warning("%s failing: %s: %s", self._what, type(exc).__name__, exc)
        else:
            self._logger.debug("%s still failing: %s", self._what, exc)

    def recovered(self, *, for_sure: bool = False) -> None:
        if not self._failures:
            return
        now = self._clock()
        if for_sure or now - self._failed_at >= self.QUIET_SECONDS:
            # Without `for_sure` the end is only known to lie between the last failure and
            # now: the last failure is what is said.
            ended = now if for_sure else self._failed_at
            self._logger.info("%s works again after %.2f s (%d failures)", self._what,
                              ended - self._started_at, self._failures)
            self._failures = 0
