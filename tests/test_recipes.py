"""Per-model recipes: what a knob left unset becomes, that a set one always wins, and divergence stops."""

from __future__ import annotations

import math

import pytest
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError, TrainingDiverged
from hetero_ps.server.divergence import NONFINITE_STEPS, DivergenceWatch
from hetero_ps.training import optim, recipes


def test_every_knob_left_unset_comes_from_the_models_recipe():
    job, source = recipes.resolve(JobConfig(model="gpt2", model_size="tiny", global_batch=64), total_steps=200)
    assert (job.optimizer, job.lr, job.weight_decay, job.lr_schedule, job.warmup_steps) == (
        "adamw",
        3e-3,
        0.1,
        "cosine",
        20,  # 10 % of 200 steps
    )
    assert set(source.values()) == {"recipe"} and set(source) == set(recipes.KNOBS)
    assert not recipes.unresolved(job)


def test_a_value_the_user_set_always_wins_and_is_marked_as_a_flag():
    job, source = recipes.resolve(JobConfig(model="bert", model_size="tiny", lr=0.05, warmup_steps=0), 100)
    assert job.lr == 0.05 and job.warmup_steps == 0  # 0 is a value, not "unset"
    assert job.optimizer == "adamw" and job.weight_decay == 0.01
    assert source["lr"] == source["warmup_steps"] == "flag" and source["optimizer"] == "recipe"
    said = recipes.describe(job, source)
    assert "--lr" in said and "--warmup-steps" in said and "adamw" in said and "lr 0.05" in said


def test_another_optimizer_by_flag_gets_that_optimizers_learning_rate_not_the_recipes():
    job, source = recipes.resolve(JobConfig(model="resnet50", optimizer="adamw"), 100)
    assert job.lr == 1e-3 and source["lr"] == "recipe" and job.weight_decay == 1e-4
    job, _ = recipes.resolve(JobConfig(model="gpt2", model_size="tiny", optimizer="momentum"), 100)
    assert job.lr == 0.05 and job.warmup_steps == 10


@pytest.mark.parametrize("batch", [64, 256, 1024])
def test_resnet_scales_its_learning_rate_with_the_global_batch(batch):
    job, _ = recipes.resolve(JobConfig(model="resnet50", global_batch=batch), total_steps=1000)
    assert job.optimizer == "momentum" and math.isclose(job.lr, 0.1 * batch / 256)
    assert job.warmup_steps == 50 and job.weight_decay == 1e-4


def test_sizes_and_plugins_have_their_own_recipes():
    big, _ = recipes.resolve(JobConfig(model="gpt2", model_size="default"), 100)
    assert big.lr == 6e-4
    plug, _ = recipes.resolve(JobConfig(model="my_pkg:make"), 100)
    assert (plug.optimizer, plug.lr, plug.warmup_steps) == ("momentum", 0.05, 0)
    simple, _ = recipes.resolve(JobConfig(), 100)  # the demo's model keeps the settings that reach 99.4 %
    assert (simple.optimizer, simple.lr, simple.momentum, simple.lr_schedule) == ("momentum", 0.05, 0.9, "cosine")
    with pytest.raises(ConfigError, match="0 steps"):
        recipes.resolve(JobConfig(), 0)


def test_the_optimizer_built_from_an_unresolved_job_is_the_recipes():
    param = torch.nn.Parameter(torch.zeros(4))
    opt, _ = optim.build_optimizer(JobConfig(model="bert", model_size="tiny"), param, 10)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01


def _feed(watch, losses, lr=0.1):
    for step, loss in enumerate(losses):
        watch.observe(step, loss, lr)


def test_a_loss_that_explodes_stops_the_run_with_the_step_and_the_hint():
    watch = DivergenceWatch(4.0)
    _feed(watch, [2.3, 3.0, 6.0, 9.0])  # the last three average 6.0 < 4 × 2.3: still within bounds
    with pytest.raises(TrainingDiverged, match=r"step 4: .*rose to 1\d\.\d.*Lower the learning rate \(--lr, 0\.1"):
        watch.observe(4, 25.0, 0.1)


def test_a_loss_that_leaps_at_once_is_caught_though_it_settles_high():
    # lr 20 on simple_cnn/digits, measured: 2.31, 159.6, 173228, 89, 1714, 17.8, 18.5, ...
    with pytest.raises(TrainingDiverged, match="step 2"):
        _feed(DivergenceWatch(4.0), [2.31, 159.6, 173228.0, 89.2, 1714.0, 17.8, 18.5])


def test_one_nan_step_is_forgiven_but_a_run_of_them_is_divergence():
    watch = DivergenceWatch(4.0)
    _feed(watch, [2.3, float("nan"), 2.2, 2.1, float("nan"), 2.0])  # a bad worker's NaN: skipped, forgiven
    with pytest.raises(TrainingDiverged, match=f"nan for {NONFINITE_STEPS} steps in a row"):
        _feed(watch, [float("nan")] * NONFINITE_STEPS)


def test_a_resumed_run_keeps_judging_against_where_the_run_started():
    watch = DivergenceWatch(4.0)
    watch.replay([2.3, None, 1.0, 0.2, 0.05, 0.05])  # the steps before the checkpoint (a NaN as null)
    watch.observe(6, 0.3, 0.1)  # six times the last losses, still far below 4 × 2.3: not divergence
    with pytest.raises(TrainingDiverged, match="from 2.3 at the start"):
        _feed(watch, [20.0, 20.0, 20.0])


def test_a_falling_loss_never_trips_and_factor_zero_turns_the_check_off():
    _feed(DivergenceWatch(4.0), [6.2 * 0.97**s for s in range(300)])
    _feed(DivergenceWatch(0), [1.0] * 3 + [1e9] * 10 + [float("inf")] * 10)
    with pytest.raises(ValueError):
        DivergenceWatch(0.5)
