"""The HTTP API of PROTOCOL §1 and §9: publish, broadcast, send, batch, disconnect, presence,
history, channels, stats, and the probes and metrics.

Bodies are decoded into, and replies encoded from, the Structs of `hub.api_types`, which
are also what `/openapi.json` describes.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from hub import api_types as t
from hub import protocol as p
from hub.batch import in_order
from hub.broker import StreamPosition
from hub.channels import personal_channel
from hub.connections import DEFAULT_LIMIT, MAX_LIMIT, Query, decode_cursor, encode_cursor
from hub.errors import HTTP_STATUS_BY_CODE, BrokerUnavailable, ErrorCode, HubError, close_reason
from hub.node import Node, node_of
from hub.presence import cluster_stats
from hub.settings import DEFAULT_NAMESPACE

log = logging.getLogger("hub.endpoints")

MAX_BODY_BYTES = 1024 * 1024
MAX_OFFSET = 2**63 - 1  # a stream offset is a signed 64-bit integer in Redis
BodyT = TypeVar("BodyT")
Handler = Callable[[Request, Node], Awaitable[msgspec.Struct]]
_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_response(body: msgspec.Struct, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(t.ErrorReply(t.ErrorDetail(code, message)), status)


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
    except (msgspec.DecodeError, RecursionError) as exc:  # too deep: RecursionError
        raise ApiError(400, "bad_request", f"malformed body: {exc}") from None
    return body


def api(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Key check, reply encoding and error mapping for every API call."""

    async def endpoint(request: Request) -> Response:
        node = node_of(request.app)
        try:
            _check_key(request, node)
            return json_response(await handler(request, node))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except HubError as exc:
            return error_response(HTTP_STATUS_BY_CODE.get(exc.code, 400), exc.code, exc.message)
        except ClientDisconnect:  # gone before its body was in: the client's doing, not ours
            return error_response(400, ErrorCode.BAD_REQUEST, "incomplete body")
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, ErrorCode.INTERNAL, "internal error")

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


def _publish_reply(position: StreamPosition | None) -> t.PublishReply:
    if position is None:
        return t.PublishReply()
    return t.PublishReply(offset=position.offset, epoch=position.epoch)


def _check_user(user: str) -> None:
    if not 1 <= len(user) <= 128:
        raise ApiError(400, "bad_request", "`user` must be 1-128 characters")


@api
async def publish(request: Request, node: Node) -> t.PublishReply:
    body = await _body(request, t.PublishBody)
    return _publish_reply(await node.publish(body.channel, body.data, body.event))


@api
async def broadcast(request: Request, node: Node) -> t.BroadcastReply:
    body = await _body(request, t.BroadcastBody)
    if not node.broker.up:
        raise BrokerUnavailable()
    return t.BroadcastReply(await _broadcast(node, body))


async def _broadcast(node: Node, body: t.BroadcastBody) -> list[t.BroadcastItem]:
    """Every channel side by side (one round trip to Redis for all), each answering for
    itself; a channel named twice gets its two publications in order."""

    async def one(channel: str) -> t.BroadcastItem:
        try:
            position = await node.publish(channel, body.data, body.event)
        except HubError as exc:
            return t.BroadcastItem(channel, error=t.ErrorDetail(exc.code, exc.message))
        reply = _publish_reply(position)
        return t.BroadcastItem(channel, offset=reply.offset, epoch=reply.epoch)

    return await in_order(body.channels, one, lambda channel: (channel,))


def _batch_channels(command: t.BatchCommand) -> tuple[str, ...] | None:
    if command.publish is not None:
        return (command.publish.channel,)
    if command.broadcast is not None:
        return tuple(command.broadcast.channels)
    if command.send is not None:
        return (personal_channel(command.send.user),)
    return ()


