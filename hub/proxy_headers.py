"""uvicorn's `X-Forwarded-*` handling without a coroutine frame of its own in every
connection's call chain.

uvicorn wraps the app in `ProxyHeadersMiddleware`, whose `__call__` rewrites the scope and
then awaits the app: a frame (0.45 KiB with the address tuples its locals keep) that lives
as long as each WebSocket does. `FlatProxyHeaders` runs the same middleware, uvicorn's own
code and trusted hosts, against a stand-in app that returns at once, then hands the server
the app's coroutine itself. That holds while the middleware awaits nothing but the app;
`flatten` checks it once (a probe), and keeps uvicorn's middleware as it is otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import uvicorn
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

log = logging.getLogger("hub.server")

_PROBE_SCOPE = {"type": "websocket", "client": ("127.0.0.1", 1), "headers": [
    (b"x-forwarded-for", b"192.0.2.1"), (b"x-forwarded-proto", b"https")]}


async def _scope_only(scope: Any, receive: Any, send: Any) -> None:
    return None


class FlatProxyHeaders:
    __slots__ = ("_app", "_rewrite")

    def __init__(self, middleware: ProxyHeadersMiddleware) -> None:
        self._app: Any = middleware.app
        rewrite = ProxyHeadersMiddleware(_scope_only)
        rewrite.trusted_hosts = middleware.trusted_hosts
        self._rewrite = rewrite

    def __call__(self, scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        if not rewrite_scope(self._rewrite, scope):
            raise RuntimeError("uvicorn's ProxyHeadersMiddleware awaited more than the app")
        result: Coroutine[Any, Any, None] = self._app(scope, receive, send)
        return result


def rewrite_scope(middleware: ProxyHeadersMiddleware, scope: Any) -> bool:
    """Run the middleware's rewrite of `scope` to its end; False if it did not end at
    once (it awaited something)."""
    step = middleware(scope, _no_receive, _no_send)
    try:
        step.send(None)
    except StopIteration:
        return True
    step.close()
    return False


async def _no_receive() -> Any:
    raise RuntimeError("not for the proxy headers' rewrite")


async def _no_send(message: Any) -> None:
    raise RuntimeError("not for the proxy headers' rewrite")


def flatten(app: Any) -> Any:
    """`app` with uvicorn's proxy-headers middleware made flat, if it is that middleware
    and the probe finds it rewrites without awaiting; else `app` itself."""
    if not isinstance(app, ProxyHeadersMiddleware):
        return app
    probe = ProxyHeadersMiddleware(_scope_only, trusted_hosts="127.0.0.1")
    scope = dict(_PROBE_SCOPE)
    if not rewrite_scope(probe, scope) or scope.get("client", ("",))[0] != "192.0.2.1":
        log.warning("uvicorn's proxy headers middleware kept as it is (its probe failed)")
        return app
    return FlatProxyHeaders(app)


class LeanConfig(uvicorn.Config):
    """uvicorn's configuration, with `flatten` applied to the app it loads."""

    def load(self) -> None:
        super().load()
        self.loaded_app = flatten(self.loaded_app)
