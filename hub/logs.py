"""Logging set-up: text for people, one JSON object per line for machines; and a filter
that keeps a client's bad input out of the ERROR and WARNING lines of uvicorn."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from hub.abuse import CURRENT, LOG_INTERVAL

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


QUIET_CLIENT_LOGGERS = ("httpx", "httpcore")  # kept at WARNING and above


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
    # httpx logs every request at info (each POST of events and hooks): noise too.
    for name in QUIET_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
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


# uvicorn's lines about a client's bad input (uvicorn 0.35-0.54, httptools, h11 and
# websockets-sansio protocols), by the reason of hub.abuse each is counted under. The first
# is logged with a traceback at ERROR, for every text frame that is not UTF-8.
CLIENT_NOISE: dict[str, str] = {
    "Invalid UTF-8 sequence received from client.": "bad_utf8",
    "Invalid HTTP request received.": "bad_http_request",
    "Unsupported upgrade request.": "unsupported_upgrade",
}
UVICORN_LOGGER = "uvicorn.error"


class ClientNoiseFilter(logging.Filter):
    """Exactly the lines of `CLIENT_NOISE`; every other record passes untouched.

    On a connection of a node's HTTP protocol (`hub.deadline`, which names the node in
    `hub.abuse.CURRENT`) the line is counted for that node, whose own rate-limited line
    replaces it. Elsewhere (a WebSocket's frames, whose close code the endpoint counts; an
    app served some other way) it is kept at INFO without its traceback, one per message
    per interval, with the number left out since the previous one.
    """

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._quiet_until: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        reason = CLIENT_NOISE.get(record.msg) if isinstance(record.msg, str) else None
        if reason is None:
            return True
        errors = CURRENT.get()
        if errors is not None:
            errors.count(reason)
            return False
        now = self._clock()
        if now < self._quiet_until.get(reason, 0.0):
            self._left_out[reason] = self._left_out.get(reason, 0) + 1
            return False
        self._quiet_until[reason] = now + self.interval
        left_out = self._left_out.pop(reason, 0)
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info = record.exc_text = record.stack_info = None
        record.msg = (f"{record.msg} (a client's bad input; {left_out} more since the last"
                      f" such line, at most one per {self.interval:.0f} s)")
        record.args = None
        return True


def install_filters() -> None:
    """Put `ClientNoiseFilter` on uvicorn's logger, once per process (loggers are
    process-wide). Call after uvicorn configured its logging."""
    logger = logging.getLogger(UVICORN_LOGGER)
    if not any(isinstance(existing, ClientNoiseFilter) for existing in logger.filters):
        logger.addFilter(ClientNoiseFilter())
