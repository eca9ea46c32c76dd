"""SSP and ASP end to end, run-time control, and the async work queue."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import find, find_all, metrics_path, read_jsonl, still_running, wait_until

from hetero_ps.server.loops.async_sgd import WorkQueue
from hetero_ps.testing import LocalCluster

DIGITS_TRAIN = 1438


def test_work_queue_hands_out_every_sample_once_per_epoch():
    q = WorkQueue(n=10, epochs=2, max_samples=20)
    got, vanished = [], False
    while (piece := q.take(3)) is not None:
        got.append(piece)
        if len(got) == 2 and not vanished:
            q.give_back(*got.pop())  # a worker vanished with this slice
            vanished = True
    seen = {(e, o + i) for e, o, c in got for i in range(c)}
    assert seen == {(e, i) for e in range(2) for i in range(10)}
    assert sum(c for _, _, c in got) == 20 and q.exhausted


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ssp", "asp"])
def test_stale_modes_converge_and_ssp_respects_its_bound(tmp_path, mode):
    args = [
        "--world-size",
        "3",
        "--no-local-worker",
        "--dataset",
        "digits",
        "--global-batch-size",
        "64",
        "--epochs",
        "4",
        "--lr",
        "0.05",
        "--sync",
        mode,
        "--staleness",
        "1",
        "--experiment",
        mode,
        "--enable-load-balancing",
        "--load-balance-policy",
        "dynamic",
        "--rebalance-interval",
        "5",
    ]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2", "--simulate-slowdown", "3"]]) as c:
        assert c.wait(timeout=240) == 0, c.output("server")
        exp, summary = c.experiment_dir(), c.summary()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert sum(r["samples"] for r in steps) == 4 * DIGITS_TRAIN  # every sample once per epoch
    assert {r["worker"] for r in steps} == {1, 2}
    assert all(r["tau"] >= 0 and 0 < r["scale"] <= 1 for r in steps)
    assert any(r["tau"] > 0 for r in steps), "two workers at their own pace must produce stale updates"
    if mode == "ssp":
        assert max(r["staleness"] for r in steps) <= 1
    assert summary["final_eval_accuracy"] >= 0.9, summary


def _share_of(rank: str, schedule: dict) -> float:
    """The fraction of the global batch a schedule event gives ``rank`` (absent: none)."""
    sizes = schedule["sizes"]
    return sizes.get(rank, 0) / sum(sizes.values())


@pytest.mark.slow
def test_a_worker_slowed_mid_run_gets_a_smaller_share(tmp_path):
    # Asserts on the scheduler's decisions (schedule events), not on step records: when the
    # slowdown lands and how many steps the reaction takes depend on the machine's speed.
    args = [
        "--world-size",
        "3",
        "--no-local-worker",
        "--dataset",
        "digits",
        "--global-batch-size",
        "128",
        "--epochs",
        "60",
        "--enable-load-balancing",
        "--load-balance-policy",
        "dynamic",
        "--rebalance-interval",
        "5",
        "--experiment",
        "slowed",
    ]  # long enough: the test stops it
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"]]) as c:
        events_path = metrics_path(tmp_path, "slowed", "events")

        def running():
            return still_running(c.server, lambda: c.output("server"))

        wait_until(
            lambda: running() and find(read_jsonl(events_path, missing_ok=True), event="schedule", policy="dynamic"),
            timeout=120,
            what="a schedule from measured speeds",
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hetero_ps.control",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(c.port),
                "--rank",
                "2",
                "--simulate-slowdown",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=c.env,
        )
        assert r.returncode == 0, r.stderr
        seen = {}

        def smaller_share_after_the_control():
            running()
            events = read_jsonl(events_path)
            at = next(i for i, e in enumerate(events) if e["event"] == "control")  # logged before the ack
            before = [_share_of("2", e) for e in find_all(events[:at], event="schedule")]
            seen["reference"] = sum(before) / len(before)
            seen["after"] = [_share_of("2", e) for e in find_all(events[at + 1 :], event="schedule")]
            return any(a < 0.6 * seen["reference"] for a in seen["after"])

        wait_until(
            smaller_share_after_the_control,
            timeout=150,
            what=lambda: f"rank 2's share below 0.6 x its share before the slowdown; rank 2's shares: {seen}",
        )


def test_control_for_unknown_rank_is_a_clear_error(tmp_path):
    args = ["--world-size", "2", "--no-local-worker", "--dataset", "digits", "--epochs", "1", "--experiment", "ctl"]
    with LocalCluster(tmp_path, args) as c:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hetero_ps.control",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(c.port),
                "--rank",
                "7",
                "--simulate-slowdown",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=c.env,
        )
    assert r.returncode == 1 and "rank 7" in r.stderr, r.stderr
