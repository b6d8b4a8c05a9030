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

from tests.redis_cluster import RedisCluster, RedisSentinel
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
    # Bounded: a server that accepts and never answers fails the setup with a reason
    # instead of hanging until the test's timeout.
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
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


# Redis Cluster and Sentinel (tests/redis_cluster.py). Need redis-server and redis-cli:
# skipped without them, failed with HUB_REQUIRE_REDIS=1.
#
# - `redis_cluster_session`: one 3-master/3-replica cluster for the session.
# - `redis_cluster`: that cluster, brought back to health if a test left a node down or
#   paused, FLUSHALL on the masters and SCRIPT FLUSH on every node before each test
#   (roles may differ from the start: an earlier failover is not undone).
# - `redis_cluster_factory`: `make(**RedisCluster options)` builds and starts clusters for
#   one test and kills them after it; use it for tests that kill, stop or pause nodes.
# - `redis_sentinel_factory`: `make(**RedisSentinel options)`, the same for Sentinel.


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> RedisCluster:
    redis_cluster_session.reset()
    return redis_cluster_session


@pytest.fixture
def redis_cluster_factory() -> Iterator[Callable[..., RedisCluster]]:
    clusters: list[RedisCluster] = []

    def make(**options: Any) -> RedisCluster:
        cluster = RedisCluster(**options)
        clusters.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.cleanup()


@pytest.fixture
def redis_sentinel_factory() -> Iterator[Callable[..., RedisSentinel]]:
    deployments: list[RedisSentinel] = []

    def make(**options: Any) -> RedisSentinel:
        deployment = RedisSentinel(**options)
        deployments.append(deployment)
        deployment.start()
        return deployment

    try:
        yield make
    finally:
        for deployment in deployments:
            deployment.cleanup()
