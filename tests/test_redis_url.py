"""HUB_REDIS_URL in its three forms (PROTOCOL §6): what each gives redis-py, and a one-line
error naming what is wrong with a URL that cannot work, at start."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hub.redis.topology import create_server_client
from hub.redis.url import Kind, RedisUrlError, parse_redis_url
from hub.settings import SettingsError, load_settings
from tests.redis_server import RedisServer


def test_one_server_with_credentials_tls_and_db() -> None:
    target = parse_redis_url("rediss://hub:s%40cret@redis.example:6380/3?ssl_ca_certs=/ca.pem")
    assert (target.kind, target.nodes, target.db, target.tls) == (
        Kind.SERVER, (("redis.example", 6380),), 3, True
    )
    assert (target.username, target.password) == ("hub", "s@cret")
    assert target.connection_kwargs() == {
        "username": "hub", "password": "s@cret", "ssl": True, "ssl_ca_certs": "/ca.pem"
    }


def test_cluster_seeds_and_a_password_alone() -> None:
    target = parse_redis_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert target.kind is Kind.CLUSTER and not target.tls
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (target.username, target.password, target.db) == (None, "pw", 0)
    assert parse_redis_url("rediss+cluster://a:1").tls


def test_sentinel_master_db_and_sentinel_password() -> None:
    target = parse_redis_url(
        "redis+sentinel://u:p@s1:26379,s2:26380/mymaster/2?sentinel_password=spw"
    )
    assert (target.kind, target.master, target.db) == (Kind.SENTINEL, "mymaster", 2)
    assert target.nodes == (("s1", 26379), ("s2", 26380))
    assert (target.username, target.password, target.sentinel_password) == ("u", "p", "spw")


@pytest.mark.parametrize(("url", "says"), [
    ("localhost:6379", "must start with one of"),
    ("http://redis:6379", "must start with one of"),
    ("redis://", "names no host"),
    ("redis://a:1,b:2", "takes one host"),
    ("redis://a:99999", "not 1-65535"),
    ("redis://a:x", "not 1-65535"),
    ("redis://a/x", "database 'x' is not a number"),
    ("redis+cluster://a:1/2", "only database 0"),
    ("redis+cluster://a:1,,b:2", "names no host"),
    ("redis+sentinel://s:26379", "needs the master's name"),
    ("redis+sentinel://s:26379/m/1/2", "/MASTER[/db]"),
    ("redis://a:1?timeout=3", "unknown option 'timeout'"),
    ("redis://a:1?ssl_check_hostname=maybe", "must be true or false"),
    ("redis://a:1?ssl_ca_certs=/ca.pem", "ssl_ca_certs needs TLS (rediss://)"),
    ("redis+cluster://a:1?ssl_certfile=/c", "needs TLS (rediss+cluster://)"),
])
def test_a_bad_url_is_one_line_that_says_why(url: str, says: str) -> None:
    with pytest.raises(RedisUrlError) as raised:
        parse_redis_url(url)
    message = str(raised.value)
    assert says in message and "\n" not in message and message.startswith("HUB_REDIS_URL")
    with pytest.raises(SettingsError, match="HUB_REDIS_URL"):
        load_settings({}, {"HUB_REDIS_URL": url})


@pytest.mark.parametrize("credentials", ["s%40cret", ":s%40cret", "default:s%40cret"])
async def test_one_server_takes_a_password_in_each_spelling(
    credentials: str, redis_factory: Callable[..., RedisServer]
) -> None:
    """`redis://PASSWORD@`, `redis://:PASSWORD@` and `redis://USER:PASSWORD@` all log in
    (redis-py alone would take the first for a user name, and fail)."""
    server = redis_factory(password="s@cret")
    client = create_server_client(f"redis://{credentials}@127.0.0.1:{server.port}/0")
    try:
        assert await client.ping()
    finally:
        await client.aclose()
