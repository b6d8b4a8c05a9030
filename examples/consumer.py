"""A service that consumes channels of the hub with `hub.client`: it prints each message as
one JSON line, and says when it must reload (a `Reset`: messages were lost for good).

    python examples/consumer.py --channel news                  # against `hub serve --dev`
    HUB_TOKEN=$(hub token --sub billing --channels 'orders:*') \\
        python examples/consumer.py --url ws://hub-a:8000/ws --url ws://hub-b:8000/ws \\
        --channel orders:eu

The client reconnects by itself (to the next URL, with backoff), subscribes again, and on
channels with history recovers what it missed: each message is printed once and in order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from hub.client import Message, Reset, Subscription, connect


async def consume(subscription: Subscription, left: list[int]) -> None:
    async for item in subscription:
        if isinstance(item, Reset):
            # Here a real service reloads what the messages build (from its database, or
            # from the hub's history), then goes on from item.offset.
            print(json.dumps({"reset": item.channel, "offset": item.offset,
                              "epoch": item.epoch}), flush=True)
            continue
        assert isinstance(item, Message)
        print(json.dumps({"channel": item.channel, "offset": item.offset, "data": item.data}),
              flush=True)
        left[0] -= 1
        if left[0] == 0:
            return


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", help="a node's /ws URL (repeat for more)")
    parser.add_argument("--channel", action="append", required=True)
    parser.add_argument("--count", type=int, default=0, help="stop after this many messages")
    args = parser.parse_args()
    urls = args.url or ["ws://127.0.0.1:8000/ws?user=consumer"]
    async with connect(urls, token=os.environ.get("HUB_TOKEN")) as client:
        left = [args.count or -1]
        subscriptions = [await client.subscribe(channel) for channel in args.channel]
        print(json.dumps({"ready": client.node}), flush=True)
        tasks = [asyncio.create_task(consume(s, left)) for s in subscriptions]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
