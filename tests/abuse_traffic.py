"""Abuse traffic against a live node (issue 13, second layer of the fuzz suite): raw
WebSocket connections on `/ws` and `/connection/websocket` that send frame-level garbage and
mutated commands, and raw HTTP requests with wrong keys, malformed or huge bodies, odd
paths, methods and request lines. Seeded, so a run can be repeated.

Used by tests/test_abuse.py, and from the command line to measure a node's log under attack:
`python -m tests.abuse_traffic --url http://127.0.0.1:8000 --seconds 45 --token JWT --api-key K`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests import rawws
from tests.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, RawSocket, frame

WAIT = 5.0
CLOSE_WAIT = 2.0  # s: how long a connection waits for the server's close at its end
MAX_FRAME_BYTES = 65536  # the node's HUB_MAX_FRAME_BYTES (the default)
# The bystander's user and channel: no HTTP request of the attack names them (the API key
# may publish anywhere, and disconnect anyone). Client tokens of the attack may not publish
# to the channel (see tests/test_abuse.py).
SPARED = {"bystander": "someone", "@bystander": "@someone", "feed:stream": "chat:a"}
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@dataclass
class Tally:
    frames: int = 0  # WebSocket frames sent
    ws_connections: int = 0
    http_requests: int = 0
    close_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    handshake_statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx answers: what was asked

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.close_codes.items()))
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return (f"{self.frames:,} frames on {self.ws_connections:,} WebSocket connections, "
                f"{self.http_requests:,} HTTP requests; close codes seen: {codes}; "
                f"HTTP statuses: {statuses}; handshakes refused: "
                f"{dict(self.handshake_statuses)}; 5xx: {len(self.server_errors)}")


@dataclass
class Target:
    host: str
    port: int
    token: str  # an attacker's valid token (it may not publish where the bystander listens)
    api_key: str


# Values and commands


def junk_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, -(2**63) - 1,
                           10**40, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, 3.0, 4003.0])
    if kind == 4:
        return rng.choice(["", "a" * rng.randrange(1, 300), "chat:" + "x" * rng.randrange(250),
                           "@", "@alice", "\u0000", "\ud7ff\ue000", "feed:stream", "*", "../..",
                           "é" * 50, "\n\n", '{"type":"ping"}'])
    if kind == 5:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 6:
        return [junk_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {junk_key(rng): junk_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"offset": junk_value(rng, depth + 1), "epoch": junk_value(rng, depth + 1)}


def junk_key(rng: random.Random) -> str:
    return rng.choice(["type", "id", "channel", "data", "since", "limit", "token", "event",
                       "offset", "epoch", "connect", "subscribe", "publish", "recover", "x",
                       "", "__proto__"])


def ws_command(rng: random.Random) -> dict[str, Any]:
    """A valid /ws command (publishing only where the attacker may: chat:*)."""
    channel = rng.choice(["chat:a", "chat:b", "room1", "feed:stream"])
    command: dict[str, Any] = rng.choice([
        {"type": "ping"},
        {"type": "subscribe", "channel": channel},
        {"type": "subscribe", "channel": "feed:stream", "since": {"offset": 1, "epoch": "e"}},
        {"type": "unsubscribe", "channel": channel},
        {"type": "publish", "channel": "chat:a", "data": {"n": rng.randrange(99)}},
        {"type": "presence", "channel": "chat:a"},
        {"type": "history", "channel": "feed:stream", "limit": rng.randrange(5)},
        {"type": "refresh", "token": "x"},
        {"type": "auth", "token": "x"},
    ])
    return {**command, "id": rng.randrange(1, 1000)}


def centrifugo_command(rng: random.Random) -> dict[str, Any]:
    channel = rng.choice(["chat:a", "room1", "feed:stream"])
    body: dict[str, Any] = rng.choice([
        {"subscribe": {"channel": channel}},
        {"subscribe": {"channel": "feed:stream", "recover": True, "offset": 1, "epoch": "e"}},
        {"unsubscribe": {"channel": channel}},
        {"publish": {"channel": "chat:a", "data": {"n": 1}}},
        {"presence": {"channel": "chat:a"}},
        {"presence_stats": {"channel": "chat:a"}},
        {"history": {"channel": "feed:stream", "limit": rng.randrange(-1, 5)}},
        {"rpc": {"method": "x"}},
        {"refresh": {"token": "x"}},
    ])
    return {"id": rng.randrange(1, 2**32), **body}


def mutate(rng: random.Random, value: Any) -> Any:
    """One structural change somewhere in a JSON value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        changed = dict(value)
        key = rng.choice(sorted(changed))
        how = rng.randrange(4)
        if how == 0:
            del changed[key]
        elif how == 1:
            changed[key] = junk_value(rng)
        elif how == 2:
            changed[junk_key(rng)] = junk_value(rng)
        else:
            changed[key] = mutate(rng, changed[key])
        return changed
    return junk_value(rng)


