"""--sync local: H inner steps per worker, the weighted mean parameter change, an outer Nesterov step.

The pieces exactly (a round of inner steps, the outer step on a known change, the re-weighting when
a worker is left out, auto's choice of H), then real processes: two workers' rounds give the
parameters one process computes from the same slices, every sample is trained once per epoch, a
worker lost mid-round costs only its own samples, and bad input stops the start.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import find, find_all, metrics_path, read_jsonl, still_running, wait_until

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError, RemoteProtocolError
from hetero_ps.kernels.chunked_step import ChunkedStep
from hetero_ps.server.assignment import Assignment, per_step
from hetero_ps.server.cli import parse_local_steps
from hetero_ps.server.loops.local_sgd import AUTO_MAX, needed_local_steps, next_local_steps
from hetero_ps.testing import LocalCluster
from hetero_ps.training import data, models
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.optim import build_outer_optimizer
from hetero_ps.training.recipes import outer_step, resolve
from hetero_ps.training.sampler import EpochSampler
from hetero_ps.training.trainer import LocalTrainer, inner_optimizer
from hetero_ps.wire.messages import Schedule

JOB = JobConfig(model="simple_cnn", dataset="digits", seed=0, optimizer="momentum", lr=0.05, momentum=0.9)


def _trainer(job: JobConfig = JOB) -> tuple[LocalTrainer, FlatParams]:
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    flat = FlatParams(model)
    return LocalTrainer(job, model, flat, train, info), flat


# -- the pieces ------------------------------------------------------------------------------------
def test_a_round_is_h_steps_of_the_inner_optimizer_and_leaves_the_change_and_the_start():
    trainer, flat = _trainer()
    start = flat.params.clone()
    idx = np.arange(40, 40 + 3 * 16 + 2)  # 50 samples in 3 parts: 17, 17, 16
    opt = inner_optimizer(JOB, flat)
    stats = trainer.local_round(idx, 3, opt, lr=0.05)

    ref, ref_flat = _trainer()
    ref_opt = torch.optim.SGD([torch.nn.Parameter(ref_flat.params)], lr=0.05, momentum=0.9)
    ref_opt.param_groups[0]["params"][0].grad = ref_flat.grads
    losses = []
    for part in np.array_split(idx, 3):
        losses.append(ref.compute_gradient(part).loss * len(part))
        ref_opt.step()
    torch.testing.assert_close(flat.grads, start - ref_flat.params, rtol=0, atol=0)
    assert torch.equal(flat.params, start)  # the replica is what the master sent
    assert stats.count == 50 and not stats.nonfinite
    assert stats.loss == pytest.approx(sum(losses) / 50)
    # the optimizer's state goes on: its momentum is the reference's after the same three steps
    torch.testing.assert_close(
        next(iter(opt.state.values()))["momentum_buffer"], next(iter(ref_opt.state.values()))["momentum_buffer"]
    )


def test_a_round_smaller_than_h_runs_one_step_per_sample():
    trainer, flat = _trainer()
    stats = trainer.local_round(np.arange(2), 5, inner_optimizer(JOB, flat), lr=0.05)
    assert stats.count == 2 and not stats.nonfinite and bool(flat.grads.abs().sum() > 0)


def test_a_nonfinite_inner_step_makes_the_whole_change_nan_and_keeps_the_start():
    trainer, flat = _trainer()
    with torch.no_grad():
        trainer.model.head[-1].bias[0] = float("nan")
    start = flat.params.clone()
    stats = trainer.local_round(np.arange(24), 3, inner_optimizer(JOB, flat), lr=0.05)
    assert stats.nonfinite and math.isnan(stats.loss)
    assert bool(torch.isnan(flat.grads).all())  # never a partly applied change
    torch.testing.assert_close(flat.params, start, equal_nan=True)


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_outer_step_is_torchs_nesterov_sgd_on_the_mean_change(chunks):
    n = 1000
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(n, generator=g)
    job = JobConfig(sync="local", outer_lr=0.7, outer_momentum=0.9)
    p = torch.nn.Parameter(theta.clone())
    opt, _ = build_outer_optimizer(job, p)
    stepper = ChunkedStep(opt)
    ref = torch.nn.Parameter(theta.clone())
    ref_opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    deltas = [torch.randn(n, generator=g) for _ in range(3)]
    # The first step, by hand: the buffer is the change, so θ − η (Δ + μ Δ).
    expected_first = theta - 0.7 * (deltas[0] + 0.9 * deltas[0])
    for k, d in enumerate(deltas):
        plan = stepper.begin()
        cuts = np.linspace(0, n, chunks + 1).astype(int)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            plan.chunk(int(lo), int(hi - lo), d.numpy()[lo:hi])
        plan.finish()
        ref.grad = d.clone()
        ref_opt.step()
        if k == 0:
            torch.testing.assert_close(p.detach(), expected_first, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    assert opt.state_dict()["state"][0]["momentum_buffer"].shape == (n,)  # torch's own state format


def test_a_worker_left_out_of_a_round_reweights_the_others_to_the_samples_that_remain():
    async def main() -> None:
        acc = torch.zeros(6)
        a = Assignment.for_sizes(
            step=0, attempt=0, total=60, sizes={1: 10, 2: 20, 3: 30}, n_chunks=2, acc=acc, version=0
        )
        d1, d3 = torch.arange(6.0), torch.full((6,), 2.0)
        a.take_chunk(1, 0, "w1")
        acc[:3] += a.weight(1) * d1[:3]
        assert not a.drop(1)  # it pushed a chunk: part of it is in acc, so it cannot be left out
        assert a.drop(2)
        assert a.total == 40 and 2 not in a.sizes and 2 not in a.pending
        a.take_chunk(1, 1, "w1")
        acc[3:] += a.weight(1) * d1[3:]
        for c in (0, 1):
            a.take_chunk(3, c, "w3")
        acc += a.weight(3) * d3
        torch.testing.assert_close(acc, (10 * d1 + 30 * d3) / 40)
        assert not Assignment.for_sizes(
            step=0, attempt=0, total=5, sizes={1: 5}, n_chunks=1, acc=torch.zeros(1), version=0
        ).drop(1)  # the last worker of a round is never dropped

    asyncio.run(main())


def test_per_step_is_what_one_inner_step_computes():
    a = Assignment.__new__(Assignment)
    a.sizes, a.local_steps = {1: 96, 2: 2}, 8
    assert per_step(a, 1) == (12, 8) and per_step(a, 2) == (1, 2)
    a.local_steps = 0
    assert per_step(a, 1) == (96, 1)


def test_auto_picks_the_h_that_hides_the_slowest_transfer_and_does_not_flip():
    h, why = needed_local_steps([(0.5, 0.1), (0.01, 0.1)])
    assert h == 50 and "a transfer of 0.5 s against 0.1 s" in why  # 0.5 s ≤ a tenth of 50 × 0.1 s
    assert needed_local_steps([(100.0, 0.1)])[0] == AUTO_MAX
    assert needed_local_steps([(0.001, 0.1)]) == (1, "every transfer is small against its compute")
    assert needed_local_steps([(0.001, 0.1)], least=16)[0] == 16  # an outer momentum needs a few steps
    assert next_local_steps(4, [50]) == 50  # up at once
    assert next_local_steps(50, [50, 30]) == 50  # the worst recent round still counts
    assert next_local_steps(50, [30]) == 50  # not half: keep
    assert next_local_steps(50, [25]) == 25  # half: down


def test_the_outer_step_is_diloco_after_adaptive_optimizers_and_averaging_after_sgd():
    assert outer_step(JobConfig(sync="local", optimizer="adamw")) == (0.7, 0.9)
    assert outer_step(JobConfig(sync="local", optimizer="momentum")) == (1.0, 0.0)
    assert outer_step(JobConfig(sync="local", optimizer="adam", outer_momentum=0.5)) == (0.7, 0.5)
    job, _ = resolve(JobConfig(sync="local", model="gpt2", model_size="tiny", dataset="synthetic_text"), 100)
    assert (job.optimizer, job.outer_lr, job.outer_momentum) == ("adamw", 0.7, 0.9)  # what config.json shows


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["0", "-3", "three", "1.5"])
def test_local_steps_that_are_not_a_count_are_refused(spec):
    with pytest.raises(ConfigError, match="--local-steps expects a number of inner steps >= 1 or auto"):
        parse_local_steps(spec, "local")


def test_local_steps_need_sync_local_and_auto_is_zero():
    assert parse_local_steps("auto", "local") == 0 and parse_local_steps("12", "local") == 12
    assert parse_local_steps(None, "bsp") == 0
    with pytest.raises(ConfigError, match="applies to --sync local"):
        parse_local_steps("8", "bsp")


def test_a_job_that_cannot_carry_a_parameter_change_is_refused():
    with pytest.raises(ConfigError, match="--momentum-correction pushes a momentum velocity"):
        JobConfig(sync="local", compression="topk:0.01", optimizer="momentum", momentum=0.9, momentum_correction=True)
    with pytest.raises(ConfigError, match="--local-steps must be"):
        JobConfig(sync="local", local_steps=-1)
    with pytest.raises(ConfigError, match="--outer-momentum"):
        JobConfig(sync="local", outer_momentum=1.0)


def test_a_local_schedule_names_its_lr_and_a_count_in_range():
    base = Schedule(step=0, attempt=0, epoch=0, offset=0, count=8, version=0, total=8, local_steps=4, lr=0.1)
    assert Schedule.from_header(base.to_header()) == base
    header = base.to_header()
    del header["lr"]
    with pytest.raises(RemoteProtocolError, match="SCHEDULE.lr"):
        Schedule.from_header(header)
    with pytest.raises(RemoteProtocolError, match="SCHEDULE.local_steps"):
        Schedule.from_header({**base.to_header(), "local_steps": 0})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sync", "local", "--local-steps", "0"], "--local-steps expects a number of inner steps >= 1 or auto"),
        (["--local-steps", "8"], "--local-steps 8 applies to --sync local"),
        (
            ["--sync", "local", "--compression", "topk:0.01", "--optimizer", "momentum", "--momentum-correction"],
            "cannot carry it",
        ),
    ],
)
def test_the_master_refuses_local_steps_it_cannot_run_before_anything_is_written(tmp_path, args, message):
    cmd = [sys.executable, "-m", "hetero_ps.server", "--port", "0", "--no-dashboard"]
    cmd += ["--experiments-dir", str(tmp_path / "experiments"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr
    assert not (tmp_path / "experiments").exists() or not os.listdir(tmp_path / "experiments")


# -- end to end ------------------------------------------------------------------------------------
LOCAL = ["--world-size", "3", "--no-local-worker", "--no-dashboard", "--model", "simple_cnn", "--dataset", "digits"]
LOCAL += ["--global-batch-size", "64", "--sync", "local", "--chunk-mb", "0.01"]


@pytest.mark.slow
def test_two_workers_rounds_are_exactly_their_local_steps_averaged_by_samples_then_nesterov(tmp_path):
    """Two rounds of H = 3 with fixed shares 23/41: the master's parameters are what one process
    gets by running each worker's inner steps on its slice (its own momentum kept across rounds),
    averaging the changes by samples and taking torch's Nesterov step on that average."""
    h, rounds, lr = 3, 2, 0.05
    args = [*LOCAL, "--worker-batch-sizes", "1:23,2:41", "--local-steps", str(h), "--max-steps", str(h * rounds)]
    args += ["--optimizer", "momentum", "--momentum", "0.9", "--lr", str(lr), "--lr-schedule", "constant"]
    args += ["--weight-decay", "0", "--warmup-steps", "0", "--experiment", "local"]
    args += ["--outer-lr", "0.7", "--outer-momentum", "0.9"]  # (after momentum SGD the default is averaging)
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"]]) as c:
        assert c.wait(timeout=180) == 0, c.output("server")[-3000:]
        exp = c.experiment_dir()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert [(s["local_steps"], s["samples"], s["staleness"]) for s in steps] == [(h, h * 64, 0)] * rounds
    assert {r: w["batch"] for r, w in steps[0]["workers"].items()} == {"1": 69, "2": 123}

    job = JobConfig(model="simple_cnn", dataset="digits", optimizer="momentum", lr=lr, momentum=0.9, weight_decay=0.0)
    trainer, flat = _trainer(job)
    sampler = EpochSampler(len(trainer.train_set), 0)
    outer = torch.nn.Parameter(flat.params)  # shares the buffer: the outer step moves flat.params
    outer_opt = torch.optim.SGD([outer], lr=0.7, momentum=0.9, nesterov=True)
    inner = {1: inner_optimizer(job, flat), 2: inner_optimizer(job, flat)}
    offset = 0
    for _ in range(rounds):
        mean = torch.zeros_like(flat.params)
        for rank, n in ((1, 69), (2, 123)):
            trainer.local_round(sampler.indices(0, offset, n), h, inner[rank], lr)
            mean += (n / 192) * flat.grads
            offset += n
        outer.grad = mean
        outer_opt.step()
    expected = flat.params.clone()
    state = torch.load(os.path.join(exp, "model.pt"), weights_only=True)
    trainer.model.load_state_dict(state.get("model", state))
    torch.testing.assert_close(flat.params, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected, _trainer(job)[1].params)


