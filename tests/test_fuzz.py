"""Property tests of decoding (issue 13, first layer): frames of `/ws`, commands of
`/connection/websocket` and bodies of the HTTP API, from arbitrary bytes and from structured
mutations of valid ones. Every input is either accepted or answered with the contract's
error, never another exception. The live-node layer is tests/test_abuse.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
from centrifuge.protocol import client_pb2 as pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub import api_types as t
from hub import centrifugo_frames as cf
from hub import centrifugo_protobuf as hpb
from hub import protocol as p
from hub.abuse import REASONS, decode_reason
from hub.app import create_app
from hub.errors import ErrorCode
from tests.conftest import NAMESPACES
from tests.support import API_KEY, make_settings

FUZZ = settings(
    max_examples=150, deadline=timedelta(seconds=2), database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
COMMAND_CLASSES = (p.Auth, p.Subscribe, p.Unsubscribe, p.Publish, p.PresenceRequest,
                   p.HistoryRequest, p.Refresh, p.Ping)
CONTRACT_CODES = {code.value for code in ErrorCode}

# Valid inputs, as JSON-able values

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
channels = st.sampled_from(["chat:a", "feed:b", "room1", "@alice", "", "x" * 300, "a b"])
ids = st.none() | st.integers(-5, 2**40)
since = st.fixed_dictionaries({"offset": st.integers(0, 2**40), "epoch": st.text(max_size=8)})


def with_id(command: dict[str, Any], frame_id: int | None) -> dict[str, Any]:
    return command if frame_id is None else {**command, "id": frame_id}


ws_commands = st.one_of(
    st.builds(lambda tok: {"type": "auth", "token": tok}, st.text(max_size=40)),
    st.builds(lambda ch, s: {"type": "subscribe", "channel": ch, **({"since": s} if s else {})},
              channels, st.none() | since),
    st.builds(lambda ch: {"type": "unsubscribe", "channel": ch}, channels),
    st.builds(lambda ch, d, e: {"type": "publish", "channel": ch, "data": d,
                                **({"event": e} if e else {})},
              channels, json_values, st.none() | st.text(max_size=8)),
    st.builds(lambda ch: {"type": "presence", "channel": ch}, channels),
    st.builds(lambda ch, lim: {"type": "history", "channel": ch, "limit": lim}, channels,
              st.integers(0, 2000)),
    st.builds(lambda tok: {"type": "refresh", "token": tok}, st.text(max_size=40)),
    st.just({"type": "ping"}),
).flatmap(lambda command: ids.map(lambda frame_id: with_id(command, frame_id)))

centrifugo_commands = st.one_of(
    st.builds(lambda tok: {"connect": {"token": tok, "name": "js"}}, st.text(max_size=40)),
    st.builds(lambda ch, rec, off, ep: {"subscribe": {"channel": ch, "recover": rec,
                                                      "offset": off, "epoch": ep}},
              channels, st.booleans(), st.integers(0, 2**40), st.text(max_size=8)),
    st.builds(lambda ch: {"unsubscribe": {"channel": ch}}, channels),
    st.builds(lambda ch, d: {"publish": {"channel": ch, "data": d}}, channels, json_values),
    st.builds(lambda ch: {"presence": {"channel": ch}}, channels),
    st.builds(lambda ch: {"presence_stats": {"channel": ch}}, channels),
    st.builds(lambda ch, lim, rev: {"history": {"channel": ch, "limit": lim, "reverse": rev}},
              channels, st.integers(-5, 2000), st.booleans()),
    st.builds(lambda tok: {"refresh": {"token": tok}}, st.text(max_size=40)),
    st.builds(lambda d: {"rpc": {"method": "x", "data": d}}, json_values),
    st.just({}),
).flatmap(lambda command: st.integers(0, 2**32 + 5).map(lambda n: {"id": n, **command}))

bodies: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/api/publish": st.builds(lambda ch, d: {"channel": ch, "data": d}, channels, json_values),
    "/api/broadcast": st.builds(lambda chs, d: {"channels": chs, "data": d},
                                st.lists(channels, max_size=4), json_values),
    "/api/send": st.builds(lambda u, d: {"user": u, "data": d}, st.text(max_size=130),
                           json_values),
    "/api/disconnect": st.builds(lambda u, c: {"user": u, "code": c},
                                 st.text(min_size=1, max_size=20).filter(lambda u: u != "x"),
                                 st.integers(0, 70000) | st.floats(allow_nan=False)),
    "/api/subscribe": st.builds(lambda u, ch, s: {"user": u, "channel": ch,
                                                  **({"since": s} if s else {})},
                                st.text(max_size=130), channels, st.none() | since),
    "/api/unsubscribe": st.builds(lambda u, ch: {"user": u, "channel": ch},
                                  st.text(max_size=130), channels),
}

users = st.text(max_size=130)
tags = st.dictionaries(st.sampled_from(["event", "x"]), st.text(max_size=5), max_size=2)
centrifugo_bodies: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "publish": st.builds(lambda ch, d, tg, b64, skip: {
        "channel": ch, "data": d, "tags": tg, "b64data": b64, "skip_history": skip},
        channels, json_values, tags, st.sampled_from(["", "e30=", "%%", "AP8="]), st.booleans()),
    "broadcast": st.builds(lambda chs, d: {"channels": chs, "data": d},
                           st.lists(channels, max_size=4), json_values),
    "subscribe": st.builds(lambda u, ch, s, d: {"user": u, "channel": ch, "recover_since": s,
                                                "data": d},
                           users, channels, st.none() | since, json_values),
    "unsubscribe": st.builds(lambda u, ch, c: {"user": u, "channel": ch, "client": c},
                             users, channels, st.text(max_size=8)),
    "disconnect": st.builds(lambda u, c, r, w: {"user": u, "disconnect": {"code": c,
                                                                          "reason": r},
                                                "whitelist": w},
                            users, st.integers(-5, 70000), st.text(max_size=200),
                            st.lists(st.text(max_size=8), max_size=3)),
    "refresh": st.builds(lambda u, exp, at, info: {"user": u, "expired": exp, "expire_at": at,
                                                   "info": info},
                         users, st.booleans(), st.integers(-(2**40), 2**70), json_values),
    "presence": st.builds(lambda ch: {"channel": ch}, channels),
    "presence_stats": st.builds(lambda ch: {"channel": ch}, channels),
    "history": st.builds(lambda ch, lim, s, rev: {"channel": ch, "limit": lim, "since": s,
                                                  "reverse": rev},
                         channels, st.integers(-5, 2**40), st.none() | since, st.booleans()),
    "history_remove": st.builds(lambda ch: {"channel": ch}, channels),
    "channels": st.builds(lambda pattern: {"pattern": pattern}, st.text(max_size=12)),
    "info": st.just({}),
}
centrifugo_bodies["batch"] = st.builds(
    lambda commands, parallel: {"commands": commands, "parallel": parallel},
    st.lists(st.sampled_from(sorted(centrifugo_bodies)).flatmap(
        lambda name: centrifugo_bodies[name].map(lambda body: {name: body})), max_size=4),
    st.booleans())
CENTRIFUGO_CODES = {102, 104, 107, 108, 112}  # 100 would be the hub's fault here

# Mutations of a valid value, then of its bytes


def mutate_value(value: Any, draw: Callable[[st.SearchStrategy[Any]], Any]) -> Any:
    """One structural change somewhere inside a JSON value: a key dropped, added or renamed,
    a value replaced by one of another type, deep nesting, a huge number."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        how = draw(st.sampled_from(["drop", "replace", "add", "recurse", "rename"]))
        changed = dict(value)
        if how == "drop":
            del changed[key]
        elif how == "replace":
            changed[key] = draw(json_values | st.integers(2**63, 2**80) | deep_nesting)
        elif how == "add":
            changed[draw(st.text(max_size=10))] = draw(json_values)
        elif how == "rename":
            changed[draw(st.text(max_size=10))] = changed.pop(key)
        else:
            changed[key] = mutate_value(value[key], draw)
        return changed
    if isinstance(value, list) and value:
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], mutate_value(value[index], draw), *value[index + 1:]]
    return draw(json_values | deep_nesting)


