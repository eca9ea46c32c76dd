"""--compression auto: the link measurement and the choice of codecs (unit), and a run where a
paced worker is moved to top-k while it trains (end to end)."""

from __future__ import annotations

import pytest
from conftest import find_all, metrics_path, read_jsonl

from hetero_ps.server import codec_choice
from hetero_ps.server.codec_choice import LADDER, MIN_SPAN_BYTES, LinkChoice
from hetero_ps.testing import LocalCluster
from hetero_ps.wire.messages import chunk_layout

CHUNKS = chunk_layout(10_500_000, 4 << 20)  # the 10.5 M-parameter model of the links benchmark
MB = 1 << 20


def _measured(link: LinkChoice, rate: float, *, samples: int = 3, step: int = 0) -> None:
    """Feed ``samples`` pushes of 11 chunks of 1 MiB arriving at ``rate`` bytes/s."""
    for s in range(step, step + samples):
        for i in range(11):
            link.on_push(s, 0, MB, now=100.0 * s + i * MB / rate)
        link.on_report(s, 0, encode_s=0.0)


def test_a_push_span_gives_the_link_rate():
    link = LinkChoice("auto", "auto", CHUNKS)
    for t in (5.0, 5.1, 5.2, 5.4):
        link.on_push(3, 1, MB, now=t)
    assert link.on_report(3, 1, encode_s=0.0) == pytest.approx(3 * MB / 0.4)
    assert link.rate == pytest.approx(3 * MB / 0.4)


@pytest.mark.parametrize(
    "why, pushes, report",
    [
        ("one chunk says nothing of the link", [(0, 0, MB, 1.0)], (0, 0, 0.0)),
        ("too few bytes after the first chunk", [(0, 0, MB, 1.0), (0, 0, MIN_SPAN_BYTES - 1, 2.0)], (0, 0, 0.0)),
        ("the encoder set the pace", [(0, 0, MB, 1.0), (0, 0, MB, 1.1), (0, 0, MB, 1.2)], (0, 0, 0.5)),
        ("a report for another attempt", [(0, 0, MB, 1.0), (0, 0, MB, 2.0)], (0, 1, 0.0)),
    ],
)
def test_spans_that_do_not_measure_the_link_are_not_samples(why, pushes, report):
    link = LinkChoice("auto", "auto", CHUNKS)
    for step, attempt, nbytes, t in pushes:
        link.on_push(step, attempt, nbytes, now=t)
    assert link.on_report(*report) is None, why
    assert link.rate is None


def test_a_fast_link_stays_uncompressed_and_a_slow_one_gets_top_k():
    loopback, wifi = LinkChoice("auto", "auto", CHUNKS), LinkChoice("auto", "auto", CHUNKS)
    _measured(loopback, 2e9)
    _measured(wifi, 100e6 / 8)
    assert loopback.decide(compute_s=0.3) == ""
    assert (loopback.push, loopback.pull) == ("none", "none")
    why = wifi.decide(compute_s=0.3)
    assert (wifi.push, wifi.pull) == ("topk:0.01", "topk:0.01")
    assert "link 100 Mbit/s: 6.72 s of transfer per step before, 0.134 s now" in why and "more compression" in why
    # Gigabit Ethernet against a long compute step: the least compression whose transfer fits half of it.
    lan = LinkChoice("auto", "auto", CHUNKS)
    _measured(lan, 1e9 / 8)
    lan.decide(compute_s=1.0)
    assert lan.push == "fp16" and lan.transfer_s(LADDER.index("fp16")) <= 0.5 < lan.transfer_s(LADDER.index("none"))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_an_adaptive_optimizer_stops_at_int8(optimizer):
    wifi = LinkChoice("auto", "auto", CHUNKS, codec_choice.ladder_for(optimizer))
    _measured(wifi, 20e6 / 8)  # even where int8 does not fit the budget
    assert "more compression" in wifi.decide(compute_s=0.3)
    assert (wifi.push, wifi.pull) == ("int8", "int8")
    assert codec_choice.ladder_for("momentum") == codec_choice.ladder_for(None) == LADDER


def test_two_samples_are_not_enough_and_a_fixed_direction_keeps_its_codec():
    link = LinkChoice("fp16", "auto", CHUNKS)
    _measured(link, 100e6 / 8, samples=2)
    assert link.decide(compute_s=0.3) == ""
    _measured(link, 100e6 / 8, samples=1, step=2)
    assert link.decide(compute_s=0.3)
    assert (link.push, link.pull) == ("fp16", "topk:0.01")  # only the pull is auto
    fixed = LinkChoice("int8", "none", CHUNKS)
    _measured(fixed, 1e6)
    assert fixed.decide(compute_s=0.1) == "" and (fixed.push, fixed.pull) == ("int8", "none")


