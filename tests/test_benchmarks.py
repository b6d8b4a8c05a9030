"""The fan-out benchmark's own logic (`benchmarks/`, not packaged): the order check that
fails a run, where connections and messages go, and the publisher's per-channel order.
No processes are started: a real run is `python -m benchmarks` (benchmarks/README.md)."""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import build_parser, check_args
from benchmarks.layout import (
    channel_name,
    channel_of,
    messages_on,
    node_of,
    subscribers_per_channel,
)
from benchmarks.publisher import Publishing
from benchmarks.sequence import SequenceCheck
from hub.cli import main as hub_main


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
    (["--nodes", "2"], "needs --redis-url or --redis-server"),
])
def test_options(argv: list[str], problem: str | None) -> None:
    found = check_args(build_parser().parse_args(argv))
    assert found == problem if problem is None else problem in (found or "")


def test_hub_bench_points_to_the_new_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert hub_main(["bench", "--subscribers", "10"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err
