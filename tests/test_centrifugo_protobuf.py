"""Centrifugo's Protobuf encoding on `/connection/websocket` (PROTOCOL §11), and the
semantics the SDK suites expect of both encodings: the real centrifuge-python SDK with
`use_protobuf=True` beside a JSON one in one channel, fossil deltas of a changing 10 KB
document (checked equal to what was published, across a recovery), and raw Protobuf
commands (written with the SDK's own generated client_pb2) for history order, recovery with
an empty epoch, subscribe flag 2, subscription tokens, anonymous connects, `#user`, rpc and
an empty `Sec-WebSocket-Protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import msgspec
import websockets
from centrifuge import Client, DeltaType
from centrifuge.codecs import _varint_decode, _varint_encode
from centrifuge.fossil import apply_delta
from centrifuge.protocol import client_pb2 as pb

from hub import centrifugo_frames as cf
from hub import centrifugo_protobuf as hpb
from hub import fossil
from hub import protocol as p
from hub.centrifugo_codecs import JSON_CODEC, PROTOBUF_CODEC
from hub.centrifugo_session import CentrifugoSession
from hub.wire import payload_of
from tests.support import (
    SECRET,
    WAIT,
    RunningNode,
    eventually,
    make_settings,
    publish,
    running_node,
    token,
)
from tests.test_centrifugo_python import SubEvents, address, sdk

DELTA_NAMESPACES = {
    "default": {"subscribe": "token", "publish": "none"},
    "chat": {"subscribe": "any", "publish": "any", "presence": True, "join_leave": True},
    "feed": {"subscribe": "any", "publish": "token", "history_size": 100, "history_ttl": 300},
    "doc": {"subscribe": "any", "publish": "any", "history_size": 100, "history_ttl": 300,
            "allowed_delta_types": ["fossil"]},
    "live": {"subscribe": "any", "publish": "any", "allowed_delta_types": ["fossil"]},
}


@contextlib.asynccontextmanager
async def delta_node(**overrides: Any) -> AsyncIterator[RunningNode]:
    async with running_node(make_settings(namespaces=DELTA_NAMESPACES, **overrides)) as node:
        yield node


def document(version: int) -> dict[str, Any]:
    """About 10 KB of JSON of which each version changes a few values."""
    return {
        "version": version,
        "rows": [{"id": n, "name": f"row {n} é", "value": (n * 7 + version) % 13 if n % 17 == 0
                  else n, "tags": ["a", "b", str(n % 5)]} for n in range(160)],
    }


# Raw Protobuf


class RawProtobuf:
    """A client speaking the Protobuf encoding by hand."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0
        self.replies: list[Any] = []

    async def send(self, **fields: Any) -> int:
        self.next_id += 1
        command = pb.Command(id=self.next_id, **fields)
        data = command.SerializeToString()
        await self.socket.send(_varint_encode(len(data)) + data)
        return self.next_id

    async def reply(self, command_id: int) -> Any:
        async with asyncio.timeout(WAIT):
            while True:
                for reply in self.replies:
                    if reply.id == command_id:
                        self.replies.remove(reply)
                        return reply
                await self._read()

    async def push(self, kind: str) -> Any:
        async with asyncio.timeout(WAIT):
            while True:
                for reply in self.replies:
                    if reply.id == 0 and reply.HasField("push") and reply.push.HasField(kind):
                        self.replies.remove(reply)
                        return reply.push
                await self._read()

    async def call(self, **fields: Any) -> Any:
        return await self.reply(await self.send(**fields))

    async def _read(self) -> None:
        frame = await self.socket.recv()
        assert isinstance(frame, bytes), "the Protobuf encoding uses binary frames"
        position = 0
        while position < len(frame):
            size, position = _varint_decode(frame, position)
            reply = pb.Reply()
            reply.ParseFromString(frame[position:position + size])
            position += size
            self.replies.append(reply)


