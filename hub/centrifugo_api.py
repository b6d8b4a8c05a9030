"""Centrifugo's server HTTP API (PROTOCOL §16): `POST {prefix}/{method}` with a JSON body,
so that Centrifugo's server SDKs (`cent` for Python, gocent, phpcent) and centrifuge-js's
`getState` helpers talk to the hub unchanged.

The requests and results (`hub.centrifugo_api_types`) mirror Centrifugo's api.proto; a
call answers `{"result": {...}}`, or `{"error": {"code", "message"}}` with
Centrifugo's codes (100 internal, 102 unknown channel, 104 not found, 107 bad request, 108
not available, 112 unrecoverable position), HTTP 200 as Centrifugo does, or the status
Centrifugo maps the code to when the request asks `X-Centrifugo-Error-Mode: transport`.
What cannot be a call at all is an HTTP status with the same body: 400 (the body is no JSON,
or a field has the wrong type), 401/403 (key), 404 (no such method), 413 (over 1 MiB).

Every call is the hub's own: `hub.node.Node` publishes, moves a user's connections, reads
presence and history; nothing here keeps state. The choices where the hub and Centrifugo
differ are listed in docs/protocol.md §16.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from hub import __version__
from hub import centrifugo_frames as cf
from hub import protocol as p
from hub.batch import in_order
from hub.centrifugo_api_types import (
    BAD_REQUEST,
    HUB_CODES,
    INTERNAL,
    MESSAGES,
    NOT_FOUND,
    TRANSPORT_STATUS,
    UNKNOWN_CHANNEL,
    UNRECOVERABLE,
    BatchRequest,
    BatchResult,
    BroadcastRequest,
    BroadcastResult,
    CallFailed,
    ChannelInfo,
    ChannelRequest,
    ChannelsRequest,
    ChannelsResult,
    DisconnectRequest,
    DisconnectSpec,
    Empty,
    ErrorBody,
    ErrorReply,
    HistoryRequest,
    HistoryResult,
    InfoRequest,
    InfoResult,
    NodeResult,
    PresenceResult,
    PresenceStatsResult,
    PublishRequest,
    PublishResponse,
    PublishResult,
    RefreshRequest,
    Reply,
    SubscribeRequest,
    Unreadable,
    UnsubscribeRequest,
)
from hub.centrifugo_codecs import publication
from hub.channels import is_personal, is_valid
from hub.endpoints import MAX_BODY_BYTES
from hub.errors import BrokerUnavailable, CloseCode, HubError, close_reason
from hub.node import HISTORY_LIMIT, Node, node_of
from hub.presence import cluster_stats
from hub.settings import Settings

log = logging.getLogger("hub.centrifugo_api")

MAX_INFO_BYTES = 1024
MAX_BATCH_PARALLEL = 64  # commands of a `parallel` batch in flight at once
MAX_EXPIRE_AT = 2**32  # unix seconds: a timer further out is no timer


# the calls

RequestT = TypeVar("RequestT", bound=msgspec.Struct)
Call = Callable[[Node, Any], Awaitable[msgspec.Struct]]
METHODS: dict[str, tuple[type[msgspec.Struct], Call]] = {}
RESULTS: dict[str, type[msgspec.Struct]] = {}  # by method, for /openapi.json


def method(
    name: str, request: type[RequestT], result: type[msgspec.Struct]
) -> Callable[[Callable[[Node, RequestT], Awaitable[msgspec.Struct]]], Call]:
    def register(call: Callable[[Node, RequestT], Awaitable[msgspec.Struct]]) -> Call:
        METHODS[name] = (request, call)
        RESULTS[name] = result
        return call

    return register


def _channel(channel: str) -> str:
    """Empty: 107 (Centrifugo checks that first); not a valid name: 102."""
    if not channel:
        raise CallFailed(BAD_REQUEST, "channel required")
    if not is_valid(channel):
        raise CallFailed(UNKNOWN_CHANNEL)
    return channel


def _user(user: str) -> str:
    if not 1 <= len(user) <= 128:
        raise CallFailed(BAD_REQUEST, "user must be 1-128 characters")
    return user


def _no_session(session: str) -> None:
    if session:
        raise CallFailed(BAD_REQUEST, "sessions are not supported; name the client")


def _json(raw: msgspec.Raw, b64: str, what: str) -> msgspec.Raw:
    """`data` as JSON, or `b64data` decoded; the hub carries JSON payloads only, so the
    decoded bytes must be one JSON value too. NO_RAW when neither is given."""
    if b64:
        try:
            decoded = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise CallFailed(BAD_REQUEST, f"b64{what} is not base64") from None
        try:
            msgspec.json.decode(decoded)
        except (msgspec.DecodeError, RecursionError):
            raise CallFailed(BAD_REQUEST, f"b64{what} must hold JSON here") from None
        return msgspec.Raw(decoded)
    return raw


def _event(tags: dict[str, str] | None) -> str | None:
    """The hub's publications carry one tag, `event` (and `ts`, which it sets)."""
    if not tags:
        return None
    others = set(tags) - {"event"}
    if others:
        raise CallFailed(BAD_REQUEST, f"only the `event` tag is carried, not {sorted(others)}")
    return tags.get("event")


