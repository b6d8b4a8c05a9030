"""Logging set-up: text for people, one JSON object per line for machines."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": self.node_id,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry, enc_hook=str).decode()


def configure(level: str, fmt: str, node_id: str) -> dict[str, Any]:
    """Configure the root logger; returns a uvicorn `log_config` that uses the same handler."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(node_id))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = logging.DEBUG if level == "trace" else getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            "uvicorn": {"level": numeric, "handlers": [], "propagate": True},
            # uvicorn logs every WebSocket accept at info: one line per connection is noise.
            "uvicorn.error": {"level": max(numeric, logging.WARNING), "propagate": True},
            "uvicorn.access": {"level": numeric, "propagate": True},
        },
    }
