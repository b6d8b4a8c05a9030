"""The cyclic garbage collector set for a node's process: a heap of long-lived objects
(thousands of connections and their subscriptions) and a stream of short-lived ones (each
publication's message, futures and tasks, each request's objects).

With CPython's defaults a young collection runs every 700 net allocations, so whatever is in
flight at that moment (a batch of publications waiting for Redis, frames on their way)
survives two of them and lands in the old generation; once that grew by a quarter, a full
collection walks every connection's objects, and finds nothing to free. Measured with 5,000
connections per node and `/api/batch` (benchmarks/results.md, issue 23): about a third of a
second of CPU per full collection, one every two or three seconds of publishing. A young
generation of 20,000 lets in-flight objects die before a collection looks at them, so few
reach the old one; freezing what start-up made (modules, classes, the app and its settings)
keeps it out of every full collection for good. Only `hub serve` does this: an application
that embeds the hub owns its own process's collector.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # net allocations between young collections (CPython: 700)


def tune_collector() -> None:
    """Call once the app is built, before serving."""
    gc.collect()  # start-up's garbage goes now, not into the frozen generation
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
