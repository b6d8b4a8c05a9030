"""The result of a run: one JSON-able dict, and the human summary of it."""

from __future__ import annotations

import argparse
import time
from typing import Any

from hub.bench.processes import ClientProcess, NodeProcess
from hub.bench.publisher import Publishing


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


def summarise(
    args: argparse.Namespace, nodes: list[NodeProcess], clients: list[ClientProcess],
    job: Publishing, own_cpu: float, redis_url: str | None, redis_cpu: float,
    private_redis: bool, stats_before: dict[str, int], stats_after: dict[str, int],
) -> dict[str, Any]:
    reports = [c.done for c in clients]
    received = sum(int(r["received"]) for r in reports)
    expected = args.subscribers * job.published
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
            "nodes": args.nodes, "broker": "redis" if redis_url else "memory",
            "subscribers": args.subscribers, "messages": args.messages, "rate": args.rate,
            "payload": args.payload, "client_procs": len(clients),
            "publishers": args.publishers, "batch": args.batch, "sample": args.sample,
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
        "min_per_connection": min(int(r["min_per_connection"]) for r in reports),
        "max_per_connection": max(int(r["max_per_connection"]) for r in reports),
        "delivery_seconds": round(window, 3),
        "delivered_per_second": round(received / window, 1),
        "messages_per_second": round(received / window / args.subscribers, 1),
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
        "delivered_per_node_cpu_second": round(
            received / max(sum(n.cpu_after - n.cpu_before for n in nodes), 1e-9)
        ),
        "client_cpu_percent": [
            round(100 * (c.cpu_after - c.cpu_before) / measured, 1) for c in clients
        ],
        "publisher_cpu_percent": round(100 * own_cpu / measured, 1),
    }
    if redis_url:
        calls = {
            name: stats_after.get(name, 0) - stats_before.get(name, 0) for name in stats_after
        }
        calls = {name: n for name, n in calls.items() if n > 0 and name != "info"}
        per_message = job.published or 1
        result["redis"] = {
            "private": private_redis,
            "cpu_percent": round(100 * redis_cpu / measured, 1) if private_redis else None,
            "commands": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "commands_per_message": round(sum(calls.values()) / per_message, 3),
        }
    return result


def human(result: dict[str, Any]) -> str:
    config = result["config"]
    rate = f"{config['rate']:g}/s" if config["rate"] else "max"
    lat, hub_lat = result["latency_ms"], result["hub_ts_latency_ms"]
    lines = [
        f"hub bench: {config['nodes']} node(s), {config['broker']} broker, "
        f"{config['subscribers']} subscribers, {config['messages']} messages of "
        f"{config['payload']} B at {rate} ({config['publishers']} publishers, batch "
        f"{config['batch']}), {config['client_procs']} client procs",
        f"published   {result['published']} in {result['publish_seconds']} s "
        f"({result['offered_per_second']} msg/s), {result['publish_errors']} errors",
        f"delivered   {result['received']} of {result['expected']} frames "
        f"(lost {result['lost']}, per connection {result['min_per_connection']}-"
        f"{result['max_per_connection']}) in {result['delivery_seconds']} s",
        f"rate        {result['delivered_per_second']:,.0f} frames/s delivered = "
        f"{result['messages_per_second']:,.1f} msg/s to every subscriber",
    ]
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
    clients = ", ".join(f"{c}%" for c in result["client_cpu_percent"])
    lines.append(
        f"cpu         {result['delivered_per_node_cpu_second']:,} frames per node CPU second; "
        f"clients {clients}; publisher {result['publisher_cpu_percent']}%; machine "
        f"{result.get('machine_busy_percent')}% busy of {result.get('cpus')} CPUs"
    )
    if result["closes"] or result["client_errors"]:
        lines.append(f"closes      {result['closes']} errors {result['client_errors']}")
    redis = result.get("redis")
    if redis:
        top = ", ".join(f"{k} {v}" for k, v in list(redis["commands"].items())[:6])
        cpu = f", CPU {redis['cpu_percent']}%" if redis["cpu_percent"] is not None else ""
        lines.append(
            f"redis       {redis['commands_per_message']} commands per message ({top}){cpu}"
        )
    return "\n".join(lines)
