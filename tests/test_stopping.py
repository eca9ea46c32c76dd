"""Ctrl-C / SIGTERM stop the master within one evaluation batch, and ``--eval-samples`` bounds evaluation.

The eval split here is slow on purpose (each sample sleeps) and logs every sample it serves, so the
tests count what the master evaluated instead of timing it.
"""

from __future__ import annotations

import os
import re
import signal
import textwrap

import pytest
from conftest import still_running, wait_until

from hetero_ps.testing import LocalCluster

pytestmark = pytest.mark.slow

PLUGIN = textwrap.dedent('''
    import os, time
    import torch

    class SlowEval(torch.utils.data.Dataset):
        """Every sample takes 20 ms and is logged: a long evaluation whose progress can be counted."""
        def __init__(self, x, y, log):
            self.x, self.y, self.log = x, y, log
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            time.sleep(0.02)
            with open(self.log, "a") as f:
                f.write(f"{i}\\n")
            return self.x[i], self.y[i]

    def make_data(log, n_eval=3000):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(128 + n_eval, 8, generator=g), torch.randint(0, 2, (128 + n_eval,), generator=g)
        return torch.utils.data.TensorDataset(x[:128], y[:128]), SlowEval(x[128:], y[128:], log)

    def make_model():
        return torch.nn.Linear(8, 2)
''')


def _cluster(tmp_path, *extra: str) -> LocalCluster:
    (tmp_path / "slow_eval.py").write_text(PLUGIN)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [
        "--world-size",
        "1",
        "--model",
        "slow_eval:make_model",
        "--dataset",
        "slow_eval:make_data",
        "--dataset-arg",
        f"log={tmp_path / 'served.txt'}",
        "--global-batch-size",
        "64",
        "--epochs",
        "1",
        "--experiment",
        "stop",
        *extra,
    ]
    return LocalCluster(tmp_path, args, env=env)


def _served(tmp_path) -> int:
    path = tmp_path / "served.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_during_evaluation_stops_after_the_current_batch(tmp_path):
    with _cluster(tmp_path) as c:
        wait_until(
            lambda: still_running(c.server, lambda: c.output("server")) and _served(tmp_path) >= 64,
            timeout=180,
            what="the evaluation to start",
        )
        c.server.send_signal(signal.SIGTERM)
        at_signal = _served(tmp_path)
        rc = c.wait(timeout=120)
        log = c.output("server")
    assert rc == 130, log
    assert "stopped while evaluating" in log
    # the batch in flight (and the one whose samples were being fetched) may finish; no more
    assert _served(tmp_path) <= at_signal + 2 * 64 < 3000


def test_eval_samples_bounds_the_evaluation(tmp_path):
    with _cluster(tmp_path, "--eval-samples", "100") as c:
        assert c.wait(timeout=180) == 0, c.output("server")
        log = c.output("server")
    assert re.search(r"evaluating version \d+ on 100 eval samples", log), log
    assert _served(tmp_path) == 100
