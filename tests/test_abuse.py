"""The live-node layer of the fuzz suite (issue 13): a real node with a token, an API key and
a bystander receiving a numbered stream (~20 messages/s) on a history channel, while raw
sockets send it frame-level garbage and mutated commands on `/ws` and
`/connection/websocket`, and malformed HTTP requests (tests/abuse_traffic.py).

Judged: the node alive and ready, the bystander got every message in order with no gap, no
5xx, no ERROR record and no traceback in the logs (uvicorn's included), at most one INFO
line per reason and minute, RSS bounded. CI runs about 12 s of it; `pytest -m soak` runs
until a million frames were sent and prints what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hub.abuse import REASONS
from tests.abuse_traffic import Attack, Tally, Target
from tests.conftest import NAMESPACES
from tests.support import (
    API_KEY,
    WAIT,
    Client,
    RunningNode,
    connect,
    eventually,
    make_settings,
    metric,
    metric_of,
    running_node,
    token,
)

STREAM = "feed:stream"  # history on (tests/conftest.py); attackers may not publish to it
PUBLISH_EVERY = 0.05  # s: the bystander's stream at ~20 messages/s
SHORT_SECONDS = 10.0
SOAK_FRAMES = 1_000_000
SEED = 13
RSS_GROWTH_MIB = {"short": 64, "soak": 128}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Outcome:
    tally: Tally
    seconds: float
    published: int
    received: list[dict[str, Any]]
    rss_before_kib: int
    rss_after_kib: int
    protocol_errors: dict[str, float]
    ready: int
    records: list[logging.LogRecord]

    def report(self) -> str:
        errors = ", ".join(f"{r}: {int(n)}" for r, n in self.protocol_errors.items() if n)
        return (f"{self.seconds:.0f} s: {self.tally.summary()}\n"
                f"bystander: {len(self.received)} of {self.published} messages; "
                f"RSS {self.rss_before_kib / 1024:.1f} -> {self.rss_after_kib / 1024:.1f} MiB; "
                f"hub_protocol_errors_total: {errors}; log records at INFO and up: "
                f"{len(self.records)}")


async def receive_stream(client: Client, into: list[dict[str, Any]]) -> None:
    with contextlib.suppress(Exception):
        while True:
            frame = await client.recv(timeout=60)
            if frame.get("type") == "message" and frame.get("channel") == STREAM:
                into.append(frame)


async def publish_stream(running: RunningNode, stop: asyncio.Event) -> int:
    """Publish {"n": 0}, {"n": 1}, ... on a PUBLISH_EVERY beat (catching up when a call was
    slow) until `stop`; returns how many."""
    published = 0
    started = time.monotonic()
    while not stop.is_set():
        response = await running.http.post("/api/publish",
                                           json={"channel": STREAM, "data": {"n": published}})
        assert response.status_code == 200, response.text
        published += 1
        pause = started + published * PUBLISH_EVERY - time.monotonic()
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
    return published


async def under_attack(
    caplog: pytest.LogCaptureFixture, done: Callable[[Tally, float], bool]
) -> Outcome:
    caplog.set_level(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    settings = make_settings(namespaces=NAMESPACES, handshake_timeout=1.0, auth_timeout=1.0)
    async with running_node(settings) as running:
        host, port = running.url.removeprefix("http://").rsplit(":", 1)
        attacker = token("mallory", channels=["*"], publish=["chat:*"])
        attack = Attack(Target(host, int(port), attacker, API_KEY), SEED)
        received: list[dict[str, Any]] = []
        async with connect(running.ws_url, token("bystander", channels=[STREAM])) as bystander:
            await bystander.subscribe(STREAM)
            gc.collect()
            rss_before = rss_kib()
            receiver = asyncio.create_task(receive_stream(bystander, received))
            stop = asyncio.Event()
            publisher = asyncio.create_task(publish_stream(running, stop))
            started = time.monotonic()
            tally = await attack.run(lambda: done(attack.tally, time.monotonic() - started))
            seconds = time.monotonic() - started
            stop.set()
            published = await publisher
            await eventually(lambda: len(received), lambda n: n >= published, within=2 * WAIT,
                             what="the bystander's last message")
            receiver.cancel()
            ready = (await running.http.get("/readyz")).status_code
            await eventually(lambda: metric(running, "hub_connections"), lambda n: n == 1,
                             within=2 * WAIT, what="only the bystander left")
            gc.collect()
            rss_after = rss_kib()
            exposition = (await running.http.get("/metrics")).text
    errors = {r: metric_of(exposition, "hub_protocol_errors_total", reason=r) for r in REASONS}
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    return Outcome(tally, seconds, published, received, rss_before, rss_after, errors, ready,
                   records)


def judge(outcome: Outcome, kind: str) -> None:
    print(outcome.report())
    assert outcome.ready == 200
    # The bystander: every message, in order, no gap, no duplicate.
    numbers = [frame["data"]["n"] for frame in outcome.received]
    assert numbers == list(range(outcome.published)), numbers[:20]
    offsets = [frame["offset"] for frame in outcome.received]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert not outcome.tally.server_errors, outcome.tally.server_errors[:5]
    # At most one line per reason per minute (and uvicorn's: one per message per minute).
    minutes = outcome.seconds / 60 + 1
    ours = [r for r in outcome.records if r.name == "hub.abuse"]
    uvicorns = [r for r in outcome.records
                if r.name.startswith("uvicorn") and r.levelno == logging.INFO]
    assert len(ours) <= len(REASONS) * (minutes + 1), len(ours)
    assert len(uvicorns) <= 3 * (minutes + 1), [r.getMessage() for r in uvicorns]
    # The attack reached most of what it aims at.
    assert sum(1 for n in outcome.protocol_errors.values() if n) >= len(REASONS) - 3, \
        outcome.protocol_errors
    growth_mib = (outcome.rss_after_kib - outcome.rss_before_kib) / 1024
    assert growth_mib < RSS_GROWTH_MIB[kind], growth_mib
    bad = [r for r in outcome.records
           if r.levelno >= logging.ERROR or r.exc_info or "Traceback" in r.getMessage()]
    assert not bad, [f"{r.levelname} {r.name}: {r.getMessage()[:300]}" for r in bad[:5]]


async def test_abuse_short(caplog: pytest.LogCaptureFixture) -> None:
    outcome = await under_attack(caplog, lambda tally, seconds: seconds >= SHORT_SECONDS)
    judge(outcome, "short")


@pytest.mark.soak
@pytest.mark.timeout(3 * 3600)
async def test_abuse_soak(caplog: pytest.LogCaptureFixture) -> None:
    outcome = await under_attack(caplog, lambda tally, seconds: tally.frames >= SOAK_FRAMES)
    judge(outcome, "soak")
    assert outcome.tally.frames >= SOAK_FRAMES
