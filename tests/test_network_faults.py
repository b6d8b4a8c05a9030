"""Network faults between nodes and Redis (PROTOCOL §5, §6; issue 20), through the TCP fault
proxy of `tests.faultproxy`: three real nodes, each on Redis through a proxy of its own, a
numbered stream published through each, a subscriber on each node to every stream, and
presence. Node a's link to Redis is partitioned (RST), blackholed, slowed and throttled in
turn; after each fault:

- every subscriber got every accepted publication once, in order (no gap, no duplicate),
  and none that was refused, but for the one a partition may cut between Redis running it
  and its reply (the node cannot tell; docs/protocol.md §5 says so);
- a partition or blackhole was noticed within 1 s (/readyz 503) and service resumed within
  200 ms (+ the probe's own poll) of the link being healed (/readyz 200);
- presence lists exactly who is connected, on every node, within TTL + 1 s, though a
  member left during the fault.

The times are written to $HUB_FAULT_REPORT (JSON) when it is set: that is how the numbers
of issue 20 were taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hub.settings import Namespace
from tests.faultproxy import FaultProxy
from tests.redis_server import RedisServer
from tests.support import (
    API_KEY,
    WAIT,
    Client,
    RunningNode,
    connect,
    eventually,
    make_settings,
    running_node,
    token,
)

TTL = 3.0
FAULT_SECONDS = float(os.environ.get("HUB_FAULT_SECONDS", "2.0"))
DETECT_WITHIN = 1.0  # PROTOCOL §5
# PROTOCOL §5 says 200 ms; the test allows for its own polling (/readyz every 20 ms, through
# an event loop it shares with three nodes, three proxies and the clients) on a busy
# machine. Before issue 20 this took 0.9-1.4 s.
RESUME_WITHIN = 0.5
ROOM = "room:all"
NAMESPACES = {
    "feed": Namespace(subscribe="any", publish="any", history_size=10_000, history_ttl=300),
    "room": Namespace(subscribe="any", presence=True, join_leave=True),
}
NODES = ("a", "b", "c")


@dataclass
class Publisher:
    """Publishes 1, 2, 3... to `channel` through `node`'s API every 25 ms."""

    node: RunningNode
    channel: str
    accepted: dict[int, int] = field(default_factory=dict)  # offset -> data
    refused: set[int] = field(default_factory=set)
    unknown: set[int] = field(default_factory=set)  # the answer was lost
    accepted_at: list[float] = field(default_factory=list)
    refusals: list[tuple[float, float]] = field(default_factory=list)  # (sent at, took)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.node.url, headers={"X-API-Key": API_KEY},
                                     timeout=3.0) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                sent_at = time.monotonic()
                try:
                    response = await http.post("/api/publish",
                                               json={"channel": self.channel, "data": n})
                except httpx.HTTPError:
                    self.unknown.add(n)
                else:
                    if response.status_code == 200:
                        self.accepted[response.json()["offset"]] = n
                        self.accepted_at.append(time.monotonic())
                    else:
                        assert response.status_code == 503, response.text
                        self.refused.add(n)
                        self.refusals.append((sent_at, time.monotonic() - sent_at))
                await asyncio.sleep(0.025)


@dataclass
class Subscriber:
    """A client reading every frame in the background, by channel."""

    client: Client
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await self.client.recv(timeout=3600)
                if frame["type"] in ("message", "reset"):
                    self.received.setdefault(frame["channel"], []).append(frame)


@contextlib.asynccontextmanager
async def cluster(redis: RedisServer) -> AsyncIterator[tuple[list[FaultProxy], list[RunningNode]]]:
    async with contextlib.AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(FaultProxy("127.0.0.1", redis.port))
                   for _ in NODES]
        nodes = []
        for name, proxy in zip(NODES, proxies, strict=True):
            settings = make_settings(redis_url=proxy.url(), node_id=name, presence_ttl=TTL,
                                     namespaces=NAMESPACES)
            nodes.append(await stack.enter_async_context(running_node(settings)))
        yield proxies, nodes


async def ready(http: httpx.AsyncClient, node: RunningNode) -> int:
    try:
        return (await http.get(node.url + "/readyz", timeout=0.5)).status_code
    except httpx.HTTPError:
        return 0


async def listed(http: httpx.AsyncClient, node: RunningNode) -> set[str]:
    try:
        response = await http.get(node.url + f"/api/presence/{ROOM}", timeout=1.0)
    except httpx.HTTPError:
        return {"<no answer>"}
    if response.status_code != 200:
        return {f"<{response.status_code}>"}
    return {member["client"] for member in response.json()["clients"]}


