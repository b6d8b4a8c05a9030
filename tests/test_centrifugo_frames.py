"""hub/centrifugo_frames.py against the JSON the real SDKs send and parse: the commands
below were captured from centrifuge-js 5.8.0 (Node, `ws`) and centrifuge-python 0.7.0 talking
to a scripted server (docs/centrifugo-notes.md), and each reply is checked for the keys the
SDKs read without a fallback."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from hub import centrifugo_frames as cf
from hub import protocol as p
from hub.errors import CloseCode, HubError
from hub.errors import ErrorCode as HubErrorCode


def loads(message: bytes) -> Any:
    return json.loads(message)


def one(frame: str) -> cf.Command:
    commands = list(cf.iter_commands(frame))
    assert len(commands) == 1
    return commands[0]


# Commands as the SDKs send them


def test_js_connect_and_subscribe_come_in_one_frame_id_last() -> None:
    frame = (
        '{"connect":{"token":"tok-initial","name":"js"},"id":1}\n'
        '{"subscribe":{"channel":"chat:room","flag":1},"id":2}'
    )
    connect, subscribe = cf.iter_commands(frame)
    assert connect.id == 1 and connect.method == "connect"
    assert connect.connect is not None
    assert connect.connect.token == "tok-initial"
    assert connect.connect.name == "js"
    assert connect.connect.subs is None
    assert subscribe.id == 2 and subscribe.method == "subscribe"
    assert subscribe.subscribe is not None
    assert subscribe.subscribe.channel == "chat:room"
    assert subscribe.subscribe.flag == 1
    assert subscribe.subscribe.since is None


def test_python_connect() -> None:
    command = one('{"id": 1, "connect": {"token": "tok-initial", "name": "python"}}')
    assert command.connect is not None
    assert (command.id, command.connect.token, command.connect.name) == (1, "tok-initial", "python")


def test_reconnect_asks_to_recover_server_side_subscriptions() -> None:
    js = one(
        '{"connect":{"token":"tok-1","name":"js","subs":{"@alice":'
        '{"recover":true,"offset":8,"epoch":"pe"}}},"id":12}'
    )
    py = one(
        '{"id": 12, "connect": {"token": "tok-1", "name": "python", "subs": {"@alice": '
        '{"recover": true, "offset": 8, "epoch": "pe"}}}}'
    )
    for command in (js, py):
        assert command.connect is not None and command.connect.subs is not None
        assert command.connect.subs["@alice"].since == p.Since(8, "pe")


def test_resubscribe_after_insufficient_state_recovers_from_last_offset() -> None:
    js = one('{"subscribe":{"channel":"chat:room","flag":1,"recover":true,"offset":4,'
             '"epoch":"e1"},"id":10}')
    py = one('{"id": 10, "subscribe": {"channel": "chat:room", "recover": true, '
             '"epoch": "e1", "offset": 4, "flag": 1}}')
    for command in (js, py):
        assert command.subscribe is not None
        assert command.subscribe.since == p.Since(4, "e1")


def test_js_leaves_out_a_zero_offset_and_an_empty_epoch() -> None:
    command = one('{"subscribe":{"channel":"c","flag":1,"recover":true},"id":3}')
    assert command.subscribe is not None
    assert command.subscribe.since == p.Since(0, "")


def test_subscribe_options_are_tolerated() -> None:
    command = one(
        '{"subscribe":{"channel":"c","token":"t","data":{"x":1},"positioned":true,'
        '"recoverable":true,"join_leave":true,"flag":3,"delta":"fossil",'
        '"tf":{"op":"","key":"k","cmp":"eq","val":"v"},"type":0},"id":4}'
    )
    assert command.subscribe is not None
    assert command.subscribe.join_leave and command.subscribe.delta == "fossil"


def test_publish_keeps_data_raw() -> None:
    command = one('{"publish":{"channel":"chat:room","data":{"text":"hi\\nthere"}},"id":3}')
    assert command.publish is not None
    assert command.publish.channel == "chat:room"
    assert bytes(command.publish.data) == b'{"text":"hi\\nthere"}'


@pytest.mark.parametrize(
    ("frame", "limit", "since", "reverse"),
    [
        # centrifuge-js: history(ch, {limit, since}), history(ch), history(ch, {limit, reverse})
        ('{"history":{"channel":"chat:room","since":{"offset":2,"epoch":"e1"},"limit":10},'
         '"id":4}', 10, cf.StreamPosition(2, "e1"), False),
        ('{"history":{"channel":"chat:room"},"id":5}', 0, None, False),
        ('{"history":{"channel":"chat:room","limit":5,"reverse":true},"id":6}', 5, None, True),
        # centrifuge-python always sends limit and reverse
        ('{"id": 4, "history": {"channel": "chat:room", "limit": 10, "reverse": false, '
         '"since": {"offset": 2, "epoch": "e1"}}}', 10, cf.StreamPosition(2, "e1"), False),
        ('{"id": 5, "history": {"channel": "chat:room", "limit": 0, "reverse": false}}',
         0, None, False),
    ],
)
def test_history(frame: str, limit: int, since: cf.StreamPosition | None, reverse: bool) -> None:
    history = one(frame).history
    assert history is not None
    assert (history.channel, history.limit, history.since, history.reverse) == (
        "chat:room", limit, since, reverse
    )


def test_presence_presence_stats_refresh_unsubscribe() -> None:
    assert one('{"presence":{"channel":"chat:room"},"id":7}').method == "presence"
    stats = one('{"id": 8, "presence_stats": {"channel": "chat:room"}}')
    assert stats.presence_stats == cf.PresenceStatsRequest("chat:room")
    refresh = one('{"refresh":{"token":"tok-1"},"id":11}')
    assert refresh.refresh == cf.RefreshRequest("tok-1")
    assert one('{"unsubscribe":{"channel":"c"},"id":9}').unsubscribe == cf.UnsubscribeRequest("c")


def test_pong_is_the_empty_command() -> None:
    assert one("{}").is_pong


def test_send_has_no_id_and_is_not_a_pong() -> None:
    command = one('{"send":{"data":{"x":1}}}')
    assert command.method == "send" and not command.is_pong


@pytest.mark.parametrize(
    ("frame", "method"),
    [('{"ping":{},"id":9}', "ping"), ('{"id":7,"foo":{}}', None)],
)
def test_methods_not_served_are_recognised(frame: str, method: str | None) -> None:
    command = one(frame)
    assert command.method == method
    assert command.method not in cf.SERVED_METHODS
    assert not command.is_pong


def test_rpc_is_served_and_decoded() -> None:
    command = one('{"rpc":{"method":"m","data":{"x":1}},"id":9}')
    assert command.method == "rpc" and "rpc" in cf.SERVED_METHODS
    assert command.rpc is not None and command.rpc.method == "m"
    assert bytes(command.rpc.data) == b'{"x":1}'


def test_blank_lines_are_skipped() -> None:
    assert [c.id for c in cf.iter_commands(b'{"id":1,"presence":{"channel":"a"}}\n\n')] == [1]


@pytest.mark.parametrize(
    ("frame", "command_id"),
    [
        ('{"id":3,"subscribe":{"channel":5}}', 3),
        ('{"id":3,"subscribe":{}}', 3),
        ('{"id":4,"refresh":{}}', 4),
        ('{"id":-1}', None),
        ("not json", None),
        ("[1]", None),
    ],
)
def test_bad_commands(frame: str, command_id: int | None) -> None:
    with pytest.raises(cf.BadCommand) as caught:
        one(frame)
    assert caught.value.command_id == command_id
    assert caught.value.code is HubErrorCode.BAD_REQUEST


def test_a_bad_command_comes_after_the_good_ones_before_it() -> None:
    commands = cf.iter_commands('{"id":1,"presence":{"channel":"a"}}\n{"id":2,"publish":5}')
    assert next(commands).id == 1
    with pytest.raises(cf.BadCommand) as caught:
        next(commands)
    assert caught.value.command_id == 2


# Replies and pushes as the SDKs parse them


def test_connect_reply() -> None:
    reply = cf.Reply(
        id=1,
        connect=cf.ConnectResult(
            client="client-1", version="0.1.0", expires=True, ttl=3, ping=25, pong=True,
            subs={"@alice": cf.SubscribeResult()},
        ),
    )
    assert cf.encode(reply) == (
        b'{"id":1,"connect":{"client":"client-1","version":"0.1.0","expires":true,"ttl":3,'
        b'"subs":{"@alice":{}},"ping":25,"pong":true}}'
    )


def test_connect_reply_without_expiry_leaves_expires_and_ttl_out() -> None:
    reply = loads(cf.encode(cf.Reply(id=1, connect=cf.ConnectResult(client="c", ping=25))))
    assert reply == {"id": 1, "connect": {"client": "c", "ping": 25}}


def test_subscribe_reply_of_a_recovery() -> None:
    recovered = cf.SubscribeResult(
        recoverable=True, positioned=True, epoch="e1", offset=2, was_recovering=True,
        recovered=True, publications=[cf.Publication(data=msgspec.Raw(b'{"n":3}'), offset=3)],
    )
    assert cf.encode(cf.Reply(id=10, subscribe=recovered)) == (
        b'{"id":10,"subscribe":{"recoverable":true,"epoch":"e1","publications":'
        b'[{"data":{"n":3},"offset":3}],"recovered":true,"offset":2,"positioned":true,'
        b'"was_recovering":true}}'
    )
    failed = cf.SubscribeResult(
        recoverable=True, positioned=True, epoch="e2", offset=20, was_recovering=True
    )
    assert loads(cf.encode(cf.Reply(id=10, subscribe=failed)))["subscribe"] == {
        "recoverable": True, "epoch": "e2", "offset": 20, "positioned": True,
        "was_recovering": True,
    }


def test_empty_results_are_still_objects() -> None:
    # centrifuge-js hands reply.subscribe to its handler: an absent one throws.
    assert cf.encode(cf.Reply(id=2, subscribe=cf.SubscribeResult())) == b'{"id":2,"subscribe":{}}'
    assert cf.encode(cf.Reply(id=3, publish=cf.PublishResult())) == b'{"id":3,"publish":{}}'
    assert cf.encode(cf.Reply(id=4, unsubscribe=cf.UnsubscribeResult())) == (
        b'{"id":4,"unsubscribe":{}}'
    )


def test_history_presence_and_stats_always_carry_their_fields() -> None:
    history = cf.Reply(id=5, history=cf.HistoryResult(publications=[], epoch="e1", offset=0))
    assert cf.encode(history) == b'{"id":5,"history":{"publications":[],"epoch":"e1","offset":0}}'
    presence = cf.Reply(id=7, presence=cf.PresenceResult(presence={}))
    assert cf.encode(presence) == b'{"id":7,"presence":{"presence":{}}}'
    stats = cf.Reply(id=8, presence_stats=cf.PresenceStatsResult(num_clients=0, num_users=0))
    assert cf.encode(stats) == b'{"id":8,"presence_stats":{"num_clients":0,"num_users":0}}'


def test_presence_entries_are_client_infos() -> None:
    info = cf.ClientInfo(user="bob", client="c-pub", conn_info=msgspec.Raw(b'{"name":"Bob"}'))
    reply = cf.Reply(id=7, presence=cf.PresenceResult(presence={"c-pub": info}))
    assert cf.encode(reply) == (
        b'{"id":7,"presence":{"presence":{"c-pub":{"user":"bob","client":"c-pub",'
        b'"conn_info":{"name":"Bob"}}}}}'
    )


def test_refresh_reply() -> None:
    reply = cf.Reply(id=11, refresh=cf.RefreshResult(expires=True, ttl=600))
    assert cf.encode(reply) == b'{"id":11,"refresh":{"expires":true,"ttl":600}}'


def test_publication_push() -> None:
    info = cf.ClientInfo(user="bob", client="c-pub", conn_info=msgspec.Raw(b'{"name":"Bob"}'))
    pub = cf.publication(msgspec.Raw(b'{"n":3}'), 3, 1700000000123, "chat", info)
    assert cf.encode_push(cf.Push(channel="chat:room", pub=pub)) == (
        b'{"push":{"channel":"chat:room","pub":{"data":{"n":3},"info":{"user":"bob",'
        b'"client":"c-pub","conn_info":{"name":"Bob"}},"offset":3,'
        b'"tags":{"event":"chat","ts":"1700000000123"}}}}'
    )
    bare = cf.publication(msgspec.Raw(b'"x"'))
    assert cf.encode_push(cf.Push(channel="@alice", pub=bare)) == (
        b'{"push":{"channel":"@alice","pub":{"data":"x"}}}'
    )


def test_publication_from_hub_message_and_history_item() -> None:
    message = p.Message(channel="c", data=msgspec.Raw(b"1"), ts=5, event="e", offset=2,
                        epoch="x")
    assert cf.message_publication(message) == cf.Publication(
        data=msgspec.Raw(b"1"), offset=2, tags={"event": "e", "ts": "5"}
    )
    item = p.HistoryItem(offset=2, data=msgspec.Raw(b"1"), ts=5)
    assert cf.history_publication(item) == cf.Publication(
        data=msgspec.Raw(b"1"), offset=2, tags={"ts": "5"}
    )


def test_raw_newlines_are_stripped_so_framing_holds() -> None:
    pub = cf.Publication(data=msgspec.Raw(b'{\n  "text": "a\\nb"\n}'))
    encoded = cf.encode_push(cf.Push(channel="c", pub=pub))
    assert b"\n" not in encoded
    assert loads(encoded)["push"]["pub"]["data"] == {"text": "a\nb"}


def test_join_leave_pushes_carry_info() -> None:
    info = cf.ClientInfo(user="bob", client="c-pub")
    assert cf.encode_push(cf.Push(channel="c", join=cf.Join(info))) == (
        b'{"push":{"channel":"c","join":{"info":{"user":"bob","client":"c-pub"}}}}'
    )
    assert loads(cf.encode_push(cf.Push(channel="c", leave=cf.Leave(info))))["push"]["leave"] == {
        "info": {"user": "bob", "client": "c-pub"}
    }


def test_unsubscribe_push_for_a_reset_has_code_2500_and_a_reason() -> None:
    assert cf.encode_push(cf.unsubscribe_push("chat:room")) == (
        b'{"push":{"channel":"chat:room","unsubscribe":{"code":2500,'
        b'"reason":"insufficient state"}}}'
    )
    for code in cf.UnsubscribeCode:
        # centrifuge-python reads `reason` without a fallback
        push = cf.unsubscribe_push("c", code).unsubscribe
        assert push is not None and push.code == code and push.reason


def test_several_messages_share_a_frame_and_ping_is_empty() -> None:
    pub = cf.encode_push(cf.Push(channel="c", pub=cf.Publication(data=msgspec.Raw(b"1"))))
    frame = cf.join_frame([pub, cf.PING])
    assert frame == b'{"push":{"channel":"c","pub":{"data":1}}}\n{}'
    assert [json.loads(line) for line in frame.split(b"\n")][1] == {}


# Errors and closes


def test_error_replies_always_have_a_message() -> None:
    assert cf.encode(cf.error_reply(9, cf.ErrorCode.METHOD_NOT_FOUND)) == (
        b'{"id":9,"error":{"code":104,"message":"method not found"}}'
    )
    assert cf.encode(cf.error_reply(1, cf.ErrorCode.TOKEN_EXPIRED)) == (
        b'{"id":1,"error":{"code":109,"message":"token expired"}}'
    )
    assert loads(cf.encode(cf.error_reply(2, cf.ErrorCode.INTERNAL)))["error"] == {
        "code": 100, "message": "internal server error", "temporary": True
    }
    for code in cf.ErrorCode:
        assert cf.error_reply(1, code, message="").error == cf.Error(
            code, cf.ERROR_MESSAGES[code], code in cf.TEMPORARY_ERRORS
        )


def test_every_hub_error_has_a_code() -> None:
    assert set(cf.HUB_ERRORS) == set(HubErrorCode)
    unavailable = cf.hub_error_reply(3, HubError(HubErrorCode.UNAVAILABLE, "broker down"))
    assert loads(cf.encode(unavailable)) == {
        "id": 3, "error": {"code": 108, "message": "broker down", "temporary": True}
    }
    forbidden = cf.hub_error_reply(4, HubError(HubErrorCode.FORBIDDEN, ""))
    assert forbidden.error == cf.Error(103, "permission denied")


def test_every_hub_close_has_a_reason_that_is_not_json() -> None:
    for code, reason in (*cf.HUB_CLOSES.values(), *cf.DISCONNECT_REASONS.items()):
        assert reason == reason.strip() and 0 < len(reason.encode()) <= 123, code
        with pytest.raises(ValueError):
            json.loads(reason)  # centrifuge-js first reads a reason as JSON
    assert cf.reason_for(3001) == "shutdown"
    assert cf.reason_for(3012) == "no pong"
    assert cf.reason_for(4321) == "disconnect"


@pytest.mark.parametrize(
    ("hub_code", "terminal"),
    [
        (CloseCode.UNAUTHORIZED, True),
        (CloseCode.DISCONNECTED_BY_API, True),
        (CloseCode.BINARY_FRAME, True),
        (CloseCode.POLICY_VIOLATION, True),
        (CloseCode.TOKEN_EXPIRED, False),
        (CloseCode.SLOW_CONSUMER, False),
        (CloseCode.RESTARTING, False),
        (CloseCode.TRY_AGAIN_LATER, False),
        (CloseCode.TOO_MANY_COMMANDS, False),
        (CloseCode.INTERNAL_ERROR, False),
    ],
)
def test_hub_closes_keep_their_meaning(hub_code: CloseCode, terminal: bool) -> None:
    code, _ = cf.HUB_CLOSES[hub_code]
    assert cf.is_terminal(code) is terminal
    assert code >= 3000


@pytest.mark.parametrize(
    ("expires_at", "now", "ttl"),
    [(1000.0, 900.0, 99), (1000.0, 900.5, 98), (1000.0, 998.5, 0), (1000.0, 1001.0, 0)],
)
def test_token_ttl_keeps_a_margin(expires_at: float, now: float, ttl: int) -> None:
    assert cf.token_ttl(expires_at, now) == ttl