def command_text(rng: random.Random, centrifugo: bool) -> bytes:
    """A command, mutated or not, or JSON-level garbage."""
    command = centrifugo_command(rng) if centrifugo else ws_command(rng)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        command = mutate(rng, command)
    data = json.dumps(command).encode()
    how = rng.randrange(12)
    if how == 0 and data:
        data = data[:rng.randrange(len(data))]
    elif how == 1:
        data = b"[" * 3000 + b"]" * 3000
    elif how == 2:
        data = b'{"type":"publish","channel":"chat:a","data":' + b"[" * 5000 + b"]" * 5000 + b"}"
    elif how == 3:
        data = rng.choice([b"", b"null", b"0", b'"x"', b"{}", b"[]", b"NaN", b"{,}",
                           b'{"type":"ping"}{"type":"ping"}', b'{"id":1e999}', b"\x00"])
    elif how == 4:
        at = rng.randrange(len(data) + 1)
        data = data[:at] + bytes(rng.randrange(32, 127) for _ in range(3)) + data[at:]
    if centrifugo and rng.random() < 0.3:  # several commands in one frame
        other = json.dumps(centrifugo_command(rng)).encode()
        data = b"\n".join(rng.sample([data, other, b"", b"{}"], rng.randrange(1, 4)))
    return data


# Frames


def harmless(rng: random.Random, centrifugo: bool) -> tuple[bytes, int]:
    """Frames a session takes: commands (good, mutated, garbage), pings, fragments."""
    kind = rng.randrange(10)
    if kind < 6:
        return rawws.text(command_text(rng, centrifugo)), 1
    if kind == 6:
        return frame(PING, rng.randbytes(rng.randrange(126))), 1
    if kind == 7:
        return frame(PONG, rng.randbytes(rng.randrange(20))), 1
    if kind == 8:  # a message in three fragments with a ping in between
        data = command_text(rng, centrifugo)
        a, b = sorted((rng.randrange(len(data) + 1), rng.randrange(len(data) + 1)))
        return (frame(TEXT, data[:a], fin=False) + frame(PING, b"p")
                + frame(CONT, data[a:b], fin=False) + frame(CONT, data[b:])), 4
    return rawws.text(b""), 1


def fatal(rng: random.Random) -> tuple[bytes, int]:
    """Frame-level garbage that ends the connection (or should)."""
    body = b'{"type":"ping"}'
    choices: list[Callable[[], tuple[bytes, int]]] = [
        lambda: (frame(TEXT, body, rsv=rng.randrange(1, 8)), 1),
        lambda: (frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), b"x"), 1),
        lambda: (frame(CONT, b"orphan"), 1),
        lambda: (frame(PING, b"p" * rng.randrange(126, 1000)), 1),
        lambda: (frame(PING, b"p", fin=False), 1),
        lambda: (frame(TEXT, body, mask=False), 1),
        lambda: (frame(TEXT, b"", length=rng.choice([2**62, 2**63 - 1, 2**40, 10**12])), 1),
        lambda: (frame(TEXT, b"x" * 100, length=MAX_FRAME_BYTES + 1), 1),
        lambda: (rawws.text(b'{"type":"ping","x":"\xff\xfe\xfd"}'), 1),
        lambda: (frame(TEXT, b'{"type":"\xe2\x82', fin=False) + frame(CONT, b"\x28\xa1"), 2),
        lambda: (frame(BINARY, rng.randbytes(rng.randrange(1, 200))), 1),
        lambda: (rawws.text(b"[" + b"0," * (MAX_FRAME_BYTES // 2) + b"0]"), 1),
        lambda: (frame(TEXT, b"[" + b"0," * 20000, fin=False)
                 + frame(CONT, b"0," * 20000, fin=False) + frame(CONT, b"0]"), 3),
        lambda: (rawws.close_frame(rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 2999,
                                               5000, 65535])), 1),
        lambda: (rawws.close_frame(1000, b"\xff\xfe"), 1),
        lambda: (frame(CLOSE, b"\x03"), 1),
        lambda: (frame(CLOSE, struct.pack("!H", 1000) + b"r" * 124), 1),
        lambda: (frame(TEXT, b"{", fin=False) + rawws.text(b"}"), 2),
        lambda: (rng.randbytes(rng.randrange(1, 64)), 1),
    ]
    return rng.choice(choices)()


# WebSocket connections


