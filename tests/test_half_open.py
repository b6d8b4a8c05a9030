"""Slow and half-open clients (issue 13): a thousand connections that never finish their
HTTP request or never authenticate, opened at once against a `hub serve` process (uvloop,
as in production), keep nobody out, and every one is dropped within its deadline."""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

from tests import rawws
from tests.rawws import RawSocket
from tests.support import (
    API_KEY,
    SECRET,
    WAIT,
    NodeProcess,
    connect,
    http_client,
    metric_of,
    publish,
    token,
)

DEADLINE = 1.0  # HUB_HANDSHAKE_TIMEOUT and HUB_AUTH_TIMEOUT here
KINDS = {  # kind: how many
    "silent": 300,  # TCP, not a byte
    "half request line": 200,
    "headers without end": 200,
    "/ws, never authenticates": 200,
    "/connection/websocket, never connects": 100,
}
HTTP_KINDS = {"silent": b"", "half request line": b"GET /ws HTT",
              "headers without end": b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"}


def enough_file_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def half_open(host: str, port: int, kind: str) -> RawSocket:
    if kind in HTTP_KINDS:
        raw = await rawws.tcp(host, port, timeout=WAIT)
        raw.send(HTTP_KINDS[kind])
        return raw
    path = "/ws" if kind.startswith("/ws") else "/connection/websocket"
    raw = await rawws.websocket(host, port, path, timeout=WAIT)
    assert raw.status == 101
    return raw


async def dropped(kind: str, raw: RawSocket) -> str:
    """How the node ended it: the HTTP status or the close code."""
    try:
        if kind in HTTP_KINDS:
            return (await raw.eof(timeout=2 * DEADLINE + WAIT))[:12].decode()
        return str(await raw.closed(timeout=DEADLINE + WAIT))
    finally:
        raw.close()


async def test_a_thousand_half_open_connections_keep_nobody_out(tmp_path: Path) -> None:
    total = sum(KINDS.values())
    enough_file_descriptors(total + 512)
    log = tmp_path / "node.err"
    node = NodeProcess({
        "HUB_JWT_SECRET": SECRET, "HUB_API_KEY": API_KEY, "HUB_NODE_ID": "half-open",
        "HUB_HANDSHAKE_TIMEOUT": str(DEADLINE), "HUB_AUTH_TIMEOUT": str(DEADLINE),
        "HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0",
    }, stderr=log).start()
    held: list[tuple[str, RawSocket]] = []
    try:
        host, port = node.url.removeprefix("http://").rsplit(":", 1)
        kinds = [kind for kind, count in KINDS.items() for _ in range(count)]
        opened_at = time.monotonic()
        sockets = await asyncio.gather(*(half_open(host, int(port), kind) for kind in kinds))
        held = list(zip(kinds, sockets, strict=True))
        async with http_client(node.url) as http:
            # While all of them are held: a normal client connects, subscribes and receives.
            started = time.monotonic()
            async with connect(node.ws_url, token("alice")) as client:
                await client.subscribe("room")
                await publish(http, "room", {"n": 1})
                assert (await client.expect("message"))["data"] == {"n": 1}
            served_in = time.monotonic() - started
            assert served_in < 1.0, served_in
            ends = await asyncio.gather(*(dropped(kind, raw) for kind, raw in held))
            dropped_within = time.monotonic() - opened_at
            by_kind: dict[str, set[str]] = {}
            for kind, end in zip(kinds, ends, strict=True):
                by_kind.setdefault(kind, set()).add(end)
            assert by_kind == {
                "silent": {"HTTP/1.1 408"},
                "half request line": {"HTTP/1.1 408"},
                "headers without end": {"HTTP/1.1 408"},
                "/ws, never authenticates": {"4001"},
                "/connection/websocket, never connects": {"3502"},
            }, by_kind
            assert dropped_within < 2 * DEADLINE + 2.0, dropped_within
            print(f"{total} half-open: a client served in {served_in:.3f} s meanwhile, "
                  f"all dropped {dropped_within:.2f} s after the first opened")
            exposition = (await http.get("/metrics")).text
        http_kinds = sum(count for kind, count in KINDS.items() if kind in HTTP_KINDS)
        assert metric_of(exposition, "hub_protocol_errors_total",
                         reason="handshake_timeout") == http_kinds
        assert metric_of(exposition, "hub_protocol_errors_total",
                         reason="auth_timeout") == total - http_kinds
    finally:
        for _, raw in held:
            raw.close()
        node.stop()
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text[-2000:]
