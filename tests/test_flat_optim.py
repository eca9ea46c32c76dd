"""FlatParams (parameters and gradients as views of one buffer) and the flat optimizer + schedules."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError
from hetero_ps.training.data import DatasetInfo
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.models import build_model
from hetero_ps.training.optim import build_optimizer, lr_factor

DIGITS = DatasetInfo("digits", "image", (1, 8, 8), 10)


def _model():
    return build_model(JobConfig(seed=1), DIGITS)


def test_params_and_grads_are_views_and_backward_writes_into_the_flat_grad():
    m = _model()
    ref = copy.deepcopy(m)
    flat = FlatParams(m)
    assert flat.numel == sum(p.numel() for p in m.parameters())
    for (_name, shape, off, _n), p in zip(flat.layout(), m.parameters()):
        assert p.data_ptr() == flat.params.data_ptr() + 4 * off and tuple(p.shape) == shape
        assert p.grad.data_ptr() == flat.grads.data_ptr() + 4 * off
    # Same values as before flattening.
    torch.testing.assert_close(flat.params, torch.cat([p.detach().reshape(-1) for p in ref.parameters()]))

    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    grad_ptr = flat.grads.data_ptr()
    flat.zero_grad_()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    assert flat.grads.data_ptr() == grad_ptr and flat.check_views()
    torch.testing.assert_close(flat.grads, torch.cat([p.grad.reshape(-1) for p in ref.parameters()]))


def test_writing_the_flat_buffer_changes_the_model():
    m = _model()
    flat = FlatParams(m)
    x = torch.randn(2, 1, 8, 8)
    flat.params.zero_()
    with torch.no_grad():
        assert float(m(x).abs().sum()) == 0.0
    new = torch.randn(flat.numel)
    flat.load_(new.numpy())
    assert torch.equal(flat.params, new)
    assert torch.equal(m.head[-1].bias.detach(), new[-10:])
    with pytest.raises(ValueError, match=f"expected {flat.numel}"):
        flat.load_(torch.zeros(flat.numel + 1))


def test_zero_grad_repairs_grads_that_were_set_to_none():
    m = _model()
    flat = FlatParams(m)
    m.zero_grad()  # set_to_none=True detaches .grad from the buffer
    assert not flat.check_views()
    flat.zero_grad_()
    assert flat.check_views()
    torch.nn.functional.cross_entropy(m(torch.randn(2, 1, 8, 8)), torch.tensor([1, 2])).backward()
    assert float(flat.grads.abs().sum()) > 0


def test_tied_and_frozen_parameters():
    job = JobConfig(model="gpt2", model_size="tiny")
    m = build_model(job, DatasetInfo("t", "text", (8,), 2, vocab_size=50, seq_len=8))
    assert m.lm_head.weight is m.transformer.wte.weight
    flat = FlatParams(m)
    assert flat.numel == sum(p.numel() for p in m.parameters())  # the tied matrix once
    names = [n for n, *_ in flat.layout()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    out = m(input_ids=torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8)))
    out.loss.backward()
    assert flat.check_views()

    frozen = _model()
    frozen.features[0].weight.requires_grad_(False)
    f2 = FlatParams(frozen)
    assert f2.numel == sum(p.numel() for p in frozen.parameters() if p.requires_grad)


def test_moving_the_model_after_flattening_is_detected():
    m = _model()
    flat = FlatParams(m)
    m.to(torch.float64)
    with pytest.raises(RuntimeError, match="no longer lives in the flat buffer"):
        flat.check_views()


# -- optimizer -------------------------------------------------------------------------------------


def _step(job, grads, init=None, total=100):
    p = torch.nn.Parameter(torch.ones(4) if init is None else init.clone())
    opt, sched = build_optimizer(job, p, total)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        sched.step()
    return p.detach()


def test_sgd_ignores_momentum_and_momentum_uses_it():
    g = torch.tensor([1.0, -2.0, 0.5, 0.0])
    sgd = _step(JobConfig(optimizer="sgd", lr=0.1, momentum=0.9, lr_schedule="constant"), [g, g])
    torch.testing.assert_close(sgd, 1 - 0.2 * g)
    mom = _step(JobConfig(optimizer="momentum", lr=0.1, momentum=0.9, lr_schedule="constant"), [g, g])
    torch.testing.assert_close(mom, 1 - 0.1 * g - 0.1 * (0.9 * g + g))


def test_adam_and_adamw_weight_decay():
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    adam = _step(JobConfig(optimizer="adam", lr=0.01, lr_schedule="constant"), [g])
    torch.testing.assert_close(adam, 1 - 0.01 * torch.sign(g), rtol=1e-5, atol=1e-6)  # first Adam step
    zero = torch.zeros(4)
    adamw = _step(JobConfig(optimizer="adamw", lr=0.1, weight_decay=0.5, lr_schedule="constant"), [zero])
    torch.testing.assert_close(adamw, torch.full((4,), 1 - 0.1 * 0.5))  # decoupled: θ(1 − ηλ)
    sgd_wd = _step(JobConfig(optimizer="sgd", lr=0.1, weight_decay=0.5, lr_schedule="constant"), [zero])
    torch.testing.assert_close(sgd_wd, torch.full((4,), 1 - 0.1 * 0.5))  # L2: g + λθ


def test_server_pattern_updates_the_model_through_shared_storage():
    m = _model()
    flat = FlatParams(m)
    param = torch.nn.Parameter(flat.params)
    opt, sched = build_optimizer(JobConfig(optimizer="sgd", lr=1.0, lr_schedule="constant"), param, 10)
    before = m.head[-1].bias.detach().clone()
    param.grad = torch.ones(flat.numel)
    opt.step()
    torch.testing.assert_close(m.head[-1].bias.detach(), before - 1.0)
    # A plain tensor is wrapped; the Parameter is reachable from the optimizer.
    opt2, _ = build_optimizer(JobConfig(lr_schedule="constant"), flat.params, 10)
    assert opt2.param_groups[0]["params"][0].data_ptr() == flat.params.data_ptr()


def test_schedules_at_known_steps():
    lr = 2.0
    job = JobConfig(lr=lr, lr_schedule="cosine", warmup_steps=10)
    f = lr_factor(job, 110)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    step = lr_factor(JobConfig(lr_schedule="step", lr_step_size=3, lr_gamma=0.5), None)
    assert [step(s) for s in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    const = lr_factor(JobConfig(lr_schedule="constant", warmup_steps=4), None)
    assert [const(s) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]

    # The scheduler object applies the same factors to the optimizer's lr.
    p = torch.nn.Parameter(torch.zeros(3))
    opt, sched = build_optimizer(job, p, 110)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(3)
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [lr * f(s) for s in range(12)], rtol=1e-12)


def test_bad_optimizer_settings():
    p = torch.zeros(3)
    with pytest.raises(ConfigError, match="sgd, momentum, adam, adamw"):
        build_optimizer(JobConfig(optimizer="lamb"), p, 10)
    with pytest.raises(ConfigError, match="total number of steps"):
        build_optimizer(JobConfig(lr_schedule="cosine"), p, None)
    with pytest.raises(ConfigError, match="constant, cosine, step"):
        build_optimizer(JobConfig(lr_schedule="linear"), p, 10)
    with pytest.raises(ConfigError, match="learning rate"):
        build_optimizer(JobConfig(lr=0.0), p, 10)
    with pytest.raises(TypeError):
        build_optimizer(JobConfig(), torch.zeros(3, 2), 10)