@contextlib.asynccontextmanager
async def raw(
    node: RunningNode, jwt_token: str | None = None, *, query: str = "",
    subprotocols: list[str] | None = None,
) -> AsyncIterator[RawProtobuf]:
    url = address(node.ws_url) + query
    protocols: Any = ["centrifuge-protobuf"] if subprotocols is None else subprotocols
    async with websockets.connect(url, subprotocols=protocols, open_timeout=WAIT) as socket:
        client = RawProtobuf(socket)
        connect = pb.ConnectRequest(token=jwt_token if jwt_token is not None else token("raw"))
        reply = await client.call(connect=connect)
        assert not reply.HasField("error"), reply
        client.connected = reply.connect  # type: ignore[attr-defined]
        yield client


def subscription_token(user: str, channel: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, "channel": channel, **claims}, SECRET, algorithm="HS256")


# The SDK in both encodings


async def test_protobuf_and_json_sdk_clients_share_a_channel(node: RunningNode) -> None:
    async with sdk(node.ws_url, "bin") as (_, _), contextlib.AsyncExitStack() as stack:
        pb_client = Client(address(node.ws_url), token=token("pbu"), use_protobuf=True,
                           timeout=WAIT)
        json_client = Client(address(node.ws_url), token=token("jsu"), timeout=WAIT)
        for client in (pb_client, json_client):
            stack.push_async_callback(client.disconnect)
            await client.connect()
            await client.ready(timeout=WAIT)
        pb_events, json_events = SubEvents(), SubEvents()
        pb_sub = pb_client.new_subscription("feed:mix", events=pb_events)
        json_sub = json_client.new_subscription("feed:mix", events=json_events)
        for sub in (pb_sub, json_sub):
            await sub.subscribe()
            await sub.ready(timeout=WAIT)
        assert pb_events.subscribed[-1].recoverable
        await publish(node, "feed:mix", {"from": "api"})
        await json_sub.publish({"from": "json"})
        await pb_sub.publish(json.dumps({"from": "protobuf"}).encode())
        await eventually(lambda: len(pb_events.publications) == 3 and
                         len(json_events.publications) == 3, what="three publications each")
        assert json_events.publications == [
            (1, {"from": "api"}, None), (2, {"from": "json"}, "jsu"),
            (3, {"from": "protobuf"}, "pbu"),
        ]
        assert [(o, json.loads(d), u) for o, d, u in pb_events.publications] == [
            (o, d, u) for o, d, u in json_events.publications
        ]
        history = await pb_client.history("feed:mix", limit=2)
        assert [json.loads(x.data) for x in history.publications] == [
            {"from": "api"}, {"from": "json"}]  # the oldest two, as Centrifugo
        stats = await pb_client.presence_stats("chat:none")
        assert (stats.num_clients, stats.num_users) == (0, 0)


async def test_protobuf_sdk_recovers_after_a_dropped_transport(node: RunningNode) -> None:
    client = Client(address(node.ws_url), token=token("prec"), use_protobuf=True,
                    timeout=WAIT, min_reconnect_delay=0.05, max_reconnect_delay=0.5)
    try:
        await client.connect()
        await client.ready(timeout=WAIT)
        events = SubEvents()
        sub = client.new_subscription("feed:pbdrop", events=events)
        await sub.subscribe()
        await sub.ready(timeout=WAIT)
        await publish(node, "feed:pbdrop", 1)
        await eventually(lambda: len(events.publications) == 1, what="the first")
        (session,) = [s for s in node.node.hub.sessions.values()
                      if isinstance(s, CentrifugoSession)]
        assert session.codec is PROTOBUF_CODEC
        session._outbound.abort()
        for n in (2, 3):
            await publish(node, "feed:pbdrop", n)
        await eventually(lambda: len(events.publications) == 3, what="the missed ones")
        assert [(o, json.loads(d)) for o, d, _ in events.publications] == [(1, 1), (2, 2), (3, 3)]
        assert events.subscribed[-1].recovered
    finally:
        await client.disconnect()