def _unsupported(idempotency_key: str, version: int) -> None:
    if idempotency_key:
        raise CallFailed(BAD_REQUEST, "idempotency_key is not supported")
    if version:
        raise CallFailed(BAD_REQUEST, "version is not supported")


async def _publish(
    node: Node, channel: str, data: msgspec.Raw, event: str | None, skip_history: bool
) -> PublishResult:
    position = await node.publish(channel, data, event, skip_history=skip_history)
    if position is None:
        return PublishResult()
    return PublishResult(position.offset, position.epoch)


@method("publish", PublishRequest, PublishResult)
async def publish(node: Node, request: PublishRequest) -> PublishResult:
    channel = _channel(request.channel)
    _unsupported(request.idempotency_key, int(request.version))
    event = _event(request.tags)
    data = _json(request.data, request.b64data, "data")
    if not len(data):
        raise CallFailed(BAD_REQUEST, "data required")
    return await _publish(node, channel, data, event, request.skip_history)


@method("broadcast", BroadcastRequest, BroadcastResult)
async def broadcast(node: Node, request: BroadcastRequest) -> BroadcastResult:
    if not request.channels:
        raise CallFailed(BAD_REQUEST, "channels required")
    _unsupported(request.idempotency_key, int(request.version))
    event = _event(request.tags)
    data = _json(request.data, request.b64data, "data")
    if not len(data):
        raise CallFailed(BAD_REQUEST, "data required")
    if not node.broker.up:
        raise BrokerUnavailable()

    async def one(channel: str) -> PublishResponse:
        try:
            result = await _publish(node, _channel(channel), data, event, request.skip_history)
        except (CallFailed, HubError) as exc:
            return PublishResponse(error=_error_body(exc))
        return PublishResponse(result=result)

    # side by side: one round trip to Redis for all (a channel named twice keeps its order)
    return BroadcastResult(await in_order(request.channels, one, lambda channel: (channel,)))


@method("subscribe", SubscribeRequest, Empty)
async def subscribe(node: Node, request: SubscribeRequest) -> Empty:
    channel, user = _channel(request.channel), _user(request.user)
    _no_session(request.session)
    if is_personal(channel):
        raise CallFailed(BAD_REQUEST, "personal channels take no server-side subscriptions")
    if request.expire_at:
        raise CallFailed(BAD_REQUEST, "subscription expiry (expire_at) is not supported")
    since = request.recover_since
    await node.subscribe_user(
        user, channel, p.Since(int(since.offset), since.epoch) if since is not None else None,
        client=request.client or None, data=_json(request.data, request.b64data, "data"),
    )
    return Empty()


@method("unsubscribe", UnsubscribeRequest, Empty)
async def unsubscribe(node: Node, request: UnsubscribeRequest) -> Empty:
    """An empty channel: every channel of the user (Centrifugo's meaning)."""
    user = _user(request.user)
    _no_session(request.session)
    channel = request.channel
    if channel:
        _channel(channel)
        if is_personal(channel):
            raise CallFailed(BAD_REQUEST, "personal channels cannot be left")
    await node.unsubscribe_user(user, channel, client=request.client or None)
    return Empty()


@method("disconnect", DisconnectRequest, Empty)
async def disconnect(node: Node, request: DisconnectRequest) -> Empty:
    """Without `disconnect`, or with code 0: the hub's 4003 (3503 on Centrifugo's
    endpoints, Centrifugo's default)."""
    user = _user(request.user)
    _no_session(request.session)
    spec = request.disconnect or DisconnectSpec()
    code = int(spec.code) or int(CloseCode.DISCONNECTED_BY_API)
    if not 3000 <= code <= 4999:
        raise CallFailed(BAD_REQUEST, "disconnect code must be 3000-4999")
    await node.disconnect_user(user, code, close_reason(spec.reason),
                               client=request.client or None, whitelist=request.whitelist)
    return Empty()