class Attack:
    def __init__(self, target: Target, seed: int, tally: Tally | None = None) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.tally = tally or Tally()
        self._slow = asyncio.Semaphore(16)  # requests left hanging for the deadline
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, done: Callable[[], bool], ws_workers: int = 8,
                  http_workers: int = 2) -> Tally:
        workers = [self._ws_worker(done, i) for i in range(ws_workers)]
        workers += [self._http_worker(done, i) for i in range(http_workers)]
        await asyncio.gather(*workers)
        if self._background:
            await asyncio.wait(self._background, timeout=4 * WAIT)
        return self.tally

    async def _ws_worker(self, done: Callable[[], bool], number: int) -> None:
        rng = random.Random(self.rng.random())
        while not done():
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError,
                                     ValueError):
                await self._ws_connection(rng, done)

    async def _ws_connection(self, rng: random.Random, done: Callable[[], bool]) -> None:
        target, tally = self.target, self.tally
        centrifugo = rng.random() < 0.4
        path = "/connection/websocket" if centrifugo else "/ws"
        how = rng.choice(["token", "token", "token", "frame", "none", "bad"])
        headers = {"Authorization": f"Bearer {target.token}"} if how == "token" and not \
            centrifugo else {}
        raw = await rawws.websocket(target.host, target.port, path, headers)
        tally.ws_connections += 1
        if raw.status != 101:
            tally.handshake_statuses[raw.status] += 1
            raw.close()
            return
        reader = asyncio.create_task(self._read(raw))
        try:
            if centrifugo or how != "token":
                self._send(raw, self._authentication(centrifugo, how))
            for _ in range(rng.randrange(1, 80)):
                if reader.done() or done():
                    break
                data, count = harmless(rng, centrifugo)
                self._send(raw, data, count)
                await raw.drain()
            ending = rng.random()
            if ending < 0.65:
                self._send(raw, *fatal(rng))
            elif ending < 0.85:
                self._send(raw, rawws.close_frame(1000))
            else:
                raw.close()  # gone without a word, perhaps mid-frame
            with contextlib.suppress(OSError):
                await raw.drain()
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await asyncio.shield(reader)
            except TimeoutError:  # garbage the server still waits to complete, say
                self.tally.close_codes[f"none within {CLOSE_WAIT:.0f} s"] += 1
        finally:
            reader.cancel()
            raw.close()

    def _authentication(self, centrifugo: bool, how: str) -> bytes:
        token = self.target.token if how in ("token", "frame") else "not.a.token"
        if how == "none":
            return b""
        if centrifugo:
            return rawws.text(json.dumps({"id": 1, "connect": {"token": token}}))
        return rawws.text(json.dumps({"type": "auth", "token": token, "id": 1}))

    def _send(self, raw: RawSocket, data: bytes, count: int = 1) -> None:
        if data:
            raw.send(data)
            self.tally.frames += count

    async def _read(self, raw: RawSocket) -> None:
        """Read the server's frames, answer its pings, note how it closed."""
        code: str = "eof"
        try:
            while True:
                opcode, payload = await raw.read_frame(timeout=None)
                if opcode == PING:
                    raw.send(frame(PONG, payload))
                elif opcode == CLOSE:
                    code = str(rawws.close_code_of(payload))
                    break
        except (asyncio.IncompleteReadError, OSError):
            pass
        self.tally.close_codes[code] += 1

    # HTTP

    async def _http_worker(self, done: Callable[[], bool], number: int) -> None:
        rng = random.Random(self.rng.random())
        while not done():
            request, slow = http_request(rng, self.target)
            if slow:
                if self._slow.locked():
                    continue
                task = asyncio.create_task(self._http(request, slow=True))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                continue
            await self._http(request)

    async def _http(self, request: bytes, slow: bool = False) -> None:
        tally = self.tally
        async with contextlib.AsyncExitStack() as stack:
            if slow:
                await stack.enter_async_context(self._slow)
            try:
                raw = await rawws.tcp(self.target.host, self.target.port)
            except (OSError, TimeoutError):
                return
            stack.callback(raw.close)
            tally.http_requests += 1
            try:
                raw.send(request)
                response = await raw.eof(timeout=4 * WAIT)
            except (OSError, TimeoutError):
                return
        for status in _STATUS.findall(response):
            code = int(status)
            tally.statuses[code] += 1
            if code >= 500:
                tally.server_errors.append(request[:200].decode("latin-1"))


