"""`HUB_REDIS_URL` in its three forms (PROTOCOL §6), checked once at start: one server, a
Redis Cluster (`redis+cluster://` seeds) or the master that Sentinels name
(`redis+sentinel://…/MASTER`). A URL that cannot work is one line that says why."""

from __future__ import annotations

import enum
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec

# Query options passed on to redis-py's connections (TLS files and checks, timeouts).
_PASSED_OPTIONS = {
    "ssl_ca_certs": str, "ssl_certfile": str, "ssl_keyfile": str, "ssl_cert_reqs": str,
    "ssl_check_hostname": bool, "ssl_ca_data": str, "client_name": str,
}


class RedisUrlError(ValueError):
    """What is wrong with HUB_REDIS_URL, in one line."""


class Kind(enum.StrEnum):
    SERVER = "server"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


class RedisTarget(msgspec.Struct, frozen=True):
    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    master: str | None = None  # Sentinel: the master's name
    sentinel_password: str | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)

    def connection_kwargs(self) -> dict[str, Any]:
        """Credentials, TLS and the passed options, as redis-py connections take them."""
        kwargs: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            kwargs["ssl"] = True
        kwargs.update(self.options)
        return kwargs


_SCHEMES = {
    "redis": (Kind.SERVER, False), "rediss": (Kind.SERVER, True),
    "redis+cluster": (Kind.CLUSTER, False), "rediss+cluster": (Kind.CLUSTER, True),
    "redis+sentinel": (Kind.SENTINEL, False), "rediss+sentinel": (Kind.SENTINEL, True),
}


def parse_redis_url(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise RedisUrlError(
            f"HUB_REDIS_URL must start with one of {', '.join(s + '://' for s in _SCHEMES)}"
        )
    kind, tls = _SCHEMES[scheme.lower()]
    parts = urlsplit("//" + rest)
    credentials, at, hosts = parts.netloc.rpartition("@")
    username, password = _credentials(credentials) if at else (None, None)
    nodes = _nodes(hosts, single=kind is Kind.SERVER)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    sentinel_password = query.pop("sentinel_password", None) if kind is Kind.SENTINEL else None
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    master, db = _path(kind, path)
    if "db" in query:
        db = _db(query.pop("db"))
    if kind is Kind.CLUSTER and db:
        raise RedisUrlError("HUB_REDIS_URL: a Redis Cluster has only database 0")
    options = _options(query)
    tls_only = sorted(name for name in options if name.startswith("ssl_"))
    if tls_only and not tls:
        secure = scheme.lower().replace("redis", "rediss", 1)
        raise RedisUrlError(f"HUB_REDIS_URL: {', '.join(tls_only)} needs TLS ({secure}://)")
    return RedisTarget(
        kind, url, nodes, tls, username, password, db, master, sentinel_password, options
    )


def _credentials(text: str) -> tuple[str | None, str | None]:
    user, colon, password = text.partition(":")
    if not colon:  # redis://password@host, as redis-cli reads it
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _nodes(hosts: str, *, single: bool) -> tuple[tuple[str, int], ...]:
    listed = [host for host in hosts.split(",")]
    if not hosts or any(not host for host in listed):
        raise RedisUrlError("HUB_REDIS_URL names no host (host:port, comma-separated)")
    if single and len(listed) > 1:
        raise RedisUrlError(
            "HUB_REDIS_URL: redis:// takes one host; several are redis+cluster:// seeds or "
            "redis+sentinel:// sentinels"
        )
    return tuple(_host_port(host) for host in listed)


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:6379
        host, bracket, port = text[1:].partition("]")
        port = port.removeprefix(":")
        if not bracket:
            raise RedisUrlError(f"HUB_REDIS_URL: unclosed [ in host {text!r}")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise RedisUrlError(f"HUB_REDIS_URL: no host in {text!r}")
    if not port:
        return unquote(host), 6379
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError(f"HUB_REDIS_URL: port {port!r} of {host} is not 1-65535")
    return unquote(host), int(port)


def _path(kind: Kind, path: list[str]) -> tuple[str | None, int]:
    if kind is Kind.SENTINEL:
        if not path:
            raise RedisUrlError(
                "HUB_REDIS_URL: redis+sentinel:// needs the master's name: "
                "redis+sentinel://host:port[,host:port...]/MASTER[/db]"
            )
        if len(path) > 2:
            raise RedisUrlError("HUB_REDIS_URL: redis+sentinel:// path is /MASTER[/db]")
        return path[0], _db(path[1]) if len(path) == 2 else 0
    if len(path) > 1:
        raise RedisUrlError("HUB_REDIS_URL: the path is at most /db")
    return None, _db(path[0]) if path else 0


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"HUB_REDIS_URL: database {text!r} is not a number")
    return int(text)


def _options(query: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, value in query.items():
        kind = _PASSED_OPTIONS.get(name)
        if kind is None:
            known = ", ".join(sorted([*_PASSED_OPTIONS, "db", "sentinel_password"]))
            raise RedisUrlError(f"HUB_REDIS_URL: unknown option {name!r} (known: {known})")
        if kind is bool:
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise RedisUrlError(f"HUB_REDIS_URL: {name} must be true or false")
            options[name] = value.lower() in {"true", "1", "yes"}
        else:
            options[name] = value
    return options
