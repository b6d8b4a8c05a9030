"""The fan-out benchmark's own logic (`benchmarks/`, not packaged): the order check that
fails a run, where connections and messages go, the publisher's per-channel order, how a
private Redis Cluster's slots are split and when it is formed, which shards are read, the
per-shard Redis report, the bare RESP client, and the subscriber's frame parsing in both
protocols (`/ws` and Centrifugo's), fed the hub's own encoders' frames through a fake
transport. No processes are started: a real run is `python -m benchmarks`
(benchmarks/README.md)."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from typing import cast

import msgspec
import pytest

from benchmarks.cli import build_parser, check_args
from benchmarks.common import BenchError
from benchmarks.layout import (
    channel_name,
    channel_of,
    messages_on,
    node_of,
    subscribers_per_channel,
)
from benchmarks.publisher import Publishing
from benchmarks.redis_cluster import SLOTS, cluster_ready, cluster_url, slot_ranges
from benchmarks.redis_shards import Shard, cluster_masters
from benchmarks.redis_stats import (
    Reading,
    RedisWindow,
    parse_commandstats,
    parse_cpu_seconds,
    redis_section,
)
from benchmarks.resp import encode, read_reply
from benchmarks.run import _to_the_end
from benchmarks.sequence import SequenceCheck
from benchmarks.subscriber import (
    CentrifugoSubscriber,
    ClientState,
    Subscriber,
    accept_key,
    classify_reply,
    client_frame,
    read_sample,
    split_messages,
    subscriber_class,
)
from hub import protocol as p
from hub.centrifugo_session import CENTRIFUGO_CODEC, PING_FRAME
from hub.cli import main as hub_main
from hub.wire import text_frame
from hub.ws_session import WS_CODEC


def _feed(check: SequenceCheck, seqs: list[int]) -> SequenceCheck:
    for seq in seqs:  # what the subscriber's hot path does
        if seq == check.next:
            check.next = seq + 1
        else:
            check.unexpected(seq)
    return check


def test_in_order_is_clean() -> None:
    check = _feed(SequenceCheck(5), [0, 1, 2, 3, 4])
    assert check.clean and check.next == 5


def test_a_skipped_seq_is_a_gap() -> None:
    check = _feed(SequenceCheck(5), [0, 1, 3, 4])
    assert (check.gaps, check.duplicates, check.reorders) == (1, 0, 0)
    assert not check.clean


def test_a_late_seq_is_a_reorder_not_a_gap() -> None:
    check = _feed(SequenceCheck(5), [0, 2, 1, 3, 4])
    assert (check.gaps, check.duplicates, check.reorders) == (0, 0, 1)


def test_a_repeated_seq_is_a_duplicate_even_when_the_count_matches() -> None:
    check = _feed(SequenceCheck(3), [0, 1, 1])  # three frames for three messages
    assert (check.gaps, check.duplicates, check.reorders) == (0, 1, 0)
    assert not check.clean


def test_a_seq_never_published_is_unknown() -> None:
    check = _feed(SequenceCheck(3), [0, 7, -1])
    assert check.unknown == 2 and check.gaps == 0
    check.malformed()
    assert check.unknown == 3


def test_missing_tail_is_loss_not_gap() -> None:
    check = _feed(SequenceCheck(5), [0, 1, 2])
    assert check.clean  # the frame count reports it as lost


def test_each_channel_has_subscribers_on_every_node() -> None:
    nodes, channels = 2, 1000
    where = {(channel_of(i, nodes, channels), node_of(i, nodes)) for i in range(10_000)}
    assert len(where) == channels * nodes
    assert subscribers_per_channel(10_000, nodes, channels) == [10] * channels


def test_messages_round_robin_over_channels() -> None:
    assert [messages_on(c, 10, 4) for c in range(4)] == [3, 3, 2, 2]
    assert messages_on(5, 3, 10) == 0
    assert channel_name(0, 1) == "bench:fanout"
    assert channel_name(7, 20) == "bench:fanout.7"


async def test_claims_wait_for_the_previous_message_of_their_channels() -> None:
    job = Publishing(messages=7, batch=2, rate=0, payload=100, deadline=float("inf"),
                     api_key="k", channels=3)
    claims = []
    while (claim := job.claim()) is not None:
        claims.append(claim)
    # A claim never wraps from the last channel to the first, so one seq serves it.
    assert [(c.channel, c.size, c.seq) for c in claims] == [
        (0, 2, 0), (2, 1, 0), (0, 2, 1), (2, 1, 1), (0, 1, 2)
    ]
    assert claims[0].after == [] and claims[1].after == []
    assert claims[2].after == [claims[0].done]
    assert claims[3].after == [claims[1].done]
    assert claims[4].after == [claims[2].done]
    path, body = job.request(claims[0])
    assert path == "/api/broadcast"
    sent = json.loads(body)
    assert sent["channels"] == ["bench:fanout.0", "bench:fanout.1"]
    assert sent["data"]["seq"] == 0 and len(json.dumps(sent["data"])) >= 90
    job.record(claims[0], 200, b'{"results":[{"channel":"bench:fanout.0"},'
                               b'{"channel":"bench:fanout.1","error":{"code":"x"}}]}')
    assert job.published_on == [1, 0, 0] and job.errors == 1
    for claim in claims:
        claim.done.set_result(None)


@pytest.mark.parametrize(("argv", "problem"), [
    ([], None),
    (["--channels", "1000", "--batch", "10"], None),
    (["--batch", "2"], "--batch must be <= --channels"),
    (["--channels", "0"], "must be >= 1"),
    (["--nodes", "2"], "needs --redis-url, --redis-server or --redis-cluster"),
    (["--nodes", "2", "--redis-cluster", "3"], None),
    (["--nodes", "2", "--redis-cluster", "1"], None),
    (["--redis-cluster", "3", "--redis-server"], "not --redis-server and --redis-cluster"),
    (["--redis-cluster", "2", "--redis-url", "redis://h:1"], "not --redis-url and --redis-c"),
    (["--redis-cluster", "-1"], "--redis-cluster takes 1-16384"),
    (["--redis-cluster", "16385"], "--redis-cluster takes 1-16384"),
    (["--protocol", "centrifugo"], None),
])
def test_options(argv: list[str], problem: str | None) -> None:
    found = check_args(build_parser().parse_args(argv))
    assert found == problem if problem is None else problem in (found or "")


def test_hub_bench_points_to_the_new_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert hub_main(["bench", "--subscribers", "10"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


@pytest.mark.parametrize("masters", [1, 2, 3, 5, 7, 16, SLOTS])
def test_slots_split_evenly_into_consecutive_ranges(masters: int) -> None:
    ranges = slot_ranges(masters)
    assert len(ranges) == masters
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(nxt[0] == prev[1] + 1 for prev, nxt in itertools.pairwise(ranges))
    sizes = [last - first + 1 for first, last in ranges]
    assert sum(sizes) == SLOTS and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first ones take the remainder


def test_slot_split_of_one_and_three_masters() -> None:
    assert slot_ranges(1) == [(0, 16383)]
    assert slot_ranges(3) == [(0, 5461), (5462, 10922), (10923, 16383)]
    for wrong in (0, -1, SLOTS + 1):
        with pytest.raises(ValueError, match="1-16384"):
            slot_ranges(wrong)


def test_the_nodes_get_every_master_as_a_seed() -> None:
    assert cluster_url([7001, 7002]) == "redis+cluster://127.0.0.1:7001,127.0.0.1:7002"
    assert cluster_url([7001]) == "redis+cluster://127.0.0.1:7001"


def _cluster_info(state: str = "ok", assigned: int = SLOTS, known: int = 3) -> str:
    return (f"cluster_enabled:1\r\ncluster_state:{state}\r\n"
            f"cluster_slots_assigned:{assigned}\r\ncluster_known_nodes:{known}\r\n")


def test_a_cluster_is_ready_when_ok_with_every_slot_and_node() -> None:
    assert cluster_ready(_cluster_info(), 3)
    assert not cluster_ready(_cluster_info(state="fail"), 3)
    assert not cluster_ready(_cluster_info(known=2), 3)  # a MEET not seen yet
    assert not cluster_ready(_cluster_info(assigned=5462), 3)
    assert not cluster_ready("redis 127.0.0.1:1: ConnectionRefusedError()", 1)
    assert cluster_ready(_cluster_info(known=1), 1)


CLUSTER_NODES = """\
e7d1 127.0.0.1:30002@31002,host2 master - 0 1426238316232 2 connected 5461-10922
67ed 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5460->-e7d1]
292f 127.0.0.1:30004@31004 slave 67ed 0 1426238318243 4 connected
9fd8 127.0.0.1:30005@31005 master,fail - 0 1426238316232 5 connected 10923-16383
1b2c :30006@31006 myself,master - 0 0 6 connected 10923-16383
aa11 127.0.0.1:30007@31007 master - 0 0 7 connected
"""


def test_the_shards_are_the_masters_that_hold_slots_in_slot_order() -> None:
    # A replica, a failed master and a master without slots are not read; a node that
    # never learnt its own address is the seed's host.
    assert cluster_masters(CLUSTER_NODES, "10.0.0.9") == [
        ("127.0.0.1", 30001), ("127.0.0.1", 30002), ("10.0.0.9", 30006),
    ]
    assert cluster_masters("", "h") == []


INFO_CPU = """# CPU\r
used_cpu_sys:1.250000\r
used_cpu_user:0.500000\r
used_cpu_sys_children:9.000000\r
used_cpu_user_children:9.000000\r
used_cpu_sys_main_thread:1.000000\r
used_cpu_user_main_thread:0.400000\r
"""
INFO_COMMANDSTATS = """# Commandstats\r
cmdstat_spublish:calls=120,usec=300,usec_per_call=2.50,rejected_calls=0,failed_calls=0\r
cmdstat_info:calls=4,usec=80,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r
"""


def test_info_readings() -> None:
    assert parse_cpu_seconds(INFO_CPU) == pytest.approx(1.75)  # children not added
    assert parse_commandstats(INFO_COMMANDSTATS) == {"spublish": 120, "info": 4}


def test_redis_report_per_shard_and_summed() -> None:
    window = RedisWindow("cluster", True, [Shard("127.0.0.1", 1), Shard("127.0.0.1", 2)])
    window.before = [Reading({"spublish": 10, "info": 2}, 1.0),
                     Reading({"evalsha": 5}, 2.0)]
    window.after = [Reading({"spublish": 310, "info": 4, "time": 300}, 1.3),
                    Reading({"evalsha": 205, "spublish": 200}, 2.1)]
    section = redis_section(window, published=500, measured=2.0)
    first, second = section["shards"]
    assert first["shard"] == "127.0.0.1:1"
    assert first["commands"] == {"spublish": 300, "time": 300}  # own INFO left out
    assert first["commands_per_message"] == 1.2
    assert first["cpu_seconds"] == pytest.approx(0.3)
    assert first["cpu_seconds_per_1000_messages"] == pytest.approx(0.6)
    assert first["cpu_percent"] == pytest.approx(15.0)
    assert second["commands_per_message"] == 0.8
    assert second["cpu_seconds_per_1000_messages"] == pytest.approx(0.2)
    assert section["kind"] == "cluster" and section["private"] is True
    assert section["commands"] == {"spublish": 500, "time": 300, "evalsha": 200}
    assert section["commands_per_message"] == 2.0
    assert section["cpu_seconds"] == pytest.approx(0.4)
    assert section["cpu_seconds_per_1000_messages"] == pytest.approx(0.8)
    assert section["cpu_percent"] == pytest.approx(20.0)


async def test_resp_commands_and_replies() -> None:
    assert encode(["CLUSTER", "MEET", "127.0.0.1", "7001"]) == (
        b"*4\r\n$7\r\nCLUSTER\r\n$4\r\nMEET\r\n$9\r\n127.0.0.1\r\n$4\r\n7001\r\n"
    )
    reader = asyncio.StreamReader()
    reader.feed_data(b"+OK\r\n:42\r\n$5\r\na\r\nbc\r\n$-1\r\n*2\r\n$1\r\nx\r\n:1\r\n"
                     b"-ERR Slot 0 is already busy\r\n")
    reader.feed_eof()
    assert [await read_reply(reader) for _ in range(5)] == ["OK", 42, "a\r\nbc", None, ["x", 1]]
    with pytest.raises(BenchError, match="already busy"):
        await read_reply(reader)
    with pytest.raises(BenchError, match="closed"):
        await read_reply(reader)


async def test_cleanup_runs_to_its_end_when_the_run_is_cancelled() -> None:
    steps: list[str] = []

    async def cleanup() -> None:
        steps.append("start")
        await asyncio.sleep(0.05)
        steps.append("end")

    task = asyncio.ensure_future(_to_the_end(cleanup()))
    await asyncio.sleep(0.01)
    task.cancel()  # SIGTERM while stopping: cleanup still ends, then the cancel goes on
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["start", "end"]


# The subscriber's frame parsing, on the hub's own frames.


def _message(seq: int, sent: int = 1_700_000_000_000_000, ts: int = 1_700_000_000_000,
             channel: str = "bench:fanout") -> p.Message:
    data = json.dumps({"seq": seq, "sent": sent, "pad": "x" * 60}, separators=(",", ":"))
    return p.Message(channel=channel, data=msgspec.Raw(data.encode()), ts=ts)


def _payload(frame: bytes) -> bytes:
    marker = frame[1] & 0x7F
    return frame[4:] if marker == 126 else frame[10:] if marker == 127 else frame[2:]


def _push_payload(seq: int) -> bytes:
    """One Centrifugo push as the hub encodes it (a message, without the frame header)."""
    return _payload(CENTRIFUGO_CODEC.message(_message(seq)))


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def texts(self) -> list[bytes]:
        """The client's text frames so far (unmasked), then forgotten."""
        found = []
        for frame in self.written:
            if frame.startswith(b"GET "):
                continue
            assert frame[0] == 0x81 and frame[1] & 0x80  # final text frame, masked
            length, at = frame[1] & 0x7F, 2
            if length == 126:
                length, at = struct.unpack("!H", frame[2:4])[0], 4
            mask, body = frame[at : at + 4], frame[at + 4 :]
            assert len(body) == length
            found.append(bytes(b ^ mask[k % 4] for k, b in enumerate(body)))
        self.written.clear()
        return found


