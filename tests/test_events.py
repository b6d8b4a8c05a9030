"""Events (PROTOCOL §14) of a single node (in-process broker): to a receiver app in its own
process that checks every signature, and to the callable of an embedded hub; the settings;
the signature helper. The cluster's are in tests/test_events_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.embed import EmbeddedHub
from hub.events import sign
from hub.hooks import verify_signature
from hub.settings import SettingsError, load_settings
from tests.redis_server import free_port
from tests.support import (
    RunningNode,
    connect,
    eventually,
    eventually_sync,
    make_settings,
    running_node,
    token,
)

EVENTS_SECRET = "events-secret-for-tests"
NAMESPACES = {
    "default": {"subscribe": "token", "publish": "none"},
    "chat": {"subscribe": "any", "publish": "any", "presence": True},
    "talk": {"subscribe": "any", "publish": "any", "events_client_publish": True},
}


@dataclass
class Receiver:
    url: str
    process: subprocess.Popen[bytes]

    @property
    def events_url(self) -> str:
        return self.url + "/events"

    async def recorded(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as http:
            body: dict[str, Any] = (await http.get(self.events_url)).json()
            return body

    async def events(self, **match: str) -> list[dict[str, Any]]:
        """Recorded events whose fields equal `match`, in arrival order."""
        return [
            event for event in (await self.recorded())["events"]
            if all(event.get(key) == value for key, value in match.items())
        ]

    async def mode(self, **mode: Any) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.post(self.url + "/mode", json=mode)).status_code == 200


@contextlib.contextmanager
def receiver_process(port: int | None = None) -> Iterator[Receiver]:
    """The receiver in its own process, on `port` or a free one."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.events_receiver", str(port), EVENTS_SECRET],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"receiver on")
        url = f"http://127.0.0.1:{port}"
        eventually_sync(lambda: httpx.get(url + "/events", timeout=1).status_code == 200,
                        within=5, what="the receiver", ignoring=(httpx.HTTPError,))
        yield Receiver(url, process)
    finally:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiver_process() as running:
        yield running


async def events_metric(node: RunningNode, name: str, outcome: str) -> float:
    text = (await node.http.get("/metrics")).text
    return events_sample(text, name, outcome)