DEEP = "\x00deep\x00"
"""Stands for 2,000 nested arrays, past what json.dumps nests (written in by `encode`)."""
DEEP_JSON = json.dumps(DEEP)
deep_nesting = st.integers(1, 300).map(lambda depth: json.loads("[" * depth + "]" * depth)) | \
    st.just(DEEP)


def encode(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False)
    return text.replace(DEEP_JSON, "[" * 2000 + "]" * 2000).encode()


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> bytes:
    value = draw(valid)
    for _ in range(draw(st.integers(0, 3))):
        value = mutate_value(value, draw)
    data = encode(value)
    how = draw(st.sampled_from(["as is", "truncate", "insert", "flip", "wrap", "dup key"]))
    if how == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif how == "wrap":
        data = b"[" + data + b"]"
    elif how == "dup key" and data.startswith(b"{") and len(data) > 2:
        data = b'{"type":"ping",' + data[1:]
    return data


# /ws


def check_ws(data: bytes | str) -> None:
    try:
        command = p.decode_command(data)
    except p.BadFrame as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE), exc.code
        assert exc.frame_id is None or type(exc.frame_id) is int
        assert decode_reason(data, exc) in REASONS
    else:
        assert isinstance(command, COMMAND_CLASSES)
        assert command.id is None or type(command.id) is int
    frame_id = p.frame_id_of(data)
    assert frame_id is None or type(frame_id) is int