def http_request(rng: random.Random, target: Target) -> tuple[bytes, bool]:
    """A request, and whether it is one left unfinished (for the deadline to drop)."""
    key = target.api_key
    path = rng.choice(["/api/publish", "/api/broadcast", "/api/send", "/api/disconnect"])
    valid = {
        "/api/publish": {"channel": "chat:a", "data": {"n": 1}},
        "/api/broadcast": {"channels": ["chat:a", "bad channel!", "@" + "u" * 200], "data": 1},
        "/api/send": {"user": "someone", "data": [1]},
        "/api/disconnect": {"user": "someone", "code": 4003},
    }[path]
    kind = rng.randrange(20)
    if kind == 0:  # unfinished: half a request line, headers without end, a body cut short
        return rng.choice([b"GET /api/stats HT", b"GET /ws HTTP/1.1\r\nHost: x\r\n",
                           f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
                           "Content-Length: 500\r\n\r\n{\"chan".encode(), b""]), True
    if kind == 1:
        body = json.dumps(valid).encode()
        return post(path, body, rng.choice([{}, {"X-API-Key": "wrong"},
                                            {"Authorization": "Bearer wrong"},
                                            {"Authorization": "Basic eDp5"}])), False
    if kind == 2:  # over 1 MiB: declared, or chunked
        if rng.random() < 0.5:
            return post(path, b"x" * (1024 * 1024 + 10), {"X-API-Key": key}), False
        chunk = b"x" * 65536
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)) + b"0\r\n\r\n"
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nConnection: close\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks, False
    if kind == 3:
        return rng.choice(GARBAGE_REQUESTS), False
    if kind == 4:
        method = rng.choice(["DELETE", "PUT", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "HEAD",
                             "get", "CONNECT", "M-SEARCH"])
        return (f"{method} {rng.choice(ODD_PATHS)} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}"
                "\r\nConnection: close\r\n\r\n").encode(), False
    if kind == 5:
        return (f"GET {rng.choice(ODD_PATHS)} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
                "Connection: close\r\n\r\n").encode(), False
    if kind == 6:  # a history or presence read with odd parameters
        query = "&".join(f"{name}={junk_query(rng)}" for name in
                         rng.sample(["since", "limit", "epoch", "prefix"], rng.randrange(4)))
        where = rng.choice(["history/feed:stream", "history/chat:a", "presence/chat:a",
                            "history/%FF%FE", "presence/@" + "x" * 300, "channels"])
        return (f"GET /api/{where}?{query} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
                "Connection: close\r\n\r\n").encode(), False
    if kind == 7:  # pipelined
        one = (f"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPOST {path} HTTP/1.1\r\nHost: x\r\n"
               f"X-API-Key: {key}\r\nContent-Length: 2\r\n\r\n{{}}").encode()
        return one + b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False
    if kind == 8:  # a head of 200 KB
        return (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + b"X-Big: " + b"b" * 200_000 + b"\r\n\r\n"), False
    if kind == 9:  # a body that claims less or more than it has
        body = json.dumps(valid).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nConnection: close\r\n"
                f"Content-Length: {max(0, len(body) - rng.randrange(1, 5))}\r\n\r\n").encode() \
            + body, False
    # the rest: mutated bodies and JSON-level garbage, with the key
    body_value: Any = valid
    for _ in range(rng.randrange(1, 4)):
        body_value = mutate(rng, body_value)
    body = json.dumps(spare(body_value)).encode()
    if rng.random() < 0.2:
        body = rng.choice([b"", b"{", b"[" * 5000 + b"]" * 5000, rng.randbytes(64), b"\xff\xfe",
                           body[: len(body) // 2]])
    return post(path, body, {"X-API-Key": key, "Content-Type": rng.choice(
        ["application/json", "text/plain", "application/x-www-form-urlencoded"])}), False


def spare(value: Any) -> Any:
    """`value` with the bystander's names replaced, wherever they are."""
    if isinstance(value, str):
        return SPARED.get(value, value)
    if isinstance(value, list):
        return [spare(item) for item in value]
    if isinstance(value, dict):
        return {spare(key): spare(item) for key, item in value.items()}
    return value


def post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def junk_query(rng: random.Random) -> str:
    return rng.choice(["", "-1", "0", "1", "99999999999999999999999", "1.5", "abc", "%00",
                       "%FF", "1e3", str(2**63), "%20", "a" * 300])


ODD_PATHS = [
    "/", "//", "/api", "/api/", "/api/publish/", "/api/publish/extra", "/api/../api/stats",
    "/%2e%2e/%2e%2e/etc/passwd", "/api/history/", "/api/history/%00", "/api/presence/%",
    "/api/history/" + "a" * 5000, "/ws", "/connection/websocket", "/metrics?x=%FF",
    "/admin/../../", "/openapi.json", "/%FF%FE", "/api/stats?" + "a=b&" * 500, "*",
    "/api/channels?prefix=%00", "/readyz/", "/healthz?", "/admin/admin.js/x",
]

GARBAGE_REQUESTS = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: h2c\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 8\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"HELLO\r\n\r\n",
    b"GET " + b"/a" * 40000 + b" HTTP/1.1\r\n\r\n",
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    host, port = args.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    deadline = time.monotonic() + args.seconds
    tally = await Attack(Target(host, int(port), args.token, args.api_key), args.seed).run(
        lambda: time.monotonic() >= deadline)
    print(tally.summary())


if __name__ == "__main__":
    asyncio.run(main())
