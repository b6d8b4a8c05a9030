"""The HTTP publisher: keep-alive connections sharing one `Publishing` job."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from hub.bench.common import CHANNEL
from hub.bench.httpclient import exchange
from hub.bench.processes import NodeProcess


@dataclass
class Publishing:
    messages: int
    batch: int
    rate: float
    payload: int
    deadline: float
    api_key: str
    next_index: int = 0
    published: int = 0
    errors: int = 0
    first: float = 0.0
    last: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    measured: float = 0.0  # seconds from the start of publishing to the CPU readings

    def claim(self) -> tuple[int, int] | None:
        if self.next_index >= self.messages or time.time() >= self.deadline:
            return None
        index = self.next_index
        size = min(self.batch, self.messages - index)
        self.next_index += size
        return index, size

    def data(self, index: int) -> bytes:
        sent = int(time.time() * 1e6)
        head = f'{{"seq":{index},"sent":{sent},"pad":"'
        pad = max(0, self.payload - len(head) - 2)
        return (head + "x" * pad + '"}').encode()


async def publisher(node: NodeProcess, job: Publishing, start: float) -> None:
    reader, writer = await asyncio.open_connection(node.host, node.port)
    try:
        while (claimed := job.claim()) is not None:
            index, size = claimed
            if job.rate:
                delay = start + index / job.rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            data = job.data(index)
            if size == 1:
                path = "/api/publish"
                body = b'{"channel":"' + CHANNEL.encode() + b'","data":' + data + b"}"
            else:
                path = "/api/broadcast"
                channels = json.dumps([CHANNEL] * size).encode()
                body = b'{"channels":' + channels + b',"data":' + data + b"}"
            if not job.first:
                job.first = time.time()
            try:
                status, reply = await exchange(
                    reader, writer, node.host, "POST", path, body, job.api_key
                )
            except (OSError, asyncio.IncompleteReadError) as exc:
                job.errors += size
                job.error_samples.append(f"{node.name}: {exc!r}")
                return
            failed = size if status != 200 else reply.count(b'"error"')
            job.errors += failed
            job.published += size - failed
            if failed and len(job.error_samples) < 5:
                job.error_samples.append(f"{status} {reply[:200]!r}")
            job.last = time.time()
    finally:
        writer.close()
