"""Stopping background tasks for sure."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel until it ends. On Python 3.11 a cancellation that lands just as the inner call
    of an `asyncio.wait_for` finishes is swallowed (CPython gh-86296; redis-py wraps each
    socket write in one), and a loop task would then go on for ever."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    with contextlib.suppress(asyncio.CancelledError):
        await task