async def test_fossil_deltas_of_a_changing_document_in_both_encodings() -> None:
    """centrifuge-python applies the deltas; what it hands the app equals what was
    published, through a dropped transport and the recovery after it."""
    async with delta_node() as node:
        clients = [Client(address(node.ws_url), token=token(f"d{n}"), use_protobuf=bool(n),
                          timeout=WAIT, min_reconnect_delay=0.05, max_reconnect_delay=0.5)
                   for n in (0, 1)]
        received: list[list[Any]] = [[], []]
        try:
            for index, client in enumerate(clients):
                await client.connect()
                await client.ready(timeout=WAIT)
                events = SubEvents()
                sub = client.new_subscription("doc:shared", events=events,
                                              delta=DeltaType.FOSSIL)
                await sub.subscribe()
                await sub.ready(timeout=WAIT)
                received[index] = events.publications
            for version in range(1, 4):
                await publish(node, "doc:shared", document(version))
            await eventually(lambda: all(len(r) == 3 for r in received), what="three each")
            for session in list(node.node.hub.sessions.values()):
                if isinstance(session, CentrifugoSession):
                    session._outbound.abort()
            for version in range(4, 7):
                await publish(node, "doc:shared", document(version))
            await eventually(lambda: all(len(r) == 6 for r in received), what="recovered")
            for version in range(7, 9):
                await publish(node, "doc:shared", document(version))
            await eventually(lambda: all(len(r) == 8 for r in received), what="live again")
        finally:
            for client in clients:
                await client.disconnect()
        as_json = [data for _, data, _ in received[0]]
        as_protobuf = [json.loads(data) for _, data, _ in received[1]]
        expected = [document(version) for version in range(1, 9)]
        assert as_json == expected and as_protobuf == expected


async def test_deltas_travel_on_the_wire_and_are_built_once() -> None:
    """Raw Protobuf: the first publication whole, the next a patch that applies to it;
    a subscription that did not ask for deltas gets whole payloads."""
    async with delta_node() as node, raw(node, token("w1")) as plain, \
            raw(node, token("w2")) as delta:
        await plain.call(subscribe=pb.SubscribeRequest(channel="live:w"))
        answer = await delta.call(subscribe=pb.SubscribeRequest(channel="live:w",
                                                                delta="fossil"))
        assert answer.subscribe.delta
        first, second = document(1), document(2)
        for data in (first, second):
            await publish(node, "live:w", data)
        got = [(await delta.push("pub")).pub for _ in range(2)]
        assert not got[0].delta and json.loads(got[0].data) == first
        assert got[1].delta and len(got[1].data) < 200
        assert json.loads(apply_delta(got[0].data, got[1].data)) == second
        whole = [(await plain.push("pub")).pub for _ in range(2)]
        assert [json.loads(w.data) for w in whole] == [first, second]
        assert not any(w.delta for w in whole)


# Semantics both encodings share


async def test_history_oldest_first_and_paging_forward(node: RunningNode) -> None:
    for n in range(1, 6):
        await publish(node, "feed:page", n)
    async with raw(node) as client:
        oldest = await client.call(history=pb.HistoryRequest(channel="feed:page", limit=2))
        assert [json.loads(x.data) for x in oldest.history.publications] == [1, 2]
        since = pb.StreamPosition(offset=2, epoch=oldest.history.epoch)
        page = await client.call(history=pb.HistoryRequest(channel="feed:page", limit=2,
                                                           since=since))
        assert [x.offset for x in page.history.publications] == [3, 4]
        newest = await client.call(history=pb.HistoryRequest(channel="feed:page", limit=2,
                                                             reverse=True))
        assert [x.offset for x in newest.history.publications] == [5, 4]
        everything = await client.call(history=pb.HistoryRequest(channel="feed:page",
                                                                  limit=-1))
        assert [x.offset for x in everything.history.publications] == [1, 2, 3, 4, 5]


async def test_recover_with_an_empty_epoch_and_flag_2(node: RunningNode) -> None:
    for n in range(1, 4):
        await publish(node, "feed:rec", n)
    async with raw(node) as client:
        answer = await client.call(subscribe=pb.SubscribeRequest(
            channel="feed:rec", recover=True, offset=1))
        result = answer.subscribe
        assert result.recovered and [x.offset for x in result.publications] == [2, 3]
        await client.call(unsubscribe=pb.UnsubscribeRequest(channel="feed:rec"))
        refused = await client.call(subscribe=pb.SubscribeRequest(
            channel="feed:rec", recover=True, offset=1, epoch="gone", flag=2))
        assert refused.error.code == 112
        again = await client.call(subscribe=pb.SubscribeRequest(
            channel="feed:rec", recover=True, offset=1, epoch="gone"))
        assert again.subscribe.was_recovering and not again.subscribe.recovered


