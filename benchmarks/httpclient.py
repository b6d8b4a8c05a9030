"""A minimal HTTP/1.1 request/response over asyncio streams (JSON bodies, API key)."""

from __future__ import annotations

import asyncio
import re

CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


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
    payload = await reader.readexactly(int(found.group(1))) if found else b""
    return status, payload
