"""`hub bench`: the fan-out benchmark (see benchmarks/README.md).

The parent process starts the nodes (`python -m hub serve --port 0`, optionally a private
redis-server), spreads the subscriber connections over `--client-procs` client processes
(`python -m hub.bench --client CONFIG`), waits until every connection got `subscribed`,
publishes through the HTTP API from a few keep-alive connections, and measures delivery
rate, loss, latency, memory per connection and CPU.

The subscriber side is deliberately lean so that it is not what is measured: one raw
asyncio Protocol per connection does the WebSocket handshake by hand, and then only walks
frame headers to count text frames, looking inside one frame in `--sample` for the
publisher's send time and the hub's `ts`.

Modules:

- `cli`: options, checks and `main` (also the `--client` entry);
- `run`: one run, from starting the nodes to stopping them;
- `processes`: starting and stopping node, redis-server and client processes;
- `procfs`: memory and CPU readings from /proc;
- `httpclient`: the minimal HTTP/1.1 exchange the publisher and readiness checks use;
- `publisher`: the HTTP publisher;
- `client`: a client process (many subscribers, JSON lines on stdin/stdout);
- `subscriber`: the lean WebSocket subscriber protocol;
- `redis_stats`: `INFO commandstats` over a bare RESP connection;
- `report`: the result dict, percentiles and the human summary;
- `common`: the channel and `BenchError`.
"""

from hub.bench.cli import main

__all__ = ["main"]
