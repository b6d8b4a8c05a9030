"""The HTTP API of PROTOCOL §1 and §9: publish, broadcast, send, disconnect, presence,
history, channels, stats, and the probes and metrics."""

from __future__ import annotations

import hmac
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hub import protocol as p
from hub.errors import (
    HTTP_STATUS_BY_CODE,
    BrokerUnavailable,
    CloseCode,
    HubError,
    close_reason,
)
from hub.node import Node, node_of
from hub.presence import cluster_stats

MAX_BODY_BYTES = 1024 * 1024
BodyT = TypeVar("BodyT")
_encoder = msgspec.json.Encoder()


class PublishBody(msgspec.Struct):
    channel: str
    data: msgspec.Raw
    event: str | None = None


class BroadcastBody(msgspec.Struct):
    channels: list[str]
    data: msgspec.Raw
    event: str | None = None


class SendBody(msgspec.Struct):
    user: str
    data: msgspec.Raw
    event: str | None = None


class DisconnectBody(msgspec.Struct):
    user: str
    code: int = int(CloseCode.DISCONNECTED_BY_API)
    reason: str = ""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def _check_key(request: Request, node: Node) -> None:
    configured = node.settings.api_key
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" else None
    if configured is None:
        if node.settings.dev:
            return
        raise ApiError(403, "forbidden", "the HTTP API is off: no HUB_API_KEY is configured")
    if node.settings.dev and given is None:
        return
    if given is None or not hmac.compare_digest(given.encode(), configured.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key")


async def _body(request: Request, kind: type[BodyT]) -> BodyT:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, "bad_request", "body over 1 MiB")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "bad_request", "body over 1 MiB")
        chunks.append(chunk)
    try:
        body = msgspec.json.decode(b"".join(chunks), type=kind)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "bad_request", f"malformed body: {exc}") from None
    return body


def api(handler: Any) -> Any:
    """Key check and error mapping for every API call."""

    async def endpoint(request: Request) -> Response:
        node = node_of(request.app)
        try:
            _check_key(request, node)
            response: Response = await handler(request, node)
            return response
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except HubError as exc:
            return error_response(HTTP_STATUS_BY_CODE.get(exc.code, 400), exc.code, exc.message)

    return endpoint


def _position(position: Any) -> dict[str, Any]:
    return {} if position is None else {"offset": position.offset, "epoch": position.epoch}


def _check_user(user: str) -> None:
    if not 1 <= len(user) <= 128:
        raise ApiError(400, "bad_request", "`user` must be 1-128 characters")


@api
async def publish(request: Request, node: Node) -> Response:
    body = await _body(request, PublishBody)
    position = await node.publish(body.channel, body.data, body.event)
    return json_response(_position(position))


@api
async def broadcast(request: Request, node: Node) -> Response:
    body = await _body(request, BroadcastBody)
    if not node.broker.up:
        raise BrokerUnavailable()
    results: list[dict[str, Any]] = []
    for channel in body.channels:
        try:
            position = await node.publish(channel, body.data, body.event)
            results.append({"channel": channel, **_position(position)})
        except HubError as exc:
            error = {"code": exc.code, "message": exc.message}
            results.append({"channel": channel, "error": error})
    return json_response({"results": results})


@api
async def send(request: Request, node: Node) -> Response:
    body = await _body(request, SendBody)
    _check_user(body.user)
    await node.send_to_user(body.user, body.data, body.event)
    return json_response({})


@api
async def disconnect(request: Request, node: Node) -> Response:
    body = await _body(request, DisconnectBody)
    _check_user(body.user)
    if not (body.code == 1000 or 3000 <= body.code <= 4999):
        raise ApiError(400, "bad_request", "`code` must be 1000 or 3000-4999")
    await node.disconnect_user(body.user, body.code, close_reason(body.reason))
    return json_response({})


@api
async def presence(request: Request, node: Node) -> Response:
    channel = request.path_params["channel"]
    clients = await node.presence_of(channel)
    return json_response({"channel": channel, "clients": clients})


@api
async def history(request: Request, node: Node) -> Response:
    channel = request.path_params["channel"]
    query = request.query_params
    since = None
    try:
        limit = int(query["limit"]) if "limit" in query else None
        if "since" in query:
            if "epoch" not in query:
                raise ApiError(400, "bad_request", "`since` needs `epoch`")
            since = p.Since(int(query["since"]), query["epoch"])
    except ValueError:
        raise ApiError(400, "bad_request", "`since` and `limit` must be integers") from None
    reply = await node.history(channel, since, limit)
    return json_response({
        "channel": reply.channel, "epoch": reply.epoch, "offset": reply.offset,
        "messages": reply.messages,
    })


@api
async def channels(request: Request, node: Node) -> Response:
    prefix = request.query_params.get("prefix", "")
    counts = await node.presence.channels(node.snapshot(), prefix)
    return json_response({"channels": counts})


@api
async def stats(request: Request, node: Node) -> Response:
    return json_response(await cluster_stats(node.presence, node.snapshot()))


async def metrics(request: Request) -> Response:
    body, content_type = node_of(request.app).metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    node = node_of(request.app)
    if node.ready:
        return json_response({"status": "ready"})
    reason = "draining" if node.draining else "broker unavailable"
    return json_response({"status": reason}, 503)


routes = [
    Route("/api/publish", publish, methods=["POST"]),
    Route("/api/broadcast", broadcast, methods=["POST"]),
    Route("/api/send", send, methods=["POST"]),
    Route("/api/disconnect", disconnect, methods=["POST"]),
    Route("/api/presence/{channel:path}", presence, methods=["GET"]),
    Route("/api/history/{channel:path}", history, methods=["GET"]),
    Route("/api/channels", channels, methods=["GET"]),
    Route("/api/stats", stats, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