@method("refresh", RefreshRequest, Empty)
async def refresh(node: Node, request: RefreshRequest) -> Empty:
    """Centrifugo's meanings: `expired` closes the connections as expired; otherwise
    `expire_at` (unix s) is their new expiry, and none (0) means none; `info` replaces
    their token's `info` (a JSON object of at most 1 KiB)."""
    user = _user(request.user)
    _no_session(request.session)
    info = request.info
    if len(info) and (not bytes(info).lstrip().startswith(b"{") or len(info) > MAX_INFO_BYTES):
        raise CallFailed(BAD_REQUEST, "info must be a JSON object of at most 1 KiB")
    expire_at = int(request.expire_at)
    if not 0 <= expire_at < MAX_EXPIRE_AT:
        raise CallFailed(BAD_REQUEST, "expire_at must be unix seconds (0: no expiry)")
    await node.refresh_user(
        user, client=request.client or None, expired=request.expired,
        expire_at=expire_at or None, info=info,
    )
    return Empty()


@method("presence", ChannelRequest, PresenceResult)
async def presence(node: Node, request: ChannelRequest) -> PresenceResult:
    members = await node.presence_of(_channel(request.channel))
    return PresenceResult({
        m.client: cf.ClientInfo(user=m.user, client=m.client, conn_info=m.info)
        for m in members
    })


@method("presence_stats", ChannelRequest, PresenceStatsResult)
async def presence_stats(node: Node, request: ChannelRequest) -> PresenceStatsResult:
    members = await node.presence_of(_channel(request.channel))
    return PresenceStatsResult(len(members), len({m.user for m in members}))


@method("history", HistoryRequest, HistoryResult)
async def history(node: Node, request: HistoryRequest) -> HistoryResult:
    """Centrifugo's meanings: `limit` 0 is the position only, a negative one everything
    (up to the hub's cap, 1,000); without `since` the oldest (`reverse`: the newest, newest
    first); with `since` those after it (`reverse`: before it, newest first); a `since` of
    another epoch is 112, and an empty epoch means the current one."""
    channel = _channel(request.channel)
    limit = HISTORY_LIMIT if request.limit < 0 else min(int(request.limit), HISTORY_LIMIT)
    top = (await node.history_page(channel, None, 0)).position
    position = request.since
    since = p.Since(int(position.offset), position.epoch) if position is not None else None
    if since is not None and since.epoch and since.epoch != top.epoch:
        raise CallFailed(UNRECOVERABLE)
    messages: list[p.Message] = []
    if limit and request.reverse:
        page = await node.history_page(channel, None, HISTORY_LIMIT if since else limit)
        top = page.position
        held = page.messages if since is None else [
            m for m in page.messages if (m.offset or 0) < since.offset]
        messages = held[::-1][:limit]
    elif limit:
        after = p.Since(since.offset if since is not None else 0, top.epoch)
        page = await node.history_page(channel, after, limit)
        if page.position.epoch != top.epoch:  # a new epoch began between the two reads
            raise CallFailed(UNRECOVERABLE)
        top, messages = page.position, page.messages
    return HistoryResult([publication(m) for m in messages], top.epoch, top.offset)


@method("history_remove", ChannelRequest, Empty)
async def history_remove(node: Node, request: ChannelRequest) -> Empty:
    await node.remove_history(_channel(request.channel))
    return Empty()


@method("channels", ChannelsRequest, ChannelsResult)
async def channels(node: Node, request: ChannelsRequest) -> ChannelsResult:
    """`pattern` is a glob (`*`, `?`, `[...]`), as Centrifugo's; empty: every channel."""
    counts = await node.presence.channels(node.snapshot())
    pattern = request.pattern
    return ChannelsResult({
        name: ChannelInfo(count) for name, count in counts.items()
        if not pattern or fnmatchcase(name, pattern)
    })


@method("info", InfoRequest, InfoResult)
async def info(node: Node, request: InfoRequest) -> InfoResult:
    cluster = await cluster_stats(node.presence, node.snapshot())
    now = int(time.time())
    return InfoResult([
        NodeResult(
            uid=stats.node, name=stats.node, version=__version__,
            num_clients=stats.connections, num_users=stats.users,
            num_subs=stats.subscriptions, num_channels=stats.channels,
            uptime=max(0, now - stats.started),
        )
        for stats in cluster.nodes
    ])


