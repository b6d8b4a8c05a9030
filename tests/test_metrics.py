"""`/metrics` (PROTOCOL §8): every metric with its labels, both exposition formats, and
counters and gauges that follow what happens on the node, exactly."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from hub import __version__
from hub.abuse import REASONS
from hub.auth import mint_token
from hub.hooks import HOOK_NAMES, OUTCOMES
from hub.metrics import EMULATION_OUTCOMES
from tests.redis_server import RedisServer
from tests.support import (
    API_KEY,
    SECRET,
    WAIT,
    Client,
    NodeProcess,
    RunningNode,
    connect,
    eventually,
    make_settings,
    publish,
    running_node,
    token,
)

NAMESPACES = {"room": {"subscribe": "any", "publish": "any"}}
NODE_ID = "metrics-node"

# PROTOCOL §8: sample name -> (family type, label names).
SECTION_8: dict[str, tuple[str, set[str]]] = {
    "hub_connections": ("gauge", set()),
    "hub_connections_by_protocol": ("gauge", {"protocol"}),
    "hub_subscriptions": ("gauge", set()),
    "hub_channels": ("gauge", set()),
    "hub_connections_accepted_total": ("counter", set()),
    "hub_disconnections_total": ("counter", {"code"}),
    "hub_messages_published_total": ("counter", {"source"}),
    "hub_messages_delivered_total": ("counter", set()),
    "hub_messages_dropped_total": ("counter", {"reason"}),
    "hub_auth_failures_total": ("counter", {"reason"}),
    "hub_command_errors_total": ("counter", {"code"}),
    "hub_broker_up": ("gauge", set()),
    "hub_broker_reconnects_total": ("counter", set()),
    "hub_publish_seconds_bucket": ("histogram", {"le"}),
    "hub_publish_seconds_count": ("histogram", set()),
    "hub_publish_seconds_sum": ("histogram", set()),
    "hub_delivery_lag_seconds_bucket": ("histogram", {"le"}),
    "hub_delivery_lag_seconds_count": ("histogram", set()),
    "hub_delivery_lag_seconds_sum": ("histogram", set()),
    "hub_node_info": ("gauge", {"node", "version", "write_path"}),
}

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One parsed Prometheus text exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.types[sample.name] = family.type
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """The value of one sample; 0 when it is not there (yet)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


async def scrape(node: RunningNode) -> Scrape:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        response = await http.get(node.url + "/metrics")
    assert response.status_code == 200
    return Scrape(response.text)


@pytest.fixture
async def node() -> AsyncIterator[RunningNode]:
    settings = make_settings(
        node_id=NODE_ID, namespaces=NAMESPACES, auth_timeout=0.3, rate_limit=0
    )
    async with running_node(settings) as running:
        yield running


async def refused(ws_url: str, *, headers: dict[str, str] | None = None,
                  first_frame: str | None = None) -> int:
    """Open a connection that fails authentication; returns its close code."""
    async with websockets.connect(ws_url, additional_headers=headers or {},
                                  open_timeout=WAIT) as connection:
        if first_frame is not None:
            await connection.send(first_frame)
        client = Client(connection)
        return await client.closed()


def bearer(jwt: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt}"}


async def test_every_metric_of_section_8_with_its_labels(node: RunningNode) -> None:
    # Put a sample under every labelled family first: a family without samples shows no
    # labels.
    assert await refused(node.ws_url, headers=bearer("not-a-jwt")) == 4001
    async with connect(node.ws_url, token("alice")) as alice:
        assert (await alice.request({"type": "nope"}))["code"] == "unknown_type"
        await alice.subscribe("room:a")
        await publish(node, "room:a", 1)
        await alice.expect("message")
    current = await eventually(
        lambda: scrape(node), lambda s: s("hub_disconnections_total", code="1000") == 1
    )
    for name, (kind, labels) in SECTION_8.items():
        assert current.types.get(name) == kind, (name, current.types.get(name))
        label_sets = current.label_sets(name)
        assert label_sets, f"no sample of {name}"
        for found in label_sets:
            assert set(found) == labels, (name, found)
    assert current("hub_broker_up") == 1


