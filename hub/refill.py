"""Catching up after a broker outage (PROTOCOL §5): each channel with history that has
local subscribers gets what it missed, in order, before any live message held meanwhile —
or one `reset` when the history is gone or the epoch changed.

One task does the work, in rounds: channels are refilled side by side (bounded); a channel
whose history read fails stays held and is tried again while the broker is up; after a few
failed rounds it gets a `reset` so its subscribers reload rather than wait for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from hub import protocol as p
from hub.broker import Broker, HistoryOptions, StreamPosition
from hub.hub import Hub, Refill, already_seen
from hub.metrics import Metrics
from hub.settings import Settings
from hub.tasks import cancel
from hub.wire import frame_of

log = logging.getLogger("hub.refill")

CONCURRENCY = 32
ATTEMPTS = 5
FIRST_RETRY_DELAY = 0.2
SUBSCRIBE_WAIT_SECONDS = 10.0


def history_options(settings: Settings, channel: str) -> HistoryOptions | None:
    namespace = settings.namespace_of(channel)
    if not namespace.has_history:
        return None
    return HistoryOptions(namespace.history_size, namespace.history_ttl)


class Refiller:
    def __init__(
        self,
        hub: Hub,
        broker: Broker,
        settings: Settings,
        metrics: Metrics,
        deliver: Callable[[str, p.Message], None],
    ) -> None:
        self._hub = hub
        self._broker = broker
        self._settings = settings
        self._metrics = metrics
        self._deliver = deliver
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Hold every channel with history and a known position, and refill them."""
        hub = self._hub
        for channel in hub.last_position_by_channel:
            if channel not in hub.refilling and history_options(self._settings, channel):
                hub.refilling[channel] = Refill()
        if hub.refilling and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="hub-refill")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    async def wait(self, channel: str) -> None:
        """A subscribe to a channel being refilled waits for it: its `subscribed` offset
        must not overtake the messages its fellow subscribers are still owed."""
        refill = self._hub.refilling.get(channel)
        if refill is not None:
            await asyncio.wait_for(refill.done.wait(), SUBSCRIBE_WAIT_SECONDS)

    async def _run(self) -> None:
        parallel = asyncio.Semaphore(CONCURRENCY)

        async def attempt(channel: str) -> None:
            async with parallel:
                try:
                    await self._refill(channel)
                except Exception as exc:
                    log.warning("refilling a channel from history failed: %s", exc)

        failed_rounds = 0
        while self._hub.refilling and self._broker.up:
            await asyncio.gather(*(attempt(channel) for channel in list(self._hub.refilling)))
            if not self._hub.refilling:
                return
            failed_rounds += 1
            if failed_rounds >= ATTEMPTS:
                for channel in list(self._hub.refilling):
                    self._give_up(channel)
                return
            await asyncio.sleep(FIRST_RETRY_DELAY * 2 ** (failed_rounds - 1))
        # Broker down again: the channels stay held; its return starts the next run.

    async def _refill(self, channel: str) -> None:
        hub = self._hub
        known = hub.last_position_by_channel.get(channel)
        options = history_options(self._settings, channel)
        if known is None or options is None or channel not in hub.subscribers_by_channel:
            self._finish(channel, None)
            return
        limit = self._settings.recovery_max + 1
        page = await self._broker.history(channel, options, known, limit)
        subscribers = hub.subscribers_by_channel.get(channel, set())
        if page.complete and len(page.messages) <= self._settings.recovery_max:
            delivered = 0
            for message in page.messages:
                delivered += hub.fan_out_positioned(channel, subscribers, message)
            self._metrics.messages_delivered.inc(delivered)
        else:
            position = page.position
            reset = p.Reset(channel=channel, epoch=position.epoch, offset=position.offset)
            hub.fan_out(subscribers, frame_of(reset))
        if subscribers:
            hub.last_position_by_channel[channel] = page.position
        self._finish(channel, page.position)

    def _give_up(self, channel: str) -> None:
        """History stayed unreadable: tell subscribers to reload, then go on live."""
        hub = self._hub
        refill = hub.refilling.get(channel)
        known = hub.last_position_by_channel.get(channel)
        first = refill.held[0] if refill and refill.held else None
        if first is not None and first.epoch is not None and first.offset is not None:
            position: StreamPosition | None = StreamPosition(first.offset - 1, first.epoch)
        else:
            position = known
        subscribers = hub.subscribers_by_channel.get(channel)
        if position is not None and subscribers:
            reset = p.Reset(channel=channel, epoch=position.epoch, offset=position.offset)
            hub.fan_out(subscribers, frame_of(reset))
        log.warning("gave up refilling a channel after %d attempts; sent reset", ATTEMPTS)
        self._finish(channel, position)

    def _finish(self, channel: str, position: StreamPosition | None) -> None:
        refill = self._hub.refilling.pop(channel, None)
        if refill is None:
            return
        for message in refill.held:
            if position is None or not already_seen(message, position):
                self._deliver(channel, message)
        refill.done.set()
