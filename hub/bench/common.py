"""What the benchmark's modules share: the channel and the setup error."""

from __future__ import annotations

CHANNEL = "bench:fanout"


class BenchError(Exception):
    pass