class _Target(msgspec.Struct):
    channel: str = ""
    channels: list[str] = msgspec.field(default_factory=list)


def _published_to(command: dict[str, msgspec.Raw]) -> list[str] | None:
    """The channels a publish or broadcast command names (for `hub.batch.in_order`); None
    for any other command, or one that cannot be read (it runs alone, and fails alone)."""
    name = next((key for key in command if key in METHODS), None)
    if name not in ("publish", "broadcast"):
        return None
    try:
        target = msgspec.json.decode(bytes(command[name]) or b"{}", type=_Target)
    except (msgspec.DecodeError, RecursionError):
        return None
    return [target.channel] if name == "publish" else target.channels


async def _batch(node: Node, request: BatchRequest) -> BatchResult:
    """Each command on its own: one that fails (or names no method: 104) fails its own
    reply only. In order, as Centrifugo runs them, but publications go to the broker
    together (`hub.batch.in_order`: one channel's keep their order, and any other command
    waits for those before it). `parallel` runs them side by side, at most
    MAX_BATCH_PARALLEL at once."""
    if not request.parallel:
        replies = await in_order(
            request.commands, lambda command: _batch_item(node, command), _published_to
        )
        return BatchResult(replies)
    gate = asyncio.Semaphore(MAX_BATCH_PARALLEL)

    async def gated(command: dict[str, msgspec.Raw]) -> dict[str, Any]:
        async with gate:
            return await _batch_item(node, command)

    return BatchResult(list(await asyncio.gather(*map(gated, request.commands))))


async def _batch_item(node: Node, command: dict[str, msgspec.Raw]) -> dict[str, Any]:
    name = next((key for key in command if key in METHODS), None)
    if name is None:
        return {"error": ErrorBody(NOT_FOUND, MESSAGES[NOT_FOUND])}
    try:
        return {name: await run(node, name, command[name])}
    except CallFailed as exc:
        return {"error": _error_body(exc)}
    except Exception:  # one command's failure is its own reply, not the batch's
        log.exception("centrifugo API batch command %s failed", name)
        return {"error": ErrorBody(INTERNAL, MESSAGES[INTERNAL])}


async def run(node: Node, name: str, body: msgspec.Raw | bytes) -> msgspec.Struct:
    """One call: CallFailed for its errors, a body that cannot be read included (107)."""
    kind, call = METHODS[name]
    try:
        request = msgspec.json.decode(bytes(body) or b"{}", type=kind)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise Unreadable(str(exc)) from None
    try:
        return await call(node, request)
    except HubError as exc:
        raise CallFailed(HUB_CODES.get(exc.code, INTERNAL), exc.message) from None


def _error_body(exc: CallFailed | HubError) -> ErrorBody:
    if isinstance(exc, HubError):
        exc = CallFailed(HUB_CODES.get(exc.code, INTERNAL), exc.message)
    return ErrorBody(exc.code, exc.message)


# HTTP

_encoder = msgspec.json.Encoder()


def _response(body: msgspec.Struct, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status, media_type="application/json")


def _failure(status: int, code: int, message: str) -> Response:
    return _response(Reply(error=ErrorBody(code, message)), status)


def _key_refusal(request: Request, settings: Settings) -> Response | None:
    """Centrifugo's forms: `X-API-Key: K` or `Authorization: apikey K` (HUB_API_KEY)."""
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "apikey" else None
    configured = settings.api_key
    if configured is None:
        if settings.dev:
            return None
        return _failure(403, 103, "permission denied: no HUB_API_KEY is configured")
    if settings.dev and given is None:
        return None
    if given is None or not hmac.compare_digest(given.encode(), configured.encode()):
        return _failure(401, 101, "unauthorized")
    return None