async def until(probe: Callable[[], Awaitable[bool]], within: float) -> float | None:
    """Seconds until `probe()` is true (polled by `eventually`), None if not `within`."""
    started = time.monotonic()
    try:
        await eventually(probe, within=within)
    except AssertionError:
        return None
    return time.monotonic() - started


async def test_three_nodes_through_partition_blackhole_latency_and_throttle(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory()
    report: dict[str, dict[str, float | None]] = {}
    async with cluster(server) as (proxies, nodes), contextlib.AsyncExitStack() as stack, \
            httpx.AsyncClient(headers={"X-API-Key": API_KEY}) as http:
        a = nodes[0]
        subscribers: list[Subscriber] = []
        for n, node in enumerate(nodes):
            client = await stack.enter_async_context(connect(node.ws_url, token(f"s{n}")))
            for name in NODES:
                assert (await client.subscribe(f"feed:{name}"))["type"] == "subscribed"
            assert (await client.subscribe(ROOM))["type"] == "subscribed"
            subscribers.append(Subscriber(client))
        for subscriber in subscribers:
            subscriber.start()
        staying = {s.client.welcome["client"] for s in subscribers}
        publishers = [Publisher(node, f"feed:{name}") for node, name in zip(nodes, NODES,
                                                                             strict=True)]
        running = [asyncio.create_task(p.run()) for p in publishers]

        async def settled() -> bool:
            for node in nodes:
                if await listed(http, node) != staying:
                    return False
            return True

        try:
            assert await until(settled, WAIT) is not None
            for fault in ("partition", "blackhole", "latency", "throttle"):
                async with connect(a.ws_url, token(f"leaver-{fault}")) as leaver:
                    assert (await leaver.subscribe(ROOM))["type"] == "subscribed"
                    leaving = leaver.welcome["client"]

                    async def leaver_listed(client: str = leaving) -> bool:
                        return all([client in await listed(http, node) for node in nodes])

                    assert await until(leaver_listed, WAIT) is not None
                    start_fault(proxies[0], fault)
                    faulted_at = time.monotonic()
                    down = asyncio.create_task(until(lambda: _is(ready(http, a), 503),
                                                     FAULT_SECONDS))
                    # A subscribe sent before the fault is noticed: an answer within 1 s.
                    asked = time.monotonic()
                    reply = await leaver.request({"type": "subscribe",
                                                  "channel": f"feed:new-{fault}"})
                    answered = time.monotonic() - asked
                    await asyncio.sleep(max(0.0, asked + 0.3 - time.monotonic()))
                # the leaver is gone, during the fault
                detected = await down
                await asyncio.sleep(max(0.0, faulted_at + FAULT_SECONDS - time.monotonic()))
                proxies[0].heal()
                healed_at = time.monotonic()
                resumed = await until(lambda: _is(ready(http, a), 200), 10)
                settle = await until(settled, TTL + 3)
                publishing = await first_accepted_after(publishers[0], healed_at)
                report[fault] = {
                    "detected_s": detected, "readyz_200_after_heal_s": resumed,
                    "presence_settled_after_heal_s": settle,
                    "publish_accepted_after_heal_s": publishing,
                    "subscribe_answered_s": answered,
                    "slowest_refused_publish_s": max(
                        [took for sent, took in publishers[0].refusals if sent >= faulted_at],
                        default=None,
                    ),
                }
                if fault in ("partition", "blackhole"):
                    assert reply["type"] == "error" and reply["code"] == "unavailable", reply
        finally:
            for publisher in publishers:
                publisher.stop.set()
            await asyncio.gather(*running)

        for publisher in publishers:  # every subscriber has caught up
            top = max(publisher.accepted)
            for subscriber in subscribers:
                def caught_up(s: Subscriber = subscriber, p: Publisher = publisher,
                              t: int = top) -> Any:
                    return _true(any(f.get("offset") == t
                                     for f in s.received.get(p.channel, [])))

                assert await until(caught_up, WAIT) is not None, (publisher.channel, top)
        for subscriber in subscribers:
            if subscriber.task is not None:
                subscriber.task.cancel()

    if os.environ.get("HUB_FAULT_REPORT"):
        await asyncio.to_thread(Path(os.environ["HUB_FAULT_REPORT"]).write_text,
                                json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    for publisher in publishers:
        for subscriber in subscribers:
            frames = subscriber.received[publisher.channel]
            assert not [f for f in frames if f["type"] == "reset"], publisher.channel
            offsets = [f["offset"] for f in frames]
            assert offsets == list(range(offsets[0], offsets[-1] + 1)), (
                f"{publisher.channel}: gap or duplicate"
            )
            got = {f["offset"]: f["data"] for f in frames}
            for offset, data in publisher.accepted.items():
                assert got.get(offset) == data, (publisher.channel, offset)
            # A partition's RST can land between Redis running a publish and its reply: the
            # node answers `unavailable` for a publish that was stored. At most one per
            # partition (the publisher has one in flight), and only on node a.
            leaked = publisher.refused & set(got.values())
            allowed = 1 if publisher.node is a else 0
            assert len(leaked) <= allowed, f"refused publishes arrived: {sorted(leaked)}"
    for fault in ("partition", "blackhole"):
        times = report[fault]
        assert times["detected_s"] is not None and times["detected_s"] <= DETECT_WITHIN, times
        resumed = times["readyz_200_after_heal_s"]
        assert resumed is not None and resumed <= RESUME_WITHIN, times
        took = times["subscribe_answered_s"]
        assert took is not None and took <= DETECT_WITHIN, times
        slowest = times["slowest_refused_publish_s"]
        assert slowest is not None and slowest <= DETECT_WITHIN, times
    for fault in ("latency", "throttle"):
        assert report[fault]["detected_s"] is None, (fault, report[fault])
    for fault, times in report.items():
        settle = times["presence_settled_after_heal_s"]
        assert settle is not None and settle <= TTL + 1, (fault, times)


async def first_accepted_after(publisher: Publisher, healed_at: float) -> float | None:
    """Seconds from `healed_at` to the first publish accepted after it."""
    def accepted() -> list[float]:
        return [t for t in publisher.accepted_at if t > healed_at]

    if await until(lambda: _true(bool(accepted())), 10) is None:
        return None
    return min(accepted()) - healed_at


def start_fault(proxy: FaultProxy, fault: str) -> None:
    if fault == "partition":
        proxy.partition()
    elif fault == "blackhole":
        proxy.blackhole()
    elif fault == "latency":
        proxy.latency(0.08, 0.04)
    else:
        proxy.bandwidth(50_000)


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


async def _true(value: bool) -> bool:
    return value


async def test_clients_cut_off_from_their_node_leave_presence_and_say_leave(
    redis_url: str,
) -> None:
    """Between clients and a node: one client's link is partitioned (RST), another's
    blackholed. The node closes the first at once and the second at its keepalive (ping
    unanswered for an interval); both drop out of presence on every node, with a leave."""
    interval = 0.5
    settings = [
        make_settings(redis_url=redis_url, node_id=name, presence_ttl=TTL,
                      namespaces=NAMESPACES, ping_interval=interval)
        for name in ("a", "b")
    ]
    async with running_node(settings[0]) as a, running_node(settings[1]) as b, \
            httpx.AsyncClient(headers={"X-API-Key": API_KEY}) as http, \
            connect(b.ws_url, token("watcher")) as watcher:
        port = int(a.url.rsplit(":", 1)[1])
        async with FaultProxy("127.0.0.1", port) as cut, FaultProxy("127.0.0.1", port) as lost:
            through = [f"ws://127.0.0.1:{proxy.port}/ws" for proxy in (cut, lost)]
            async with connect(through[0], token("cut")) as one, \
                    connect(through[1], token("lost")) as two:
                assert (await watcher.subscribe(ROOM))["type"] == "subscribed"
                for client in (one, two):
                    assert (await client.subscribe(ROOM))["type"] == "subscribed"
                everyone = {c.welcome["client"] for c in (watcher, one, two)}

                async def listed_everywhere(expected: set[str]) -> bool:
                    return all([await listed(http, node) == expected for node in (a, b)])

                assert await until(lambda: listed_everywhere(everyone), WAIT) is not None
                cut.partition()
                lost.blackhole()
                started = time.monotonic()
                alone = {watcher.welcome["client"]}
                settled = await until(lambda: listed_everywhere(alone), 2 * interval + TTL + 1)
                assert settled is not None, await listed(http, a)
                assert settled <= 3 * interval + 1, settled
                left: set[str] = set()
                async with asyncio.timeout(WAIT):
                    while left != everyone - alone:
                        frame = await watcher.recv()
                        if frame["type"] == "leave":
                            left.add(frame["client"])
                assert time.monotonic() - started <= 3 * interval + 2
                for client in (one, two):  # no close handshake through a dead link
                    client.connection.transport.abort()
