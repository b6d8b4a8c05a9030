"""The fan-out benchmark's own logic (`benchmarks/`, not packaged): the checks that fail a
run (each seq once, offsets +1 in one epoch, seq order), where connections and messages go,
the publisher's concurrent and ordered claims, how a private Redis Cluster's slots are split
and when it is formed, which shards are read, the per-shard Redis report, the bare RESP
client, the chunked HTTP answer, and the subscriber's frame parsing in the three protocols
(`/ws` and Centrifugo's, fed the hub's own encoders' frames, and Socket.IO's) through a fake
transport. No processes are started: a real run is `python -m benchmarks`
(benchmarks/README.md)."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import time
from pathlib import Path
from typing import cast

import msgspec
import pytest

from benchmarks import processes
from benchmarks.cli import build_parser, check_args
from benchmarks.common import BenchError
from benchmarks.httpclient import exchange
from benchmarks.layout import (
    channel_name,
    channel_of,
    messages_on,
    node_of,
    subscribers_per_channel,
)
from benchmarks.publisher import Claim, Publishing
from benchmarks.redis_cluster import SLOTS, cluster_ready, cluster_url, slot_ranges
from benchmarks.redis_shards import Shard, cluster_masters
from benchmarks.redis_stats import (
    Reading,
    RedisWindow,
    parse_commandstats,
    parse_cpu_seconds,
    redis_section,
)
from benchmarks.report import failures
from benchmarks.resp import encode, read_reply
from benchmarks.run import _to_the_end, config_toml
from benchmarks.sequence import OffsetCheck, OnceCheck, SequenceCheck
from benchmarks.subscriber import (
    CentrifugoSubscriber,
    ClientState,
    SocketIOSubscriber,
    Subscriber,
    accept_key,
    classify_reply,
    client_frame,
    read_position,
    read_sample,
    socketio_subscribe,
    split_messages,
    subscribe_position,
    subscriber_class,
)
from hub import protocol as p
from hub.centrifugo_session import CENTRIFUGO_CODEC, PING_FRAME
from hub.cli import main as hub_main
from hub.settings import load_namespaces
from hub.wire import text_frame
from hub.ws_session import WS_CODEC
from tests.support import eventually


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


def _once(check: OnceCheck, seqs: list[int | None]) -> OnceCheck:
    for seq in seqs:  # what the subscriber's hot path does
        if seq is not None and 0 <= seq < check.limit and not check.seen[seq]:
            check.seen[seq] = 1
        else:
            check.unexpected(seq)
    return check


def test_each_seq_once_in_any_order() -> None:
    check = _once(OnceCheck(4), [2, 0, 3, 1])
    assert check.clean and check.received == 4


def test_a_seq_twice_or_unknown_fails_the_once_check() -> None:
    check = _once(OnceCheck(3), [0, 2, 2, 5, -1, None])
    assert (check.duplicates, check.unknown, check.received) == (1, 3, 2)
    assert not check.clean
    assert check.samples[:2] == ["duplicate seq 2", "unknown seq: 5"]


def _offsets(check: OffsetCheck, frames: list[tuple[int | None, str | None]]) -> OffsetCheck:
    for offset, epoch in frames:  # the hot path's case first, as the subscriber does it
        if offset is not None and epoch == check.epoch and offset == check.next:
            check.next = offset + 1
        else:
            check.frame(offset, epoch)
    return check


def _positioned(offset: int = 0, epoch: str = "e1") -> OffsetCheck:
    check = OffsetCheck()
    check.start(offset, epoch, frames_have_epoch=True)
    return check


def test_offsets_from_the_subscribe_position_up_by_one() -> None:
    check = _offsets(_positioned(7), [(8, "e1"), (9, "e1"), (10, "e1")])
    assert check.clean and check.next == 11
    assert check.tail == b',"epoch":"e1"}'


def test_offset_gap_reorder_and_duplicate() -> None:
    check = _offsets(_positioned(), [(1, "e1"), (3, "e1"), (5, "e1"), (2, "e1"), (5, "e1")])
    assert (check.gaps, check.reorders, check.duplicates) == (1, 1, 1)  # 4 never came
    assert not check.clean
    # The first message must follow the subscribe reply's offset: one before it is a gap.
    assert _offsets(_positioned(0), [(2, "e1")]).gaps == 1
    # An offset at or below the subscribed position is a duplicate (it was before us).
    assert _offsets(_positioned(5), [(5, "e1")]).duplicates == 1


def test_another_epoch_or_no_position_fails_the_offset_check() -> None:
    check = _offsets(_positioned(), [(1, "e1"), (1, "e2"), (2, "e1")])
    assert (check.epochs, check.gaps, check.duplicates) == (1, 0, 0) and not check.clean
    unpositioned = OffsetCheck()
    unpositioned.start(None, None, frames_have_epoch=True)
    assert unpositioned.missing == 1 and not unpositioned.positioned
    assert not unpositioned.clean
    check = _offsets(_positioned(), [(1, None), (None, "e1")])
    assert check.missing == 2
    # A Centrifugo push has no epoch: the offset alone is checked.
    centrifugo = OffsetCheck()
    centrifugo.start(3, "e1", frames_have_epoch=False)
    assert centrifugo.tail == b""
    centrifugo.frame(4, None)
    centrifugo.frame(6, None)
    assert (centrifugo.next, centrifugo.gaps, centrifugo.missing) == (7, 1, 0)


def test_a_far_jump_is_counted_without_a_set_of_holes() -> None:
    check = _offsets(_positioned(), [(1, "e1"), (10**12, "e1")])
    assert check.gaps == 10**12 - 2 and not check.holes


def test_failures_name_each_check() -> None:
    result = {"lost": 0, "extra": 0, "publish_errors": 0, "checks": {
        "seq": {"duplicates": 0, "unknown": 0, "connections": 0, "samples": []},
        "offsets": {"duplicates": 0, "gaps": 2, "reorders": 1, "epochs": 0, "missing": 0,
                    "connections": 1, "samples": []},
    }}
    assert failures(result) == [
        "offsets +1 in one epoch failed on 1 connections: 2 gaps, 1 reorders"]


def test_each_channel_has_subscribers_on_every_node() -> None:
    nodes, channels = 2, 1000
    where = {(channel_of(i, nodes, channels), node_of(i, nodes)) for i in range(10_000)}
    assert len(where) == channels * nodes
    assert subscribers_per_channel(10_000, nodes, channels) == [10] * channels


async def test_personal_channels_one_subscriber_each_and_sends_to_users() -> None:
    assert [channel_of(i, 2, 10, personal=True) for i in range(4)] == [0, 1, 2, 3]
    assert subscribers_per_channel(10, 2, 10, personal=True) == [1] * 10
    assert channel_name(7, 10, personal=True) == "@bench-7"
    job = Publishing(messages=4, batch=1, rate=0, payload=60, deadline=time.time() + 60,
                     api_key="k", channels=10, personal=True)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    path, body = job.request(Claim(3, 3, 1, 0, [], done))
    assert path == "/api/send" and body.startswith(b'{"user":"bench-3","data":{"seq":0,')
    path, body = job.request(Claim(2, 2, 2, 0, [], done))
    assert path == "/api/batch"
    assert [command["send"]["user"] for command in json.loads(body)["commands"]] == [
        "bench-2", "bench-3"]


def test_messages_round_robin_over_channels() -> None:
    assert [messages_on(c, 10, 4) for c in range(4)] == [3, 3, 2, 2]
    assert messages_on(5, 3, 10) == 0
    assert channel_name(0, 1) == "bench:fanout"
    assert channel_name(7, 20) == "bench:fanout.7"


async def test_concurrent_claims_do_not_wait() -> None:
    job = Publishing(messages=5, batch=1, rate=0, payload=100, deadline=float("inf"),
                     api_key="k", channels=1)
    claims = []
    while (claim := job.claim()) is not None:
        claims.append(claim)
    assert [(c.channel, c.seq) for c in claims] == [(0, k) for k in range(5)]
    assert all(c.after == [] for c in claims)  # up to --publishers in flight on a channel
    for claim in claims:
        claim.done.set_result(None)


async def test_ordered_claims_wait_for_the_previous_message_of_their_channels() -> None:
    job = Publishing(messages=7, batch=2, rate=0, payload=100, deadline=float("inf"),
                     api_key="k", channels=3, ordered=True)
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
    assert path == "/api/batch"
    sent = [command["publish"] for command in json.loads(body)["commands"]]
    assert [command["channel"] for command in sent] == ["bench:fanout.0", "bench:fanout.1"]
    assert sent[0]["data"]["seq"] == 0 and len(json.dumps(sent[0]["data"])) >= 90
    job.record(claims[0], 200, b'{"replies":[{"publish":{"offset":1}},'
                               b'{"error":{"code":"x"}}]}')
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
    (["--ordered"], None),
    (["--history-size", "0"], "give --ordered"),
    (["--history-size", "0", "--ordered"], None),
    (["--history-ttl", "0"], "--history-ttl > 0"),
    (["--peer", "socketio"], None),
    (["--peer", "socketio", "--nodes", "2", "--redis-server"], None),
    (["--peer", "socketio", "--history-size", "0"], None),  # no offsets to lose there
    (["--peer", "socketio", "--protocol", "centrifugo"], "leave out --protocol"),
    (["--peer", "socketio", "--nodes", "2", "--redis-cluster", "3"], "one Redis server"),
    (["--peer", "socketio", "--redis-url", "redis+cluster://h:1"], "one Redis server"),
    (["--peer", "socketio", "--channels", "2", "--batch", "2"], None),
    (["--personal"], None),
    (["--personal", "--protocol", "centrifugo"], "no --protocol"),
    (["--personal", "--channels", "10", "--batch", "2"], None),
    (["--idle", "60", "--drain", "--source-addresses", "4"], None),
    (["--idle", "-1"], "--idle must be >= 0"),
    (["--source-addresses", "0"], "--source-addresses 1-254"),
])
def test_options(argv: list[str], problem: str | None) -> None:
    found = check_args(build_parser().parse_args(argv))
    assert found == problem if problem is None else problem in (found or "")


def test_the_namespace_gets_history(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(config_toml(100, 600))
    bench = load_namespaces(str(config))["bench"]
    assert (bench.history_size, bench.history_ttl, bench.has_history) == (100, 600, True)
    assert "history" not in config_toml(0, 600)


async def test_a_chunked_answer_is_read_to_its_end() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
    writer = cast(asyncio.StreamWriter, FakeTransport())
    assert await exchange(reader, writer, "h", "POST", "/api/publish", b"{}", "") == (200, b"{}")
    assert await exchange(reader, writer, "h", "POST", "/api/publish", b"{}", "") == (200, b"[]")


def test_the_socketio_peer_says_how_to_install_its_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "SOCKETIO_DIR", tmp_path / "socketio")
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    problem = processes.socketio_missing()
    assert problem is not None and "npm install --prefix" in problem
    assert "socket.io, @socket.io/redis-adapter, redis" in problem
    for name in processes.SOCKETIO_PACKAGES:
        package = tmp_path / "socketio" / "node_modules" / name
        package.mkdir(parents=True)
        (package / "package.json").write_text('{"version": "9.9.9"}')
    assert processes.socketio_missing() is None
    assert processes.socketio_versions()["socket.io"] == "9.9.9"
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "needs Node.js" in (processes.socketio_missing() or "")


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
    released = asyncio.Event()

    async def cleanup() -> None:
        steps.append("start")
        await released.wait()  # still at work when the cancel comes
        steps.append("end")

    task = asyncio.ensure_future(_to_the_end(cleanup()))
    await eventually(lambda: steps, what="the cleanup started")
    task.cancel()  # SIGTERM while stopping: cleanup still ends, then the cancel goes on
    released.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["start", "end"]


# The subscriber's frame parsing, on the hub's own frames.


def _message(seq: int, sent: int = 1_700_000_000_000_000, ts: int = 1_700_000_000_000,
             channel: str = "bench:fanout", offset: int | None = None,
             epoch: str | None = None) -> p.Message:
    data = json.dumps({"seq": seq, "sent": sent, "pad": "x" * 60}, separators=(",", ":"))
    return p.Message(channel=channel, data=msgspec.Raw(data.encode()), ts=ts, offset=offset,
                     epoch=epoch)


def _payload(frame: bytes) -> bytes:
    marker = frame[1] & 0x7F
    return frame[4:] if marker == 126 else frame[10:] if marker == 127 else frame[2:]


def _push_payload(seq: int, offset: int | None = None) -> bytes:
    """One Centrifugo push as the hub encodes it (a message, without the frame header)."""
    return _payload(CENTRIFUGO_CODEC.message(_message(seq, offset=offset)))


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


def _open(kind: type[Subscriber], limit: int = 10, sample: int = 1, offsets: bool = False,
          ordered: bool = False) -> tuple[Subscriber, FakeTransport, ClientState]:
    state = ClientState(sample, offsets=offsets, ordered=ordered)
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


def test_centrifugo_subscribe_position() -> None:
    # The hub leaves a zero offset out (omit_defaults); the epoch is there with history.
    assert subscribe_position(b'{"id":2,"subscribe":{"recoverable":true,"epoch":"ab",'
                              b'"positioned":true}}') == (0, "ab")
    assert subscribe_position(b'{"id":2,"subscribe":{"epoch":"ab","offset":41}}') == (41, "ab")
    assert subscribe_position(b'{"id":2,"subscribe":{}}') == (None, None)
    assert subscribe_position(b"[]") == (None, None)


def test_latency_sample_reads_both_protocols_frames() -> None:
    message = _message(3, sent=111, ts=222)
    ws = _payload(WS_CODEC.message(message))
    centrifugo = _payload(CENTRIFUGO_CODEC.message(message))
    assert b'"ts":"222"' in centrifugo and b'"ts":222' in ws  # a string in `pub.tags`
    assert read_sample(ws) == (111, 222)
    assert read_sample(centrifugo) == (111, 222)
    assert read_sample(b'{"push":{}}') is None


def test_the_position_is_the_hubs_after_data() -> None:
    ws = _payload(WS_CODEC.message(_message(3, offset=12, epoch="e9")))
    assert ws.endswith(b',"offset":12,"epoch":"e9"}')  # what the hot path relies on
    assert read_position(ws) == (12, "e9")
    assert read_position(_push_payload(3, offset=12)) == (12, None)
    assert read_position(b'{"data":{"seq":1}}') == (None, None)


def test_subscriber_classes() -> None:
    assert subscriber_class("ws") is Subscriber
    assert subscriber_class("centrifugo") is CentrifugoSubscriber
    assert subscriber_class("socketio") is SocketIOSubscriber
    with pytest.raises(ValueError, match="unknown protocol"):
        subscriber_class("sse")


def _ws_frames(seq_offsets: list[tuple[int, int]], epoch: str = "e1") -> bytes:
    return b"".join(WS_CODEC.message(_message(seq, offset=offset, epoch=epoch))
                    for seq, offset in seq_offsets)


async def test_ws_subscriber_counts_and_checks_frames_split_across_reads() -> None:
    subscriber, transport, state = _open(Subscriber, ordered=True)
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
    assert order is not None
    assert (order.duplicates, order.gaps, order.next) == (1, 1, 5)
    assert (subscriber.once.duplicates, subscriber.once.received) == (1, 4)
    assert len(state.latencies_us) == 5 and len(state.hub_latencies_ms) == 5
    subscriber.data_received(bytes((0x89, 2)) + b"hi")  # a WebSocket ping: a masked pong
    assert transport.written[-1][0] == 0x8A


async def test_ws_subscriber_checks_offsets_of_concurrent_publishers() -> None:
    subscriber, _, state = _open(Subscriber, limit=6, offsets=True)
    assert subscriber.order is None  # seq order is not defined with concurrent publishers
    subscriber.data_received(text_frame(
        p.encode(p.Subscribed(channel="bench:fanout", id=1, offset=20, epoch="e1"))))
    offsets = subscriber.offsets
    assert offsets is not None and offsets.positioned and offsets.next == 21
    # seq in any order (publishers overtook one another), offsets up by one: clean.
    stream = _ws_frames([(1, 21), (0, 22), (3, 23), (2, 24)])
    for k in range(0, len(stream), 13):
        subscriber.data_received(stream[k : k + 13])
    assert offsets.clean and subscriber.once.clean and offsets.next == 25
    # A skipped offset, a late one, one twice, one of another epoch:
    subscriber.data_received(_ws_frames([(4, 26)]) + _ws_frames([(5, 25)])
                             + _ws_frames([(5, 26)]) + _ws_frames([(4, 27)], epoch="e2"))
    assert (offsets.gaps, offsets.reorders, offsets.duplicates, offsets.epochs) == (0, 1, 1, 1)
    assert (subscriber.once.duplicates, state.received) == (2, 8)
    assert offsets.samples[0] == "gap: expected offset 25, got 26"


async def test_ws_subscriber_without_a_position_fails_the_offset_check() -> None:
    subscriber, _, _ = _open(Subscriber, offsets=True)
    subscriber.data_received(text_frame(b'{"type":"subscribed","channel":"bench:fanout"}'))
    subscriber.data_received(WS_CODEC.message(_message(0)))
    assert subscriber.offsets is not None and subscriber.offsets.missing == 1
    assert subscriber.once.clean


async def test_centrifugo_subscriber_connects_subscribes_and_answers_pings() -> None:
    subscriber, transport, state = _open(CentrifugoSubscriber, sample=2, ordered=True)
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
    assert order is not None
    assert (order.duplicates, order.gaps, order.reorders, order.next) == (1, 0, 0, 4)
    assert order.samples == ["duplicate: expected seq 4, got 3"]
    assert subscriber.once.duplicates == 1
    assert len(state.latencies_us) == 2  # the 2nd and 4th of 5 (`sample` = 2)
    subscriber.data_received(text_frame(b'{"push":{"channel":"bench:fanout","join":{}}}'))
    assert state.others == 1


async def test_centrifugo_subscriber_checks_offsets_from_the_subscribe_reply() -> None:
    subscriber, transport, state = _open(CentrifugoSubscriber, limit=4, offsets=True)
    transport.texts()
    subscriber.data_received(text_frame(b'{"id":1,"connect":{"client":"c1"}}'))
    subscriber.data_received(text_frame(
        b'{"id":2,"subscribe":{"recoverable":true,"epoch":"e1","offset":9,"positioned":true}}'))
    offsets = subscriber.offsets
    assert offsets is not None and offsets.positioned and offsets.next == 10
    batch = b"\n".join([_push_payload(1, 10), _push_payload(0, 11), _push_payload(2, 13)])
    subscriber.data_received(text_frame(batch))
    assert (offsets.gaps, offsets.reorders, offsets.duplicates, offsets.next) == (1, 0, 0, 14)
    assert subscriber.once.clean and state.received == 3


async def test_centrifugo_subscriber_fails_on_an_error_reply() -> None:
    subscriber, transport, state = _open(CentrifugoSubscriber)
    transport.texts()
    subscriber.data_received(text_frame(b'{"id":1,"error":{"code":109,"message":"expired"}}'))
    assert transport.aborted and state.errors == ["centrifugo error: 109 expired"]
    with pytest.raises(ConnectionError):
        subscriber.ready.result()


def _socketio_message(seq: int, sent: int = 1_700_000_000_000_000) -> bytes:
    data = json.dumps({"seq": seq, "sent": sent, "pad": "x" * 60}, separators=(",", ":"))
    return text_frame(b'42["message",' + data.encode() + b"]")


async def test_socketio_subscriber_connects_joins_with_an_ack_and_answers_pings() -> None:
    subscriber, transport, state = _open(SocketIOSubscriber, limit=3)
    assert b"GET /socket.io/?EIO=4&transport=websocket " in transport.written[0]
    assert transport.texts() == []  # the server speaks first
    subscriber.data_received(text_frame(
        b'0{"sid":"s1","upgrades":[],"pingInterval":25000,"pingTimeout":20000}'))
    assert transport.texts() == [b"40"]
    subscriber.data_received(text_frame(b'40{"sid":"x1"}'))
    assert transport.texts() == [socketio_subscribe("bench:fanout")]
    assert socketio_subscribe("bench:fanout") == b'421["subscribe","bench:fanout"]'
    subscriber.data_received(text_frame(b"2"))  # an Engine.IO ping before the ack
    assert transport.texts() == [b"3"]
    assert not subscriber.ready.done()
    subscriber.data_received(text_frame(b"431[]"))
    assert subscriber.ready.done() and subscriber.live and state.subscribed == 1
    assert subscriber.offsets is None  # no offsets there

    stream = _socketio_message(2, sent=5) + text_frame(b"2") + _socketio_message(0)
    for k in range(0, len(stream), 9):
        subscriber.data_received(stream[k : k + 9])
    subscriber.data_received(_socketio_message(2) + _socketio_message(1))
    assert transport.texts() == [b"3"]
    assert (state.received, state.others) == (4, 0)
    assert (subscriber.once.duplicates, subscriber.once.received) == (1, 3)
    assert len(state.latencies_us) == 4 and state.hub_latencies_ms == []  # no hub `ts`


async def test_socketio_subscriber_fails_on_a_connect_error() -> None:
    subscriber, transport, state = _open(SocketIOSubscriber)
    subscriber.data_received(text_frame(b'0{"sid":"s1"}') + text_frame(b'44{"message":"no"}'))
    assert transport.aborted and state.errors[0].startswith("socket.io refused: 44")
    with pytest.raises(ConnectionError):
        subscriber.ready.result()


def test_every_benchmark_command_in_the_docs_parses() -> None:
    """Each `python -m benchmarks ...` that README.md, docs/ and benchmarks/README.md show a
    reader is a command the benchmark takes (placeholders such as N read as numbers)."""
    import re
    import shlex

    repo = Path(__file__).resolve().parents[1]
    pages = [repo / "README.md", repo / "benchmarks" / "README.md",
             *sorted((repo / "docs").glob("*.md"))]
    found = 0
    for page in pages:
        text = page.read_text().replace("\\\n", " ")  # continued shell lines, joined
        for command in re.findall(r"python -m benchmarks( [^`\n|>&]*)", text):
            words = shlex.split(command, comments=True)
            if "--client" in words:  # the client processes' own entry, not a reader's
                continue
            argv = [re.sub(r"^[A-Z]+$", "7", word) for word in words]
            args = build_parser().parse_args(argv)
            check_args(args)
            found += 1
    assert found >= 5


def test_a_run_reports_connects_idle_cost_and_the_drain() -> None:
    """A real run with `--idle` and `--drain`: the node's own drain (here 0 + 1 s) closes
    every connection with 1012 and exits; connections come from two source addresses."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update({"HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "1"})
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--subscribers", "40", "--messages", "3",
         "--idle", "1", "--drain", "--source-addresses", "2", "--settle", "0", "--json"],
        env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["received"] == 120 and not result["failures"]
    assert result["connect"]["connections"] == 40 and result["connect"]["per_second"] > 0
    assert result["idle"]["seconds"] >= 1 and len(result["idle"]["node_cpu_percent"]) == 1
    drain = result["drain"]
    assert drain["closes"] == {"1012": 40} and drain["still_open"] == 0
    (exit_seconds,) = drain["node_exit_seconds"]
    assert exit_seconds is not None and 0 < drain["last_closed_seconds"] <= exit_seconds
