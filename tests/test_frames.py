"""PROTOCOL §3 end to end: every bad input gets the answer the contract gives (an error
frame, or a close code), and an error leaves the connection and its subscriptions working."""

from __future__ import annotations

import uuid
from typing import Any

from tests.support import (
    WAIT,
    Client,
    RunningNode,
    api,
    connect,
    eventually,
    make_settings,
    metric,
    publish,
    running_node,
    token,
)

CHANNEL = "room1"  # default namespace: subscribe by token claim, no join/leave frames


async def wait_for_metric(running: RunningNode, value: float, name: str, **labels: str) -> None:
    """Poll /metrics until the sample has `value` (a close is counted after the socket is
    gone, asynchronously)."""
    await eventually(lambda: metric(running, name, **labels), lambda got: got == value,
                     within=WAIT, what=f"{name} = {value}")


async def still_delivers(running: RunningNode, client: Client, channel: str = CHANNEL) -> None:
    """The next frame the client gets is a message published now on `channel`."""
    marker = uuid.uuid4().hex
    await publish(running, channel, {"marker": marker})
    frame = await client.expect("message")
    assert frame["channel"] == channel
    assert frame["data"] == {"marker": marker}


async def error_reply(client: Client, raw: str) -> dict[str, Any]:
    """Send raw text; the next frame must be an error."""
    await client.connection.send(raw)
    return await client.expect("error")


# Closing inputs


async def test_binary_frame_closes_1003_and_others_keep_receiving(node: RunningNode) -> None:
    async with (
        connect(node.ws_url, token("alice")) as offender,
        connect(node.ws_url, token("bob")) as bystander,
    ):
        await offender.subscribe(CHANNEL)
        await bystander.subscribe(CHANNEL)
        await offender.connection.send(b"\x00\x01binary")
        assert await offender.closed() == 1003
        await still_delivers(node, bystander)
        await wait_for_metric(node, 1, "hub_disconnections_total", code="1003")


async def test_frame_over_size_limit_closes_1009() -> None:
    async with (
        running_node(make_settings(max_frame_bytes=1024)) as running,
        connect(running.ws_url, token("alice")) as offender,
        connect(running.ws_url, token("bob")) as bystander,
    ):
        await offender.subscribe(CHANNEL)
        await bystander.subscribe(CHANNEL)
        # Just under the limit is fine (unknown fields are ignored).
        padded = {"type": "ping", "id": 1, "pad": "x" * 900}
        assert (await offender.request(padded))["type"] == "pong"
        await offender.send({"type": "ping", "id": 2, "pad": "x" * 2000})
        assert await offender.closed() == 1009
        await still_delivers(running, bystander)
        await wait_for_metric(running, 1, "hub_disconnections_total", code="1009")


# Error replies


