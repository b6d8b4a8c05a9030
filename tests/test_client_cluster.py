"""`hub.client` on a cluster of three real node processes and a real Redis, through faults
(PROTOCOL §5, §17): the node it is connected to is killed, Redis restarts with its data,
then Redis restarts empty. Meanwhile a publisher goes on through the API of a node that
is not killed. The application sees every message once and in order, and one `Reset`,
where the contract puts it: when the history was lost (the empty restart), and nowhere
else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hub.client import Message, Reset, Subscription, connect
from tests.redis_server import RedisServer
from tests.support import NodeProcess, eventually, http_client, token
from tests.test_cluster import unique, wait_ready
from tests.test_cluster_faults import nodes_on

Factory = Callable[..., RedisServer]


@dataclass
class Publisher:
    """Publishes 1, 2, 3, ... every 20 ms through one node's API; remembers the position of
    each accepted message (refused ones, while Redis is down, were not published)."""

    http: httpx.AsyncClient
    node: NodeProcess
    channel: str
    accepted: dict[int, tuple[int, str]] = field(default_factory=dict)  # n → offset, epoch
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            n += 1
            try:
                response = await self.http.post(
                    self.node.url + "/api/publish", json={"channel": self.channel, "data": n})
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                reply = response.json()
                self.accepted[n] = (reply["offset"], reply["epoch"])
            await asyncio.sleep(0.02)


async def collect(subscription: Subscription, into: list[Message | Reset]) -> None:
    async for item in subscription:
        into.append(item)


def seen_up_to(items: list[Message | Reset], n: int) -> bool:
    return any(isinstance(item, Message) and item.data >= n for item in items)


async def test_every_message_once_in_order_or_a_reset_through_faults(
    redis_factory: Factory, tmp_path: Path
) -> None:
    server = redis_factory(durable=True)
    channel = unique("feed:client")
    items: list[Message | Reset] = []
    async with http_client() as http, nodes_on(server, tmp_path, 3) as (a, b, c), \
            connect([a.ws_url, b.ws_url, c.ws_url], token=token(unique("consumer")),
                    backoff_min=0.05, backoff_max=0.5) as client:
        assert client.node == "fault-a"
        subscription = await client.subscribe(channel)
        collector = asyncio.create_task(collect(subscription, items))
        publisher = Publisher(http, c, channel)
        publishing = asyncio.create_task(publisher.run())

        async def published_and_seen(more: int) -> None:
            target = max(publisher.accepted, default=0) + more
            await eventually(lambda: seen_up_to(items, target), within=15,
                             what=f"message {target} seen by the client")

        try:
            await published_and_seen(5)

            # 1. the node the client is on dies without a word: it goes to the next one
            await asyncio.to_thread(a.kill)
            await published_and_seen(10)
            assert client.node in ("fault-b", "fault-c") and client.connects == 2

            # 2. Redis restarts with its data: no loss, no reset
            await asyncio.to_thread(server.stop)
            await wait_ready(http, c, 503, timeout=5)
            await asyncio.to_thread(server.start, keep_data=True)
            await wait_ready(http, c, 200)
            await published_and_seen(10)
            assert not any(isinstance(item, Reset) for item in items)

            # 3. Redis restarts empty: history is lost, so one Reset, then the new epoch
            await asyncio.to_thread(server.kill)
            await wait_ready(http, c, 503, timeout=5)
            await asyncio.to_thread(server.start, keep_data=False)
            await wait_ready(http, c, 200)
            await published_and_seen(10)
        finally:
            publisher.stopped.set()
            await publishing
        last = max(publisher.accepted)
        await eventually(lambda: seen_up_to(items, last), within=10,
                         what="the last message seen")
        collector.cancel()

    resets = [index for index, item in enumerate(items) if isinstance(item, Reset)]
    assert len(resets) == 1, [item for item in items if isinstance(item, Reset)]
    before, reset, after = items[:resets[0]], items[resets[0]], items[resets[0] + 1:]
    assert isinstance(reset, Reset)
    old_epoch = next(item.epoch for item in before if isinstance(item, Message))
    assert reset.epoch != old_epoch

    for segment, epoch, start in ((before, old_epoch, 1), (after, reset.epoch,
                                                          reset.offset + 1)):
        messages = [item for item in segment if isinstance(item, Message)]
        assert len(messages) == len(segment)
        # once and in order: consecutive offsets of one epoch, data rising with them
        assert {m.epoch for m in messages} == {epoch}
        assert [m.offset for m in messages] == list(range(start, start + len(messages)))
        assert [m.data for m in messages] == sorted(m.data for m in messages)
        # each message accepted in that epoch and not covered by the reset was seen
        delivered = {m.data: m.offset for m in messages}
        top = messages[-1].offset
        assert top is not None and len(messages) >= 3
        for n, (offset, accepted_epoch) in publisher.accepted.items():
            if accepted_epoch == epoch and start <= offset <= top:
                assert delivered.get(n) == offset, (n, offset)
    # after the reset nothing accepted in the new epoch is missing
    top_after = max(offset for offset, epoch in publisher.accepted.values()
                    if epoch == reset.epoch)
    assert isinstance(items[-1], Message) and items[-1].offset == top_after
