"""HUB_ALLOWED_ORIGINS (PROTOCOL §13, §15): which browser origins may connect.

One rule for every endpoint (`/ws`, `/connection/websocket`, the one-way streams, the
emulation and `/emulation`) and for the CORS of the HTTP streams: the list is shell globs
(`https://*.example.com`, `http://127.0.0.1:*`), matched case-insensitively against the
request's whole `Origin`. No list: any origin. A request without `Origin` is no browser's
cross-site request (browsers send it on every WebSocket upgrade and every cross-origin
fetch), so it is allowed: cookies are the browser's, and a non-browser client could send
any `Origin` it likes anyway.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp


def parse_origins(text: str) -> tuple[str, ...]:
    """The comma-separated patterns of HUB_ALLOWED_ORIGINS, lower-cased."""
    return tuple(item.strip().lower() for item in text.split(",") if item.strip())


def origin_allowed(patterns: Sequence[str], origin: str | None) -> bool:
    """Whether a request with this `Origin` header (None: none) may go on."""
    if not patterns or origin is None:
        return True
    origin = origin.lower()
    return any(fnmatch.fnmatchcase(origin, pattern) for pattern in patterns)


class OriginCORS(CORSMiddleware):
    """Starlette's CORS with the origin decided by `origin_allowed`: with a list, an
    allowed origin is echoed with `Access-Control-Allow-Credentials: true` (so a page may
    send its cookies to the connect hook); without one, any origin, without credentials."""

    def __init__(self, app: ASGIApp, patterns: Sequence[str]) -> None:
        super().__init__(app, allow_origins=[] if patterns else ["*"],
                         allow_credentials=bool(patterns),
                         allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                         max_age=300)
        self.patterns = tuple(patterns)

    def is_allowed_origin(self, origin: str) -> bool:
        if not self.patterns:
            return True
        return origin_allowed(self.patterns, origin)