@pytest.mark.slow
def test_auto_rounds_train_every_sample_once_per_epoch_and_learn(tmp_path):
    args = [*LOCAL, "--epochs", "2", "--experiment", "auto", "--eval-samples", "300"]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"]]) as c:
        assert c.wait(timeout=240) == 0, c.output("server")[-3000:]
        exp = c.experiment_dir()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    n = len(data.load_datasets(JobConfig(dataset="digits"))[0])
    for epoch in (0, 1):
        rounds = [s for s in steps if s["epoch"] == epoch]
        assert sum(s["samples"] for s in rounds) == n  # the rounds tile the epoch
        assert all(sum(w["batch"] for w in s["workers"].values()) == s["samples"] for s in rounds)
    assert all(s["local_steps"] >= 1 and s["applied"] for s in steps)
    assert steps[0]["local_steps"] == 4  # auto's first round, which measures the links
    epochs = read_jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))
    assert epochs[-1]["eval_accuracy"] > 0.5, epochs


@pytest.mark.slow
def test_a_worker_lost_mid_round_loses_only_its_own_samples(tmp_path):
    """Rank 2 is killed while computing a round of 16 inner steps: that round is applied with the
    other two workers' changes (re-weighted), nothing is redone, and the run goes on."""
    args = [*LOCAL, "--world-size", "4", "--local-steps", "16", "--epochs", "30", "--experiment", "lost"]
    args += ["--worker-timeout", "120"]
    workers = [["--rank", str(r), "--simulate-slowdown", "3", "--torch-threads", "1"] for r in (1, 2, 3)]
    with LocalCluster(tmp_path, args, workers=workers) as c:
        steps, events = metrics_path(tmp_path, "lost", "steps"), metrics_path(tmp_path, "lost", "events")
        alive = lambda: still_running(c.server, lambda: c.output("server"))  # noqa: E731
        wait_until(lambda: alive() and len(read_jsonl(steps, missing_ok=True)) >= 2, 180, what="two rounds")
        os.killpg(c.workers[1].pid, signal.SIGKILL)  # mid-compute: its round was scheduled with the last update
        salvaged = wait_until(
            lambda: alive() and find(read_jsonl(events, missing_ok=True), event="round_salvaged", rank=2),
            timeout=180,
            what="rank 2's round salvaged",
        )
        wait_until(  # two rounds an epoch (1438 digits: 1024 + 414): its epoch is whole after three more
            lambda: alive() and len(read_jsonl(steps)) >= salvaged["step"] + 4, 180, what="its epoch's end"
        )
        records = read_jsonl(steps)
    hit = find(records, step=salvaged["step"])
    assert hit["attempts"] == 1 and hit["applied"] and set(hit["workers"]) == {"1", "3"}
    assert hit["samples"] == sum(w["batch"] for w in hit["workers"].values())
    n = len(data.load_datasets(JobConfig(dataset="digits"))[0])
    assert sum(s["samples"] for s in records if s["epoch"] == hit["epoch"]) == n - salvaged["samples"]
    assert [e["rank"] for e in find_all(read_jsonl(events), event="round_salvaged")] == [2]