async def test_openmetrics_when_the_scraper_asks_for_it(node: RunningNode) -> None:
    async with httpx.AsyncClient(base_url=node.url, timeout=WAIT) as http:
        plain = await http.get("/metrics")
        open_metrics = await http.get("/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
        })
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    parsed = parse_openmetrics(open_metrics.text)  # type: ignore[no-untyped-call]
    families = {family.name: family for family in parsed}
    for name in ("hub_connections", "hub_messages_delivered", "hub_publish_seconds"):
        assert name in families, sorted(families)
    assert families["hub_node"].type == "info"
    assert families["hub_node"].samples[0].labels == {
        "node": NODE_ID, "version": __version__, "write_path": "direct"
    }


async def test_k_messages_to_n_subscribers_are_k_times_n_deliveries(node: RunningNode) -> None:
    k, n = 7, 4
    before = await scrape(node)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(node.ws_url, token(f"user{i}")))
            for i in range(n)
        ]
        for client in clients:
            await client.subscribe("room:fan")
        async with node.api() as api:
            for i in range(k):
                response = await api.post(
                    "/api/publish", json={"channel": "room:fan", "data": i}
                )
                assert response.status_code == 200
        for client in clients:
            assert [(await client.expect("message"))["data"] for _ in range(k)] == list(range(k))
        after = await scrape(node)
    delivered = after("hub_messages_delivered_total") - before("hub_messages_delivered_total")
    assert delivered == k * n
    published = after("hub_messages_published_total", source="api") - before(
        "hub_messages_published_total", source="api")
    assert published == k
    # One publish observation and one delivery-lag observation (per node) per message.
    assert after("hub_publish_seconds_count") - before("hub_publish_seconds_count") == k
    lags = after("hub_delivery_lag_seconds_count") - before("hub_delivery_lag_seconds_count")
    assert lags == k
    assert after("hub_delivery_lag_seconds_bucket", le="+Inf") == after(
        "hub_delivery_lag_seconds_count")
    for histogram in ("hub_publish_seconds", "hub_delivery_lag_seconds"):
        total = after(histogram + "_sum")
        assert math.isfinite(total) and 0 <= total < k * 5, (histogram, total)


async def test_published_by_source(node: RunningNode) -> None:
    before = await scrape(node)
    async with connect(node.ws_url, token("alice")) as alice:
        for i in range(3):
            reply = await alice.request({"type": "publish", "channel": "room:p", "data": i})
            assert reply["type"] == "published", reply
        await publish(node, "room:p", "api")
        # A publish answered with an error was not published: it counts nowhere.
        reply = await alice.request({"type": "publish", "channel": "@bob", "data": 0})
        assert reply["code"] == "forbidden"
    after = await scrape(node)
    assert after("hub_messages_published_total", source="client") - before(
        "hub_messages_published_total", source="client") == 3
    assert after("hub_messages_published_total", source="api") - before(
        "hub_messages_published_total", source="api") == 1
    assert after("hub_publish_seconds_count") - before("hub_publish_seconds_count") == 4


async def test_slow_consumer_close_is_counted() -> None:
    """A client that stops reading while ~1 KB messages pour in is closed with 4008; the
    close and the dropped messages are counted, and other connections stay."""
    settings = make_settings(node_id=NODE_ID, namespaces=NAMESPACES, queue_limit=5)
    payload = "x" * 1000
    async with running_node(settings) as node, \
            connect(node.ws_url, token("slow")) as slow, \
            connect(node.ws_url, token("bystander")) as bystander, \
            node.api() as api:
        await slow.subscribe("room:flood")
        before = await scrape(node)
        transport: Any = slow.connection.transport
        transport.pause_reading()
        sent = 0
        dropped = 0.0
        # Bounded: at most 10,000 messages (10 MB), 20 per broadcast call (one channel,
        # listed 20 times); stop once the node dropped.
        while sent < 10_000 and not dropped:
            response = await api.post("/api/broadcast", json={
                "channels": ["room:flood"] * 20, "data": [sent, payload],
            })
            assert response.status_code == 200, response.text
            sent += 20
            current = await scrape(node)
            dropped = current("hub_messages_dropped_total", reason="slow_consumer") - before(
                "hub_messages_dropped_total", reason="slow_consumer")
        assert dropped > 0, f"no drop after {sent} messages"
        transport.resume_reading()
        assert await slow.closed() == 4008
        after = await eventually(
            lambda: scrape(node), lambda s: s("hub_disconnections_total", code="4008") == 1
        )
        assert after("hub_disconnections_total", code="4008") - before(
            "hub_disconnections_total", code="4008") == 1
        assert after("hub_connections") == 1
        assert (await bystander.request({"type": "ping"}))["type"] == "pong"