async def test_malformed_json_is_bad_request(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        for raw in ('{"type": "ping"', "not json at all", '{"type": "ping",}', ""):
            error = await error_reply(client, raw)
            assert error["code"] == "bad_request", raw
            assert "id" not in error
            assert error["message"]
            await still_delivers(node, client)


async def test_json_that_is_not_an_object_is_bad_request(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        for raw in ("[1, 2]", '"subscribe"', "42", "null", "true", "[]"):
            error = await error_reply(client, raw)
            assert error["code"] == "bad_request", raw
            await still_delivers(node, client)


async def test_unknown_type_is_unknown_type_with_id_echoed(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        error = await error_reply(client, '{"type": "dance", "id": 17}')
        assert error["code"] == "unknown_type"
        assert error["id"] == 17
        error = await error_reply(client, '{"type": "welcome"}')  # a server frame type
        assert error["code"] == "unknown_type"
        assert "id" not in error
        await still_delivers(node, client)


async def test_missing_type_is_bad_request_with_id_echoed(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        error = await error_reply(client, '{"id": 5, "channel": "room2"}')
        assert error["code"] == "bad_request"
        assert error["id"] == 5
        error = await error_reply(client, "{}")
        assert error["code"] == "bad_request"
        await still_delivers(node, client)


BAD_NAMES = ["has space", "x" * 256, "", "bad#chars", "semi;colon", "caf\u00e9", "tab\there",
             "new\nline", "star*", "q?uery"]


async def test_bad_channel_name_is_invalid_channel(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        for name in BAD_NAMES:
            for kind in ("subscribe", "unsubscribe", "publish", "presence", "history"):
                frame: dict[str, Any] = {"type": kind, "channel": name}
                if kind == "publish":
                    frame["data"] = {}
                reply = await client.request(frame)
                assert reply["type"] == "error", (name, kind, reply)
                assert reply["code"] == "invalid_channel", (name, kind, reply)
            await still_delivers(node, client)


async def test_longest_valid_channel_name_is_accepted(node: RunningNode) -> None:
    name = "a:" + "b" * 253
    assert len(name) == 255
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(name)
        await still_delivers(node, client, name)


async def test_every_allowed_character_is_accepted(node: RunningNode) -> None:
    name = "AZaz09_-:.=/"
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(name)
        await still_delivers(node, client, name)


async def test_personal_channel_commands_are_forbidden(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        for channel in ("@alice", "@bob"):
            for kind in ("subscribe", "unsubscribe", "publish"):
                frame: dict[str, Any] = {"type": kind, "channel": channel, "id": 3}
                if kind == "publish":
                    frame["data"] = {"x": 1}
                await client.send(frame)
                error = await client.expect("error")
                assert (error["code"], error["id"]) == ("forbidden", 3), (channel, kind)
                await still_delivers(node, client)
        # The personal subscription is untouched: a personal message still arrives.
        response = await api(node).post("/api/send", json={"user": "alice", "data": "hi"})
        assert response.status_code == 200
        message = await client.expect("message")
        assert message["channel"] == "@alice"
        assert message["data"] == "hi"


async def assert_bad_requests(node: RunningNode, cases: list[tuple[str, int | None]]) -> None:
    """Each raw frame is answered bad_request (echoing its integer id) and changes nothing:
    room2 and feed:a, which the bad frames name, stay unsubscribed."""
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        for raw, frame_id in cases:
            error = await error_reply(client, raw)
            assert error["code"] == "bad_request", (raw, error)
            if frame_id is not None:
                assert error["id"] == frame_id, raw
            else:
                assert not isinstance(error.get("id"), int), raw
            await publish(node, "room2", "not for us")
            await publish(node, "feed:a", "not for us either")
            await still_delivers(node, client)


async def test_missing_or_mistyped_channel_is_bad_request(node: RunningNode) -> None:
    await assert_bad_requests(node, [
        ('{"type": "subscribe", "channel": 5, "id": 21}', 21),
        ('{"type": "subscribe", "channel": null, "id": 22}', 22),
        ('{"type": "unsubscribe", "channel": ["room1"], "id": 23}', 23),
        ('{"type": "subscribe", "id": 24}', 24),
        ('{"type": "presence", "id": 25}', 25),
    ])


async def test_malformed_since_is_bad_request(node: RunningNode) -> None:
    await assert_bad_requests(node, [
        ('{"type": "subscribe", "channel": "feed:a", "since": 7, "id": 31}', 31),
        ('{"type": "subscribe", "channel": "feed:a", "since": "yesterday", "id": 32}', 32),
        ('{"type": "subscribe", "channel": "feed:a", "since": {"offset": "1", "epoch": "e"},'
         ' "id": 33}', 33),
        ('{"type": "subscribe", "channel": "feed:a", "since": {"offset": 1}, "id": 34}', 34),
        ('{"type": "subscribe", "channel": "feed:a", "since": {"epoch": "e"}, "id": 35}', 35),
    ])


async def test_publish_without_data_or_with_mistyped_event_is_bad_request(
    node: RunningNode,
) -> None:
    await assert_bad_requests(node, [
        ('{"type": "publish", "channel": "chat:a", "id": 41}', 41),
        ('{"type": "publish", "channel": "chat:a", "data": 1, "event": 9, "id": 42}', 42),
        ('{"type": "publish", "data": 1, "id": 43}', 43),
    ])


async def test_other_mistyped_fields_are_bad_request(node: RunningNode) -> None:
    await assert_bad_requests(node, [
        ('{"type": "history", "channel": "feed:a", "limit": "10", "id": 51}', 51),
        ('{"type": "refresh", "token": 12, "id": 52}', 52),
        ('{"type": "refresh", "id": 53}', 53),
    ])


async def test_id_that_is_not_an_integer_is_bad_request(node: RunningNode) -> None:
    await assert_bad_requests(node, [
        ('{"type": "ping", "id": 1.5}', None),
        ('{"type": "subscribe", "channel": "room2", "id": "61"}', None),
        ('{"type": "subscribe", "channel": "room2", "id": [1]}', None),
    ])


async def test_auth_frame_after_welcome_is_bad_request(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        reply = await client.request({"type": "auth", "token": token("bob")})
        assert reply["code"] == "bad_request"
        await still_delivers(node, client)


async def test_ping_gets_pong_echoing_id(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.send({"type": "ping", "id": 99})
        assert await client.expect("pong") == {"type": "pong", "id": 99}
        await client.send({"type": "ping"})
        assert await client.expect("pong") == {"type": "pong"}


async def test_error_frames_are_counted_by_code(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        counted = {
            code: await metric(node, "hub_command_errors_total", code=code)
            for code in ("unknown_type", "invalid_channel", "bad_request", "forbidden",
                         "not_subscribed")
        }
        assert (await client.request({"type": "dance"}))["code"] == "unknown_type"
        assert (await client.request({"type": "subscribe", "channel": "a b"}))["code"] == (
            "invalid_channel"
        )
        assert (await client.request({"type": "subscribe", "channel": 1}))["code"] == (
            "bad_request"
        )
        assert (await client.request({"type": "subscribe", "channel": "@x"}))["code"] == (
            "forbidden"
        )
        assert (await client.request({"type": "unsubscribe", "channel": "zz"}))["code"] == (
            "not_subscribed"
        )
        for code, before in counted.items():
            assert await metric(node, "hub_command_errors_total", code=code) == before + 1, code
        await still_delivers(node, client)


async def test_many_errors_in_a_row_do_not_close_the_connection(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        await client.subscribe(CHANNEL)
        for index in range(50):
            await client.connection.send("{oops")
            await client.send({"type": "nope", "id": index})
        for index in range(50):
            assert (await client.expect("error"))["code"] == "bad_request"
            error = await client.expect("error")
            assert (error["code"], error["id"]) == ("unknown_type", index)
        await still_delivers(node, client)