async def _read(request: Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY_BYTES."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def endpoint(name: str) -> Callable[[Request], Awaitable[Response]]:
    """The HTTP endpoint of one method."""

    async def serve(request: Request) -> Response:
        node = node_of(request.app)
        refusal = _key_refusal(request, node.settings)
        if refusal is not None:
            return refusal
        try:
            body = await _read(request)
            if body is None:
                return _failure(413, BAD_REQUEST, "bad request: body over 1 MiB")
            if name == "batch":
                return _response(await _call_batch(node, body))
            result = await run(node, name, body)
        except Unreadable as exc:
            return _failure(400, BAD_REQUEST, exc.message)
        except CallFailed as exc:
            status = 200
            if request.headers.get("x-centrifugo-error-mode") == "transport":
                status = TRANSPORT_STATUS.get(exc.code, 500)
            return _failure(status, exc.code, exc.message)
        except ClientDisconnect:
            return _failure(400, BAD_REQUEST, "bad request: incomplete body")
        except Exception:
            log.exception("centrifugo API %s failed", name)
            return _failure(500, INTERNAL, MESSAGES[INTERNAL])
        return _response(Reply(result=result))

    serve.__name__ = f"centrifugo_{name}"
    return serve


async def _call_batch(node: Node, body: bytes) -> BatchResult:
    try:
        request = msgspec.json.decode(body or b"{}", type=BatchRequest)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise Unreadable(str(exc)) from None
    return await _batch(node, request)


async def not_found(request: Request) -> Response:
    refusal = _key_refusal(request, node_of(request.app).settings)
    return refusal or _failure(404, NOT_FOUND, "not found: no such method")


METHOD_NAMES = (*METHODS, "batch")


def routes(settings: Settings) -> list[Mount]:
    """Under HUB_CENTRIFUGO_API_PREFIX: one route per method, and 404 for any other."""
    return [Mount(settings.centrifugo_api_prefix, routes=[
        *(Route(f"/{name}", endpoint(name), methods=["POST"]) for name in METHOD_NAMES),
        Route("/{method:path}", not_found, methods=["POST"]),
    ])]


Endpoint = Callable[[Request], Awaitable[Response]]


def shortcuts(settings: Settings) -> dict[tuple[str, str], Endpoint]:
    """`publish` and `broadcast`, the calls a backend makes per message, for HubApp to take
    before the router (as it does the hub's own)."""
    prefix = settings.centrifugo_api_prefix
    return {("POST", f"{prefix}/{name}"): endpoint(name) for name in ("publish", "broadcast")}



# /openapi.json

SCHEMA_PREFIX = "Centrifugo"  # its components' names, apart from the hub's own API's


def _ref(kind: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{SCHEMA_PREFIX}{kind.__name__}"}


def openapi_schemas() -> dict[str, Any]:
    kinds = {*(kind for kind, _ in METHODS.values()), *RESULTS.values(), BatchRequest,
             BatchResult, ErrorReply}
    _, schemas = msgspec.json.schema_components(
        sorted(kinds, key=lambda kind: kind.__name__),
        ref_template=f"#/components/schemas/{SCHEMA_PREFIX}{{name}}",
    )
    return {SCHEMA_PREFIX + name: schema for name, schema in schemas.items()}


def openapi_paths(prefix: str) -> dict[str, Any]:
    """Each method: its request, `{"result"}` or `{"error"}` at 200, the statuses of what
    is no call."""

    def error(description: str) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": _ref(ErrorReply)}}}

    paths: dict[str, Any] = {}
    for name in METHOD_NAMES:
        request: type[msgspec.Struct] = BatchRequest
        ok: dict[str, Any] = _ref(BatchResult)
        if name != "batch":
            request = METHODS[name][0]
            ok = {"oneOf": [
                {"type": "object", "properties": {"result": _ref(RESULTS[name])},
                 "required": ["result"]},
                _ref(ErrorReply),
            ]}
        paths[f"{prefix}/{name}"] = {"post": {
            "operationId": f"centrifugo_{name}", "tags": ["centrifugo"],
            "summary": f"Centrifugo's server API: {name} (PROTOCOL §16)",
            "security": [{"ApiKey": []}, {"CentrifugoApiKey": []}],
            "requestBody": {"required": False,  # no body: `{}`
                            "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {"description": "`{\"result\"}`, or `{\"error\"}` with Centrifugo's "
                        "code (100, 102, 104, 107, 108, 112)",
                        "content": {"application/json": {"schema": ok}}},
                "400": error("107: the body is no JSON, or a field has the wrong type"),
                "401": error("101: missing or wrong API key"),
                "403": error("103: no HUB_API_KEY is configured (and not in dev mode)"),
                "413": error("107: body over 1 MiB"),
                "500": error("100: a failure of the node (logged)"),
            },
        }}
    return paths


SECURITY_SCHEME = {"type": "apiKey", "in": "header", "name": "Authorization",
                   "description": "`apikey <HUB_API_KEY>` (Centrifugo's form; X-API-Key too)"}