@FUZZ
@given(st.binary(max_size=300))
def test_ws_frames_from_arbitrary_bytes(data: bytes) -> None:
    check_ws(data)


@FUZZ
@given(st.text(max_size=100))
def test_ws_frames_from_arbitrary_text(data: str) -> None:
    check_ws(data)


@FUZZ
@given(ws_commands)
def test_valid_ws_frames_are_accepted(command: dict[str, Any]) -> None:
    decoded = p.decode_command(json.dumps(command))
    assert decoded.id == command.get("id")
    assert type(decoded).__struct_config__.tag == command["type"]


@FUZZ
@given(mutated(ws_commands))
def test_mutated_ws_frames(data: bytes) -> None:
    check_ws(data)


# /connection/websocket


def check_centrifugo(data: bytes | str) -> None:
    messages = cf.split_frame(data)
    try:
        for command in cf.iter_commands(data):
            assert isinstance(command, cf.Command)
            assert 0 <= command.id < 2**32
            assert command.method is None or command.method in cf._METHODS
    except cf.BadCommand as exc:
        assert exc.code == ErrorCode.BAD_REQUEST
        assert exc.command_id is None or 0 < exc.command_id < 2**32
        for message in messages:
            assert decode_reason(message, exc) in REASONS


@FUZZ
@given(st.binary(max_size=300))
def test_centrifugo_frames_from_arbitrary_bytes(data: bytes) -> None:
    check_centrifugo(data)


@FUZZ
@given(st.lists(centrifugo_commands, min_size=1, max_size=4))
def test_valid_centrifugo_frames_are_accepted(commands: list[dict[str, Any]]) -> None:
    frame = "\n".join(json.dumps(command) for command in commands)
    in_range = [c for c in commands if c["id"] < 2**32]
    if len(in_range) < len(commands):  # an id past uint32 is a bad command
        with pytest.raises(cf.BadCommand):
            list(cf.iter_commands(frame))
        return
    decoded = list(cf.iter_commands(frame))
    assert [c.id for c in decoded] == [c["id"] for c in commands]


