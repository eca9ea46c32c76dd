"""SSP and ASP end to end, run-time control, and the async work queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hetero_ps.testing import LocalCluster
from hetero_ps.server.loops.async_sgd import WorkQueue

DIGITS_TRAIN = 1438


def _steps(exp: str) -> list[dict]:
    with open(os.path.join(exp, "metrics", "steps.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_work_queue_hands_out_every_sample_once_per_epoch():
    q = WorkQueue(n=10, epochs=2, max_samples=20)
    got, vanished = [], False
    while (piece := q.take(3)) is not None:
        got.append(piece)
        if len(got) == 2 and not vanished:
            q.give_back(*got.pop())   # a worker vanished with this slice
            vanished = True
    seen = {(e, o + i) for e, o, c in got for i in range(c)}
    assert seen == {(e, i) for e in range(2) for i in range(10)}
    assert sum(c for _, _, c in got) == 20 and q.exhausted


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ssp", "asp"])
def test_stale_modes_converge_and_ssp_respects_its_bound(tmp_path, mode):
    args = ["--world-size", "3", "--no-local-worker", "--dataset", "digits", "--global-batch-size", "64",
            "--epochs", "4", "--lr", "0.05", "--sync", mode, "--staleness", "1", "--experiment", mode,
            "--enable-load-balancing", "--load-balance-policy", "dynamic", "--rebalance-interval", "5"]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2", "--simulate-slowdown", "3"]]) as c:
        assert c.wait(timeout=240) == 0, c.output("server")
        exp, summary = c.experiment_dir(), c.summary()
    steps = _steps(exp)
    assert sum(r["samples"] for r in steps) == 4 * DIGITS_TRAIN   # every sample once per epoch
    assert {r["worker"] for r in steps} == {1, 2}
    assert all(r["tau"] >= 0 and 0 < r["scale"] <= 1 for r in steps)
    assert any(r["tau"] > 0 for r in steps), "two workers at their own pace must produce stale updates"
    if mode == "ssp":
        assert max(r["staleness"] for r in steps) <= 1
    assert summary["final_eval_accuracy"] >= 0.9, summary


@pytest.mark.slow
def test_a_worker_slowed_mid_run_gets_a_smaller_share(tmp_path):
    interval = 5
    args = ["--world-size", "3", "--no-local-worker", "--dataset", "digits", "--global-batch-size", "128",
            "--epochs", "3", "--enable-load-balancing", "--load-balance-policy", "dynamic",
            "--rebalance-interval", str(interval), "--experiment", "slowed"]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"]]) as c:
        steps_path = os.path.join(tmp_path, "experiments", "slowed", "metrics", "steps.jsonl")
        deadline = time.monotonic() + 90
        while not (os.path.exists(steps_path) and sum(1 for _ in open(steps_path)) >= 8):
            assert time.monotonic() < deadline, c.output("server")
            time.sleep(0.1)
        r = subprocess.run([sys.executable, "-m", "hetero_ps.control", "--master-addr", "127.0.0.1",
                            "--master-port", str(c.port), "--rank", "2", "--simulate-slowdown", "4"],
                           capture_output=True, text=True, timeout=30, env=c.env)
        assert r.returncode == 0, r.stderr
        changed_at = sum(1 for _ in open(steps_path))
        assert c.wait(timeout=240) == 0, c.output("server")
        steps = _steps(c.experiment_dir())
    share = lambda rec: rec["workers"]["2"]["batch"] / rec["samples"]   # noqa: E731
    before = share(steps[changed_at - 1])
    after = share(steps[changed_at + 2 * interval + 1])
    assert after < 0.75 * before, (before, after)


def test_control_for_unknown_rank_is_a_clear_error(tmp_path):
    args = ["--world-size", "2", "--no-local-worker", "--dataset", "digits", "--epochs", "1",
            "--experiment", "ctl"]
    with LocalCluster(tmp_path, args) as c:
        r = subprocess.run([sys.executable, "-m", "hetero_ps.control", "--master-addr", "127.0.0.1",
                            "--master-port", str(c.port), "--rank", "7", "--simulate-slowdown", "2"],
                           capture_output=True, text=True, timeout=30, env=c.env)
    assert r.returncode == 1 and "rank 7" in r.stderr, r.stderr
