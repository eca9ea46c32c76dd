"""Nobody is declared lost for waiting: idle and busy workers stay live, evaluations run beside training.

A plug-in model whose forward sleeps a fixed time per sample makes every duration of the run known:
rank 2 computes 14 of the 16 samples of a step (6.3 s), rank 1 computes 2 and then waits ~5.4 s for
it, each evaluation (8 samples) takes 3.6 s, and loading the data set takes 4 s (on each worker,
after it joined) — each longer than the 3-second ``--worker-timeout``. Before heartbeats, the master
declared the waiting rank (and the busy one) lost; before the workers' own keep-alive, a slow data
set load did the same; before evaluations ran beside training, every worker sat idle through them.
"""

from __future__ import annotations

import os
import textwrap

from conftest import find_all, read_jsonl

from hetero_ps.testing.local_cluster import LocalCluster

SLOW_PLUGIN = """
import time
import torch

class SlowLinear(torch.nn.Module):
    \"\"\"A linear classifier whose forward takes `delay` seconds per sample.\"\"\"

    def __init__(self, delay):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay * len(x))
        return self.lin(x)

def make_model(delay=0.45):
    return SlowLinear(delay)

def make_data():
    time.sleep(4.0)  # a big data set on a slow disk
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return torch.utils.data.TensorDataset(x[:32], y[:32]), torch.utils.data.TensorDataset(x[32:], y[32:])
"""


def test_waiting_and_busy_workers_outlive_a_short_worker_timeout_and_evaluation_runs_beside(tmp_path):
    (tmp_path / "slow_plugin.py").write_text(textwrap.dedent(SLOW_PLUGIN))
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [
        "--world-size", "3", "--no-local-worker",
        "--model", "slow_plugin:make_model",
        "--dataset", "slow_plugin:make_data",
        "--global-batch-size", "16", "--worker-batch-sizes", "1:2,2:14",
        "--epochs", "2",
        "--worker-timeout", "3",
        "--experiment", "liveness",
    ]  # fmt: skip
    workers = [["--rank", "1", "--no-calibrate"], ["--rank", "2", "--no-calibrate"]]
    with LocalCluster(tmp_path, args, workers=workers, env=env) as c:
        assert c.wait(timeout=240) == 0, c.output("server")
        exp = c.experiment_dir()
        events = read_jsonl(os.path.join(exp, "metrics", "events.jsonl"))
        steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
        evaluations = read_jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))

    assert not find_all(events, event="worker_lost"), find_all(events, event="worker_lost")
    assert sorted(s["step"] for s in steps) == [0, 1, 2, 3]
    # Every step had both workers, with the fixed split: the slow step really was that slow.
    assert all(s["attempts"] == 1 and sorted(s["workers"]) == ["1", "2"] for s in steps)
    assert all(s["workers"]["2"]["batch"] == 14 for s in steps)
    # Each epoch was scored on the parameters as they were when it ended (2 updates per epoch).
    assert [(e["epoch"], e["version"], e["step"]) for e in evaluations] == [(0, 2, 2), (1, 4, 4)]
    assert all(e["eval_s"] >= 3.6 for e in evaluations)  # slower than --worker-timeout, by design