def events_sample(text: str, name: str, outcome: str) -> float:
    """hub_events_total{name, outcome} (`metric_of` takes `name` for the sample's)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hub_events_total" and sample.labels == {
                "name": name, "outcome": outcome
            }:
                return float(sample.value)
    return 0.0


def names(events: list[dict[str, Any]]) -> list[str]:
    return [event["name"] for event in events]


async def test_single_node_tells_transitions_in_order(receiver: Receiver) -> None:
    """Occupied/vacated, online/offline and member added/removed come once each, signed,
    with ids and times; a second subscriber or connection changes nothing."""
    settings = make_settings(namespaces=NAMESPACES, events_url=receiver.events_url,
                             events_secret=EVENTS_SECRET)
    async with running_node(settings) as node:
        async with connect(node.ws_url, token("ev-ann")) as one:
            await one.subscribe("chat:ev-room")
            async with connect(node.ws_url, token("ev-ann")) as two:
                await two.subscribe("chat:ev-room")
                await eventually(lambda: receiver.events(channel="chat:ev-room"),
                                 lambda found: len(found) == 2, what="occupied, added")
                await two.close()
            await one.request({"type": "unsubscribe", "channel": "chat:ev-room"})
            await eventually(lambda: receiver.events(channel="chat:ev-room"),
                             lambda found: len(found) == 4, what="removed, vacated")
        await eventually(lambda: receiver.events(user="ev-ann"),
                         lambda found: "user_offline" in names(found), what="offline")
        assert await events_metric(node, "channel_occupied", "sent") == 1
    on_channel = await receiver.events(channel="chat:ev-room")
    assert names(on_channel) == [
        "channel_occupied", "member_added", "member_removed", "channel_vacated"]
    added = on_channel[1]
    assert added["user"] == "ev-ann" and len(added["clients"]) == 1
    assert names(await receiver.events(user="ev-ann", name="user_online")) == ["user_online"]
    assert names(await receiver.events(user="ev-ann", name="user_offline")) == ["user_offline"]
    everything = await receiver.recorded()
    ids = [event["id"] for event in everything["events"]]
    assert len(ids) == len(set(ids))
    assert all(isinstance(event["time_ms"], int) for event in everything["events"])
    assert everything["bad_signatures"] == 0


async def test_receiver_failing_delays_and_loses_nothing(receiver: Receiver) -> None:
    """500s, then a slow answer past the timeout... then 200: every event arrives, once,
    in order per channel; client traffic goes on meanwhile."""
    settings = make_settings(namespaces=NAMESPACES, events_url=receiver.events_url,
                             events_secret=EVENTS_SECRET, node_id="ev-failing")
    await receiver.mode(status=500)
    try:
        async with running_node(settings) as node, connect(node.ws_url, token("ev-bo")) as c:
            for _ in range(3):
                for index in range(5):
                    await c.subscribe(f"chat:ev-fail-{index}")
                for index in range(5):
                    await c.request({"type": "unsubscribe", "channel": f"chat:ev-fail-{index}"})
            await eventually(lambda: events_metric(node, "user_online", "retried"),
                             lambda value: value > 0, what="a retry")
            await receiver.mode(status=200)
            for index in range(5):
                channel = f"chat:ev-fail-{index}"
                found = await eventually(functools.partial(receiver.events, channel=channel),
                                         lambda found: len(found) == 12, within=15,
                                         what=f"12 events of {channel}")
                assert names(found) == [
                    "channel_occupied", "member_added", "member_removed", "channel_vacated"
                ] * 3
    finally:
        await receiver.mode(status=200)


async def test_receiver_not_listening_yet() -> None:
    """A closed port is a failed attempt like any other: client traffic goes on, and the
    events arrive once something listens there."""
    port = free_port()
    settings = make_settings(namespaces=NAMESPACES, node_id="ev-closed",
                             events_secret=EVENTS_SECRET,
                             events_url=f"http://127.0.0.1:{port}/events")
    async with running_node(settings) as node, connect(node.ws_url, token("ev-cl")) as c:
        await c.subscribe("chat:ev-closed")
        await eventually(lambda: events_metric(node, "user_online", "retried"),
                         lambda value: value > 0, what="a retry")
        await c.subscribe("chat:ev-closed-2")  # clients are not held up meanwhile
        with receiver_process(port) as receiver:
            found = await eventually(
                lambda: receiver.events(channel="chat:ev-closed-2"), within=15,
                what="the events, once the receiver listens")
    assert names(found) == ["channel_occupied", "member_added"]


async def test_client_publish_over_the_socket(receiver: Receiver) -> None:
    """`client_publish` for namespaces with events_client_publish only, and only for what
    clients publish (not the API)."""
    settings = make_settings(namespaces=NAMESPACES, events_url=receiver.events_url,
                             events_secret=EVENTS_SECRET, node_id="ev-pub")
    async with running_node(settings) as node, connect(node.ws_url, token("ev-pub")) as c:
        for channel in ("talk:ev-pub", "chat:ev-pub"):
            await c.subscribe(channel)
            reply = await c.request({"type": "publish", "channel": channel,
                                     "data": {"n": channel}})
            assert reply["type"] == "published", reply
        await node.http.post("/api/publish", json={"channel": "talk:ev-pub", "data": 1})
        found = await eventually(lambda: receiver.events(name="client_publish", user="ev-pub"))
    assert found == [{
        "id": found[0]["id"], "time_ms": found[0]["time_ms"], "name": "client_publish",
        "channel": "talk:ev-pub", "user": "ev-pub", "client": c.welcome["client"],
        "data": {"n": "talk:ev-pub"},
    }]


async def test_embedded_callable_gets_the_events() -> None:
    batches: list[list[dict[str, Any]]] = []
    failures = [2]

    async def collect(events: list[dict[str, Any]]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("not now")  # retried
        batches.append(events)

    hub = EmbeddedHub(make_settings(namespaces=NAMESPACES), on_events=collect)
    async with hub.running():
        hub.node.events.channel("chat:e", True)  # type: ignore[union-attr]
        hub.node.events.channel("chat:e", False)  # type: ignore[union-attr]
        await eventually(lambda: sum(len(batch) for batch in batches) == 2, within=5)
    assert [e["name"] for batch in batches for e in batch] == [
        "channel_occupied", "channel_vacated"]


@pytest.mark.parametrize("overrides, message", [
    ({"HUB_EVENTS_URL": "http://x/e"}, "HUB_EVENTS_SECRET"),
    ({"HUB_EVENTS_URL": "ftp://x", "HUB_EVENTS_SECRET": "s"}, "http"),
    ({"HUB_EVENTS_MAX_PENDING": "0"}, "HUB_EVENTS_MAX_PENDING"),
    ({"HUB_EVENTS_MAX_PENDING": "many"}, "HUB_EVENTS_MAX_PENDING"),
])
def test_bad_settings_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=overrides)


def test_toml_events_table(tmp_path: Any) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('[events]\nurl = "http://127.0.0.1:9/e"\nsecret = "s"\nmax_pending = 7\n'
                    '[namespaces.talk]\nevents_client_publish = true\n')
    settings = load_settings(environ={"HUB_CONFIG": str(path)})
    assert (settings.events_url, settings.events_secret, settings.events_max_pending) == (
        "http://127.0.0.1:9/e", "s", 7)
    assert settings.namespace_of("talk:x").events_client_publish
    overridden = load_settings(environ={"HUB_CONFIG": str(path), "HUB_EVENTS_MAX_PENDING": "9"})
    assert overridden.events_max_pending == 9
    path.write_text("[events]\nurl_typo = 1\n")
    with pytest.raises(SettingsError, match="url_typo"):
        load_settings(environ={"HUB_CONFIG": str(path)})


def test_signature_helper() -> None:
    body = b'{"events":[]}'
    header = sign(body, "k")
    assert header.startswith("sha256=") and verify_signature(body, header, "k")
    assert not verify_signature(body + b" ", header, "k")
    assert not verify_signature(body, header, "other")
    assert not verify_signature(body, None, "k")
    assert not verify_signature(body, "sha256=zz", "k")


async def test_overflow_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Past HUB_EVENTS_MAX_PENDING events are dropped, counted and logged, not kept."""
    release = asyncio.Event()
    got: list[dict[str, Any]] = []

    async def slow(events: list[dict[str, Any]]) -> None:
        await release.wait()
        got.extend(events)

    hub = EmbeddedHub(make_settings(namespaces=NAMESPACES, events_max_pending=5),
                      on_events=slow)
    async with hub.running():
        events = hub.node.events
        assert events is not None
        for index in range(20):
            events.channel(f"chat:o{index}", True)
        release.set()
        await eventually(lambda: len(got) == 5, within=5)
        text = hub.node.metrics.exposition(None)[0].decode()
    assert 'hub_events_total{name="channel_occupied",outcome="dropped"} 15.0' in text
    assert "HUB_EVENTS_MAX_PENDING" in caplog.text