NAN_LOSS = '''
import torch.nn.functional as F

seen = 0


def loss(out, y):
    """Cross-entropy; NaN on this process's third batch of 31 samples (only rank 2 has such parts)."""
    global seen
    value = F.cross_entropy(out, y)
    if len(y) == 31:
        seen += 1
        if seen == 3:
            return value * float("nan")
    return value
'''


@pytest.mark.slow
def test_a_round_with_a_nan_change_is_reported_and_never_applied_and_the_next_rounds_train(tmp_path):
    """Rank 2's third inner step of round 0 (its parts are 31 samples) goes NaN: that round is skipped
    with a nonfinite_gradient event naming rank 2, the worker starts a fresh inner optimizer, and
    every later round is applied."""
    (tmp_path / "nan_loss.py").write_text(NAN_LOSS)
    path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    args = [*LOCAL, "--worker-batch-sizes", "1:33,2:31", "--local-steps", "4", "--max-steps", "16"]
    args += ["--loss", "nan_loss:loss", "--experiment", "nan"]
    with LocalCluster(tmp_path, args, env={"PYTHONPATH": path}) as c:
        c.add_worker(["--rank", "1"])
        c.add_worker(["--rank", "2"])
        assert c.wait(timeout=180) == 0, c.output("server")[-3000:]
        exp = c.experiment_dir()
        said = c.output("worker1")
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert [s["applied"] for s in steps] == [False, True, True, True]
    nonfinite = find_all(read_jsonl(os.path.join(exp, "metrics", "events.jsonl")), event="nonfinite_gradient")
    assert len(nonfinite) == 1 and nonfinite[0]["step"] == 0 and "rank 2" in nonfinite[0]["workers"][0]
    assert "a non-finite inner step; its round is not applied, optimizer reset" in said
    state = torch.load(os.path.join(exp, "model.pt"), weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in state.get("model", state).values())


