"""The fan-out benchmark, `python -m benchmarks` (see benchmarks/README.md).

It lives outside the `hub` package so that wheels and container images do not carry it; run
it from a source checkout with hub installed (`pip install -e .`).

The parent process starts the nodes (`python -m hub serve --port 0`, optionally a private
redis-server or Redis Cluster), spreads the subscriber connections over `--client-procs`
client processes (`python -m benchmarks --client CONFIG`), waits until every connection
got `subscribed`, publishes through the HTTP API from a few keep-alive connections, and
measures delivery rate, loss, order, latency, memory per connection and CPU.

The subscriber side is deliberately lean so that it is not what is measured: one raw
asyncio Protocol per connection does the WebSocket handshake by hand, and then only walks
frame headers and reads each frame's `seq` to check the order, looking inside one frame in
`--sample` for the publisher's send time and the hub's `ts`.

Modules:

- `cli`: options, checks and `main` (also the `--client` entry);
- `run`: one run, from starting the nodes to stopping them;
- `layout`: which node and channel each connection is on, which channel and `seq` each
  message has;
- `processes`: starting and stopping node, redis-server and client processes;
- `redis_cluster`: a private Redis Cluster of N masters, formed without redis-cli;
- `fdlimit`: RLIMIT_NOFILE, raised for every process a run starts;
- `procfs`: memory and CPU readings from /proc;
- `httpclient`: the minimal HTTP/1.1 exchange the publisher and readiness checks use;
- `publisher`: the HTTP publisher (in `seq` order per channel);
- `client`: a client process (many subscribers, JSON lines on stdin/stdout);
- `subscriber`: the lean WebSocket subscriber protocol, `/ws` or Centrifugo's (`--protocol`);
- `sequence`: the per-connection check that `seq` has no duplicate, gap or reorder;
- `redis_shards`: the Redis servers behind `HUB_REDIS_URL` (a Cluster's masters);
- `redis_stats`: `INFO cpu` and `INFO commandstats` of every shard, and the Redis report;
- `resp`: Redis commands over a bare RESP connection (no client library);
- `report`: the result dict, what makes a run fail, percentiles and the human summary;
- `common`: `BenchError`.
"""

from benchmarks.cli import main

__all__ = ["main"]
