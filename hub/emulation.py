"""Centrifugo's bidirectional emulation (PROTOCOL §15), for SDKs that cannot open a
WebSocket: `/connection/http_stream` (newline-delimited replies, or in the Protobuf
encoding varint-length-delimited ones) and `/connection/sse` (one SSE event per reply,
JSON only, as Centrifugo's) carry a session's server→client frames; its client→server
commands come as `POST /emulation` `{"session", "node", "data"}` (JSON, or Centrifugo's
Protobuf `EmulationRequest`), on any node.

The session is a `CentrifugoSession` like any on `/connection/websocket` (same commands,
limits, metrics); only its transport differs (`hub.streams`). A POST that lands on another
node is published on the holding node's inbox channel (`$emulation:<node id>`), which that
node's broker connection hears while it holds emulated sessions; the holding node puts the
batch into the session's inbox, and the session's reader runs it as if a WebSocket frame
had brought it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import Any
from urllib.parse import parse_qs

import msgspec

from hub import centrifugo_frames as cf
from hub import centrifugo_protobuf as pb
from hub import protocol as p
from hub.auth import Identity
from hub.centrifugo_endpoint import (
    CentrifugoConnect,
    CentrifugoEndpoint,
    _ConnectError,
    _Expired,
)
from hub.centrifugo_session import CentrifugoSession
from hub.commands import ClientCommands
from hub.connections import Origin
from hub.errors import BrokerUnavailable
from hub.hooks import ConnectResult, Context
from hub.lifecycle import Gone, Refused, new_client_id
from hub.node import Node
from hub.session import ASGIReceive
from hub.stream_codec import (
    EMULATION_HTTP_STREAM,
    EMULATION_PROTOBUF_HTTP_STREAM,
    EMULATION_SSE,
    EmulationCodec,
    ProtobufStreamCodec,
    StreamCodec,
)
from hub.streams import (
    STREAM_HEADERS,
    StreamInbox,
    StreamOutbound,
    header,
    plain_response,
    read_body,
)
from hub.wire import ASGISend, WritePath

log = logging.getLogger("hub.emulation")

EMULATION_PATH = "/emulation"
HTTP_STREAM_PATH = "/connection/http_stream"
SSE_PATH = "/connection/sse"
INBOX_PREFIX = "$emulation:"
# Command batches that may wait for one session's reader; more is a client sending faster
# than its commands run, refused with 429.
INBOX_LIMIT = 64
CONNECT_PARAM = "cf_connect"
# How long a POST waits for the answer of the node it routed its batch to.
ROUTE_TIMEOUT = 2.0
# How long the cluster's node list read from presence is used.
NODES_MAX_AGE, NODES_MIN_AGE = 1.0, 0.1
_LOCAL_OUTCOMES = {204: "local", 400: "bad_request", 404: "unknown_session", 429: "inbox_full"}
_ROUTED_OUTCOMES = {204: "routed", 400: "bad_request", 404: "unknown_session",
                    429: "inbox_full"}
OCTET_STREAM = "application/octet-stream"  # Centrifugo's mark of the Protobuf encoding


def inbox_channel(node_id: str) -> str:
    return INBOX_PREFIX + node_id


class EmulatedSession(CentrifugoSession):
    """A Centrifugo session whose frames go down an HTTP stream (its codec's framing):
    `stream_codec` (JSON), or `protobuf_codec` where the transport has the Protobuf
    encoding and the client asked for it."""

    __slots__ = ("inbox", "session_id")
    stream_codec: StreamCodec
    protobuf_codec: ProtobufStreamCodec | None = None

    def __init__(self, commands: ClientCommands, outbound: StreamOutbound, client_id: str,
                 identity: Identity, inbox: StreamInbox, codec: EmulationCodec | None = None
                 ) -> None:
        super().__init__(commands, outbound, client_id, identity, codec or self.stream_codec)
        self.inbox = inbox
        self.session_id = secrets.token_urlsafe(18)  # whoever knows it speaks for the client


class SseSession(EmulatedSession):
    __slots__ = ()
    stream_codec = EMULATION_SSE


class HttpStreamSession(EmulatedSession):
    __slots__ = ()
    stream_codec = EMULATION_HTTP_STREAM
    protobuf_codec = EMULATION_PROTOBUF_HTTP_STREAM


class EmulationRouter:
    """The emulated sessions of this node by session id, and the road of a POSTed batch to
    the node that holds its session and of that node's answer back."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.sessions: dict[str, EmulatedSession] = {}
        self.channel = inbox_channel(node.node_id)
        self._listening: asyncio.Future[None] | None = None
        self._waiting: dict[int, asyncio.Future[int]] = {}  # routed batches, by request id
        self._next_id = 0
        self._nodes: frozenset[str] = frozenset()  # the cluster's, read at most once a second
        self._nodes_read_at = -NODES_MAX_AGE

    async def listen(self) -> None:
        """Hear this node's inbox channel: from the first emulated session on (its
        batches), or the first batch routed from here (the answers); kept."""
        if self._listening is None or (self._listening.done()
                                       and self._listening.exception() is not None):
            self._listening = asyncio.ensure_future(self._subscribe())
        await asyncio.shield(self._listening)

    async def _subscribe(self) -> None:
        self.node.inboxes[self.channel] = self._on_relayed
        await self.node.broker.subscribe(self.channel)

    def add(self, session: EmulatedSession) -> None:
        self.sessions[session.session_id] = session

    def remove(self, session: EmulatedSession) -> None:
        self.sessions.pop(session.session_id, None)

    def _on_relayed(self, item: p.Relayed) -> None:
        if isinstance(item, p.Emulation):
            status = self.deliver(item.session, item.batch)
            if item.reply_to:
                answer = p.EmulationAnswer(id=item.id, status=status)
                self.node.spawn(self._answer(item.reply_to, answer))
        elif isinstance(item, p.EmulationAnswer):
            waiting = self._waiting.pop(item.id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(item.status)

    async def _answer(self, node_id: str, answer: p.EmulationAnswer) -> None:
        try:
            await self.node.broker.publish(inbox_channel(node_id), answer)
        except Exception as exc:  # the POST then times out on its node
            log.warning("emulation: answer to %s not sent: %s", node_id, exc)

    def deliver(self, session_id: str, data: str | bytes) -> int:
        """Hand a batch to a session of this node: the HTTP status of the POST (400: a
        Protobuf batch for a JSON session, or the other way round)."""
        session = self.sessions.get(session_id)
        if session is None or session.close_code is not None:
            return 404
        if isinstance(data, bytes) is not session.codec.binary:
            return 400
        if not session.inbox.put(data):
            return 429
        return 204

    async def route(self, node_id: str, session_id: str, data: str | bytes
                    ) -> tuple[int, str]:
        """The status of a POST and its outcome (`hub_emulation_requests_total`). A batch
        for another node goes to that node's inbox channel, and this one waits (at most
        ROUTE_TIMEOUT) for that node's answer on its own."""
        node = self.node
        if node_id == node.node_id:
            status = self.deliver(session_id, data)
            return status, _LOCAL_OUTCOMES[status]
        try:
            if node_id not in await self._cluster_nodes(node_id):
                return 404, "unknown_node"
            await self.listen()
            self._next_id += 1
            request_id = self._next_id
            waiting = self._waiting[request_id] = asyncio.get_running_loop().create_future()
            try:
                binary = data if isinstance(data, bytes) else None
                await node.broker.publish(inbox_channel(node_id), p.Emulation(
                    session=session_id, data="" if binary is not None else str(data),
                    binary=binary, reply_to=node.node_id, id=request_id))
                async with asyncio.timeout(ROUTE_TIMEOUT):
                    status = await waiting
            finally:
                self._waiting.pop(request_id, None)
        except TimeoutError:
            return 504, "timeout"
        except BrokerUnavailable:
            return 503, "unavailable"
        return status, _ROUTED_OUTCOMES.get(status, "routed")

    async def _cluster_nodes(self, wanted: str) -> frozenset[str]:
        """The nodes presence knows (heartbeats): a node that left or stopped beating is
        not among them. Read at most once per NODES_MAX_AGE, or NODES_MIN_AGE when `wanted`
        is not in the last read (it may have just started)."""
        now = asyncio.get_running_loop().time()
        age = now - self._nodes_read_at
        if age >= NODES_MAX_AGE or (wanted not in self._nodes and age >= NODES_MIN_AGE):
            node = self.node
            try:
                stats = await node.presence.nodes(node.snapshot())
            except Exception as exc:
                raise BrokerUnavailable(f"the cluster's nodes could not be read: {exc}") from None
            self._nodes = frozenset(entry.node for entry in stats)
            self._nodes_read_at = now
        return self._nodes


class EmulationRequest(msgspec.Struct):
    session: str
    node: str
    data: str


class EmulationPost:
    """`POST /emulation`: a batch of one emulated session's commands, to the node that
    holds it; JSON `{session, node, data}`, or with `Content-Type:
    application/octet-stream` a Protobuf `EmulationRequest` (`data` the commands' bytes).
    204 taken; 400 malformed, or not the session's encoding; 404 unknown session or node;
    413 too big; 429 the session has too many batches waiting; 503 the broker is down; 504
    the session's node did not answer in time."""

    def __init__(self, router: EmulationRouter) -> None:
        self.router = router

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["method"] != "POST":
            await _error(send, 405, "method not allowed: POST the commands")
            return
        if await origin_refused(self.router.node, scope, send):
            return
        settings = self.router.node.settings
        body = await read_body(receive, 2 * settings.max_frame_bytes + 1024)
        if body is None:
            await _error(send, 413, "body too large")
            return
        try:
            node_id, session_id, data = _emulation_request(body, _content_type(scope))
        except ValueError as exc:
            self.router.node.metrics.emulation_requests.labels("bad_request").inc()
            await _error(send, 400, str(exc))
            return
        if len(data) > settings.max_frame_bytes:
            await _error(send, 413, "data over HUB_MAX_FRAME_BYTES")
            return
        status, outcome = await self.router.route(node_id, session_id, data)
        self.router.node.metrics.emulation_requests.labels(outcome).inc()
        if status == 204:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        messages = {400: "the batch is not in the session's encoding (JSON or Protobuf, "
                         "as its stream)",
                    404: "unknown session or node (the stream has ended: connect again)",
                    429: "too many command batches waiting for this session",
                    503: "the broker is unavailable, try again",
                    504: "the session's node did not answer"}
        await _error(send, status, messages.get(status, "emulation failed"))


def _emulation_request(body: bytes, content_type: str) -> tuple[str, str, str | bytes]:
    """node, session and the batch of a POST: Protobuf by its content type, else JSON.
    Raises ValueError."""
    if content_type == OCTET_STREAM:
        try:
            node_id, session_id, data = pb.decode_emulation_request(body)
        except ValueError as exc:
            raise ValueError(f"expected a Protobuf EmulationRequest: {exc}") from None
        if not session_id or not node_id:
            raise ValueError("expected a Protobuf EmulationRequest with node and session")
        return node_id, session_id, data
    try:
        request = msgspec.json.decode(body, type=EmulationRequest)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(f"expected {{session, node, data}}: {exc}") from None
    return request.node, request.session, request.data


def _content_type(scope: dict[str, Any]) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return bytes(value).decode("latin-1").partition(";")[0].strip().lower()
    return ""


async def _error(send: ASGISend, status: int, message: str) -> None:
    body = msgspec.json.encode({"error": {"code": status, "message": message}})
    await plain_response(send, status, body)


async def origin_refused(node: Node, scope: dict[str, Any], send: ASGISend) -> bool:
    """HUB_ALLOWED_ORIGINS (`hub.origins`): a request from another origin is answered 403,
    before anything else is read and before any hook call."""
    if node.hooks.config.origin_allowed(header(scope, b"origin")):
        return False
    node.metrics.auth_failed("origin")
    await _error(send, 403, "origin not allowed")
    return True


async def connect_data(
    scope: dict[str, Any], receive: ASGIReceive, limit: int, *, text: bool = True
) -> tuple[bytes | None, str]:
    """The connect request of a stream: `?cf_connect=` on a GET, the body of a POST
    (`text`: JSON, whose blank body is an empty one). (None, why) when there is none, or
    it is too big."""
    method = scope["method"]
    if method == "GET":
        query = parse_qs(scope.get("query_string", b"").decode("utf-8", errors="replace"))
        values = query.get(CONNECT_PARAM)
        if not values or not values[0].strip():
            return None, f"no {CONNECT_PARAM} query parameter"
        data = values[0].encode()
        return (data, "") if len(data) <= limit else (None, "connect request too large")
    if method == "POST":
        body = await read_body(receive, limit)
        if body is None:
            return None, "connect request too large"
        if not body.strip(b" \t\r\n" if text else b""):
            return None, "empty body: POST the connect request"
        return body, ""
    return None, "method not allowed"


def _bad_connect(problem: str, data: bytes, codec: EmulationCodec) -> str:
    """Why a connect request did not decode. centrifuge-js's Protobuf build on SSE (whose
    transport is JSON only) sends its Protobuf bytes as decimal numbers separated by commas:
    say so, rather than what JSON made of it."""
    if not codec.binary and _DECIMAL_BYTES.fullmatch(data):
        return ("bad connect command: Protobuf bytes written as decimal numbers (centrifuge-js's"
                " Protobuf build over SSE, which carries JSON only: use http_stream)")
    return f"bad connect command: {problem}"


_DECIMAL_BYTES = re.compile(rb"\d{1,3}(,\d{1,3})+")


class EmulationEndpoint(CentrifugoEndpoint):
    """`/connection/sse` and `/connection/http_stream`: the connect command (and any
    commands after it) in `cf_connect` or the body; then the stream."""

    def __init__(self, node: Node, commands: ClientCommands, write_path: WritePath,
                 router: EmulationRouter, session_class: type[EmulatedSession]) -> None:
        super().__init__(node, commands, write_path)
        self.router = router
        self.session_class = session_class

    async def __call__(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        if await origin_refused(self.node, scope, send):
            return
        codec = self._codec_for(scope)
        if codec is None:
            await _error(send, 415, "the Protobuf encoding is served on /connection/http_stream"
                                    " only (SSE carries JSON, as Centrifugo's does)")
            return
        data, why = await connect_data(scope, receive, 2 * self.node.settings.max_frame_bytes,
                                       text=not codec.binary)
        if data is None:
            status = 405 if why == "method not allowed" else 413 if "large" in why else 400
            await _error(send, status, why)
            return
        messages, problem = codec.split(data)
        try:
            command = codec.decode(messages[0]) if messages else None
        except cf.BadCommand as exc:
            await _error(send, 400, _bad_connect(exc.message, data, codec))
            return
        if problem is not None and command is None:
            await _error(send, 400, f"bad connect command: {problem}")
            return
        if command is None or command.connect is None or not command.id:
            await _error(send, 400, "the first command must be connect, with an id")
            return
        if problem is not None:
            await _error(send, 400, f"bad command after connect: {problem}")
            return
        outbound = StreamOutbound(send, codec.disconnect)
        headers = [(b"content-type", codec.framing.content_type), *STREAM_HEADERS]
        await outbound.start(200, headers, codec.framing.prelude)
        inbox = StreamInbox(INBOX_LIMIT)
        outbound.on_end = inbox.end
        inbox.watch(receive, outbound)
        try:
            await self._connect(scope, command, messages[1:], outbound, inbox, codec)
        finally:
            inbox.stop_watching()
            await outbound.finish()

    def _codec_for(self, scope: dict[str, Any]) -> EmulationCodec | None:
        """JSON, or Protobuf where the request says `Content-Type: application/octet-stream`
        (centrifuge-js's Protobuf build on http_stream, as Centrifugo reads it); None where
        the transport has no Protobuf (SSE)."""
        if _content_type(scope) != OCTET_STREAM:
            return self.session_class.stream_codec
        return self.session_class.protobuf_codec

    async def _connect(self, scope: dict[str, Any], command: cf.Command, rest: list[bytes],
                       outbound: StreamOutbound, inbox: StreamInbox, codec: EmulationCodec
                       ) -> None:
        context = self._hook_context(scope, codec.binary, codec.framing.name)
        client_id = new_client_id()
        try:
            identity, hooked = await self._admit(scope, command, context, client_id)
            await self.router.listen()
        except Refused as refused:
            self.count_refusal(refused)
            await self._refuse_in_stream(refused, outbound, codec)
            return
        except BrokerUnavailable:
            await outbound.close(cf.DisconnectCode.SHUTDOWN, "try again later")
            return
        except Gone:
            return
        await self._serve_stream(identity, command, rest, outbound, inbox, Origin.of_scope(scope),
                                 codec, client_id, context, hooked)

    async def _refuse_in_stream(self, refused: Refused, outbound: StreamOutbound,
                                codec: EmulationCodec) -> None:
        """As on /connection/websocket: the connect hook's error (or 100, temporary, for a
        failed call) and an expired token's 109 are the connect reply's error, then the
        stream ends (the SDK reconnects, fetches a token, or stops, as the error says);
        anything else is the close's disconnect push."""
        if isinstance(refused, _ConnectError):
            reply = refused.reply
        elif isinstance(refused, _Expired):
            reply = cf.error_reply(refused.command_id, cf.ErrorCode.TOKEN_EXPIRED)
        else:
            await outbound.close(refused.code, refused.reason)
            return
        outbound.write_now(codec.reply(reply))
        outbound.end()

    async def _serve_stream(self, identity: Identity, command: cf.Command, rest: list[bytes],
                            outbound: StreamOutbound, inbox: StreamInbox, origin: Origin,
                            codec: EmulationCodec, client_id: str, context: Context | None,
                            hooked: ConnectResult | None) -> None:
        """The session's life as on /connection/websocket (`hub.lifecycle`), its commands
        read from its inbox; its connect reply names it for the POSTs."""
        session = self.session_class(self.commands, outbound, client_id, identity, inbox, codec)
        session.origin = origin
        session.hook = context
        reply = {"session": session.session_id, "node": self.node.node_id}
        await self.live(session, CentrifugoConnect(identity, hooked, context, command, rest,
                                                   codec, reply), inbox)

    def _opened(self, session: CentrifugoSession) -> None:
        assert isinstance(session, EmulatedSession)
        self.router.add(session)  # POSTs to /emulation find it from now on
        super()._opened(session)

    def _closed(self, session: CentrifugoSession) -> None:
        assert isinstance(session, EmulatedSession)
        self.router.remove(session)
        super()._closed(session)