async def test_auth_failures_by_reason(node: RunningNode) -> None:
    expired = mint_token(SECRET, "carol", ttl=-60)
    wrong_key = mint_token("another-secret-0123456789-abcdefghijkl", "carol")
    assert await refused(node.ws_url, headers=bearer("garbage")) == 4001
    assert await refused(node.ws_url, headers=bearer(wrong_key)) == 4001
    assert await refused(node.ws_url, headers=bearer(expired)) == 4002
    assert await refused(node.ws_url, first_frame='{"type":"ping"}') == 4001  # no auth frame
    assert await refused(node.ws_url) == 4001  # nothing within the auth timeout
    current = await scrape(node)
    assert current("hub_auth_failures_total", reason="invalid") == 2
    assert current("hub_auth_failures_total", reason="expired") == 1
    assert current("hub_auth_failures_total", reason="missing") == 1
    assert current("hub_auth_failures_total", reason="timeout") == 1
    assert current("hub_disconnections_total", code="4001") == 4
    assert current("hub_disconnections_total", code="4002") == 1
    assert current("hub_connections_accepted_total") == 0
    assert current("hub_connections") == 0


async def test_command_errors_by_code(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice", channels=["room:*"])) as alice:
        await alice.send({"type": "nope", "id": 1})
        await alice.connection.send("{not json")
        await alice.send({"type": "subscribe", "channel": "bad channel!", "id": 2})
        await alice.send({"type": "subscribe", "channel": "@bob", "id": 3})
        await alice.send({"type": "unsubscribe", "channel": "room:x", "id": 4})
        await alice.send({"type": "unsubscribe", "channel": "room:y", "id": 5})
        codes = [(await alice.expect("error"))["code"] for _ in range(6)]
    assert codes == ["unknown_type", "bad_request", "invalid_channel", "forbidden",
                     "not_subscribed", "not_subscribed"]
    current = await scrape(node)
    assert current("hub_command_errors_total", code="unknown_type") == 1
    assert current("hub_command_errors_total", code="bad_request") == 1
    assert current("hub_command_errors_total", code="invalid_channel") == 1
    assert current("hub_command_errors_total", code="forbidden") == 1
    assert current("hub_command_errors_total", code="not_subscribed") == 2


async def test_gauges_follow_connections_and_subscriptions(node: RunningNode) -> None:
    def gauges(s: Scrape) -> tuple[float, float, float]:
        return s("hub_connections"), s("hub_subscriptions"), s("hub_channels")

    assert gauges(await scrape(node)) == (0, 0, 0)
    async with connect(node.ws_url, token("alice")) as alice:
        assert gauges(await scrape(node)) == (1, 0, 0)  # the personal channel counts nowhere
        async with connect(node.ws_url, token("bob")) as bob:
            assert gauges(await scrape(node)) == (2, 0, 0)
            await alice.subscribe("room:a")
            await alice.subscribe("room:b")
            await bob.subscribe("room:a")
            assert gauges(await scrape(node)) == (2, 3, 2)
            await alice.request({"type": "unsubscribe", "channel": "room:b"})
            assert gauges(await scrape(node)) == (2, 2, 1)
        # bob's disconnect takes his subscription with it
        await eventually(lambda: scrape(node), lambda s: gauges(s) == (1, 1, 1))
    current = await eventually(lambda: scrape(node), lambda s: gauges(s) == (0, 0, 0))
    assert current("hub_connections_accepted_total") == 2
    assert current("hub_disconnections_total", code="1000") == 2


async def test_connections_by_protocol(node: RunningNode) -> None:
    def by_protocol(s: Scrape) -> tuple[float, float]:
        return (s("hub_connections_by_protocol", protocol="ws"),
                s("hub_connections_by_protocol", protocol="centrifugo"))

    assert by_protocol(await scrape(node)) == (0, 0)
    centrifugo_url = node.ws_url.replace("/ws", "/connection/websocket")
    async with connect(node.ws_url, token("alice")), \
            websockets.connect(centrifugo_url, open_timeout=WAIT) as sdk:
        await sdk.send(json.dumps({"id": 1, "connect": {"token": token("bob")}}))
        assert "connect" in json.loads(await sdk.recv())
        current = await scrape(node)
        assert by_protocol(current) == (1, 1)
        assert current("hub_connections") == 2
    await eventually(lambda: scrape(node), lambda s: by_protocol(s) == (0, 0))


async def test_node_info(node: RunningNode) -> None:
    current = await scrape(node)
    info = {"node": NODE_ID, "version": __version__, "write_path": "direct"}
    assert current.label_sets("hub_node_info") == [info]
    assert current("hub_node_info", **info) == 1


async def test_label_values_are_bounded(node: RunningNode) -> None:
    """No channel or user name shows up anywhere, whatever the traffic."""
    secret = "zq7secretname"
    user, channel = f"user-{secret}", f"room:chan-{secret}"
    async with connect(node.ws_url, token(user)) as client:
        await client.subscribe(channel)
        await client.request({"type": "publish", "channel": channel, "data": secret})
        await client.request({"type": "unsubscribe", "channel": f"room:other-{secret}"})
        await client.request({"type": "subscribe", "channel": f"@{secret}"})
        await client.request({"type": f"type-{secret}"})
        await publish(node, channel, secret)
        async with node.api() as api:
            await api.post("/api/send", json={"user": user, "data": secret})
    expired = mint_token(SECRET, user, ttl=-60)
    assert await refused(node.ws_url, headers=bearer(expired)) == 4002
    await eventually(lambda: scrape(node), lambda s: s("hub_connections") == 0)
    current = await scrape(node)
    assert secret not in current.text
    bounded: dict[str, Callable[[str], bool]] = {
        "code": lambda v: v.isdigit() or v.replace("_", "").isalpha(),
        "reason": lambda v: v in {"invalid", "expired", "missing", "timeout", "slow_consumer",
                                  "origin", *REASONS},
        "source": lambda v: v in {"api", "client"},
        "le": lambda v: v == "+Inf" or math.isfinite(float(v)),
        "node": lambda v: v == NODE_ID,
        "version": lambda v: v == __version__,
        "write_path": lambda v: v in {"direct", "asgi"},
        "protocol": lambda v: v in {"ws", "centrifugo"},
        "hook": lambda v: v in HOOK_NAMES,
        # hub_emulation_requests_total and hub_hook_calls_total
        "outcome": lambda v: v in {*EMULATION_OUTCOMES, *OUTCOMES},
    }
    for (name, labels), _ in current.samples.items():
        for label, value in labels:
            assert label in bounded and bounded[label](value), (name, label, value)


# hub_broker_up against a real Redis that goes away and comes back


@contextlib.contextmanager
def node_process(redis: RedisServer) -> Iterator[NodeProcess]:
    process = NodeProcess({
        "HUB_JWT_SECRET": SECRET, "HUB_API_KEY": API_KEY, "HUB_NODE_ID": NODE_ID,
        "HUB_REDIS_URL": redis.url, "HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0",
    })
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def broker_state(url: str) -> tuple[float, int, float]:
    """(hub_broker_up, /readyz status, hub_broker_reconnects_total), read one after another."""
    async with httpx.AsyncClient(timeout=2) as http:
        try:
            current = Scrape((await http.get(url + "/metrics")).text)
            ready = (await http.get(url + "/readyz")).status_code
        except httpx.HTTPError:
            return -1.0, 0, -1.0
    return current("hub_broker_up"), ready, current("hub_broker_reconnects_total")


async def test_broker_up_follows_redis(redis_factory: Callable[..., RedisServer]) -> None:
    """`hub_broker_up` and `/readyz` follow Redis down and up (read together: the probes act
    in between, so each wait asks for both at once)."""
    redis = redis_factory()
    with node_process(redis) as process:
        _, _, reconnects = await eventually(
            lambda: broker_state(process.url), lambda s: s[:2] == (1, 200), within=WAIT,
            what="up and ready")
        assert reconnects == 0
        redis.stop()
        await eventually(lambda: broker_state(process.url), lambda s: s[:2] == (0, 503),
                         within=10, what="down and not ready")
        redis.start(keep_data=False)
        _, _, reconnects = await eventually(
            lambda: broker_state(process.url), lambda s: s[:2] == (1, 200), within=15,
            what="up and ready again")
        assert reconnects == 1


async def test_a_clients_own_close_code_is_not_a_label_value(node: RunningNode) -> None:
    """Clients choose their close codes (3000-4999): only known ones become label values."""
    async with connect(node.ws_url, token("closer")) as client:
        await client.connection.close(code=3999, reason="mine")
    after = await eventually(
        lambda: scrape(node), lambda s: s("hub_disconnections_total", code="other") >= 1
    )
    assert after("hub_disconnections_total", code="3999") == 0
