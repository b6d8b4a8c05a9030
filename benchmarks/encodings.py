"""`python -m benchmarks.encodings`: what each encoding of `/connection/websocket` costs a
node for one channel carrying a changing document (PROTOCOL §11): bytes on the wire per
delivered publication, and node CPU per delivery, for JSON, Protobuf, JSON + fossil and
Protobuf + fossil subscriptions.

It drives the node's own delivery path in-process (`hub.subscriptions.Subscriptions`, the
codecs, the fossil patches, `fan_out`) with S subscribers whose sockets are counters: what
it measures is the protocol's work on the node (frames built once per encoding, patches
once per publication, one push per subscriber), not the kernel's socket writes, which cost
in proportion to the bytes measured beside it. The document is about 10 KB of JSON whose
every version changes a few values, as a dashboard or a game state does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import msgspec

from hub import protocol as p
from hub.broker import MemoryBroker, StreamPosition
from hub.centrifugo_codecs import JSON_CODEC, PROTOBUF_CODEC, CentrifugoCodec
from hub.metrics import Metrics
from hub.settings import Namespace, Settings
from hub.subscriptions import Joined, Subscriptions

CHANNEL = "doc:bench"
VARIANTS: dict[str, tuple[CentrifugoCodec, bool]] = {
    "json": (JSON_CODEC, False),
    "protobuf": (PROTOBUF_CODEC, False),
    "json+fossil": (JSON_CODEC, True),
    "protobuf+fossil": (PROTOBUF_CODEC, True),
}


class Sink:
    """A subscriber whose socket counts what it is given."""

    __slots__ = ("bytes", "client_id", "codec", "frames", "user")

    def __init__(self, number: int, codec: CentrifugoCodec) -> None:
        self.client_id = f"c{number}"
        self.user = f"u{number}"
        self.codec = codec
        self.bytes = 0
        self.frames = 0

    @property
    def expires(self) -> int | None:
        return None

    def push(self, frame: bytes, count: int = 1) -> bool:
        self.bytes += len(frame)
        self.frames += count
        return True

    def close(self, code: int, reason: str = "") -> None:
        return None

    def reset(self, channel: str, position: StreamPosition) -> bool:
        return False


def document(version: int, rows: int = 160) -> bytes:
    """About 10 KB of JSON (with 160 rows); each version changes about one row in 17."""
    return json.dumps({
        "version": version,
        "rows": [{"id": n, "name": f"row {n}", "tags": ["a", "b", str(n % 5)],
                  "value": (n * 7 + version) % 13 if n % 17 == 0 else n} for n in range(rows)],
    }).encode()


async def measure(variant: str, subscribers: int, messages: int) -> dict[str, Any]:
    codec, delta = VARIANTS[variant]
    namespace = Namespace(subscribe="any", history_size=100, history_ttl=600,
                          allowed_delta_types=("fossil",))
    settings = msgspec.convert({"namespaces": {"doc": namespace}}, Settings)
    broker = MemoryBroker()
    subscriptions = Subscriptions(broker, settings, Metrics("bench"))
    sinks = [Sink(n, codec) for n in range(subscribers)]
    starts: list[Joined] = []
    for sink in sinks:
        await subscriptions.join(sink, CHANNEL, None, starts.append, delta=delta)
    position = starts[0].position
    assert position is not None
    stream = [p.Message(channel=CHANNEL, data=msgspec.Raw(document(version)), ts=0,
                        offset=position.offset + version, epoch=position.epoch)
              for version in range(1, messages + 1)]
    payload = sum(len(message.data) for message in stream) / messages
    started_cpu, started = time.process_time(), time.perf_counter()
    for message in stream:
        subscriptions.deliver(CHANNEL, [message])
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    deliveries = sum(sink.frames for sink in sinks)
    assert deliveries == subscribers * messages, (deliveries, subscribers * messages)
    wire = sum(sink.bytes for sink in sinks)
    await subscriptions.close()
    return {
        "variant": variant, "subscribers": subscribers, "messages": messages,
        "payload_bytes": round(payload),
        "wire_bytes_per_delivery": round(wire / deliveries, 1),
        "cpu_us_per_delivery": round(cpu / deliveries * 1e6, 3),
        "wall_s": round(wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encodings",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=5000, help="(5000)")
    parser.add_argument("--messages", type=int, default=50,
                        help="versions of the document published (50)")
    parser.add_argument("--protocol", action="append", choices=sorted(VARIANTS),
                        help="encodings to measure (all by default; repeat for several)")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    args = parser.parse_args(argv)
    results = [asyncio.run(measure(variant, args.subscribers, args.messages))
               for variant in args.protocol or list(VARIANTS)]
    for result in results:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['variant']:16} {result['payload_bytes']:>6} B payload  "
                  f"{result['wire_bytes_per_delivery']:>8} B on the wire per delivery  "
                  f"{result['cpu_us_per_delivery']:>6} us node CPU per delivery  "
                  f"({result['subscribers']} subscribers x {result['messages']} messages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
