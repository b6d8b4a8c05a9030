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

# The epoch of a channel lives in its meta hash (`e`) with the last offset (`s`). A channel
# whose meta is gone, or whose stream is gone while the meta says messages were published,
# lost its history: it starts a new epoch at offset 0. That is how "Redis restarted empty"
# (or evicted a key) turns into a new epoch, and only that.
_EPOCH = """
local stream_key, meta_key, ttl_ms = KEYS[1], KEYS[2], ARGV[1]
local meta = redis.call('HMGET', meta_key, 'e', 's')
local epoch, top = meta[1], tonumber(meta[2] or '0')
if not epoch or (top > 0 and redis.call('EXISTS', stream_key) == 0) then
  epoch, top = ARGV[2], 0
  redis.call('DEL', stream_key)
  redis.call('HSET', meta_key, 'e', epoch, 's', 0)
  redis.call('PEXPIRE', meta_key, ttl_ms)
end
"""

# A publish carries a deadline on the Redis clock (ARGV[1]): when Redis runs it later than
# that (it was frozen, or the command sat in a buffer), the node has already answered
# `unavailable`, and PROTOCOL §5 says such a publish reaches nobody. So it is refused here.
# KEYS: the channel's stream and meta (unused but for routing: on a Cluster they say which
# shard runs the script). ARGV: deadline_ms, pub/sub topic, payload, PUBLISH or SPUBLISH.
# Returns 1, or nil past the deadline.
RELAY_LUA = (
    _NOW
    + """
if now > tonumber(ARGV[1]) then return false end
redis.call(ARGV[4], ARGV[2], ARGV[3])
return 1
"""
)

# KEYS: stream, meta. ARGV: ttl_ms, candidate epoch, payload (a JSON object without offset
# and epoch), stream size, pub/sub topic, deadline_ms, PUBLISH or SPUBLISH. The stream entry
# ID is the offset, so ranges by offset are plain XRANGEs; `t` is when it was added, so
# entries expire one by one like in MemoryBroker. PUBLISH happens here, in offset order, so
# every node sees offsets ascend.
PUBLISH_LUA = (
    _NOW
    + """
if now > tonumber(ARGV[6]) then return false end
"""
    + _EPOCH
    + """
local offset = redis.call('HINCRBY', meta_key, 's', 1)
local payload = string.sub(ARGV[3], 1, -2) .. ',"offset":' .. string.format('%d', offset)
  .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', stream_key, 'MAXLEN', ARGV[4], string.format('%d', offset),
  'd', payload, 't', string.format('%d', now))
redis.call('PEXPIRE', stream_key, ttl_ms)
redis.call('PEXPIRE', meta_key, ttl_ms)
redis.call(ARGV[7], ARGV[5], payload)
return {offset, epoch}
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
RESTART_EPOCH_LUA = """
local stream_key, meta_key = KEYS[1], KEYS[2]
local meta = redis.call('HMGET', meta_key, 'e', 's')
if meta[1] and meta[1] ~= ARGV[3] then return {meta[1], tonumber(meta[2] or '0')} end
redis.call('DEL', stream_key)
redis.call('HSET', meta_key, 'e', ARGV[2], 's', 0)
redis.call('PEXPIRE', meta_key, ARGV[1])
return {ARGV[2], 0}
"""


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
