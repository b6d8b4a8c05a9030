"""The pieces that keep a client's bad input quiet in the logs: per-reason lines at most
once per interval (hub.abuse), and the filter on uvicorn's logger (hub.logs)."""

from __future__ import annotations

import asyncio
import logging
import sys

from hub.abuse import LOG_INTERVAL, RateLimitedLines
from hub.logs import ClientNoiseFilter
from tests.support import WAIT, make_settings


def test_rate_limited_lines_without_a_loop() -> None:
    said: list[tuple[str, int]] = []
    now = [0.0]
    lines = RateLimitedLines(lambda key, count: said.append((key, count)), 60, lambda: now[0])
    lines.hit("bad_json")  # the first at once
    for now[0] in (1.0, 2.0, 59.0):
        lines.hit("bad_json")
    lines.hit("bad_frame")  # each reason on its own
    assert said == [("bad_json", 1), ("bad_frame", 1)]
    now[0] = 60.0
    lines.hit("bad_json")  # the ones held back come with the next line
    assert said[-1] == ("bad_json", 4)


async def test_rate_limited_lines_tell_the_rest_at_the_end_of_the_interval() -> None:
    said: list[tuple[str, int]] = []
    told = asyncio.Event()

    def emit(key: str, count: int) -> None:
        said.append((key, count))
        if len(said) == 2:
            told.set()

    lines = RateLimitedLines(emit, 0.2)
    for _ in range(6):
        lines.hit("bad_json")
    assert said == [("bad_json", 1)]
    async with asyncio.timeout(WAIT):
        await told.wait()
    assert said == [("bad_json", 1), ("bad_json", 5)]


def test_the_filter_touches_only_uvicorns_client_lines() -> None:
    now = [0.0]
    noise = ClientNoiseFilter(LOG_INTERVAL, lambda: now[0])

    def record(message: str, level: int = logging.ERROR) -> logging.LogRecord:
        try:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        except UnicodeDecodeError:
            info = sys.exc_info()
        return logging.LogRecord("uvicorn.error", level, __file__, 1, message, None, info)

    first = record("Invalid UTF-8 sequence received from client.")
    assert noise.filter(first)
    assert first.levelno == logging.INFO and first.exc_info is None
    assert not noise.filter(record("Invalid UTF-8 sequence received from client."))
    now[0] = LOG_INTERVAL
    later = record("Invalid UTF-8 sequence received from client.")
    assert noise.filter(later) and "1 more" in later.getMessage()
    other = record("Exception in ASGI application\n")
    assert noise.filter(other)
    assert other.levelno == logging.ERROR and other.exc_info is not None


def test_hub_serve_has_the_filter_too() -> None:
    """`hub serve` has uvicorn configure its logging from hub.logs' dict; the filter is put
    on after that, once, however many configs a process builds."""
    from hub.app import create_app
    from hub.logs import configure
    from hub.server import uvicorn_config

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        settings = make_settings()
        for _ in range(2):
            uvicorn_config(create_app(settings), settings, configure("info", "text", "n"))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    filters = logging.getLogger("uvicorn.error").filters
    assert sum(isinstance(f, ClientNoiseFilter) for f in filters) == 1