@pytest.mark.slow
def test_a_standby_worker_runs_local_rounds_whose_changes_join_the_bsp_updates(tmp_path):
    """BSP, rank 3 behind a 10 Mbit/s pacer: it stands by, and instead of idling runs rounds of
    inner steps on slices of its own; each round's change is applied with a later update (weight
    ≤ 1 by its staleness), its samples count in that step, and every sample is trained once an epoch."""
    args = ["--world-size", "4", "--no-local-worker", "--model", "simple_cnn", "--dataset", "synthetic_image"]
    args += ["--lr", "0.01", "--epochs", "2", "--global-batch-size", "64", "--no-dashboard", "--eval-samples", "500"]
    args += ["--experiment", "role", "--enable-load-balancing", "--load-balance-policy", "dynamic"]
    workers = [["--rank", str(r), "--torch-threads", "1"] for r in (1, 2, 3)]
    workers[2] += ["--simulate-bandwidth", "10"]  # 750 KB each way: ~0.6 s, against a ~0.15 s step
    with LocalCluster(tmp_path, args, workers=workers) as c:
        assert c.wait(timeout=600) == 0, c.output("server")[-3000:]
        exp = c.experiment_dir()
    events = read_jsonl(os.path.join(exp, "metrics", "events.jsonl"))
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert find(events, event="worker_role", rank=3, role="standby")
    rounds = find_all(events, event="local_round", rank=3)
    assert rounds and all(r["outcome"] == "applied" and 0 < r["weight"] <= 1 for r in rounds), rounds
    with_rounds = [s for s in steps if "3" in s["workers"] and s["workers"]["3"]["local_steps"]]
    assert len(with_rounds) == len(rounds)
    for s in steps:
        assert s["samples"] == sum(w["batch"] for w in s["workers"].values())
    n = len(data.load_datasets(JobConfig(dataset="synthetic_image"))[0])
    for epoch in (0, 1):
        assert sum(s["samples"] for s in steps if s["epoch"] == epoch) == n
    epochs = read_jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))
    assert epochs[-1]["eval_accuracy"] > 0.9, epochs


