"""The HTTP publisher: keep-alive connections sharing one `Publishing` job.

Messages are claimed in order and go round-robin over the channels (`benchmarks.layout`),
each with `seq`, its number in its channel. By default every publisher connection sends
its next message as soon as its previous one was answered, whatever the channel: with P
publishers, up to P messages of one channel are in flight at once, on different nodes,
which is "published as fast as the API takes them". Their order is then the order the
hub's broker gave them, which its offsets state and the subscribers check
(`benchmarks.sequence`); `seq` order is not defined.

With `ordered` (`--ordered`) a message is sent only once the previous message of its
channel was answered, so concurrent publishers cannot overtake one another and `seq`
order is defined (checked too): on one channel that is one request at a time, handed
from connection to connection (and so from node to node); work on different channels
still runs side by side.

With `personal` (`--personal`) message *g* goes to user `bench-(g mod S)` through
`/api/send` (S = the channels = the subscribers, each on its own personal channel).

With `--batch B` one `POST /api/batch` carries B publications (or, with `personal`, B sends)
to B consecutive channels of the same round (a claim never wraps from the last channel to the
first), so the one `data` they share has the right `seq` for each of them. Socket.IO's peer
serves the same endpoint and body (`benchmarks/peers/socketio/server.mjs`), so both get one
request and one response for B messages.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.httpclient import exchange
from benchmarks.layout import channel_name, user_name
from benchmarks.processes import NodeProcess


@dataclass
class Claim:
    """One request: `size` messages from `index` on, on channels `channel`, `channel` + 1,
    ..., all with the same `seq`."""

    index: int
    channel: int
    size: int
    seq: int
    after: list[asyncio.Future[None]]  # `ordered`: the previous publish on these channels
    done: asyncio.Future[None]


@dataclass
class Publishing:
    messages: int
    batch: int
    rate: float
    payload: int
    deadline: float
    api_key: str
    channels: int = 1
    ordered: bool = False  # wait for the previous message of the channel (`--ordered`)
    personal: bool = False  # `/api/send` to user K instead of a publish on channel K
    next_index: int = 0
    published_on: list[int] = field(default_factory=list)  # per channel
    errors: int = 0
    first: float = 0.0
    last: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    measured: float = 0.0  # seconds from the start of publishing to the CPU readings
    latest: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # per channel

    def __post_init__(self) -> None:
        self.published_on = [0] * self.channels

    @property
    def published(self) -> int:
        return sum(self.published_on)

    def claim(self) -> Claim | None:
        if self.next_index >= self.messages or time.time() >= self.deadline:
            return None
        index = self.next_index
        channel = index % self.channels
        size = min(self.batch, self.messages - index, self.channels - channel)
        self.next_index += size
        done = asyncio.get_running_loop().create_future()
        after: list[asyncio.Future[None]] = []
        for number in range(channel, channel + size) if self.ordered else ():
            previous = self.latest.get(number)
            if previous is not None and not previous.done() and previous not in after:
                after.append(previous)
            self.latest[number] = done
        return Claim(index, channel, size, index // self.channels, after, done)

    def data(self, seq: int) -> bytes:
        sent = int(time.time() * 1e6)
        head = f'{{"seq":{seq},"sent":{sent},"pad":"'
        pad = max(0, self.payload - len(head) - 2)
        return (head + "x" * pad + '"}').encode()

    def request(self, claim: Claim) -> tuple[str, bytes]:
        data = self.data(claim.seq)
        if claim.size == 1:
            return self._single(claim.channel, data)
        commands = b",".join(self._command(claim.channel + k, data) for k in range(claim.size))
        return "/api/batch", b'{"commands":[' + commands + b"]}"

    def _single(self, channel: int, data: bytes) -> tuple[str, bytes]:
        if self.personal:
            user = user_name(channel).encode()
            return "/api/send", b'{"user":"' + user + b'","data":' + data + b"}"
        name = channel_name(channel, self.channels).encode()
        return "/api/publish", b'{"channel":"' + name + b'","data":' + data + b"}"

    def _command(self, channel: int, data: bytes) -> bytes:
        """One command of `/api/batch`: the body of `_single`'s call under its name."""
        if self.personal:
            user = user_name(channel).encode()
            return b'{"send":{"user":"' + user + b'","data":' + data + b"}}"
        name = channel_name(channel, self.channels).encode()
        return b'{"publish":{"channel":"' + name + b'","data":' + data + b"}}"

    def record(self, claim: Claim, status: int, reply: bytes) -> None:
        """Count what the answer says was published, per channel."""
        if status != 200:
            self.fail(claim.size, f"{status} {reply[:200]!r}")
            return
        if claim.size == 1:
            self.published_on[claim.channel] += 1
            return
        replies: list[dict[str, Any]] = json.loads(reply).get("replies", [])
        for offset, result in enumerate(replies[: claim.size]):
            if "error" in result:
                self.fail(1, f"{status} {json.dumps(result)[:200]}")
            else:
                self.published_on[claim.channel + offset] += 1
        if len(replies) < claim.size:
            self.fail(claim.size - len(replies), f"{status} {reply[:200]!r}")

    def fail(self, count: int, sample: str) -> None:
        self.errors += count
        if len(self.error_samples) < 5:
            self.error_samples.append(sample)


async def publisher(node: NodeProcess, job: Publishing, start: float) -> None:
    reader, writer = await asyncio.open_connection(node.host, node.port)
    try:
        while (claim := job.claim()) is not None:
            try:
                if not await _publish(node, job, claim, start, reader, writer):
                    return
            finally:
                claim.done.set_result(None)  # the next message of these channels may go
    finally:
        writer.close()


async def _publish(
    node: NodeProcess, job: Publishing, claim: Claim, start: float,
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
) -> bool:
    """One request, after the previous one on its channels; False: the connection broke."""
    for previous in claim.after:
        await previous
    if job.rate:
        delay = start + claim.index / job.rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
    path, body = job.request(claim)
    if not job.first:
        job.first = time.time()
    try:
        status, reply = await exchange(reader, writer, node.host, "POST", path, body,
                                       job.api_key)
    except (OSError, asyncio.IncompleteReadError) as exc:
        job.fail(claim.size, f"{node.name}: {exc!r}")
        return False
    job.record(claim, status, reply)
    job.last = time.time()
    return True