def _open(kind: type[Subscriber], limit: int = 10,
          sample: int = 1) -> tuple[Subscriber, FakeTransport, ClientState]:
    state = ClientState(sample)
    subscriber = kind(state, "127.0.0.1", 8000, "tok", "bench:fanout", limit)
    transport = FakeTransport()
    subscriber.connection_made(cast(asyncio.BaseTransport, transport))
    request = transport.written[0]
    assert request.startswith(b"GET ") and subscriber.key in request
    subscriber.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Sec-WebSocket-Accept: " + accept_key(subscriber.key) + b"\r\n\r\n")
    return subscriber, transport, state


def test_client_frames_are_masked_and_sized() -> None:
    for size in (0, 5, 125, 126, 300, 70_000):
        frame = client_frame(1, b"a" * size)
        length = frame[1] & 0x7F
        assert frame[0] == 0x81 and frame[1] & 0x80
        assert length == (size if size < 126 else 126 if size < 65536 else 127)
    assert FakeTransport().texts() == []
    transport = FakeTransport()
    transport.write(client_frame(1, b"{}"))
    assert transport.texts() == [b"{}"]


def test_centrifugo_frames_split_at_newlines() -> None:
    assert split_messages(b"{}") == [b"{}"]
    assert split_messages(b'{"push":1}\n{}\n{"push":2}\n') == [b'{"push":1}', b"{}",
                                                               b'{"push":2}']
    assert split_messages(b"") == []


