"""hub: a horizontally scaled WebSocket pub/sub hub."""

__version__ = "0.1.0"
