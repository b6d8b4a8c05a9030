"""`GET /admin`, the operator's page (PROTOCOL §12), and `GET /` in dev mode.

The page is static HTML, CSS and JS shipped in the package (`hub/static/`, package data):
no build step, no external asset. Its data comes from the HTTP API alone, with the key the
operator types in, so serving the page itself needs no key. Every URL it uses is relative,
so it works wherever the hub is mounted.
"""

from __future__ import annotations

import functools
import html
import json
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hub import __version__
from hub.node import node_of

ASSETS = {
    "admin.html": "text/html; charset=utf-8",
    "admin.css": "text/css; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
}
# Only our own files, no inline script or style: a channel name or message shown on the
# page can never run as code.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def asset(name: str) -> bytes:
    return resources.files("hub").joinpath("static", name).read_bytes()


def _asset_response(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)


async def admin_page(request: Request) -> Response:
    return _asset_response("admin.html")


async def admin_asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS or name == "admin.html":
        return Response("not found", 404, media_type="text/plain")
    return _asset_response(name)


async def admin_config(request: Request) -> Response:
    """What the page must know before it has a key: whether it needs one (dev mode), so
    that it does not find out from a refused call (a 401 in the browser's console)."""
    dev = node_of(request.app).settings.dev  # dev mode takes calls without a key
    body = json.dumps({"dev": dev, "needs_key": not dev})
    return Response(body, media_type="application/json", headers=HEADERS)


def index_html(root_path: str) -> str:
    base = html.escape(root_path.rstrip("/"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hub {__version__} (dev mode)</title>
<link rel="stylesheet" href="{base}/admin/admin.css"></head>
<body class="index"><main class="card">
<h1>hub {__version__} <span class="badge warn">dev mode</span></h1>
<p>A WebSocket pub/sub hub. Connect to <code>{base}/ws?user=alice</code>, send
<code>{{"type":"subscribe","channel":"news"}}</code>, and publish with
<code>hub publish news '{{"text":"hello"}}'</code>.</p>
<ul>
<li><a href="{base}/admin">Admin page</a>: nodes, channels, presence, history, a console</li>
<li><a href="{base}/openapi.json">HTTP API (OpenAPI 3.1)</a></li>
<li><a href="{base}/metrics">Metrics</a> · <a href="{base}/readyz">readyz</a></li>
</ul></main></body></html>
"""


async def index(request: Request) -> Response:
    """A page of links in dev mode; nothing (404) in production, as before."""
    if not node_of(request.app).settings.dev:
        return Response("not found", 404, media_type="text/plain")
    body = index_html(request.scope.get("root_path", ""))
    return Response(body, media_type="text/html; charset=utf-8", headers=HEADERS)


routes = [
    Route("/", index, methods=["GET"]),
    Route("/admin", admin_page, methods=["GET"]),
    Route("/admin/config.json", admin_config, methods=["GET"]),
    Route("/admin/{name}", admin_asset, methods=["GET"]),
]
