"""A real `BrokerEvents` for broker tests: it records what the broker tells the node, and
waits (always bounded) for what a test expects."""

from __future__ import annotations

from collections.abc import Callable, Collection

from hub.broker import Broker
from hub.protocol import Message, Relayed
from tests.support import eventually, took

WAIT = 10.0


class Recorder:
    """Plays the node: `channels` are those it wants relayed (what a node's subscriptions
    hold), so `subscribe` and `unsubscribe` below change them with the broker's."""

    def __init__(self) -> None:
        self.channels: set[str] = set()
        self.relayed: list[tuple[str, Relayed]] = []
        self.ups: list[bool] = []
        self.resubscribed: list[list[str]] = []  # the channels of each `on_broker_up`
        self.downs = 0
        self.readies = 0
        self.events: list[str] = []

    def on_relayed(self, channel: str, relayed: list[Relayed]) -> None:
        for item in relayed:
            self.relayed.append((channel, item))
            self._record(f"relayed:{channel}")

    def on_broker_up(self, reconnected: bool, channels: Collection[str]) -> None:
        self.ups.append(reconnected)
        self.resubscribed.append(sorted(channels))
        self._record(f"up:{reconnected}")

    def on_broker_down(self, channels: Collection[str]) -> None:
        self.downs += 1
        self._record("down")

    def on_broker_ready(self) -> None:
        self.readies += 1

    def data_on(self, channel: str) -> list[bytes]:
        """Payloads of the messages relayed on `channel`, in arrival order."""
        return [
            bytes(relayed.data)
            for name, relayed in self.relayed
            if name == channel and isinstance(relayed, Message)
        ]

    async def wait_for(self, condition: Callable[[], bool], within: float = WAIT) -> float:
        """Seconds it took for `condition` to hold; fails the test past `within`."""
        return await took(eventually(condition, within=within, what="broker events"))

    def _record(self, event: str) -> None:
        self.events.append(event)


async def subscribe(broker: Broker, recorder: Recorder, *channels: str) -> None:
    for channel in channels:
        recorder.channels.add(channel)
        await broker.subscribe(channel)


async def unsubscribe(broker: Broker, recorder: Recorder, *channels: str) -> None:
    for channel in channels:
        recorder.channels.discard(channel)
        await broker.unsubscribe(channel)
