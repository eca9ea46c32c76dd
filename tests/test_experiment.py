"""The experiment directory: layout, JSON-lines metrics, summary, checkpoints loadable with plain torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError
from hetero_ps.observe.experiment import Experiment
from hetero_ps.training.data import DatasetInfo
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.models import build_model


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_layout_and_default_name(tmp_path):
    job = JobConfig(model="my.pkg:make", dataset="digits")
    with Experiment(str(tmp_path), job=job) as exp:
        assert re.fullmatch(r"\d{8}-\d{6}-my\.pkg-make-digits", exp.name), exp.name
        assert os.path.isdir(os.path.join(exp.path, "logs")) and os.path.isdir(os.path.join(exp.path, "metrics"))
        assert exp.log_path("server") == os.path.join(exp.path, "logs", "server.log")
        assert exp.log_path("worker", 2, "node-a") == os.path.join(exp.path, "logs", "worker-2-node-a.log")
        with pytest.raises(ValueError):
            exp.log_path("worker")
        exp.write_config({"job": job.to_wire(), "argv": ["x"]})
        exp.write_summary({"final_loss": float("nan"), "samples_per_s": 12.5})
    with open(os.path.join(exp.path, "config.json")) as f:
        assert json.load(f)["job"]["model"] == "my.pkg:make"
    with open(os.path.join(exp.path, "summary.json")) as f:
        assert json.load(f) == {"final_loss": None, "samples_per_s": 12.5}  # strict JSON: NaN → null


def test_a_used_name_is_never_reused(tmp_path):
    a = Experiment(str(tmp_path), "run")
    a.write_config({})
    b = Experiment(str(tmp_path), "run")
    assert (a.name, b.name) == ("run", "run-2")
    a.close(), b.close()
    with pytest.raises(ConfigError, match="may only use"):
        Experiment(str(tmp_path), "../escape")


def test_metrics_are_json_lines_that_survive_a_crash(tmp_path):
    import numpy as np

    exp = Experiment(str(tmp_path), "m")
    exp.metrics.log_step(
        {
            "step": 0,
            "loss": float("inf"),
            "lr": np.float32(0.5),
            "workers": {1: {"batch": np.int64(5), "compute_s": 0.1}},
            "t": torch.tensor(2.0),
        }
    )
    exp.metrics.log_epoch({"epoch": 0, "eval_loss": 0.3, "eval_accuracy": 0.9})
    exp.metrics.log_event({"event": "schedule", "sizes": {"0": 5, "1": 59}, "reason": "faster"})
    # Every line is on disk before close (line-buffered + flushed): read it from another process.
    code = (
        "import json,sys; print(sum(len(open(sys.argv[1] + f'/metrics/{s}.jsonl').readlines()) "
        "for s in ('steps', 'epochs', 'events')))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code, exp.path], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "3"
    )
    steps = _lines(os.path.join(exp.path, "metrics", "steps.jsonl"))
    assert steps == [{"step": 0, "loss": None, "lr": 0.5, "workers": {"1": {"batch": 5, "compute_s": 0.1}}, "t": 2.0}]
    ev = _lines(os.path.join(exp.path, "metrics", "events.jsonl"))
    assert ev[0]["event"] == "schedule" and "t" in ev[0]
    with pytest.raises(ValueError):
        exp.metrics.write("nope", {})
    exp.close()
    with pytest.raises(ValueError, match="closed"):
        exp.metrics.log_step({})


def test_checkpoint_loads_with_plain_torch(tmp_path):
    job = JobConfig(seed=4)
    info = DatasetInfo("digits", "image", (1, 8, 8), 10)
    model = build_model(job, info)
    flat = FlatParams(model)  # state_dict tensors are views of the flat buffer
    exp = Experiment(str(tmp_path), "ck", job=job)
    path = exp.save_checkpoint(model.state_dict(), job, step=7)
    assert path == os.path.join(exp.path, "model.pt")
    ck = torch.load(path, weights_only=True)
    assert ck["job"]["seed"] == 4 and ck["step"] == 7
    fresh = build_model(JobConfig(seed=99), info)
    fresh.load_state_dict(ck["model"])
    got = torch.cat([p.detach().reshape(-1) for p in fresh.parameters()])
    assert torch.equal(got, flat.params)
    exp.close()


def test_records_with_numpy_and_torch_values_become_strict_json(tmp_path):
    import numpy as np

    from hetero_ps.observe.jsonsafe import sanitize

    rec = {
        "loss": float("nan"),
        "lr": np.float32(0.5),
        "n": np.int64(3),
        "hist": np.array([1, 2]),
        "grad": torch.tensor([1.0, float("inf")]),
        "acc": torch.tensor(0.25),
        7: (1, None),
        "x": object,
    }
    clean = sanitize(rec)
    assert clean == {
        "loss": None,
        "lr": 0.5,
        "n": 3,
        "hist": [1, 2],
        "grad": [1.0, None],
        "acc": 0.25,
        "7": [1, None],
        "x": str(object),
    }
    json.dumps(clean, allow_nan=False)
    with Experiment(str(tmp_path), "run") as exp:  # the experiment files and the dashboard share it
        exp.metrics.log_step(rec)
        path = exp.metrics.path("steps")
    assert json.loads(open(path).read()) == clean
