"""`GET /openapi.json`: an OpenAPI 3.1 document of the HTTP API (PROTOCOL §1, §9).

The schemas come from the Structs in `hub.api_types` (`msgspec.json.schema_components`), the
same types the endpoints decode and encode; what is written here by hand is the part a type
cannot say: paths, parameters, which statuses each call answers, and why.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hub import __version__, centrifugo_api
from hub import api_types as t
from hub.connections import CURSOR_PATTERN
from hub.node import node_of

JSON = "application/json"
SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]
CHANNEL_DOC = "1-255 characters of A-Z a-z 0-9 _ - : . = /, or @<user>; `/` may stay unescaped"


def _ref(kind: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _json(kind: type[msgspec.Struct]) -> dict[str, Any]:
    return {JSON: {"schema": _ref(kind)}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json(t.ErrorReply)}


ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("`bad_request`: malformed body, missing or mistyped field"),
    "400c": _error("`invalid_channel` (bad channel name) or `bad_request` (malformed body, "
                   "missing or mistyped field)"),
    "401": _error("`unauthorized`: missing or wrong API key"),
    "403": _error("`forbidden`: no HUB_API_KEY is configured (and not in dev mode)"),
    "403n": _error("`forbidden`: no HUB_API_KEY is configured, or the channel's namespace has "
                   "this feature off"),
    "413": _error("`bad_request`: body over 1 MiB"),
    "500": _error("`internal`: a failure of the node (logged)"),
    "503": _error("`unavailable`: the broker (Redis) cannot be reached; nothing was done"),
}


def _responses(reply: type[msgspec.Struct], description: str, *errors: str) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": description, "content": _json(reply)}}
    for key in ("401", *errors, "500", "503"):
        responses[key[:3]] = ERRORS[key]
    return responses


def _post(
    operation: str, summary: str, body: type[msgspec.Struct], reply: type[msgspec.Struct],
    description: str, *, channel_errors: bool = False,
) -> dict[str, Any]:
    return {"post": {
        "operationId": operation, "summary": summary, "tags": ["api"], "security": SECURITY,
        "requestBody": {"required": True, "content": _json(body)},
        "responses": _responses(reply, description, "400c" if channel_errors else "400",
                                "403", "413"),
    }}


def _channel_parameter() -> dict[str, Any]:
    schema = {"type": "string", "pattern": t.CHANNEL_PATTERN}
    return {"name": "channel", "in": "path", "required": True, "schema": schema,
            "description": CHANNEL_DOC}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


OFFSET = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "format": "int64"}


def _since_parameter() -> dict[str, Any]:
    """`?since=OFFSET&epoch=EPOCH`: two query keys, one parameter, because `since` needs
    `epoch` (an exploded form object is how OpenAPI says that)."""
    return {
        "name": "position", "in": "query", "required": False, "style": "form", "explode": True,
        "description": "`since` (an offset: the messages after it) with its `epoch`",
        "schema": {
            "type": "object",
            "properties": {"since": OFFSET, "epoch": {"type": "string"}},
            "dependentRequired": {"since": ["epoch"]},
            "additionalProperties": False,
        },
    }


def _get(
    operation: str, summary: str, reply: type[msgspec.Struct], description: str,
    parameters: list[dict[str, Any]], *errors: str,
) -> dict[str, Any]:
    return {"get": {
        "operationId": operation, "summary": summary, "tags": ["api"], "security": SECURITY,
        "parameters": parameters, "responses": _responses(reply, description, *errors),
    }}


def _probe(operation: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": operation, "summary": summary, "tags": ["probes"],
                    "security": [], "responses": responses}}


def _paths() -> dict[str, Any]:
    ready = {"description": "ready", "content": _json(t.ReadyReply)}
    not_ready = {"description": "draining, or the broker is unreachable",
                 "content": _json(t.ReadyReply)}
    exposition = {"schema": {"type": "string"}}
    return {
        "/api/publish": _post(
            "publish", "Publish to one channel (an @user channel is the same as send)",
            t.PublishBody, t.PublishReply,
            "published: `{}`, or `{offset, epoch}` on a channel with history",
            channel_errors=True),
        "/api/broadcast": _post(
            "broadcast", "Publish the same data to many channels", t.BroadcastBody,
            t.BroadcastReply, "one item per channel, in order; a bad channel fails its own "
            "item (with `error`), not the call"),
        "/api/batch": _post(
            "batch", "Many publish, broadcast and send commands in one request",
            t.BatchBody, t.BatchReply, "one reply per command, in order; a command that "
            "fails answers its own `error` and the others are carried out",
            channel_errors=True),
        "/api/send": _post(
            "send", "Personal message to every connection of one user, on any node",
            t.SendBody, t.Empty, "sent (also when the user has no connection anywhere)"),
        "/api/disconnect": _post(
            "disconnect", "Close every connection of one user (or one of them), on any node",
            t.DisconnectBody, t.Empty, "done (also when the user has no connection)"),
        "/api/subscribe": _post(
            "subscribe", "Subscribe every connection of one user, on any node, to a channel",
            t.SubscribeBody, t.Empty,
            "sent to every node (also when the user has no connection); each connection is "
            "told (`/ws`: a `subscribed` frame without `id`; Centrifugo's clients: a "
            "subscribe push), then gets the channel's messages", channel_errors=True),
        "/api/unsubscribe": _post(
            "unsubscribe", "Unsubscribe every connection of one user, on any node",
            t.UnsubscribeBody, t.Empty,
            "sent to every node; each connection that was subscribed is told (`/ws`: an "
            "`unsubscribed` frame without `id`; Centrifugo's clients: an unsubscribe push)",
            channel_errors=True),
        "/api/presence/{channel}": _get(
            "presence", "Who is subscribed to a channel, cluster-wide", t.PresenceReply,
            "the channel's subscribers", [_channel_parameter()], "400c", "403n"),
        "/api/history/{channel}": _get(
            "history", "Stored messages of a channel", t.HistoryReply,
            "oldest first; with `since` the messages after it, else the newest `limit`; "
            "a `since` of another epoch answers the current position and no messages",
            [_channel_parameter(), _since_parameter(),
             _query("limit", "at most this many messages (default and cap 1000)", OFFSET)],
            "400c", "403n") | {"delete": {
                "operationId": "remove_history", "summary": "Remove a channel's stored messages",
                "tags": ["api"], "security": SECURITY, "parameters": [_channel_parameter()],
                "responses": _responses(
                    t.Empty, "removed: epoch and offset stay, the next publication takes the next "
                    "offset, a recovery from before now is `recovered: false`", "400c", "403n"),
            }},
        "/api/namespaces": _get(
            "namespaces", "The options of each channel namespace", t.NamespacesReply,
            "namespace name → options; `default` is what other channels get", [], "403"),
        "/api/channels": _get(
            "channels", "Active channels with subscriber counts, cluster-wide",
            t.ChannelsReply, "channel name → subscriber count",
            [_query("prefix", "only channels whose name starts with it", {"type": "string"})],
            "403"),
        "/api/stats": _get(
            "stats", "Connection statistics per node and in total, cluster-wide",
            t.StatsReply, "every live node and the totals", [], "403"),
        "/api/connections": _get(
            "connections", "The connections of the cluster, filtered and paged",
            t.ConnectionsReply, "at most `limit` connections in (node, client) order; `next` "
            "is the `after` of the following page",
            [_query("user", "only this user's connections", {"type": "string", "minLength": 1}),
             _query("channel", "only connections subscribed to this channel",
                    {"type": "string", "minLength": 1}),
             _query("node", "only this node's connections", {"type": "string", "minLength": 1}),
             _query("limit", "at most this many (default 100, cap 1000)",
                    {"type": "integer", "minimum": 0, "maximum": 1000}),
             _query("after", "the `next` of the previous page",
                    {"type": "string", "pattern": CURSOR_PATTERN})],
            "400", "403"),
        "/healthz": _probe("healthz", "Liveness: 200 while the process serves", {
            "200": {"description": "alive", "content": _json(t.HealthReply)}}),
        "/readyz": _probe("readyz", "Readiness for a load balancer", {
            "200": ready, "503": not_ready}),
        "/metrics": _probe("metrics", "Prometheus text exposition (PROTOCOL §8)", {
            "200": {"description": "the node's metrics", "content": {
                "text/plain": exposition, "application/openmetrics-text": exposition}}}),
    }


@functools.cache
def _components() -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(
        (*t.BODIES, *t.REPLIES), ref_template="#/components/schemas/{name}"
    )
    return {
        "schemas": schemas,
        "securitySchemes": {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                       "description": "HUB_API_KEY"},
            "Bearer": {"type": "http", "scheme": "bearer",
                       "description": "HUB_API_KEY as `Authorization: Bearer <key>`"},
        },
    }


def document(
    root_path: str = "", centrifugo_prefix: str = "/centrifugo/api"
) -> dict[str, Any]:
    """The whole document; `root_path` is where the hub is mounted (embedding), and
    Centrifugo's server API (PROTOCOL §16) is under `centrifugo_prefix`."""
    components = _components()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hub HTTP API",
            "version": __version__,
            "description": (
                "Backends publish, send and disconnect, and read presence, history, channels "
                "and stats. Every /api call needs the API key (X-API-Key or Bearer); in dev "
                "mode it may be left out. Probes and metrics need none."),
        },
        "servers": [{"url": root_path or "/"}],
        "paths": {**_paths(), **centrifugo_api.openapi_paths(centrifugo_prefix)},
        "components": {
            "schemas": {**components["schemas"], **centrifugo_api.openapi_schemas()},
            "securitySchemes": {**components["securitySchemes"],
                                "CentrifugoApiKey": centrifugo_api.SECURITY_SCHEME},
        },
    }


async def openapi_json(request: Request) -> Response:
    root_path = request.scope.get("root_path", "").rstrip("/")
    prefix = node_of(request.app).settings.centrifugo_api_prefix
    return Response(msgspec.json.encode(document(root_path, prefix)), media_type=JSON)


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
