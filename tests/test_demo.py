"""scripts/demo.sh, the README's main command, with the extra arguments it advertises."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(tmp_path, *args: str, min_accuracy: str = "0") -> subprocess.CompletedProcess:
    # A few steps only: this checks the script's plumbing, not the model (DEMO_MIN_ACCURACY=0).
    env = dict(os.environ, DEMO_EPOCHS="1", DEMO_MIN_ACCURACY=min_accuracy, PYTHONUNBUFFERED="1")
    cmd = [
        "bash",
        os.path.join(ROOT, "scripts/demo.sh"),
        "--max-steps",
        "4",
        "--no-dashboard",
        "--experiments-dir",
        str(tmp_path / "exp"),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_demo_with_a_chosen_experiment_name_finds_its_summary(tmp_path):
    r = _demo(tmp_path, "--experiment", "mine", "--epochs", "3", "--compression", "int8")  # the README's example
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "exp" / "mine" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert f"experiment written to {tmp_path / 'exp' / 'mine'} " in r.stdout
    assert "final test accuracy" in r.stdout
    # The workers were told where the run lives, so their logs sit beside the master's.
    logs = sorted(os.listdir(tmp_path / "exp" / "mine" / "logs"))
    assert "server.log" in logs and any(name.startswith("worker-1-") for name in logs), logs

    # The same name again: the master appends -2 and the demo follows it there; and a run short of
    # the accuracy the demo expects fails, saying so.
    again = _demo(tmp_path, "--experiment=mine", min_accuracy="1.01")
    assert again.returncode == 1, again.stdout + again.stderr
    assert f"experiment written to {tmp_path / 'exp' / 'mine-2'} " in again.stdout
    assert (tmp_path / "exp" / "mine-2" / "summary.json").exists()
    assert "accuracy below" in again.stderr
