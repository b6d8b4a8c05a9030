"""The result of a run: one JSON-able dict, and the human summary of it.

`failures` lists what makes the run fail (exit status 1): frames lost or extra, publishes
answered with an error, and anything a subscriber's checks found (`benchmarks.sequence`):
a `seq` twice or unknown; on the hub an offset duplicated, skipped, out of order, of
another epoch or missing; with `--ordered` a `seq` out of order; even when the frame count
matches.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.layout import subscribers_per_channel
from benchmarks.processes import ClientProcess, NodeProcess
from benchmarks.publisher import Publishing
from benchmarks.redis_stats import RedisWindow, redis_section
from benchmarks.sequence import CHECK_KINDS

CHECK_TITLES = {
    "seq": "each seq at most once",
    "offsets": "offsets +1 in one epoch",
    "order": "seq in order (--ordered)",
}
PROTOCOL_PATHS = {"ws": "ws (/ws)", "centrifugo": "centrifugo (/connection/websocket)",
                  "socketio": "socket.io (Engine.IO v4 /socket.io/)"}
PEER_NAMES = {"hub": "hub", "socketio": "Socket.IO on Node"}


def percentiles(values: list[int], scale: float) -> dict[str, float]:
    if not values:
        return {"samples": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 2)

    return {"samples": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": round(ordered[-1] * scale, 2)}


def _kib_per_connection(node: NodeProcess) -> float | None:
    if not node.connections or "VmRSS" not in node.rss_idle or "VmRSS" not in node.rss_connected:
        return None
    return round((node.rss_connected["VmRSS"] - node.rss_idle["VmRSS"]) / node.connections, 2)


def _total_kib_per_connection(nodes: list[NodeProcess]) -> float | None:
    """RSS the connections added on all nodes together, per connection."""
    measured = [n for n in nodes if "VmRSS" in n.rss_idle and "VmRSS" in n.rss_connected]
    connections = sum(n.connections for n in measured)
    if not connections:
        return None
    added = sum(n.rss_connected["VmRSS"] - n.rss_idle["VmRSS"] for n in measured)
    return round(added / connections, 2)


def _checks(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Each check's counts summed over the client processes."""
    checks: dict[str, Any] = {}
    for name, kinds in CHECK_KINDS.items():
        found = [r["checks"][name] for r in reports if name in r["checks"]]
        if not found:
            continue
        entry: dict[str, Any] = {kind: sum(int(f[kind]) for f in found) for kind in kinds}
        entry["connections"] = sum(int(f["connections"]) for f in found)
        entry["samples"] = [text for f in found for text in f["samples"]][:5]
        checks[name] = entry
    return checks


def failures(result: dict[str, Any]) -> list[str]:
    found = []
    if result["lost"]:
        found.append(f"{result['lost']} frames lost")
    if result["extra"]:
        found.append(f"{result['extra']} frames more than published")
    if result["publish_errors"]:
        found.append(f"{result['publish_errors']} publishes failed")
    for name, check in result["checks"].items():
        bad = [f"{check[kind]} {kind}" for kind in CHECK_KINDS[name] if check[kind]]
        if bad:
            found.append(f"{CHECK_TITLES[name]} failed on {check['connections']} "
                         "connections: " + ", ".join(bad))
    return found


