"""Redis `INFO commandstats`, read before and after a run (a diff: nothing is reset)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from benchmarks.common import BenchError


async def redis_info(url: str, section: str) -> str:
    """`INFO section` over a bare RESP connection (no client library needed)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1",
                                                   parts.port or 6379)
    try:
        commands = []
        if parts.password:
            user = [parts.username] if parts.username else []
            commands.append(["AUTH", *user, parts.password])
        commands.append(["INFO", section])
        for command in commands:
            writer.write(f"*{len(command)}\r\n".encode() + b"".join(
                f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in command
            ))
        async with asyncio.timeout(5):
            for _ in commands[:-1]:
                answer = await reader.readline()
                if not answer.startswith(b"+"):
                    raise BenchError(f"redis: {answer.decode(errors='replace').strip()}")
            header = await reader.readline()
            if not header.startswith(b"$"):
                raise BenchError(f"redis: {header.decode(errors='replace').strip()}")
            body = await reader.readexactly(int(header[1:]) + 2)
    finally:
        writer.close()
    return body.decode(errors="replace")


async def redis_commandstats(url: str) -> dict[str, int]:
    """Calls per command so far (`cmdstat_publish:calls=12,usec=...`)."""
    calls: dict[str, int] = {}
    for line in (await redis_info(url, "commandstats")).splitlines():
        name, _, values = line.partition(":")
        if name.startswith("cmdstat_"):
            fields = dict(item.split("=", 1) for item in values.split(",") if "=" in item)
            calls[name.removeprefix("cmdstat_")] = int(fields.get("calls", 0))
    return calls