async def test_subscription_tokens(node: RunningNode) -> None:
    """The default namespace allows no subscribe without a token's `channels`: a
    subscription token grants it; an invalid one is 103, an expired one 109."""
    connect_token = token("subt", channels=[])
    async with raw(node, connect_token) as client:
        denied = await client.call(subscribe=pb.SubscribeRequest(channel="locked"))
        assert denied.error.code == 103
        for bad in ("junk", subscription_token("other", "locked"),
                    subscription_token("subt", "elsewhere")):
            refused = await client.call(subscribe=pb.SubscribeRequest(channel="locked",
                                                                      token=bad))
            assert refused.error.code == 103
        expired = subscription_token("subt", "locked", exp=int(time.time()) - 10)
        late = await client.call(subscribe=pb.SubscribeRequest(channel="locked", token=expired))
        assert late.error.code == 109
        good = subscription_token("subt", "locked", exp=int(time.time()) + 60)
        granted = await client.call(subscribe=pb.SubscribeRequest(channel="locked", token=good))
        assert granted.subscribe.expires and 50 < granted.subscribe.ttl <= 60
        renewed = await client.call(sub_refresh=pb.SubRefreshRequest(
            channel="locked", token=subscription_token("subt", "locked",
                                                       exp=int(time.time()) + 120)))
        assert renewed.sub_refresh.expires and renewed.sub_refresh.ttl > 100
        await publish(node, "locked", {"to": "token holders"})
        assert json.loads((await client.push("pub")).pub.data) == {"to": "token holders"}


async def test_an_expiring_subscription_token_ends_the_subscription() -> None:
    async with running_node(make_settings()) as node, raw(node) as client:
        soon = subscription_token("raw", "short", exp=int(time.time()) + 3)
        granted = await client.call(subscribe=pb.SubscribeRequest(channel="short", token=soon))
        assert granted.subscribe.expires
        ended = await client.push("unsubscribe")
        assert (ended.channel, ended.unsubscribe.code) == ("short", 2501)


async def test_anonymous_connects_only_when_allowed() -> None:
    anonymous = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    async with running_node(make_settings(anonymous=True)) as node:
        async with raw(node, "") as client:
            assert not client.connected.subs  # type: ignore[attr-defined]
        async with raw(node, anonymous) as client:
            assert await client.call(presence_stats=pb.PresenceStatsRequest(channel="x"))
    async with running_node(make_settings()) as node, \
            websockets.connect(address(node.ws_url) + "?format=protobuf") as socket:
        data = pb.Command(id=1, connect=pb.ConnectRequest(token=anonymous))
        body = data.SerializeToString()
        await socket.send(_varint_encode(len(body)) + body)
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), WAIT)
        assert socket.close_code == 3500


async def test_personal_channel_under_both_names(node: RunningNode) -> None:
    async with raw(node, token("pers"), query="?format=protobuf", subprotocols=[]) as client:
        assert set(client.connected.subs) == {"@pers", "#pers"}  # type: ignore[attr-defined]
        await node.http.post("/api/send", json={"user": "pers", "data": {"n": 1}})
        channels = {(await client.push("pub")).channel for _ in range(2)}
        assert channels == {"@pers", "#pers"}
        refused = await client.call(rpc=pb.RPCRequest(method="m", data=b"{}"))
        assert refused.error.code == 108


async def test_an_empty_subprotocol_header_is_no_subprotocol(node: RunningNode) -> None:
    headers = {"Sec-WebSocket-Protocol": ""}
    async with websockets.connect(address(node.ws_url), additional_headers=headers) as socket:
        await socket.send(json.dumps({"id": 1, "connect": {"token": token("empty")}}))
        reply = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
        assert reply["connect"]["client"]


# Frames