def test_centrifugo_replies_are_classified() -> None:
    assert classify_reply(b"{}") == ("ping", "")
    assert classify_reply(b'{"id":1,"connect":{"client":"c","ping":25,"pong":true}}') == (
        "reply", "1")
    assert classify_reply(b'{"id":2,"subscribe":{}}') == ("reply", "2")
    assert classify_reply(b'{"id":2,"error":{"code":103,"message":"permission denied"}}') == (
        "error", "103 permission denied")
    assert classify_reply(_push_payload(0)) == ("push", "bench:fanout")
    assert classify_reply(b"not json")[0] == "bad"
    assert classify_reply(b"[1]")[0] == "bad"


def test_latency_sample_reads_both_protocols_frames() -> None:
    message = _message(3, sent=111, ts=222)
    ws = _payload(WS_CODEC.message(message))
    centrifugo = _payload(CENTRIFUGO_CODEC.message(message))
    assert b'"ts":"222"' in centrifugo and b'"ts":222' in ws  # a string in `pub.tags`
    assert read_sample(ws) == (111, 222)
    assert read_sample(centrifugo) == (111, 222)
    assert read_sample(b'{"push":{}}') is None


def test_subscriber_classes() -> None:
    assert subscriber_class("ws") is Subscriber
    assert subscriber_class("centrifugo") is CentrifugoSubscriber
    with pytest.raises(ValueError, match="unknown protocol"):
        subscriber_class("sse")


