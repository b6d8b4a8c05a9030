"""Many commands of one request (a batch, a broadcast) run as a sequence would, but the
publications among them side by side: the broker then takes them together (one script and
one round trip to Redis for all that were queued at once: `hub.redis.batcher.Batcher`)
instead of one round trip each.

"As a sequence would" is what a caller can see: a publication waits for the earlier ones of
the batch on the same channel (so one channel's messages keep their order on any broker), and
a command that is not a publication (a disconnect, a subscribe) waits for everything before
it, and everything after it waits for it. Publications to different channels have no order
between them (PROTOCOL §5 orders each channel on its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

CommandT = TypeVar("CommandT")
ReplyT = TypeVar("ReplyT")

IN_FLIGHT = 1024  # publications of one batch under way at once


async def in_order(
    commands: Sequence[CommandT],
    run: Callable[[CommandT], Awaitable[ReplyT]],
    channels_of: Callable[[CommandT], Collection[str] | None],
    *,
    limit: int = IN_FLIGHT,
) -> list[ReplyT]:
    """Each command's reply, in order. `channels_of` names the channels a command publishes
    to, or None for one that must run alone; `run` answers a failure with a reply of its
    own (an exception it raises ends the batch)."""
    replies: list[ReplyT | None] = [None] * len(commands)
    last: dict[str, asyncio.Task[None]] = {}
    started: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(limit)

    async def publication(index: int, command: CommandT, after: set[asyncio.Task[None]]) -> None:
        if after:
            await asyncio.wait(after)
        async with gate:
            replies[index] = await run(command)

    try:
        for index, command in enumerate(commands):
            channels = channels_of(command)
            if channels is None:
                if started:
                    await asyncio.gather(*started)
                    started.clear()
                    last.clear()
                replies[index] = await run(command)
                continue
            after = {last[channel] for channel in channels if channel in last}
            task = asyncio.create_task(publication(index, command, after))
            started.append(task)
            for channel in channels:
                last[channel] = task
        if started:
            await asyncio.gather(*started)
    except BaseException:
        for task in started:
            task.cancel()
        raise
    return replies  # type: ignore[return-value]  # every one is filled in by now
