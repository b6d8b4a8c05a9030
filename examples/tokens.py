"""Tokens for the hub from an application's own login: the backend already knows who the
user is (a session cookie, an OAuth login), and gives the browser or the app a short-lived
JWT for the hub, signed with `HUB_JWT_SECRET`. Any JWT library does; this is PyJWT, which
the hub itself uses.

The recipes in docs/guide.md call `hub_token` from a FastAPI and a Django view.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jwt


def hub_token(
    user_id: str,
    *,
    secret: str,
    channels: Sequence[str] = (),
    publish: Sequence[str] = (),
    ttl: int = 600,
    info: dict[str, Any] | None = None,
) -> str:
    """A token for `user_id` (the `sub`), valid `ttl` seconds, that may subscribe to the
    `channels` patterns and publish to the `publish` patterns (PROTOCOL §2). `info` is shown
    in presence (at most 1 KiB of JSON)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl}
    if channels:
        claims["channels"] = list(channels)
    if publish:
        claims["publish"] = list(publish)
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, secret, algorithm="HS256")
