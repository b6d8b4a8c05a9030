"""Publications share round trips to Redis: `Batcher` sends one at once when the way is
free, and whatever came meanwhile as one script when it frees (the order they came in, no
added wait when there is no crowd). The broker hands it the round trip (`send`); nothing
here knows what is sent.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from hub.errors import BrokerUnavailable

BATCH_LIMIT = 256  # publications in one script at most


class _Queued(NamedTuple):
    keys: list[bytes]
    item: list[Any]
    answer: asyncio.Future[Any]


_LEAD: Any = object()  # a queued publication's turn to send the batch it heads


def _leads(entry: _Queued) -> bool:
    answer = entry.answer
    return (answer.done() and not answer.cancelled() and answer.exception() is None
            and answer.result() is _LEAD)


class Batcher:
    """Publications go to Redis `slots` round trips at a time at most (one by default): one
    that finds a slot free goes at once, from its own task; those that come while every slot
    is taken queue, and go together, as one script, when a slot frees: the first of them
    still waiting sends the batch (woken once, as it would be for its answer) and answers the
    others (as Centrifugo's Redis broker pipelines what comes in a crowd). A crowd of
    publishes then costs one round trip and one script between them, and a lone publish
    waits for nothing. With one slot the node's publications run in the order they came; a
    publication whose caller gave up before it left is not sent."""

    def __init__(
        self, send: Callable[[list[bytes], list[Any]], Awaitable[list[Any]]],
        limit: int = BATCH_LIMIT, slots: int = 1,
    ) -> None:
        self._send = send
        self._limit = limit
        self._slots = slots
        self._in_flight = 0
        self._queue: list[_Queued] = []
        self._closed = False

    async def submit(self, keys: list[bytes], item: list[Any]) -> Any:
        """The script's answer for this publication; raises what the round trip raised."""
        if self._in_flight < self._slots and not self._queue:  # go now
            self._in_flight += 1
            try:
                [alone] = await self._send(keys, item)
            finally:
                self._release()
            return alone
        entry = _Queued(keys, item, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        try:
            answer = await entry.answer
        except asyncio.CancelledError:
            if _leads(entry):
                self._release()  # it was this one's turn: the next one waiting leads
            elif entry in self._queue:
                self._queue.remove(entry)
            raise
        if answer is not _LEAD:
            return answer
        return await self._lead(entry)

    async def _lead(self, head: _Queued) -> Any:
        """Send the batch `head` (this task's publication) heads, with what waits behind
        it; its own answer."""
        batch = [head]
        while self._queue and len(batch) < self._limit:
            entry = self._queue.pop(0)
            if not entry.answer.done():  # else its caller gave up: not sent
                batch.append(entry)
        if len(batch) == 1:  # alone after all: as if it had found the slot free
            try:
                [alone] = await self._send(head.keys, head.item)
            finally:
                self._release()
            return alone
        keys = [key for entry in batch for key in entry.keys]
        items = [arg for entry in batch for arg in entry.item]
        # Shielded: the others' publications do not share this caller's fate (one that gives
        # up does not make theirs fail, or leave the slot taken).
        sending = asyncio.ensure_future(self._send(keys, items))
        sending.add_done_callback(functools.partial(self._answer, batch))
        answers: list[Any] = await asyncio.shield(sending)
        return answers[0]

    def _answer(self, batch: list[_Queued], sending: asyncio.Future[list[Any]]) -> None:
        self._release()
        if sending.cancelled():
            failure: BaseException | None = BrokerUnavailable("the broker is closing")
        else:
            failure = sending.exception()
        for index, entry in enumerate(batch[1:], 1):
            if entry.answer.done():
                continue
            if failure is not None:
                entry.answer.set_exception(failure)
            else:
                entry.answer.set_result(sending.result()[index])

    def _release(self) -> None:
        """A round trip is back: the slot passes to the first publication still waiting,
        or is free."""
        while self._queue and not self._closed:
            first = self._queue.pop(0)
            if not first.answer.done():
                first.answer.set_result(_LEAD)
                return
        self._in_flight -= 1

    async def close(self) -> None:
        self._closed = True
        queued, self._queue = self._queue, []
        for entry in queued:
            if not entry.answer.done():
                entry.answer.set_exception(BrokerUnavailable("the broker is closing"))
