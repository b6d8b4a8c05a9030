"""A reply that arrived while the event loop was held up is read, not timed out
(`hub.redis.patience`): otherwise a node answers `unavailable` for a publish that Redis
ran and subscribers receive (PROTOCOL §5), as seen with three nodes in one starved process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import TimeoutError as RedisTimeoutError

from hub.redis.patience import PatientConnection, PatientTimeout
from hub.redis.topology import create_server_client

TIMEOUT = 0.3
HELD_UP = 0.8  # the loop is held up this long: past the timeout, not past it plus LATE retries


def client(url: str, connection_class: type[AbstractConnection]) -> Any:
    pool = redis.asyncio.ConnectionPool.from_url(
        url, connection_class=connection_class, socket_timeout=TIMEOUT, protocol=2)
    return redis.asyncio.Redis(connection_pool=pool)


async def answered_while_held_up(redis_client: Any) -> Any:
    """A command Redis answers after 50 ms (BLPOP on an empty list), with the event loop
    held up (a blocking call, as in a busy process) from 10 ms to past the timeout: the
    answer is in the socket when the loop runs again, and so is the timeout."""
    await redis_client.ping()  # connected first
    asyncio.get_running_loop().call_later(0.01, time.sleep, HELD_UP)
    return await redis_client.blpop(["nothing-here"], 0.05)


async def test_a_reply_that_came_while_the_loop_was_held_up_is_read(redis_url: str) -> None:
    patient = client(redis_url, PatientConnection)
    try:
        assert await answered_while_held_up(patient) is None
    finally:
        await patient.aclose()


async def test_redis_pys_own_timeout_drops_it(redis_url: str) -> None:
    """What the patient timeout is for: the same with redis-py's connection fails."""
    plain = client(redis_url, Connection)
    try:
        with pytest.raises(RedisTimeoutError):
            await answered_while_held_up(plain)
    finally:
        await plain.aclose()


async def test_a_silent_redis_is_still_given_up(redis_factory: Callable[..., Any]) -> None:
    server = redis_factory()
    patient = client(server.url, PatientConnection)
    try:
        await patient.ping()
        server.pause()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await patient.ping()
        assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 0.3
    finally:
        server.resume()
        await patient.aclose()


async def test_the_hubs_command_client_is_patient(redis_url: str) -> None:
    hub_client = create_server_client(redis_url)
    try:
        assert hub_client.connection_pool.connection_class is PatientConnection
    finally:
        await hub_client.aclose()


async def test_on_time_expiry_cancels_like_asyncio_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with PatientTimeout(0.05):
            await asyncio.sleep(1)
    assert time.monotonic() - started < 0.5