def test_encoder_matches_the_protobuf_runtime() -> None:
    """Every reply kind the hub writes reads back through the SDK's generated classes."""
    info = cf.ClientInfo(user="u", client="c", conn_info=msgspec.Raw(b'{"a":1}'))
    pub = cf.Publication(data=msgspec.Raw(b'{"n":1}'), info=info, offset=7,
                         tags={"event": "e", "ts": "1"})
    replies = [
        cf.Reply(id=1, connect=cf.ConnectResult(client="c", version="v", expires=True, ttl=9,
                                                subs={"@u": cf.SubscribeResult()}, ping=25,
                                                pong=True)),
        cf.Reply(id=2, subscribe=cf.SubscribeResult(recoverable=True, epoch="e", offset=3,
                                                    publications=[pub], recovered=True,
                                                    positioned=True, was_recovering=True,
                                                    delta=True)),
        cf.Reply(id=3, history=cf.HistoryResult([pub], "e", 7)),
        cf.Reply(id=4, presence=cf.PresenceResult({"c": info})),
        cf.Reply(id=5, presence_stats=cf.PresenceStatsResult(2, 1)),
        cf.Reply(id=6, error=cf.Error(code=112, message="unrecoverable position",
                                      temporary=True)),
        cf.Reply(id=7, refresh=cf.RefreshResult(expires=True, ttl=5)),
        cf.Reply(id=8, sub_refresh=cf.SubRefreshResult(expires=True, ttl=5)),
        cf.Reply(id=9, unsubscribe=cf.UnsubscribeResult()),
        cf.Reply(id=10, publish=cf.PublishResult()),
        cf.Reply(push=cf.Push(channel="ch", pub=pub)),
        cf.Reply(push=cf.Push(channel="ch", join=cf.Join(info=info))),
        cf.Reply(push=cf.Push(channel="ch", unsubscribe=cf.Unsubscribe(2500, "x"))),
    ]
    for reply in replies:
        ours = pb.Reply()
        ours.ParseFromString(hpb.encode(reply))
        expected = json.loads(cf.encode(reply))
        got = json.loads(json.dumps(_as_dict(ours)))
        assert _normalised(got) == _normalised(expected), reply


def _as_dict(message: Any) -> Any:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def _normalised(value: Any) -> Any:
    """JSON and Protobuf views of one reply: bytes fields hold the JSON they carry
    (base64 in MessageToDict), numbers as numbers."""
    import base64

    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            read = item
            if key in ("data", "conn_info") and isinstance(item, str):
                read = json.loads(base64.b64decode(item))
            elif key in ("offset", "time") and isinstance(item, str):
                read = int(item)
            out[key] = _normalised(read)
        return out
    if isinstance(value, list):
        return [_normalised(item) for item in value]
    return value


def test_commands_read_as_the_runtime_writes_them() -> None:
    command = pb.Command(id=5, subscribe=pb.SubscribeRequest(
        channel="c", recover=True, offset=2**40, epoch="e", delta="fossil", flag=3,
        token="t"))
    decoded = hpb.decode_command(command.SerializeToString())
    assert decoded.id == 5 and decoded.subscribe is not None
    request = decoded.subscribe
    assert (request.channel, request.offset, request.epoch, request.flag) == (
        "c", 2**40, "e", 3)
    history = hpb.decode_command(pb.Command(id=6, history=pb.HistoryRequest(
        channel="h", limit=-1, reverse=True)).SerializeToString())
    assert history.history is not None and history.history.limit == -1
    publish_command = hpb.decode_command(pb.Command(id=7, publish=pb.PublishRequest(
        channel="c", data=b' {"x": 1} ')).SerializeToString())
    assert publish_command.publish is not None
    assert bytes(publish_command.publish.data) == b'{"x": 1}'
    pong = hpb.decode_command(b"")
    assert pong.is_pong


