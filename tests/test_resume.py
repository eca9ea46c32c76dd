"""A master killed mid-run and started again with --resume finishes the same run, to the same parameters."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import find, metrics_path, read_jsonl, still_running, wait_until

from hetero_ps.config import JobConfig
from hetero_ps.testing import LocalCluster
from hetero_ps.training import data

pytestmark = pytest.mark.slow
JOB = ["--world-size", "3", "--no-local-worker", "--no-dashboard", "--epochs", "2"]
JOB += ["--global-batch-size", "32", "--worker-batch-sizes", "1:12,2:20"]  # BSP, a fixed split
WORKERS = [["--rank", str(r), "--torch-threads", "1", "--reconnect-timeout", "120"] for r in (1, 2)]


def _run(tmp_path, name: str, crash_at: int = 0, job=JOB, every: int = 10):
    """The job to its end; with ``crash_at``, its master is killed -9 past that step and resumed."""
    args = [*job, "--experiment", name, "--checkpoint-every", str(every)]
    (tmp_path / name).mkdir()
    with LocalCluster(tmp_path / name, args, workers=WORKERS) as c:
        if crash_at:
            first, steps = c.server, metrics_path(tmp_path / name, name, "steps")
            wait_until(
                lambda: (
                    still_running(first, lambda: c.output("server"))
                    and len(read_jsonl(steps, missing_ok=True)) > crash_at
                ),
                timeout=240,
                what=f"step {crash_at} of the first master",
            )
            c.restart_master([*args, "--resume"])
        assert c.wait(timeout=300) == 0, c.output("server2" if crash_at else "server")
        exp = c.experiment_dir(name)
        model = torch.load(os.path.join(exp, "model.pt"), weights_only=True)["model"]
        return model, read_jsonl(os.path.join(exp, "metrics", "steps.jsonl")), exp


def test_a_master_killed_mid_run_resumes_from_its_checkpoint_to_the_same_parameters(tmp_path):
    reference, ref_steps, _ = _run(tmp_path, "straight")
    resumed, steps, exp = _run(tmp_path, "crashed", crash_at=25)

    assert [s["step"] for s in steps] == [s["step"] for s in ref_steps] == list(range(len(ref_steps)))
    for name, tensor in reference.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-5, rtol=0), name
    events = read_jsonl(os.path.join(exp, "metrics", "events.jsonl"))
    resumed_at = find(events, event="resumed")
    assert resumed_at is not None and resumed_at["step"] in (20, 30)  # the checkpoint written every 10 steps
    assert not os.path.exists(os.path.join(exp, "checkpoint.pt"))  # a finished run keeps none
    with open(os.path.join(exp, "summary.json")) as f:
        summary = json.load(f)
    # the training time before the crash counts: the steps alone took longer than the time since the resume
    assert summary["train_s"] >= sum(s["step_s"] for s in steps)


def test_an_ssp_run_resumed_after_kill_9_applies_every_sample_once_per_epoch(tmp_path):
    ssp = [*JOB[:-2], "--sync", "ssp", "--staleness", "2", "--enable-load-balancing"]
    _, steps, exp = _run(tmp_path, "ssp", crash_at=15, job=ssp, every=5)

    assert [s["step"] for s in steps] == list(range(len(steps)))  # none lost, none twice
    n = len(data.load_datasets(JobConfig())[0])
    for epoch in (0, 1):
        assert sum(s["samples"] for s in steps if s["epoch"] == epoch) == n, epoch
    events = read_jsonl(os.path.join(exp, "metrics", "events.jsonl"))
    resumed_at = find(events, event="resumed")
    assert resumed_at is not None and resumed_at["step"] >= 15 - 5
    evaluated = [r["epoch"] for r in read_jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))]
    assert sorted(evaluated) == [0, 1]