def summarise(
    args: argparse.Namespace, nodes: list[NodeProcess], clients: list[ClientProcess],
    job: Publishing, own_cpu: float, redis: RedisWindow | None,
) -> dict[str, Any]:
    reports = [c.done for c in clients]
    received = sum(int(r["received"]) for r in reports)
    per_channel = subscribers_per_channel(args.subscribers, args.nodes, args.channels,
                                          args.personal)
    expected = sum(n * subs for n, subs in zip(job.published_on, per_channel, strict=True))
    node_cpu = sum(n.cpu_after - n.cpu_before for n in nodes)
    first = job.first or time.time()
    lasts = [float(r["last"]) for r in reports if r["last"]]
    last = max(lasts) if lasts else first
    window = max(last - first, 1e-9)
    # CPU is read from just before the first publish to just after the clients reported.
    measured = max(job.measured, 1e-3)
    latencies = [v for r in reports for v in r["latencies_us"]]
    hub_latencies = [v for r in reports for v in r["hub_latencies_ms"]]
    closes: dict[str, int] = {}
    for report in reports:
        for code, n in report["closes"].items():
            closes[code] = closes.get(code, 0) + int(n)
    result: dict[str, Any] = {
        "config": {
            "peer": args.peer,
            "protocol": "socketio" if args.peer == "socketio" else args.protocol,
            "ordered": args.ordered,
            "history_size": args.history_size if args.peer == "hub" else None,
            "history_ttl": args.history_ttl if args.peer == "hub" else None,
            "nodes": args.nodes, "broker": "redis" if redis else "memory",
            "redis": redis.kind if redis else None,
            "redis_shards": len(redis.shards) if redis else 0,
            "subscribers": args.subscribers, "channels": args.channels,
            "messages": args.messages, "rate": args.rate,
            "payload": args.payload, "client_procs": len(clients),
            "publishers": args.publishers, "batch": args.batch, "sample": args.sample,
            "personal": args.personal,
        },
        "published": job.published,
        "publish_errors": job.errors,
        "publish_error_samples": job.error_samples,
        "publish_seconds": round(job.last - job.first, 3) if job.first else 0.0,
        "offered_per_second": round(job.published / max(job.last - job.first, 1e-9), 1),
        "expected": expected,
        "received": received,
        "lost": max(0, expected - received),
        "extra": max(0, received - expected),
        "checks": _checks(reports),
        "other_frames": sum(int(r["others"]) for r in reports),
        "min_per_connection": min(int(r["min_per_connection"]) for r in reports),
        "max_per_connection": max(int(r["max_per_connection"]) for r in reports),
        "delivery_seconds": round(window, 3),
        "delivered_per_second": round(received / window, 1),
        # A message goes to the subscribers of its channel only: S / C of them on average.
        "messages_per_second": round(received / window / (args.subscribers / args.channels), 1),
        "latency_ms": percentiles(latencies, 1e-3),
        "hub_ts_latency_ms": percentiles(hub_latencies, 1.0),
        "closes": closes,
        "client_errors": [e for r in reports for e in r["errors"]][:5],
        "nodes": [
            {
                "node": node.name, "pid": node.pid, "connections": node.connections,
                "rss_idle_kib": node.rss_idle.get("VmRSS"),
                "rss_connected_kib": node.rss_connected.get("VmRSS"),
                "rss_after_kib": node.rss_after.get("VmRSS"),
                "rss_peak_kib": node.rss_after.get("VmHWM"),
                "kib_per_connection": _kib_per_connection(node),
                "cpu_seconds": round(node.cpu_after - node.cpu_before, 2),
                "cpu_percent": round(100 * (node.cpu_after - node.cpu_before) / measured, 1),
            }
            for node in nodes
        ],
        "kib_per_connection": _total_kib_per_connection(nodes),
        "delivered_per_node_cpu_second": round(received / max(node_cpu, 1e-9)),
        "node_cpu_seconds_per_million": (
            round(node_cpu / received * 1e6, 2) if received else None
        ),
        "client_cpu_percent": [
            round(100 * (c.cpu_after - c.cpu_before) / measured, 1) for c in clients
        ],
        "publisher_cpu_percent": round(100 * own_cpu / measured, 1),
    }
    if redis:
        result["redis"] = redis_section(redis, job.published, measured)
    result["failures"] = failures(result)
    return result


def human(result: dict[str, Any]) -> str:
    config = result["config"]
    rate = f"{config['rate']:g}/s" if config["rate"] else "max"
    lat, hub_lat = result["latency_ms"], result["hub_ts_latency_ms"]
    broker = config["broker"]
    if config.get("redis") == "cluster":
        shards = config["redis_shards"]
        broker = f"redis cluster ({shards} shard{'s' if shards > 1 else ''})"
    elif config.get("redis") == "sentinel":
        broker = "redis sentinel"
    peer = config.get("peer", "hub")
    history = (f", history {config['history_size']}" if peer == "hub"
               and config.get("history_size") else "")
    lines = [
        f"benchmarks: {config['nodes']} {PEER_NAMES.get(peer, peer)} node(s){history}, "
        f"{broker} broker, "
        f"{config['subscribers']} subscribers on {config['channels']}"
        f"{' personal' if config.get('personal') else ''} channel(s), "
        f"{config['messages']} messages of "
        f"{config['payload']} B at {rate} ({config['publishers']} publishers"
        f"{', ordered' if config.get('ordered') else ''}, batch "
        f"{config['batch']}), {config['client_procs']} client procs, protocol "
        f"{PROTOCOL_PATHS.get(config.get('protocol', 'ws'), config.get('protocol'))}",
        f"published   {result['published']} in {result['publish_seconds']} s "
        f"({result['offered_per_second']} msg/s), {result['publish_errors']} errors",
        f"delivered   {result['received']} of {result['expected']} frames "
        f"(lost {result['lost']}, per connection {result['min_per_connection']}-"
        f"{result['max_per_connection']}) in {result['delivery_seconds']} s",
    ]
    for name, check in result["checks"].items():
        lines.append(
            f"{'checks' if name == next(iter(result['checks'])) else '':<12}"
            f"{CHECK_TITLES[name]}: "
            + ", ".join(f"{check[kind]} {kind}" for kind in CHECK_KINDS[name])
        )
        if check["samples"]:
            lines.append(f"            e.g. {'; '.join(check['samples'])}")
    if result["other_frames"]:
        lines.append(f"            other frames {result['other_frames']}")
    lines.append(
        f"rate        {result['delivered_per_second']:,.0f} frames/s delivered = "
        f"{result['messages_per_second']:,.1f} msg/s to every subscriber of their channel")
    if lat.get("samples"):
        lines.append(
            f"latency     p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  "
            f"max {lat['max']} ms  (publisher send -> receive, {lat['samples']} samples)"
        )
    if hub_lat.get("samples"):
        lines.append(
            f"            hub ts -> receive (1 ms resolution): p50 {hub_lat['p50']}  "
            f"p99 {hub_lat['p99']} ms"
        )
    for node in result["nodes"]:
        idle, connected = node["rss_idle_kib"] or 0, node["rss_connected_kib"] or 0
        lines.append(
            f"node        {node['node']}: {node['connections']} conns, RSS {idle / 1024:.1f} "
            f"-> {connected / 1024:.1f} MiB = {node['kib_per_connection']} KiB/conn, "
            f"peak {(node['rss_peak_kib'] or 0) / 1024:.1f} MiB, CPU {node['cpu_percent']}%"
        )
    lines.append(
        f"memory      {result['kib_per_connection']} KiB per connection (RSS added on all "
        "nodes / connections)"
    )
    clients = ", ".join(f"{c}%" for c in result["client_cpu_percent"])
    lines.append(
        f"cpu         {result['node_cpu_seconds_per_million']} node CPU s per 1M deliveries "
        f"= {result['delivered_per_node_cpu_second']:,} frames per node CPU second"
    )
    lines.append(
        f"            clients {clients}; publisher {result['publisher_cpu_percent']}%; machine "
        f"{result.get('machine_busy_percent')}% busy of {result.get('cpus')} CPUs"
    )
    lines.extend(_lifecycle_lines(result))
    if result["closes"] or result["client_errors"]:
        lines.append(f"closes      {result['closes']} errors {result['client_errors']}")
    redis = result.get("redis")
    if redis:
        lines.extend(_redis_lines(redis))
    lines.append(f"software    {_software(result.get('software', {}))}")
    problems = result["failures"]
    lines.append(f"result      {'FAILED: ' + '; '.join(problems) if problems else 'OK'}")
    return "\n".join(lines)


