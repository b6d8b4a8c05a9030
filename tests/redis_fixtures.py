"""Pytest fixtures for tests that need a real Redis: load with
`pytest_plugins = ["tests.redis_fixtures"]` in tests/conftest.py.

- `redis_server`: one private redis-server for the session (`.url`, `.port`, `.pid`,
  `.stop()`, `.start()`, `.kill()`, `.pause()`, `.resume()`).
- `redis_url`: its URL, emptied (FLUSHALL) before each test.
- `redis_factory`: makes more private servers (durable, with a password, ...) for one test
  and kills them after it; use it for tests that stop or restart the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start(keep_data=False)
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.running:  # a test stopped it and did not start it again
        redis_server.start(keep_data=False)
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        server = RedisServer(**options)
        servers.append(server)
        server.start(keep_data=False)
        return server

    yield make
    for server in servers:
        server.cleanup()
