"""The master's optimizer: torch.optim on the single flat parameter tensor, plus the LR schedule.

The server wraps ``FlatParams.params`` as one ``nn.Parameter`` (sharing its storage), sets its
``.grad`` to the aggregated gradient and calls ``optimizer.step()`` then ``scheduler.step()`` once
per global step (the server steps it with its own kernels instead, on torch's optimizer state:
``kernels/chunked_step.py``). One tensor means one fused update over all parameters.

Optimizers (``job.optimizer``):

* ``sgd``      — plain SGD: ``θ ← θ − η (g + λθ)`` (no momentum, whatever ``job.momentum`` says);
* ``momentum`` — SGD with heavy-ball momentum ``job.momentum`` (torch's formulation, dampening 0);
* ``adam``     — Adam, ``weight_decay`` as L2 added to the gradient;
* ``adamw``    — AdamW, decoupled weight decay.

Knobs the job leaves to the model's recipe (``None``; ``training/recipes.py``) are filled in first.

Weight decay applies to every parameter (biases and norms included): with one flat tensor there are
no per-tensor groups. Use ``weight_decay=0`` where that matters.

Schedules (``job.lr_schedule``), as a multiplier ``f(s)`` of the peak ``job.lr`` where ``s`` is the
number of steps already taken (``s = 0`` for the first update), ``W = warmup_steps``,
``T = total_steps``::

    warmup (s < W):  f = (s + 1) / W                        (reaches 1 at s = W − 1; never 0)
    constant:        f = 1
    cosine:          f = ½ (1 + cos(π · min(1, (s − W) / max(1, T − W))))   (1 at s = W, → 0 at s = T)
    step:            f = lr_gamma ** floor(s / lr_step_size)
"""

from __future__ import annotations

import math

import torch

from hetero_ps.config import LR_SCHEDULES, OPTIMIZERS
from hetero_ps.errors import ConfigError
from hetero_ps.training import recipes


def _resolved(job, total_steps: int | None):
    """``job`` with the knobs it leaves to the model's recipe filled in, as the master does."""
    return recipes.resolve(job, total_steps or 1)[0] if recipes.unresolved(job) else job


def lr_factor(job, total_steps: int | None):
    """The schedule ``f(s)`` described in the module docstring, as a plain function of ``s``."""
    job = _resolved(job, total_steps)
    sched, warmup = job.lr_schedule, int(job.warmup_steps)
    if sched not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr schedule {sched!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if warmup < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup}")
    if sched == "cosine" and not total_steps:
        raise ConfigError(
            "the cosine schedule needs the total number of steps (epochs × steps per epoch, or --max-steps)"
        )
    if sched == "step" and (job.lr_step_size <= 0 or not job.lr_gamma > 0):
        raise ConfigError(
            f"the step schedule needs lr_step_size > 0 and lr_gamma > 0, got {job.lr_step_size} and {job.lr_gamma}"
        )
    total = int(total_steps or 0)
    step_size, gamma = int(job.lr_step_size), float(job.lr_gamma)

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if sched == "constant":
            return 1.0
        if sched == "cosine":
            progress = min(1.0, (s - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return gamma ** (s // step_size)

    return f


def build_optimizer(job, flat_param: torch.Tensor, total_steps: int | None = None):
    """``(optimizer, lr_scheduler)`` for the flat parameter.

    ``flat_param`` is the 1-D fp32 parameter tensor; if it is not already an ``nn.Parameter`` it is
    wrapped in one that shares its storage (then find it as ``optimizer.param_groups[0]["params"][0]``
    to set its ``.grad``). ``total_steps`` is needed by the cosine schedule.
    """
    if not isinstance(flat_param, torch.Tensor) or flat_param.dim() != 1 or flat_param.dtype != torch.float32:
        raise TypeError("build_optimizer expects the 1-D float32 flat parameter tensor")
    p = flat_param if isinstance(flat_param, torch.nn.Parameter) else torch.nn.Parameter(flat_param)
    job = _resolved(job, total_steps)
    name, lr, wd = job.optimizer, float(job.lr), float(job.weight_decay)
    if not lr > 0:
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    if wd < 0:
        raise ConfigError(f"weight decay must be >= 0, got {wd}")
    opt: torch.optim.Optimizer
    if name == "sgd":
        opt = torch.optim.SGD([p], lr=lr, momentum=0.0, weight_decay=wd)
    elif name == "momentum":
        if not 0.0 <= job.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {job.momentum}")
        opt = torch.optim.SGD([p], lr=lr, momentum=float(job.momentum), weight_decay=wd)
    elif name == "adam":
        opt = torch.optim.Adam([p], lr=lr, weight_decay=wd)
    elif name == "adamw":
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd)
    else:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(job, total_steps))
    return opt, sched


def build_outer_optimizer(job, flat_param: torch.nn.Parameter):
    """``--sync local``: the master's ``(optimizer, constant schedule)`` for the outer step, SGD with
    Nesterov momentum at ``job.outer_lr`` / ``job.outer_momentum`` (unset: ``recipes.outer_step``),
    whose gradient is the workers' weighted mean parameter change."""
    lr, mu = recipes.outer_step(job)
    opt = torch.optim.SGD([flat_param], lr=lr, momentum=mu, nesterov=mu > 0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: one sum (a mask of every value would cost a pass and an allocation),
    and the exact check only when the sum is not finite (it may have overflowed)."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())
