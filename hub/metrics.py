"""Prometheus collectors of PROTOCOL §8, in the app's own registry (no global state).

Label values are bounded: close codes, error codes, fixed reasons and sources — never a
channel or user name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder

from hub import __version__
from hub.abuse import ProtocolErrors, auth_reason
from hub.errors import CloseCode, ErrorCode

# The client protocols: /ws and /connection/websocket (the Codec's `protocol`).
CLIENT_PROTOCOLS = ("ws", "centrifugo")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


# Close codes a client may send are its own choice; only these become label values.
_KNOWN_CLOSE_CODES = frozenset(int(code) for code in CloseCode) | {1002, 1005, 1006, 1007, 1010}


def close_code_label(code: int) -> str:
    return str(code) if code in _KNOWN_CLOSE_CODES else "other"


EMULATION_OUTCOMES = ("local", "routed", "bad_request", "unknown_session", "unknown_node",
                      "inbox_full", "unavailable", "timeout")


class Metrics:
    def __init__(self, node_id: str) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("hub_connections", "Open connections (WebSockets and streams)",
                                 registry=registry)
        self.connections_by_protocol = Gauge(
            "hub_connections_by_protocol",
            "Open connections, by client protocol (ws: /ws; centrifugo: /connection/websocket "
            "and Centrifugo's other transports)", ["protocol"], registry=registry,
        )
        self.subscriptions = Gauge(
            "hub_subscriptions", "Channel subscriptions (personal ones excluded)", registry=registry
        )
        self.channels = Gauge("hub_channels", "Distinct channels with a local subscriber",
                              registry=registry)
        self.connections_accepted = Counter(
            "hub_connections_accepted", "Connections authenticated and welcomed", registry=registry
        )
        self.disconnections = Counter(
            "hub_disconnections", "Connections closed, by close code", ["code"], registry=registry
        )
        self.messages_published = Counter(
            "hub_messages_published", "Messages published, by source", ["source"],
            registry=registry,
        )
        self.messages_delivered = Counter(
            "hub_messages_delivered", "Frames of messages put into connection queues",
            registry=registry,
        )
        self.messages_dropped = Counter(
            "hub_messages_dropped", "Messages not delivered, by reason", ["reason"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "hub_auth_failures", "Failed authentications, by reason", ["reason"], registry=registry
        )
        # Bad input of clients by reason (hub.abuse.REASONS), logged at INFO once a minute.
        self.protocol_errors = ProtocolErrors(Counter(
            "hub_protocol_errors", "Protocol errors of clients, by reason", ["reason"],
            registry=registry,
        ))
        self.command_errors = Counter(
            "hub_command_errors", "Commands answered with an error, by code", ["code"],
            registry=registry,
        )
        self.broker_up = Gauge(
            "hub_broker_up", "1 while the broker is reachable (every shard of a Redis Cluster)",
            registry=registry,
        )
        self.broker_shards_up = Gauge(
            "hub_broker_shards_up", "Broker shards reachable (1 but on a Redis Cluster)",
            registry=registry,
        )
        self.broker_reconnects = Counter(
            "hub_broker_reconnects", "Broker connections re-established", registry=registry
        )
        self.publish_seconds = Histogram(
            "hub_publish_seconds", "Time to hand a publication to the broker",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.delivery_lag_seconds = Histogram(
            "hub_delivery_lag_seconds", "From publish to enqueue on the delivering node",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.emulation_requests = Counter(
            "hub_emulation_requests",
            "POST /emulation batches, by outcome (local: to a session of this node; routed: "
            "through the broker to the node holding it; PROTOCOL §15)", ["outcome"],
            registry=registry,
        )
        self.events = Counter(
            "hub_events", "Events of PROTOCOL §14, by name and outcome (produced: recorded "
            "by this node; sent: delivered by it; retried: in a failed attempt; dropped: "
            "past HUB_EVENTS_MAX_PENDING)", ["name", "outcome"], registry=registry,
        )
        self.event_delay = Histogram(
            "hub_event_delay_seconds", "From an event to its delivery (2xx)",
            buckets=(*_LATENCY_BUCKETS, 10, 30, 60, 300), registry=registry,
        )
        # Label values known up front start at 0, so rate() sees the first increment.
        for source in ("api", "client"):
            self.messages_published.labels(source)
        self.messages_dropped.labels("slow_consumer")
        for outcome in EMULATION_OUTCOMES:
            self.emulation_requests.labels(outcome)
        for reason in ("missing", "invalid", "expired", "timeout"):
            self.auth_failures.labels(reason)
        for close_code in CloseCode:
            self.disconnections.labels(str(int(close_code)))
        for error_code in ErrorCode:
            self.command_errors.labels(error_code.value)
        self.node_id = node_id
        self.node_info = Info("hub_node", "This node", registry=registry)
        self.describe_node()

    def auth_failed(self, reason: str) -> None:
        """A failed authentication (`AuthFailed.reason`): counted, and as the protocol error
        it is (an expired token is none)."""
        self.auth_failures.labels(reason).inc()
        error = auth_reason(reason)
        if error is not None:
            self.protocol_errors.count(error)

    # Read from the counters themselves: collecting the registry would also run the gauges'
    # functions, and hub_connections_by_protocol walks every connection.

    def published_count(self) -> int:
        """Messages published through this node since it started (every source)."""
        return _total(self.messages_published)

    def delivered_count(self) -> int:
        return _total(self.messages_delivered)

    def accepted_count(self) -> int:
        return _total(self.connections_accepted)

    def describe_node(self, **details: str) -> None:
        """`hub_node_info`: node id, version, and what start-up chose (`write_path`)."""
        self.node_info.info({"node": self.node_id, "version": __version__, **details})

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Prometheus text, or OpenMetrics when the scraper asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def _total(counter: Counter) -> int:
    """A counter's value summed over its labels."""
    return int(sum(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    ))