def _percents(values: list[float]) -> str:
    return ", ".join(f"{v}%" for v in values)


def _lifecycle_lines(result: dict[str, Any]) -> list[str]:
    """Connects/s, the idle window (`--idle`) and the drain (`--drain`), each with the
    machine's load average, since the machine may be shared."""
    lines: list[str] = []
    connect = result.get("connect")
    if connect:
        lines.append(
            f"connect     {connect['connections']} in {connect['seconds']} s = "
            f"{connect['per_second']:,.0f}/s; node CPU {connect['node_cpu_ms_per_connect']} "
            f"ms per connect; machine {connect['window']['machine_busy_percent']}% busy, load "
            f"{' -> '.join(connect['window']['loadavg'])}")
    idle = result.get("idle")
    if idle:
        rss = ", ".join(f"{(kib or 0) / 1024:.1f} MiB" for kib in idle["node_rss_kib"])
        lines.append(
            f"idle        {idle['seconds']} s: nodes {_percents(idle['node_cpu_percent'])} "
            f"of a core, clients {_percents(idle['client_cpu_percent'])}, machine "
            f"{idle['machine_busy_percent']}% busy, load {' -> '.join(idle['loadavg'])}; "
            f"node RSS after {rss}")
    drain = result.get("drain")
    if drain:
        lines.append(
            f"drain       SIGTERM -> node exit {drain['node_exit_seconds']} s, -> last "
            f"connection closed {drain['last_closed_seconds']} s; still open "
            f"{drain['still_open']}; closes {drain['closes']}")
    if result.get("loadavg"):
        lines.append(f"load        {result['loadavg']} (1, 5, 15 min) at the end")
    return lines


def _software(software: dict[str, Any]) -> str:
    """What ran: the hub's tree and commit (or Node's and the npm packages' versions)."""
    parts = []
    hub = software.get("hub")
    if hub:
        commit = (hub.get("commit") or "no git")[:10]
        state = " + uncommitted hub/ changes" if hub.get("dirty") else ""
        parts.append(f"hub {hub.get('path')} at {commit}{state}")
    for info in software.get("node_info") or []:
        if info:
            parts.append("hub_node_info " + ",".join(f"{k}={v}" for k, v in info.items()))
            break
    parts.extend(f"{name} {software[name]}" for name in
                 ("node", "socket.io", "@socket.io/redis-adapter", "redis")
                 if software.get(name))
    if software.get("python"):
        parts.append(f"python {software['python']}")
    if software.get("redis_server"):
        parts.append(f"redis-server {software['redis_server']}")
    return "; ".join(parts)


def _redis_usage(usage: dict[str, Any]) -> str:
    top = ", ".join(f"{k} {v}" for k, v in list(usage["commands"].items())[:6])
    return (
        f"{usage['commands_per_message']} commands per message ({top}); CPU "
        f"{usage['cpu_seconds']} s = {usage['cpu_seconds_per_1000_messages']} s per 1,000 "
        f"messages, {usage['cpu_percent']}%"
    )


def _redis_lines(redis: dict[str, Any]) -> list[str]:
    """All shards summed; then each shard, when there are several."""
    shards = redis["shards"]
    where = f"{len(shards)} shards summed: " if len(shards) > 1 else ""
    lines = [f"redis       {where}{_redis_usage(redis)}"]
    if len(shards) > 1:
        lines.extend(f"            {shard['shard']}: {_redis_usage(shard)}" for shard in shards)
    return lines
