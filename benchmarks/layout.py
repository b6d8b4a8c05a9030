"""Who is where: the node and channel of each subscriber connection, the channel and
sequence number of each message.

Connection *i* goes to node *i mod N* and to channel *(i div N) mod C*: every channel then
has its subscribers on every node. (Channel *i mod C* would put all of a channel's
subscribers on one node whenever C is a multiple of N, and each message would cross to one
node only, which is not the load a cluster sees.)

Message *g* goes to channel *g mod C* (round-robin) and carries `seq` = *g div C*, its
position in its channel's stream: a subscriber must see 0, 1, 2, ... on its channel.

With `personal` (`--personal`) every connection is a channel of its own, its user's
personal channel: connection *i* is user `bench-i`, on channel *i* (`@bench-i`), and
message *g* goes to user `bench-(g mod S)` through `/api/send`.
"""

from __future__ import annotations

PREFIX = "bench:fanout"


def channel_name(channel: int, channels: int, personal: bool = False) -> str:
    """`bench:fanout` for a single channel (as before there were many), else
    `bench:fanout.K`; `@bench-K` for personal channels."""
    if personal:
        return f"@{user_name(channel)}"
    return PREFIX if channels == 1 else f"{PREFIX}.{channel}"


def user_name(connection: int) -> str:
    return f"bench-{connection}"


def node_of(connection: int, nodes: int) -> int:
    return connection % nodes


def channel_of(connection: int, nodes: int, channels: int, personal: bool = False) -> int:
    return connection if personal else (connection // nodes) % channels


def messages_on(channel: int, messages: int, channels: int) -> int:
    """How many of `messages` round-robin messages land on `channel`."""
    return max(0, (messages - channel + channels - 1) // channels)


def subscribers_per_channel(
    subscribers: int, nodes: int, channels: int, personal: bool = False
) -> list[int]:
    counts = [0] * channels
    for connection in range(subscribers):
        counts[channel_of(connection, nodes, channels, personal)] += 1
    return counts
