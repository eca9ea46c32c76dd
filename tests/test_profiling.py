"""StepProfiler: the chosen steps become Chrome traces (and operator tables), the others are untouched."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from hetero_ps.observe.profiling import StepProfiler


def train_step(model, opt, prof):
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with prof.region("compute"):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    with prof.region("apply"):
        opt.step()
        opt.zero_grad()


def test_profiles_the_chosen_steps_into_chrome_traces(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tmp_path / "profiles"
    prof = StepProfiler(str(out), steps=2, rank=3, skip=1)
    for step in range(10, 15):
        with prof.step(step):
            train_step(model, opt, prof)
    assert prof.done
    names = sorted(os.listdir(out))
    assert names == ["worker-3-step11.json", "worker-3-step11.txt", "worker-3-step12.json", "worker-3-step12.txt"]
    assert prof.written == [str(out / "worker-3-step11.json"), str(out / "worker-3-step12.json")]
    for k in (11, 12):
        with open(out / f"worker-3-step{k}.json") as f:
            trace = json.load(f)
        events = {e.get("name") for e in trace["traceEvents"]}
        assert f"step {k}" in events and "compute" in events and "apply" in events
        assert any(n and n.startswith("aten::") for n in events)  # the operators themselves
        assert "aten::" in (out / f"worker-3-step{k}.txt").read_text()


def test_a_failing_step_writes_nothing_and_regions_are_free_outside(tmp_path):
    prof = StepProfiler(str(tmp_path / "p"), steps=1)
    assert isinstance(prof.region("x"), contextlib.nullcontext)  # nothing recorded outside profiled steps
    with pytest.raises(RuntimeError, match="boom"):
        with prof.step(0):
            raise RuntimeError("boom")
    assert prof.written == [] and not os.path.exists(tmp_path / "p" / "worker-0-step0.json")
    with prof.step(1):
        pass
    assert prof.done and not (tmp_path / "p" / "worker-0-step1.json").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        StepProfiler(str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="skip"):
        StepProfiler(str(tmp_path), skip=-1)