@FUZZ
@given(st.lists(mutated(centrifugo_commands), min_size=1, max_size=3))
def test_mutated_centrifugo_frames(lines: list[bytes]) -> None:
    check_centrifugo(b"\n".join(lines))


# /connection/websocket in Protobuf: the same answers as JSON (a command with a readable id
# answered 107, anything else closes 3501), never another exception.

protobuf_commands = st.one_of(
    st.builds(lambda tok: pb2.Command(connect=pb2.ConnectRequest(token=tok, name="js")),
              st.text(max_size=40)),
    st.builds(lambda ch, rec, off, ep, fl: pb2.Command(subscribe=pb2.SubscribeRequest(
        channel=ch, recover=rec, offset=off, epoch=ep, flag=fl, delta="fossil")),
        channels, st.booleans(), st.integers(0, 2**40), st.text(max_size=8),
        st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda ch, d: pb2.Command(publish=pb2.PublishRequest(channel=ch, data=d)),
              channels, st.binary(max_size=20) | json_values.map(lambda v: json.dumps(v).encode())),
    st.builds(lambda ch, lim, rev: pb2.Command(history=pb2.HistoryRequest(
        channel=ch, limit=lim, reverse=rev, since=pb2.StreamPosition(offset=3, epoch="e"))),
        channels, st.integers(-(2**31), 2**31 - 1), st.booleans()),
    st.builds(lambda ch, tok: pb2.Command(sub_refresh=pb2.SubRefreshRequest(channel=ch,
                                                                           token=tok)),
              channels, st.text(max_size=10)),
    st.builds(lambda d: pb2.Command(rpc=pb2.RPCRequest(method="m", data=d)), st.binary(max_size=8)),
    st.just(pb2.Command()),
).flatmap(lambda command: st.integers(0, 2**32 - 1).map(
    lambda n: (command.MergeFrom(pb2.Command(id=n)), command)[1].SerializeToString()))


@st.composite
def mutated_protobuf(draw: st.DrawFn) -> bytes:
    """A valid command's bytes, then truncated, cut into, grown, or given a huge varint or a
    length past the end."""
    data = bytearray(draw(protobuf_commands))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["truncate", "insert", "flip", "varint", "length"]))
        if how == "truncate":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif how == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif how == "varint":
            data[at:at] = b"\x08" + b"\xff" * draw(st.integers(9, 14)) + b"\x01"
        else:
            data[at:at] = bytes([draw(st.sampled_from([0x22, 0x2A, 0x3A, 0x52]))]) + b"\xff\x7f"
    return bytes(data)


def check_protobuf(frame: bytes) -> None:
    messages, _problem = hpb.split_frame(frame)
    for message in messages:
        try:
            command = hpb.decode_command(message)
        except cf.BadCommand as exc:
            assert exc.code == ErrorCode.BAD_REQUEST
            assert exc.command_id is None or 0 < exc.command_id < 2**32
            continue
        assert isinstance(command, cf.Command) and 0 <= command.id < 2**32
        assert command.method is None or command.method in cf._METHODS


@FUZZ
@given(st.binary(max_size=300))
def test_protobuf_frames_from_arbitrary_bytes(data: bytes) -> None:
    check_protobuf(data)


@FUZZ
@given(st.lists(protobuf_commands, min_size=1, max_size=4))
def test_valid_protobuf_frames_are_accepted(commands: list[bytes]) -> None:
    frame = b"".join(hpb.delimit(command) for command in commands)
    messages, problem = hpb.split_frame(frame)
    assert problem is None and messages == commands
    for message in messages:
        reference = pb2.Command()
        reference.ParseFromString(message)
        try:
            decoded = hpb.decode_command(message)
        except cf.BadCommand:  # only a publish whose data is not JSON
            assert reference.HasField("publish")
            continue
        assert decoded.id == reference.id


@FUZZ
@given(st.lists(mutated_protobuf(), min_size=1, max_size=3))
def test_mutated_protobuf_frames(messages: list[bytes]) -> None:
    check_protobuf(b"".join(hpb.delimit(message) for message in messages))
    check_protobuf(b"".join(messages))