async def test_ws_subscriber_counts_and_checks_frames_split_across_reads() -> None:
    subscriber, transport, state = _open(Subscriber)
    assert b"GET /ws?token=tok " in transport.written[0]
    assert [json.loads(t) for t in transport.texts()] == [
        {"type": "subscribe", "channel": "bench:fanout", "id": 1}]
    subscriber.data_received(text_frame(b'{"type":"subscribed","channel":"bench:fanout"}'))
    assert subscriber.ready.done() and subscriber.live and state.subscribed == 1
    stream = b"".join(WS_CODEC.message(_message(seq)) for seq in (0, 1, 2, 2, 4))
    for k in range(0, len(stream), 7):  # frames split anywhere, headers too
        subscriber.data_received(stream[k : k + 7])
    assert (state.received, subscriber.frames, state.others) == (5, 5, 0)
    order = subscriber.order
    assert (order.duplicates, order.gaps, order.next) == (1, 1, 5)
    assert len(state.latencies_us) == 5 and len(state.hub_latencies_ms) == 5
    subscriber.data_received(bytes((0x89, 2)) + b"hi")  # a WebSocket ping: a masked pong
    assert transport.written[-1][0] == 0x8A


async def test_centrifugo_subscriber_connects_subscribes_and_answers_pings() -> None:
    subscriber, transport, state = _open(CentrifugoSubscriber, sample=2)
    assert b"GET /connection/websocket " in transport.written[0]
    assert b"tok" not in transport.written[0]  # the token goes in `connect`
    assert [json.loads(t) for t in transport.texts()] == [
        {"id": 1, "connect": {"token": "tok", "name": "bench"}}]
    subscriber.data_received(text_frame(
        b'{"id":1,"connect":{"client":"c1","version":"0","ping":25,"pong":true,'
        b'"subs":{"#bench-0":{}}}}'))
    assert [json.loads(t) for t in transport.texts()] == [
        {"id": 2, "subscribe": {"channel": "bench:fanout"}}]
    assert not subscriber.ready.done()
    subscriber.data_received(PING_FRAME)  # a ping before the subscribe reply
    assert transport.texts() == [b"{}"]
    subscriber.data_received(text_frame(b'{"id":2,"subscribe":{}}'))
    assert subscriber.ready.done() and subscriber.live and state.subscribed == 1
    subscriber.countdown = 2  # the sampling phase is random per connection: fix it

    # One push per frame, as the hub sends them, split across reads ...
    stream = b"".join(CENTRIFUGO_CODEC.message(_message(seq)) for seq in (0, 1))
    for k in range(0, len(stream), 11):
        subscriber.data_received(stream[k : k + 11])
    # ... and several in one frame, with a ping among them (and a trailing newline).
    batch = b"\n".join([_push_payload(2), b"{}", _push_payload(3), _push_payload(3)]) + b"\n"
    subscriber.data_received(text_frame(batch) + PING_FRAME)
    assert transport.texts() == [b"{}", b"{}"]
    assert (state.received, subscriber.frames, state.others) == (5, 5, 0)
    order = subscriber.order
    assert (order.duplicates, order.gaps, order.reorders, order.next) == (1, 0, 0, 4)
    assert order.samples == ["duplicate: expected 4, got 3"]
    assert len(state.latencies_us) == 2  # the 2nd and 4th of 5 (`sample` = 2)
    subscriber.data_received(text_frame(b'{"push":{"channel":"bench:fanout","join":{}}}'))
    assert state.others == 1


async def test_centrifugo_subscriber_fails_on_an_error_reply() -> None:
    subscriber, transport, state = _open(CentrifugoSubscriber)
    transport.texts()
    subscriber.data_received(text_frame(b'{"id":1,"error":{"code":109,"message":"expired"}}'))
    assert transport.aborted and state.errors == ["centrifugo error: 109 expired"]
    with pytest.raises(ConnectionError):
        subscriber.ready.result()
