"""Redis commands over a bare RESP2 connection (no client library needed): what forming a
private Cluster and reading `INFO` take, and nothing more (no TLS, no pipelining API)."""

from __future__ import annotations

import asyncio
from typing import TypeAlias

from benchmarks.common import BenchError

# A RESP2 reply: simple and bulk strings (decoded), integers, nil, arrays of replies.
Reply: TypeAlias = "str | int | list[Reply] | None"


def encode(command: list[str]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [f"*{len(command)}\r\n".encode()]
    for arg in command:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One reply; an error reply raises BenchError."""
    line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise BenchError("redis: connection closed mid-reply")
    kind, body = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return body
    if kind == b"-":
        raise BenchError(f"redis: {body}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        if int(body) < 0:
            return None
        return (await reader.readexactly(int(body) + 2))[:-2].decode(errors="replace")
    if kind == b"*":
        if int(body) < 0:
            return None
        return [await read_reply(reader) for _ in range(int(body))]
    raise BenchError(f"redis: unexpected reply {line[:40]!r}")


async def redis_commands(
    host: str, port: int, commands: list[list[str]], *, username: str | None = None,
    password: str | None = None, within: float = 5.0,
) -> list[Reply]:
    """Send `commands` on one new connection (AUTH first when a password is given) and
    return their replies in order. Any failure, an error reply included, is a BenchError."""
    if password:
        commands = [["AUTH", *([username] if username else []), password], *commands]
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"".join(encode(command) for command in commands))
                replies = [await read_reply(reader) for _ in commands]
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise BenchError(f"redis {host}:{port}: {exc!r}") from None
    return replies[1:] if password else replies


async def redis_command(
    host: str, port: int, *command: str, username: str | None = None,
    password: str | None = None,
) -> Reply:
    (reply,) = await redis_commands(host, port, [list(command)], username=username,
                                    password=password)
    return reply