@pytest.mark.slow
def test_a_standby_worker_lost_mid_round_loses_only_that_round(tmp_path):
    args = ["--world-size", "4", "--no-local-worker", "--model", "simple_cnn", "--dataset", "synthetic_image"]
    args += ["--lr", "0.01", "--epochs", "30", "--global-batch-size", "64", "--no-dashboard", "--eval-samples", "200"]
    args += ["--experiment", "gone", "--enable-load-balancing", "--load-balance-policy", "dynamic"]
    workers = [["--rank", str(r), "--torch-threads", "1"] for r in (1, 2, 3)]
    workers[2] += ["--simulate-bandwidth", "10"]
    with LocalCluster(tmp_path, args, workers=workers) as c:
        steps, events = metrics_path(tmp_path, "gone", "steps"), metrics_path(tmp_path, "gone", "events")
        alive = lambda: still_running(c.server, lambda: c.output("server"))  # noqa: E731
        wait_until(lambda: alive() and "(standby): a local round of" in c.output("server"), 240, what="a round")
        os.killpg(c.workers[2].pid, signal.SIGKILL)  # mid-round: it computes for seconds
        lost = wait_until(
            lambda: alive() and find(read_jsonl(events, missing_ok=True), event="local_round", rank=3),
            timeout=120,
            what="rank 3's round ended",
        )
        at = wait_until(  # the step the round was lost in (recorded once it ends)
            lambda: alive() and find(read_jsonl(steps), step=lost["step"]), 120, what="that step's record"
        )
        wait_until(  # its epoch is over: the next one has begun
            lambda: alive() and any(s["epoch"] > at["epoch"] for s in read_jsonl(steps)), 240, what="its epoch's end"
        )
        records = read_jsonl(steps)
    assert lost["outcome"] == "lost" and lost["samples"] > 0
    n = len(data.load_datasets(JobConfig(dataset="synthetic_image"))[0])
    assert sum(s["samples"] for s in records if s["epoch"] == at["epoch"]) == n - lost["samples"]
    assert all("3" not in s["workers"] for s in records if s["step"] >= lost["step"])
