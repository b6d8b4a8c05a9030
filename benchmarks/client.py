"""A client process (`python -m benchmarks --client CONFIG`): many subscribers in one loop.

Commands come on stdin, reports go to stdout, one JSON line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from benchmarks.fdlimit import raise_fd_limit
from benchmarks.layout import channel_name, channel_of, messages_on, user_name
from benchmarks.sequence import CHECK_KINDS
from benchmarks.subscriber import ClientState, Subscriber, subscriber_class

CONNECT_CONCURRENCY = 64


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def checks_report(subscribers: list[Subscriber], state: ClientState) -> dict[str, Any]:
    """Each check this process's connections ran (`seq` always, `offsets` and `order`
    when asked), summed over the live ones, with how many connections failed it and a few
    examples."""
    names = ["seq"] + (["offsets"] if state.offsets else []) + (
        ["order"] if state.ordered else [])
    live = [s for s in subscribers if s.live]
    report: dict[str, Any] = {}
    for name in names:
        checks = [(s.channel, check) for s in live for found, check in s.checks()
                  if found == name]
        entry: dict[str, Any] = {kind: sum(getattr(check, kind) for _, check in checks)
                                 for kind in CHECK_KINDS[name]}
        entry["connections"] = sum(not check.clean for _, check in checks)
        entry["samples"] = [f"{channel}: {text}" for channel, check in checks
                            if not check.clean for text in check.samples][:5]
        report[name] = entry
    return report


async def _drained(state: ClientState, within: float, closes_before: dict[int, int],
                   began: float) -> None:
    """Report once every connection ended (or `within` seconds passed): when the last one
    did, how many are still open, and the close codes the server sent since `began` (when
    this process reported `done`: the parent's SIGTERM may reach a node, and its first
    closes this process, before the `drain` command does)."""
    if state.open:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.all_closed.wait(), within)
    closes = {str(code): count - closes_before.get(code, 0)
              for code, count in state.closes.items() if count > closes_before.get(code, 0)}
    last_closed = state.last_closed if state.last_closed >= began else None
    _emit({"event": "drained", "open": state.open, "last_closed": last_closed,
           "closes": closes})


async def run_client(config: dict[str, Any]) -> int:
    """One client process: connect, subscribe, report `ready`, wait for `go`, count,
    report `done`. Commands come on stdin, reports go to stdout, one JSON line each."""
    from hub.auth import mint_token  # the hub's own, so the tokens are what it checks

    raise_fd_limit()
    secret = os.environ.get("HUB_JWT_SECRET", "")  # none for a peer: no tokens
    targets: list[tuple[str, int]] = [(str(h), int(p)) for h, p in config["targets"]]
    first, count = int(config["first"]), int(config["count"])
    channels, messages = int(config["channels"]), int(config["messages"])
    state = ClientState(int(config["sample"]), offsets=bool(config.get("offsets")),
                        ordered=bool(config.get("ordered")))
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    subscribers: list[Subscriber] = []
    ttl = float(config.get("ttl", 3600))
    personal = bool(config.get("personal"))
    kind = subscriber_class(str(config.get("protocol", "ws")), personal)
    # One source address has ~28,000 ephemeral ports towards one node address: beyond that
    # connection i comes from 127.0.0.(1 + i mod K).
    sources = int(config.get("sources", 1))

    async def connect(index: int) -> None:
        host, port = targets[index % len(targets)]
        channel = channel_of(index, len(targets), channels, personal)
        token = mint_token(secret, user_name(index), ttl=ttl) if secret else ""
        async with gate:
            protocol = kind(state, host, port, token, channel_name(channel, channels, personal),
                            messages_on(channel, messages, channels))
            subscribers.append(protocol)
            try:
                local = (f"127.0.0.{1 + index % sources}", 0) if sources > 1 else None
                await loop.create_connection(lambda: protocol, host, port, local_addr=local)
                await asyncio.wait_for(protocol.ready, 30)
            except (OSError, TimeoutError) as exc:
                state.error(f"{host}:{port}: {exc!r}")
                if protocol.transport is not None:
                    protocol.transport.abort()

    started = time.time()
    await asyncio.gather(*(connect(first + k) for k in range(count)))
    finished = time.time()
    _emit({
        "event": "ready", "subscribed": state.subscribed, "failed": count - state.subscribed,
        "seconds": round(finished - started, 3), "started": started, "finished": finished,
        "errors": state.errors,
    })
    command = json.loads(await _read_line() or '{"cmd": "quit"}')
    if command.get("cmd") == "go":
        cpu_before = time.process_time()
        state.expected = sum(s.limit for s in subscribers if s.live)
        state.check_finished()
        remaining = float(command["deadline"]) - time.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.finished.wait(), max(0.0, remaining))
        counts = [s.frames for s in subscribers if s.live] or [0]
        _emit({
            "event": "done", "received": state.received, "expected": state.expected,
            "others": state.others, "checks": checks_report(subscribers, state),
            "first": state.first, "last": state.last,
            "min_per_connection": min(counts), "max_per_connection": max(counts),
            "latencies_us": state.latencies_us, "hub_latencies_ms": state.hub_latencies_ms,
            "closes": {str(k): v for k, v in state.closes.items()}, "errors": state.errors,
            "cpu_seconds": round(time.process_time() - cpu_before, 3),
        })
        done_at, closes_at_done = time.time(), dict(state.closes)
        # Stay connected while the parent takes its readings; `drain`: it SIGTERMed the nodes.
        command = json.loads(await _read_line() or '{"cmd": "quit"}')
        if command.get("cmd") == "drain":
            await _drained(state, float(command["within"]), closes_at_done, done_at)
    for subscriber in subscribers:
        if subscriber.transport is not None:
            subscriber.transport.abort()
    return 0
