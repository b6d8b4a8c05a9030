"""A minimal HTTP/1.1 request/response over asyncio streams (JSON bodies, API key); the
answer's body by Content-Length or chunked (Node's default when a length is not given)."""

from __future__ import annotations

import asyncio
import re

CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
CHUNKED = re.compile(rb"(?i)\r\ntransfer-encoding:[^\r]*chunked")


async def http_request(
    host: str, port: int, method: str, path: str, body: bytes = b"", api_key: str = ""
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await exchange(reader, writer, host, method, path, body, api_key)
    finally:
        writer.close()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, method: str,
    path: str, body: bytes, api_key: str,
) -> tuple[int, bytes]:
    key = f"X-API-Key: {api_key}\r\n" if api_key else ""
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{key}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    found = CONTENT_LENGTH.search(head)
    if found:
        return status, await reader.readexactly(int(found.group(1)))
    if CHUNKED.search(head):
        return status, await read_chunked(reader)
    return status, b""


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body up to its last chunk (trailers skipped)."""
    parts: list[bytes] = []
    for _ in range(1 << 16):  # bounded: a body of more chunks is not an API answer
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if not size:
            for _ in range(100):  # trailers, up to the blank line
                if await reader.readuntil(b"\r\n") == b"\r\n":
                    return b"".join(parts)
            raise ValueError("too many trailers")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    raise ValueError("too many chunks")
