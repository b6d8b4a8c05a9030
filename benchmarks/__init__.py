"""The fan-out benchmark, `python -m benchmarks` (see benchmarks/README.md).

It lives outside the `hub` package so that wheels and container images do not carry it; run
it from a source checkout with hub installed (`pip install -e .`).

The parent process starts the nodes (`python -m hub serve --port 0` of the tree this
package sits in, or with `--peer socketio` Socket.IO on Node, benchmarks/peers/socketio;
optionally a private redis-server or Redis Cluster), spreads the subscriber connections
over `--client-procs` client processes (`python -m benchmarks --client CONFIG`), waits
until every connection is subscribed, publishes through the HTTP API from a few keep-alive
connections at once, and measures delivery rate, loss, duplicates and order (the hub's
offsets), latency, memory per connection and CPU.

The subscriber side is deliberately lean so that it is not what is measured: one raw
asyncio Protocol per connection does the WebSocket handshake by hand, and then only walks
frame headers and reads each frame's `seq` (each once) and the hub's `offset` (up by one in
the subscribed epoch), looking inside one frame in `--sample` for the publisher's send time
and the hub's `ts`.

Modules:

- `cli`: options, checks and `main` (also the `--client` entry);
- `run`: one run, from starting the nodes to stopping them;
- `layout`: which node and channel each connection is on, which channel and `seq` each
  message has;
- `processes`: starting and stopping node (hub or Socket.IO), redis-server and client
  processes, and which hub the nodes run;
- `redis_cluster`: a private Redis Cluster of N masters, formed without redis-cli;
- `fdlimit`: RLIMIT_NOFILE, raised for every process a run starts;
- `lifecycle`: connects/s, the idle window (`--idle`, the keepalive cost) and the drain on
  SIGTERM (`--drain`), each with the machine's load average;
- `procfs`: memory and CPU readings from /proc;
- `httpclient`: the minimal HTTP/1.1 exchange the publisher and readiness checks use;
- `publisher`: the HTTP publisher (concurrent, or `--ordered`: in `seq` order per channel);
- `client`: a client process (many subscribers, JSON lines on stdin/stdout);
- `subscriber`: the lean WebSocket subscriber protocol, `/ws` or Centrifugo's (`--protocol`),
  or Engine.IO/Socket.IO's (`--peer socketio`);
- `sequence`: the per-connection checks: each `seq` once, offsets +1 in one epoch, `seq`
  order (`--ordered`);
- `redis_shards`: the Redis servers behind `HUB_REDIS_URL` (a Cluster's masters);
- `redis_stats`: `INFO cpu` and `INFO commandstats` of every shard, and the Redis report;
- `resp`: Redis commands over a bare RESP connection (no client library);
- `report`: the result dict, what makes a run fail, percentiles and the human summary;
- `common`: `BenchError`;
- `publish_cost` (`python -m benchmarks.publish_cost`): node CPU and Redis commands per
  publish in the Redis broker alone, at a few publishes at once.
"""

from benchmarks.cli import main

__all__ = ["main"]