@st.composite
def edited(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A source and a target made of it by insertions, deletions, replacements and moved
    stretches, as a changing document is."""
    alphabet = st.sampled_from([*b'ab{}":,0123456789', 0xC3, 0xA9])
    source = bytes(draw(st.lists(alphabet, max_size=3000)))
    target = bytearray(source)
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(target)))
        size = draw(st.integers(1, 200))
        how = draw(st.sampled_from(["insert", "delete", "replace", "move"]))
        if how == "insert":
            target[at:at] = bytes(draw(st.lists(alphabet, min_size=1, max_size=size)))
        elif how == "delete":
            del target[at:at + size]
        elif how == "replace":
            target[at:at + 3] = b"QQQ"
        else:
            stretch = target[at:at + size]
            target[draw(st.integers(0, len(target))):0] = stretch
    return source, bytes(target)


@FUZZ
@given(edited())
def test_fossil_patches_apply_with_the_sdk(pair: tuple[bytes, bytes]) -> None:
    from centrifuge.fossil import apply_delta

    from hub import fossil

    source, target = pair
    assert apply_delta(source, fossil.create(source, target)) == target


async def test_malformed_protobuf_frames_on_a_live_node(caplog: pytest.LogCaptureFixture) -> None:
    """Each kind of bad frame on a Protobuf connection: a command whose id reads gets error
    107 and the connection stays; one without, or a frame that is not delimited messages,
    closes 3501; no traceback in the log."""
    import websockets

    from tests.support import running_node, token

    caplog.set_level(logging.WARNING)
    bad_with_id = b"\x08\x05" + b"\x22\x05ab"  # id 5, then a connect field cut short
    cases: list[tuple[bytes, int | None]] = [
        (hpb.delimit(bad_with_id), 107),
        (hpb.delimit(b"\x08\x06\x3a\x04\x12\x02\xff\xfe"), 107),  # publish data not JSON
        (hpb.delimit(b"\x08\x07\xf8\x7f\x01"), 104),  # id 7, only an unknown field
        (b"\x05ab", None),  # a length past the end of the frame
        (b"\xff" * 12, None),  # a varint longer than ten bytes
        (hpb.delimit(b"\x08" + b"\xff" * 11), None),  # a huge varint where the id is
        (hpb.delimit(b"\x0f"), None),  # wire type 7
    ]
    async with running_node(make_settings(namespaces=NAMESPACES)) as node:
        url = node.ws_url.removesuffix("/ws") + "/connection/websocket?format=protobuf"
        for frame, code in cases:
            async with websockets.connect(url) as socket:
                connect = pb2.Command(id=1, connect=pb2.ConnectRequest(token=token("fz")))
                await socket.send(hpb.delimit(connect.SerializeToString()))
                await socket.recv()
                await socket.send(frame)
                if code is None:
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await asyncio.wait_for(socket.recv(), 5)
                    assert socket.close_code == 3501, frame
                    continue
                reply = pb2.Reply()
                data = await asyncio.wait_for(socket.recv(), 5)
                assert isinstance(data, bytes)
                reply.ParseFromString(data[1:])
                assert reply.error.code == code, (frame, reply)
                ping = pb2.Command(id=9, presence_stats=pb2.PresenceStatsRequest(channel="chat:z"))
                await socket.send(hpb.delimit(ping.SerializeToString()))
                assert await asyncio.wait_for(socket.recv(), 5)
    assert_quiet(caplog)


# HTTP API bodies, through the app in-process


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(namespaces=NAMESPACES))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub",
                                     headers={"X-API-Key": API_KEY}) as client:
            yield client


def check_reply(response: httpx.Response) -> None:
    """200, or the contract's error: a JSON error body with one of its codes; never 5xx.
    (403 `forbidden`: history or presence is off in the channel's namespace.)"""
    assert response.status_code in (200, 400, 403, 413), (response.status_code, response.text)
    body = response.json()
    if response.status_code != 200:
        assert body["error"]["code"] in CONTRACT_CODES, body


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING)
    return caplog


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, loud


@FUZZ
@given(path=st.sampled_from(sorted(bodies)), data=st.binary(max_size=300))
async def test_api_bodies_from_arbitrary_bytes(
    api: httpx.AsyncClient, quiet: pytest.LogCaptureFixture, path: str, data: bytes
) -> None:
    check_reply(await api.post(path, content=data))
    assert_quiet(quiet)


@FUZZ
@given(st.sampled_from(sorted(bodies)).flatmap(
    lambda path: st.tuples(st.just(path), mutated(bodies[path]))))
async def test_mutated_api_bodies(
    api: httpx.AsyncClient, quiet: pytest.LogCaptureFixture, case: tuple[str, bytes]
) -> None:
    path, data = case
    check_reply(await api.post(path, content=data))
    assert_quiet(quiet)


@FUZZ
@given(kind=st.sampled_from(["history", "presence"]), channel=st.text(min_size=1, max_size=40),
       query=st.dictionaries(st.sampled_from(["since", "limit", "epoch", "x"]),
                             st.text(max_size=24) | st.integers(-5, 2**70).map(str),
                             max_size=3))
async def test_api_paths_and_queries(
    api: httpx.AsyncClient, quiet: pytest.LogCaptureFixture, kind: str, channel: str,
    query: dict[str, str],
) -> None:
    response = await api.get(f"/api/{kind}/{quote(channel, safe='')}", params=query)
    check_reply(response)
    assert_quiet(quiet)


def test_body_types_decode_or_raise_decode_error() -> None:
    """What the endpoints map to 400: msgspec's DecodeError (and RecursionError, for
    nesting past msgspec's depth) are the only failures of decoding a body."""
    for kind in t.BODIES:
        for raw in (b"", b"[]", b"{}", b"null", b'{"channel": 1}', b"[" * 5000 + b"]" * 5000):
            with pytest.raises((msgspec.DecodeError, RecursionError)):
                msgspec.json.decode(raw, type=kind)


# Centrifugo's server API (PROTOCOL §16)


def check_centrifugo_reply(response: httpx.Response) -> None:
    """A result, or Centrifugo's error: 200 with `{"error"}` for a call's errors, 400 for a
    body it cannot read, 413 past 1 MiB; a JSON body either way, never a 5xx."""
    assert response.status_code in (200, 400, 413), (response.status_code, response.text)
    body = response.json()
    if "replies" in body:  # a batch: each command's own reply
        errors = [reply["error"] for reply in body["replies"] if "error" in reply]
    else:
        assert ("result" in body) != ("error" in body), body
        assert response.status_code == 200 or "error" in body, body
        errors = [body["error"]] if "error" in body else []
    for error in errors:
        assert error["code"] in CENTRIFUGO_CODES and error["message"], body


@FUZZ
@given(name=st.sampled_from(sorted(centrifugo_bodies)), data=st.binary(max_size=300))
async def test_centrifugo_api_bodies_from_arbitrary_bytes(
    api: httpx.AsyncClient, quiet: pytest.LogCaptureFixture, name: str, data: bytes
) -> None:
    check_centrifugo_reply(await api.post(f"/centrifugo/api/{name}", content=data))
    assert_quiet(quiet)


@FUZZ
@given(st.sampled_from(sorted(centrifugo_bodies)).flatmap(
    lambda name: st.tuples(st.just(name), centrifugo_bodies[name] | mutated(
        centrifugo_bodies[name]))))
async def test_mutated_centrifugo_api_bodies(
    api: httpx.AsyncClient, quiet: pytest.LogCaptureFixture, case: tuple[str, Any]
) -> None:
    name, body = case
    data = body if isinstance(body, bytes) else encode(body)
    check_centrifugo_reply(await api.post(f"/centrifugo/api/{name}", content=data))
    assert_quiet(quiet)

