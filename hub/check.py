"""What `hub check` prints and `hub serve` warns about: the effective configuration with its
secrets masked, and the settings that load but leave a node unable to serve anyone.

A node with no way to verify a token closes every client 4001, and one with no API key
answers every API call 403; both start without a word unless someone says so, which is
what `warnings` is for (Centrifugo's `checkconfig` plays the same part).
"""

from __future__ import annotations

import urllib.parse

import msgspec

from hub import fdlimit
from hub.settings import Settings, variables

# Settings whose value is a secret: shown as set or unset, never as text.
SECRETS = frozenset({"jwt_secret", "api_key", "hook_static_headers", "events_secret"})
_MASK = "********"


def _mask_url(url: str) -> str:
    """A Redis URL with its passwords (in the authority or `sentinel_password=`) masked."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, hosts = netloc.rpartition("@")
        user, colon, _password = credentials.partition(":")
        netloc = f"{user}:{_MASK}@{hosts}" if colon else f"{_MASK}@{hosts}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    masked = [(key, _MASK if "password" in key else value) for key, value in query]
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(masked, safe="*"), "")
    )


def _shown(name: str, value: object) -> str:
    if value is None or value == "":
        return "(unset)"
    if name in SECRETS:
        return _MASK
    if name == "redis_url":
        return _mask_url(str(value))
    if name == "jwt_public_key":
        return "(a PEM public key)"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def effective(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value as shown) for every option, in the order Settings declares them."""
    names = variables()
    return [
        (names[name], _shown(name, getattr(settings, name)))
        for name in Settings.__struct_fields__ if name in names
    ]


def namespaces_toml(settings: Settings) -> str:
    """The namespaces as the TOML that would configure them (every option spelled out)."""
    lines: list[str] = []
    for name, namespace in sorted(settings.namespaces.items()):
        lines.append(f"[namespaces.{name}]")
        for option, value in msgspec.to_builtins(namespace).items():
            lines.append(f"{option} = {msgspec.json.encode(value).decode()}")
        lines.append("")
    return "\n".join(lines)


def warnings(settings: Settings) -> list[str]:
    """What loads but serves nobody, or serves more than intended; [] when all is well."""
    found: list[str] = []
    if settings.dev:
        return found  # dev mode is open by design, and says so itself
    if not (settings.jwt_secret or settings.jwt_public_key or settings.jwks_url
            or settings.hook_connect_url):
        found.append(
            "no HUB_JWT_SECRET, HUB_JWT_PUBLIC_KEY or HUB_JWKS_URL: no token can be verified, "
            "so every client connection will be closed 4001"
        )
    if not settings.api_key:
        found.append("no HUB_API_KEY: every HTTP API call (/api/*) will be answered 403")
    limit = fdlimit.problem(fdlimit.reachable(), settings.max_connections)
    if limit:
        found.append(limit)
    return found


def report(settings: Settings) -> str:
    """The text of `hub check`: every option, then the namespaces, then the warnings."""
    width = max(len(variable) for variable, _ in effective(settings))
    lines = [f"{variable:<{width}}  {value}" for variable, value in effective(settings)]
    toml = namespaces_toml(settings)
    if toml:
        lines += ["", toml.rstrip()]
    lines.append("")
    found = warnings(settings)
    lines += [f"warning: {text}" for text in found] or ["no warnings"]
    return "\n".join(lines)