async def _batch_command(node: Node, command: t.BatchCommand) -> t.BatchItemReply:
    given = [name for name in ("publish", "broadcast", "send") if getattr(command, name)]
    try:
        if len(given) != 1:
            raise ApiError(400, "bad_request",
                           "a command must have exactly one of publish, broadcast, send")
        if command.publish is not None:
            body = command.publish
            position = await node.publish(body.channel, body.data, body.event)
            return t.BatchItemReply(publish=_publish_reply(position))
        if command.broadcast is not None:
            if not node.broker.up:
                raise BrokerUnavailable()
            return t.BatchItemReply(
                broadcast=t.BroadcastReply(await _broadcast(node, command.broadcast)))
        assert command.send is not None
        _check_user(command.send.user)
        await node.send_to_user(command.send.user, command.send.data, command.send.event)
        return t.BatchItemReply(send=t.Empty())
    except ApiError as exc:
        return t.BatchItemReply(error=t.ErrorDetail(exc.code, exc.message))
    except HubError as exc:
        return t.BatchItemReply(error=t.ErrorDetail(exc.code, exc.message))
    except Exception:  # one command's failure is its own reply, not the batch's
        log.exception("batch command failed")
        return t.BatchItemReply(error=t.ErrorDetail(ErrorCode.INTERNAL, "internal error"))


@api
async def batch(request: Request, node: Node) -> t.BatchReply:
    """Many publish, broadcast and send commands in one request, answered in order, each on
    its own: publications to different channels go to the broker together."""
    body = await _body(request, t.BatchBody)
    if len(body.commands) > t.MAX_BATCH_COMMANDS:
        raise ApiError(400, "bad_request", f"at most {t.MAX_BATCH_COMMANDS} commands")
    return t.BatchReply(await run_batch(node, body.commands))


async def run_batch(node: Node, commands: list[t.BatchCommand]) -> list[t.BatchItemReply]:
    """`/api/batch` and `EmbeddedHub.batch`: a reply per command, in order."""
    return await in_order(commands, lambda command: _batch_command(node, command),
                          _batch_channels)


@api
async def send(request: Request, node: Node) -> t.Empty:
    body = await _body(request, t.SendBody)
    _check_user(body.user)
    await node.send_to_user(body.user, body.data, body.event)
    return t.Empty()


@api
async def disconnect(request: Request, node: Node) -> t.Empty:
    body = await _body(request, t.DisconnectBody)
    _check_user(body.user)
    code = body.code
    if not (code == 1000 or 3000 <= code <= 4999) or code != int(code):
        raise ApiError(400, "bad_request", "`code` must be 1000 or 3000-4999")
    if body.client is not None and not 1 <= len(body.client) <= 128:
        raise ApiError(400, "bad_request", "`client` must be 1-128 characters")
    await node.disconnect_user(body.user, int(code), close_reason(body.reason),
                               client=body.client)
    return t.Empty()


@api
async def presence(request: Request, node: Node) -> t.PresenceReply:
    channel = request.path_params["channel"]
    members = await node.presence_of(channel)
    return t.PresenceReply(channel, [
        t.PresenceClient(member.client, member.user, member.node or node.node_id, member.info)
        for member in members
    ])


def _query_int(request: Request, name: str, maximum: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"`{name}` must be an integer") from None
    if not 0 <= value <= maximum:
        raise ApiError(400, "bad_request", f"`{name}` must be between 0 and {maximum}")
    return value


@api
async def history(request: Request, node: Node) -> t.HistoryReply:
    channel = request.path_params["channel"]
    limit = _query_int(request, "limit", MAX_OFFSET)
    offset = _query_int(request, "since", MAX_OFFSET)
    since = None
    if offset is not None:
        epoch = request.query_params.get("epoch")
        if epoch is None:
            raise ApiError(400, "bad_request", "`since` needs `epoch`")
        since = p.Since(offset, epoch)
    reply = await node.history(channel, since, limit)
    return t.HistoryReply(reply.channel, reply.epoch, reply.offset, [
        t.HistoryMessage(item.offset, item.data, item.ts, item.event, item.from_)
        for item in reply.messages
    ])


