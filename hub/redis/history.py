"""A channel's history in Redis, and publishing into it (PROTOCOL §5, §6): the Lua scripts
that publish (HINCRBY the offset, XADD, PUBLISH, in one step), read history and start a new
epoch, and what a node computes for their arguments: candidate epochs, publish deadlines,
and when to set the keys' TTL (`ExpiryClock`). Nothing here talks to Redis; the broker
(`hub.redis.broker`) runs these.
"""

from __future__ import annotations

import math
import random
from typing import Any

from hub.redis.scripts import NOW_LUA, ttl_ms

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
# was on its way goes as one script, run in queue order (`hub.redis.batcher.Batcher`), so a
# crowd of publishes costs one round trip, one EVALSHA and one TIME between them.
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
# asks (once a minute per channel at most: `ExpiryClock`) and at
# every epoch's first message.
# Returns one entry per publication: {offset, epoch}, 1 for a relay, false past its
# deadline, or {'err', message} when Redis refused one of its commands (the others ran).
PUBLISH_BATCH_LUA = (
    NOW_LUA
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
    NOW_LUA
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


# Arguments of one publication in the publish script, by its kind (its first argument):
# a relayed frame (b"r": kind, deadline, topic, payload) or a message with history (b"h",
# b"H": kind, deadline, topic, payload, expiry, size, expected epoch, candidate epoch).
_ITEM_LENGTHS = {b"r": 4, b"h": 8, b"H": 8}


def renew_deadlines(items: list[Any], deadline_ms: int) -> None:
    """Give every publication of a flat batch `deadline_ms` (the second argument of each)."""
    at = 0
    while at < len(items):
        items[at + 1] = deadline_ms
        at += _ITEM_LENGTHS[items[at]]


class ExpiryClock:
    """When this node last set the TTL of a channel's history keys, and the epoch it last
    saw: a publish sets the TTL only every `every` seconds per channel (a tenth of the TTL,
    5 s to a minute), to the history's TTL plus that plus the longest a publish may wait for
    Redis (`grace`), so the keys
    outlive every publication by at least the TTL whichever node published it, and the
    script runs no PEXPIRE on most publishes. Short TTLs (under `min_ttl`) are set on every
    publish, exactly. Bounded: past `limit` channels it starts over (each channel's next
    publish then sets the TTL and reads the epoch)."""

    def __init__(
        self, every: float = 60.0, grace: float = 4.0, min_ttl: float = 60.0,
        limit: int = 65_536,
    ) -> None:
        self._every = every  # at most; a tenth of the TTL when that is less (5 s at least)
        self._grace = grace
        self._min_ttl = min_ttl
        self._limit = limit
        self._seen: dict[str, tuple[str, float]] = {}

    def plan(self, channel: str, ttl: float, now: float) -> tuple[str, int, bool, float]:
        """(expected epoch or '', TTL to set in ms, set it now, the time to remember if the
        publish succeeds); `now` is `time.monotonic()` before it is sent."""
        seen = self._seen.get(channel)
        if ttl < self._min_ttl:
            return (seen[0] if seen else "", ttl_ms(ttl), True, now)
        every = min(self._every, max(5.0, ttl / 10))
        expire = ttl_ms(ttl) + int((every + self._grace) * 1000)
        if seen is None:
            return "", expire, True, now
        epoch, refreshed = seen
        if now - refreshed >= every:
            return epoch, expire, True, now
        return epoch, expire, False, refreshed

    def saw(self, channel: str, epoch: str, refreshed: float) -> None:
        if len(self._seen) >= self._limit and channel not in self._seen:
            self._seen.clear()
        self._seen[channel] = (epoch, refreshed)

    def learn(self, channel: str, epoch: str) -> None:
        """An epoch read elsewhere (a history read): the next publish expects it, and sets
        the TTL (when it was last set is not known)."""
        if channel not in self._seen:
            self.saw(channel, epoch, -math.inf)

    def forget(self, channel: str) -> None:
        self._seen.pop(channel, None)
