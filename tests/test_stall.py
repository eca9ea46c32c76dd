"""A stalled worker (a closed laptop lid: SIGSTOP) costs the job seconds, not minutes."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import find, find_all, metrics_path, read_jsonl, still_running, wait_until

from hetero_ps.testing import LocalCluster

pytestmark = pytest.mark.slow


def test_a_stopped_worker_is_suspended_its_step_redone_by_the_others_and_it_rejoins_when_continued(tmp_path):
    args = ["--world-size", "4", "--no-local-worker", "--no-dashboard", "--epochs", "500", "--experiment", "stall"]
    args += ["--stall-factor", "4", "--stall-floor", "2"]
    args += ["--worker-timeout", "120"]  # stopped longer than the default 30 s on a loaded machine: suspended, not lost
    args += ["--compression", "topk:0.1"]  # error feedback: its discarded push must not be sent again later
    workers = [["--rank", str(r), "--simulate-slowdown", "4", "--torch-threads", "1"] for r in (1, 2, 3)]
    with LocalCluster(tmp_path, args, workers=workers) as c:
        events, steps = metrics_path(tmp_path, "stall", "events"), metrics_path(tmp_path, "stall", "steps")
        alive = lambda: still_running(c.server, lambda: c.output("server"))  # noqa: E731

        wait_until(lambda: alive() and len(read_jsonl(steps, missing_ok=True)) >= 6, 120, what="six steps")
        stopped = c.workers[1]  # rank 2
        os.killpg(stopped.pid, signal.SIGSTOP)
        try:
            suspended = wait_until(
                lambda: alive() and find(read_jsonl(events, missing_ok=True), event="worker_suspended", rank=2),
                timeout=120,
                what="rank 2 suspended",
            )
            # The others go on without it: steps complete while it is still stopped.
            after = suspended["step"]
            wait_until(
                lambda: alive() and len(read_jsonl(steps, missing_ok=True)) >= after + 3, 120, what="3 more steps"
            )
        finally:
            os.killpg(stopped.pid, signal.SIGCONT)
        resumed = wait_until(
            lambda: alive() and find(read_jsonl(events, missing_ok=True), event="worker_resumed", rank=2),
            timeout=120,
            what="rank 2 answering again",
        )
        wait_until(  # back at work; the run is long on purpose, so it is still going: no need to see it end
            lambda: alive() and any("2" in s["workers"] for s in read_jsonl(steps) if s["step"] > resumed["step"]),
            timeout=120,
            what="a step with rank 2 after it answered",
        )
        records = read_jsonl(steps)
        log = read_jsonl(events)
        said = c.output("worker1")

    assert suspended["waited_s"] >= suspended["limit_s"] >= 2.0
    assert {e["rank"] for e in find_all(log, event="worker_suspended")} == {2}  # never one that had finished
    redone = find(records, step=after)
    assert redone["attempts"] >= 2 and "2" not in redone["workers"]  # its samples went to the others
    assert sum(w["batch"] for w in redone["workers"].values()) == redone["samples"]  # none lost
    assert not find_all(log, event="worker_lost")
    assert [s["step"] for s in records] == list(range(len(records)))
    # The master told it, with its next SCHEDULE, that its push for the redone step was thrown away.
    assert f"our push for step {after} was discarded (redone by the others): residual restored" in said, said[-3000:]