@api
async def remove_history(request: Request, node: Node) -> t.Empty:
    await node.remove_history(request.path_params["channel"])
    return t.Empty()


async def history_resource(request: Request) -> Response:
    """One route for both methods, so a 405 names both in `Allow`."""
    return await (remove_history if request.method == "DELETE" else history)(request)


@api
async def namespaces(request: Request, node: Node) -> t.NamespacesReply:
    settings = node.settings
    names = {*settings.namespaces, DEFAULT_NAMESPACE}
    return t.NamespacesReply({
        name: settings.namespace_of(f"{name}:x" if name != DEFAULT_NAMESPACE else "x")
        for name in sorted(names)
    })


@api
async def channels(request: Request, node: Node) -> t.ChannelsReply:
    prefix = request.query_params.get("prefix", "")
    return t.ChannelsReply(await node.presence.channels(node.snapshot(), prefix))


@api
async def connections(request: Request, node: Node) -> t.ConnectionsReply:
    params = request.query_params
    for name in ("user", "channel", "node"):
        if params.get(name) == "":
            raise ApiError(400, "bad_request", f"`{name}` must not be empty")
    limit = _query_int(request, "limit", MAX_LIMIT)
    after = params.get("after")
    query = Query(
        user=params.get("user"), channel=params.get("channel"), node=params.get("node"),
        limit=DEFAULT_LIMIT if limit is None else max(1, limit),
        after=decode_cursor(after) if after is not None else None,
    )
    page = await node.directory.page(query)
    cursor = encode_cursor(page.next) if page.next is not None else None
    return t.ConnectionsReply(page.connections, cursor, page.unanswered)


@api
async def stats(request: Request, node: Node) -> t.StatsReply:
    node.noticed_address(request.scope)
    cluster = await cluster_stats(node.presence, node.snapshot())
    return t.StatsReply(cluster.nodes, msgspec.convert(cluster.total, t.StatsTotal))


async def metrics(request: Request) -> Response:
    body, content_type = node_of(request.app).metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


async def healthz(request: Request) -> Response:
    return json_response(t.HealthReply("ok"))


async def readyz(request: Request) -> Response:
    node = node_of(request.app)
    node.noticed_address(request.scope)
    if node.ready:
        return json_response(t.ReadyReply("ready"))
    return json_response(t.ReadyReply("draining" if node.draining else "broker unavailable"), 503)


class ChannelRoute(Route):
    """A route whose `{channel:path}` matches any channel name, line breaks included (a
    personal channel `@<user>` may hold any character; Starlette's `.*` stops at `\n`)."""

    def __init__(
        self,
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
        methods: tuple[str, ...] = ("GET",),
    ) -> None:
        super().__init__(path, endpoint, methods=list(methods))
        self.path_regex = re.compile(self.path_regex.pattern, re.DOTALL)


# What HubApp serves before Starlette's router, by (method, path): the calls a backend
# makes per message. They are in `routes` too, which /openapi.json and mounts read.
shortcuts = {("POST", "/api/publish"): publish, ("POST", "/api/broadcast"): broadcast,
             ("POST", "/api/send"): send, ("POST", "/api/batch"): batch}

routes = [
    *(Route(path, handler, methods=[method]) for (method, path), handler in shortcuts.items()),
    Route("/api/disconnect", disconnect, methods=["POST"]),
    ChannelRoute("/api/presence/{channel:path}", presence),
    ChannelRoute("/api/history/{channel:path}", history_resource, ("GET", "DELETE")),
    Route("/api/namespaces", namespaces, methods=["GET"]),
    Route("/api/channels", channels, methods=["GET"]),
    Route("/api/stats", stats, methods=["GET"]),
    Route("/api/connections", connections, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