def test_one_frame_per_encoding_and_personal_channels_twice() -> None:
    message = p.Message(channel="feed:x", data=msgspec.Raw(b'{"n":1}'), ts=1, offset=4,
                        epoch="e")
    binary = payload_of(PROTOBUF_CODEC.message(message))
    size, start = _varint_decode(binary, 0)
    assert start + size == len(binary)
    reply = pb.Reply()
    reply.ParseFromString(binary[start:])
    assert (reply.push.channel, reply.push.pub.offset) == ("feed:x", 4)
    personal = p.Message(channel="@u", data=msgspec.Raw(b"1"), ts=1)
    lines = payload_of(JSON_CODEC.message(personal)).split(b"\n")
    assert [json.loads(line)["push"]["channel"] for line in lines] == ["@u", "#u"]


def test_fossil_deltas_apply_with_the_sdk() -> None:
    before = json.dumps(document(1)).encode()
    after = json.dumps(document(2)).encode()
    patch = fossil.create(before, after)
    assert apply_delta(before, patch) == after and len(patch) < len(after) // 20
    patch.decode()  # whole UTF-8 characters: it travels in a JSON string
    pairs: list[tuple[bytes, bytes]] = [
        (b"", b"abc"), (b"abc", b""), (b"x" * 40, b"x" * 41),
        (("é" * 30).encode(), ("è" * 30).encode()), (b"a" * 100, b"b" * 100),
    ]
    for source, target in pairs:
        assert apply_delta(source, fossil.create(source, target)) == target


async def test_a_json_client_refuses_binary_and_a_protobuf_client_text(
    node: RunningNode,
) -> None:
    async with raw(node) as client:
        await client.socket.send('{"id": 2, "presence": {"channel": "chat:x"}}')
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(client.socket.recv(), WAIT)
        assert client.socket.close_code == 3501


async def test_patches_once_per_publication_and_frames_once_per_encoding(
    monkeypatch: Any,
) -> None:
    """200 delta subscribers in two encodings and 100 plain ones: each publication's patch
    is computed once, and every subscriber of one kind gets the very same frame object."""
    import hub.subscriptions as subs_module
    from benchmarks.encodings import CHANNEL, Sink
    from hub.broker import MemoryBroker
    from hub.metrics import Metrics
    from hub.settings import Settings
    from hub.subscriptions import Subscriptions

    patches: list[int] = []

    def counted(source: bytes, target: bytes) -> bytes:
        patches.append(len(target))
        return fossil.create(source, target)

    monkeypatch.setattr(subs_module, "fossil_delta", counted)
    settings = msgspec.convert({"namespaces": {"doc": DELTA_NAMESPACES["doc"]}}, Settings)
    subscriptions = Subscriptions(MemoryBroker(), settings, Metrics("t"))
    received: dict[int, list[bytes]] = {}

    class Keeping(Sink):
        def push(self, frame: bytes, count: int = 1) -> bool:
            received.setdefault(id(self), []).append(frame)
            return super().push(frame, count)

    kinds = [(JSON_CODEC, True), (PROTOBUF_CODEC, True), (PROTOBUF_CODEC, False)]
    sinks = [(Keeping(n, codec), codec, delta) for n in range(300)
             for codec, delta in [kinds[n % 3]]]
    starts: list[Any] = []
    for sink, _, delta in sinks:
        await subscriptions.join(sink, CHANNEL, None, starts.append, delta=delta)
    position = starts[0].position
    for version in (1, 2, 3):
        message = p.Message(channel=CHANNEL, data=msgspec.Raw(json.dumps(document(version))),
                            ts=0, offset=position.offset + version, epoch=position.epoch)
        subscriptions.deliver(CHANNEL, [message])
    assert len(patches) == 2  # versions 2 and 3; version 1 goes whole
    for codec, delta in kinds:
        frames = [received[id(sink)] for sink, c, d in sinks if (c, d) == (codec, delta)]
        for index in range(3):
            assert all(got[index] is frames[0][index] for got in frames)
    json_frames = received[id(sinks[0][0])]
    second = json.loads(payload_of(json_frames[1]))["push"]["pub"]
    first = json.loads(payload_of(json_frames[0]))["push"]["pub"]
    assert second["delta"] and "delta" not in first
    rebuilt = apply_delta(first["data"].encode(), second["data"].encode())
    assert json.loads(rebuilt) == document(2)
    await subscriptions.close()
