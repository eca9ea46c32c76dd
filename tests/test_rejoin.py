"""Workers outlive their master: when it dies mid-job they wait for it and rejoin with their rank."""

from __future__ import annotations

import os

import pytest
from conftest import metrics_path, read_jsonl, still_running, wait_until

from hetero_ps.testing import LocalCluster

pytestmark = pytest.mark.slow
JOB = ["--world-size", "3", "--no-local-worker", "--no-dashboard", "--global-batch-size", "32"]


def test_workers_rejoin_a_master_restarted_after_a_crash_and_finish_its_job(tmp_path):
    workers = [["--rank", "1", "--reconnect-timeout", "120"], ["--rank", "2", "--reconnect-timeout", "120"]]
    with LocalCluster(tmp_path, [*JOB, "--epochs", "50", "--experiment", "first"], workers=workers) as c:
        steps = metrics_path(tmp_path, "first", "steps")
        first = c.server
        wait_until(
            lambda: still_running(first, lambda: c.output("server")) and len(read_jsonl(steps, missing_ok=True)) >= 3,
            timeout=180,
            what="three steps of the first master",
        )
        c.restart_master([*JOB, "--max-steps", "5", "--experiment", "second"])  # kill -9, then a new one
        assert c.wait(timeout=180) == 0, c.output("server2")
        for w in c.workers:
            assert w.wait(timeout=60) == 0  # let go by the second master's BYE
        second = read_jsonl(os.path.join(c.experiment_dir("second"), "metrics", "steps.jsonl"))
        joined = read_jsonl(os.path.join(c.experiment_dir("second"), "metrics", "events.jsonl"))
        outputs = [c.output("worker0"), c.output("worker1")]

    assert [s["step"] for s in second] == [0, 1, 2, 3, 4]
    assert sorted(e["rank"] for e in joined if e["event"] == "worker_joined") == [1, 2]  # same ranks
    for rank, out in zip((1, 2), outputs):
        assert f"lost the master at 127.0.0.1:{c.port}" in out and f"rejoining as rank {rank}" in out, out