def test_one_odd_span_is_outvoted():
    link = LinkChoice("auto", "auto", CHUNKS)
    _measured(link, 2e9, samples=1)
    _measured(link, 2e6, samples=1, step=1)  # a hiccup on loopback: 1000x slower for one push
    _measured(link, 2e9, samples=1, step=2)
    assert link.rate == pytest.approx(2e9)
    assert link.decide(compute_s=0.3) == "" and link.push == "none"


def test_going_back_to_less_compression_needs_room_to_spare():
    link = LinkChoice("auto", "auto", CHUNKS)
    _measured(link, 100e6 / 8)
    link.decide(compute_s=0.3)
    assert link.push == "topk:0.01"
    compute = 2.0 * link.transfer_s(LADDER.index("int8"))  # int8 would just fit the 0.5 budget...
    assert link.decide(compute_s=compute) == ""  # ...but not the 0.2 one needed to go back
    assert link.push == "topk:0.01"
    assert "less compression: it fits 0.2 × compute" in link.decide(compute_s=10 * compute)
    assert link.push == "none"


def test_auto_is_not_a_codec_anywhere_else():
    assert codec_choice.is_auto(" Auto ") and not codec_choice.is_auto("topk:0.01")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, codec, smaller", [("momentum", "topk:0.01", 20), ("adamw", "int8", 3)])
def test_a_worker_on_a_slow_link_is_moved_to_top_k_while_the_job_trains(tmp_path, optimizer, codec, smaller):
    """... or to int8 with an adaptive optimizer (codec_choice.ladder_for)."""
    args = ["--world-size", "3", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--optimizer", optimizer]
    args += ["--epochs", "2", "--global-batch-size", "64", "--no-dashboard", "--experiment", "auto"]
    args += ["--compression", "auto", "--pull-compression", "auto", "--chunk-mb", "0.0625"]
    args += ["--enable-load-balancing", "--load-balance-policy", "dynamic"]
    # (even int8's 0.6 s a step is 30x the other's whole step: standby would be right, and is tested below)
    args += ["--no-standby"]
    workers = [["--rank", "1", "--torch-threads", "1"], ["--rank", "2", "--torch-threads", "1"]]
    workers[1] += ["--simulate-bandwidth", "4"]  # 4 Mbit/s: the 600 KB model takes 1.2 s each way uncompressed
    with LocalCluster(tmp_path, args, workers=workers) as c:
        assert c.wait(timeout=600) == 0, c.output("server")[-3000:]
        summary = c.summary()
    events = read_jsonl(metrics_path(tmp_path, "auto", "events"))
    moves = find_all(events, event="codec_choice", rank=2)
    assert moves and (moves[-1]["push"], moves[-1]["pull"]) == (codec, codec), moves
    assert "link" in moves[0]["reason"] and "compute" in moves[0]["reason"]
    # Its pull at the move is its one full resync (as many bytes as the uncompressed pull it replaces).
    assert len(find_all(events, event="pull_resync", rank=2, reason="first pull")) == 1, events
    steps = read_jsonl(metrics_path(tmp_path, "auto", "steps"))
    moved_at = moves[0]["step"]
    before = [s["workers"]["2"]["bytes_out"] for s in steps if s["step"] < moved_at and "2" in s["workers"]]
    after = [s["workers"]["2"]["bytes_out"] for s in steps if s["step"] > moved_at + 1 and "2" in s["workers"]]
    assert before and after and max(after) * smaller < min(before), (before, after)
    assert summary["final_eval_accuracy"] >= 0.8, summary


@pytest.mark.slow
def test_a_worker_whose_link_would_slow_every_step_stands_by_and_the_others_train(tmp_path):
    """Issue 12's invariant, as the scheduler decides it: a worker whose link costs more than the
    others' whole step gets no share (standby, with the reason), and every step still trains B samples."""
    args = ["--world-size", "4", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--epochs", "50", "--max-steps", "14", "--global-batch-size", "64", "--no-dashboard"]
    args += ["--experiment", "standby", "--enable-load-balancing", "--load-balance-policy", "dynamic"]
    args += ["--standby-role", "idle"]  # (its local rounds: tests/test_local_steps.py)
    workers = [["--rank", str(r), "--torch-threads", "1"] for r in (1, 2, 3)]
    workers[2] += ["--simulate-bandwidth", "3"]  # 3 Mbit/s: the 600 KB model takes ~1.6 s each way
    with LocalCluster(tmp_path, args, workers=workers) as c:
        assert c.wait(timeout=600) == 0, c.output("server")[-3000:]
    events = read_jsonl(metrics_path(tmp_path, "standby", "events"))
    roles = find_all(events, event="worker_role", rank=3)
    assert roles and roles[0]["role"] == "standby" and "lengthen every step" in roles[0]["reason"], roles
    steps = read_jsonl(metrics_path(tmp_path, "standby", "steps"))
    assert len(steps) == 14 and all(s["samples"] == 64 for s in steps)
    after = [s for s in steps if s["step"] > roles[0]["step"]]
    assert after and all(sorted(s["workers"]) == ["1", "2"] for s in after), after
