"""The product's main job, end to end: real master and worker processes on 127.0.0.1."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
from conftest import find_all, read_jsonl

from hetero_ps.config import JobConfig
from hetero_ps.testing import LocalCluster

pytestmark = pytest.mark.slow


def test_union_batch_invariant_end_to_end(tmp_path):
    """One BSP step of 3 workers on unequal batches equals one single-process step on the union."""
    from hetero_ps.training import data, models
    from hetero_ps.training.flat import FlatParams
    from hetero_ps.training.sampler import EpochSampler
    from hetero_ps.training.trainer import LocalTrainer

    args = [
        "--world-size",
        "4",
        "--no-local-worker",
        "--model",
        "simple_cnn",
        "--dataset",
        "digits",
        "--global-batch-size",
        "64",
        "--worker-batch-sizes",
        "1:5,2:17,3:42",
        "--max-steps",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--lr-schedule",
        "constant",
        "--experiment",
        "inv",
        "--chunk-mb",
        "0.01",
    ]  # several chunks even for this small model
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"], ["--rank", "3"]]) as c:
        assert c.wait(timeout=120) == 0, c.output("server")
        exp = c.experiment_dir()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert [w["batch"] for _, w in sorted(steps[0]["workers"].items())] == [5, 17, 42]  # the run's only step

    job = JobConfig(
        model="simple_cnn",
        dataset="digits",
        global_batch=64,
        optimizer="sgd",
        lr=0.5,
        lr_schedule="constant",
        momentum=0.0,
    )
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    flat = FlatParams(model)
    before = flat.params.clone()
    trainer = LocalTrainer(job, model, flat, train, info, "cpu")
    trainer.compute_gradient(EpochSampler(len(train), job.seed).indices(0, 0, 64))
    expected = before - 0.5 * flat.grads

    state = torch.load(os.path.join(exp, "model.pt"), weights_only=True)
    state = state.get("model", state)
    model.load_state_dict(state)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, before), "the step must have changed the parameters"


def test_digits_converges_with_two_workers_and_writes_experiment(tmp_path):
    args = [
        "--world-size",
        "2",
        "--model",
        "simple_cnn",
        "--dataset",
        "digits",
        "--global-batch-size",
        "64",
        "--epochs",
        "4",
        "--lr",
        "0.05",
        "--experiment",
        "digits2",
        "--compression",
        "int8",
    ]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1", "--simulate-slowdown", "2"]]) as c:
        assert c.wait(timeout=240) == 0, c.output("server")
        exp = c.experiment_dir()
        summary = c.summary()
    assert summary["final_eval_accuracy"] >= 0.9, summary
    for rel in (
        "config.json",
        "summary.json",
        "model.pt",
        "logs/server.log",
        "metrics/steps.jsonl",
        "metrics/epochs.jsonl",
    ):
        assert os.path.exists(os.path.join(exp, rel)), rel
    logs = os.listdir(os.path.join(exp, "logs"))
    assert any(n.startswith("worker-0-") for n in logs) and any(n.startswith("worker-1-") for n in logs), logs
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    w = find_all(steps, samples=64)[-1]["workers"]  # a full step: both workers have a share
    assert set(w) == {"0", "1"}
    for k in ("compute_s", "encode_s", "push_s", "wait_s", "pull_s", "bytes_out", "batch"):
        assert k in w["0"], k
    assert all(sum(x["batch"] for x in r["workers"].values()) == r["samples"] for r in steps)
    # A finished run's first and last steps: a whole batch, then the last epoch's remainder.
    assert steps[0]["samples"] == 64 and steps[-1]["samples"] == 1438 % 64
    epochs = read_jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))
    assert len(epochs) == 4 and all("eval_accuracy" in e for e in epochs)


def test_user_model_and_dataset_plugins_train_with_three_workers(tmp_path):
    """A model and data set from the user's own module train through module:factory with three
    workers, and the run follows a single process on the same batches step for step."""
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        textwrap.dedent("""
        import torch

        def make_model(hidden=16):
            return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))

        def make_data(n=600):
            g = torch.Generator().manual_seed(1)
            x = torch.randn(n, 4, generator=g)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
            cut = n * 4 // 5
            return (torch.utils.data.TensorDataset(x[:cut], y[:cut]),
                    torch.utils.data.TensorDataset(x[cut:], y[cut:]))
    """)
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [
        "--world-size",
        "4",
        "--no-local-worker",
        "--model",
        "my_plugin:make_model",
        "--model-arg",
        "hidden=32",
        "--dataset",
        "my_plugin:make_data",
        "--global-batch-size",
        "48",
        "--epochs",
        "8",
        "--lr",
        "0.2",
        "--experiment",
        "plugin",
    ]
    with LocalCluster(
        tmp_path, args, workers=[["--rank", "1"], ["--rank", "2", "--simulate-slowdown", "2"], ["--rank", "3"]], env=env
    ) as c:
        assert c.wait(timeout=180) == 0, c.output("server")
        summary = c.summary()
        state = torch.load(os.path.join(c.experiment_dir(), "model.pt"), weights_only=True)["model"]

    # The same job in one process: same seed, same sample order, same optimizer and schedule.
    from hetero_ps.training import data, models, optim
    from hetero_ps.training.flat import FlatParams
    from hetero_ps.training.sampler import EpochSampler
    from hetero_ps.training.trainer import LocalTrainer, evaluate

    sys.path.insert(0, str(tmp_path))
    try:
        job = JobConfig(
            model="my_plugin:make_model",
            model_args={"hidden": 32},
            dataset="my_plugin:make_data",
            global_batch=48,
            epochs=8,
            lr=0.2,
        )
        train, ev, info = data.load_datasets(job)
        model = models.build_model(job, info)
    finally:
        sys.path.remove(str(tmp_path))
    flat = FlatParams(model)
    param = torch.nn.Parameter(flat.params)
    steps = -(-len(train) // 48) * 8
    opt, sched = optim.build_optimizer(job, param, steps)
    trainer, sampler = LocalTrainer(job, model, flat, train, info, "cpu"), EpochSampler(len(train), job.seed)
    for epoch in range(8):
        for off in range(0, len(train), 48):
            trainer.compute_gradient(sampler.indices(epoch, off, min(48, len(train) - off)))
            param.grad = flat.grads
            opt.step()
            sched.step()
    _, single_acc = evaluate(model, ev, 256, job)
    got = torch.cat([state[k].reshape(-1) for k in model.state_dict()])
    torch.testing.assert_close(got, flat.params, rtol=1e-3, atol=1e-4)
    assert single_acc >= 0.85 and abs(summary["final_eval_accuracy"] - single_acc) <= 0.01, (summary, single_acc)


@pytest.mark.timeout(400)
def test_gpt2_tiny_reports_time_breakdown(tmp_path):
    args = [
        "--world-size",
        "2",
        "--model",
        "gpt2",
        "--model-size",
        "tiny",
        "--dataset",
        "synthetic_text",
        "--global-batch-size",
        "8",
        "--max-steps",
        "4",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--experiment",
        "gpt2",
        "--compression",
        "fp16",
    ]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"]]) as c:
        assert c.wait(timeout=300) == 0, c.output("server")
        exp = c.experiment_dir()
        summary = c.summary()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert len(steps) == 4
    for rec in steps:
        assert rec["step_s"] > 0 and rec["server"]["aggregate_s"] >= 0
        for w in rec["workers"].values():
            assert w["compute_s"] > 0 and w["bytes_out"] > 0
    assert 0.0 <= summary["communication_overhead"] < 1.0
