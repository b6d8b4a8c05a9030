"""A Python service in the chat, on the real centrifuge-python SDK: it subscribes to a room,
prints what is said, and answers `!time` with the time.

    pip install centrifuge-python
    python examples/chat_service.py                     # against `hub serve --dev`
    HUB_TOKEN=$(hub token --sub timebot --channels 'chat:*' --publish 'chat:*') \\
        python examples/chat_service.py --url ws://127.0.0.1:8000/connection/websocket

The SDK reconnects by itself, and recovers what it missed on channels with history.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time

from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    DisconnectedContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)


class Room(SubscriptionEventHandler):  # type: ignore[misc]
    def __init__(self, name: str) -> None:
        self.name = name
        self.subscription: object | None = None
        # The SDK handles one frame at a time, and an event handler runs inside that: a
        # handler that awaited its own publish's reply would wait for a frame that cannot
        # be read until it returns (the SDK then times out and drops the connection). So a
        # reply is a task of its own, kept here until it is done.
        self.replies: set[asyncio.Task[None]] = set()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        print(f"in {self.name} (recovered: {ctx.recovered})", flush=True)

    async def on_publication(self, ctx: PublicationContext) -> None:
        who = ctx.pub.info.user if ctx.pub.info else "server"
        text = ctx.pub.data.get("text") if isinstance(ctx.pub.data, dict) else ctx.pub.data
        print(f"{who}: {text}", flush=True)
        if text == "!time":
            reply = asyncio.create_task(self.answer(time.strftime("it is %H:%M:%S")))
            self.replies.add(reply)
            reply.add_done_callback(self.replies.discard)

    async def answer(self, text: str) -> None:
        try:
            await self.subscription.publish({"text": text})  # type: ignore[attr-defined]
        except Exception as exc:  # the SDK's errors: say so and go on serving the room
            print(f"could not answer: {exc!r}", flush=True)


class Connection(ClientEventHandler):  # type: ignore[misc]
    async def on_connected(self, ctx: ConnectedContext) -> None:
        print(f"connected as {ctx.client}", flush=True)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        print(f"disconnected: {ctx.code} {ctx.reason}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/connection/websocket?user=timebot")
    parser.add_argument("--room", default="chat:lobby")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    args = parser.parse_args()
    client = Client(args.url, events=Connection(), token=os.environ.get("HUB_TOKEN", ""))
    room = Room(args.room)
    room.subscription = client.new_subscription(args.room, events=room)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await client.connect()
    await room.subscription.subscribe()  # type: ignore[attr-defined]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.seconds or None)
    await client.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
