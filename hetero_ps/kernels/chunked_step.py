"""The optimizer step, one range of the flat parameter at a time, on the native kernels.

``optim.build_optimizer`` makes a torch optimizer over the one flat parameter; this steps it with
``kernels.sgd_step`` / ``kernels.adam_step`` instead of ``optimizer.step()`` (Nesterov SGD, the outer
step of ``--sync local``, in numpy): one pass over memory
per range (torch's foreach step makes one per tensor operation), the GIL released, and any range on
its own, so BSP can step a chunk and send it while the next one is stepped (``streamed_update.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetero_ps import kernels
from hetero_ps.errors import ConfigError


@dataclass
class SGDStep:
    """One SGD(-momentum) step's hyper-parameters and state views; ``chunk`` steps one range."""

    param: np.ndarray
    lr: float
    weight_decay: float
    momentum: float
    buf: np.ndarray | None  # torch's momentum_buffer (None for plain SGD: torch keeps no state then)
    nesterov: bool = False  # --sync local's outer step: once a round, so numpy (the kernel has no Nesterov)

    def chunk(self, off: int, n: int, grad: np.ndarray) -> None:
        """Step ``[off, off + n)`` of the parameter with ``grad`` (those ``n`` values)."""
        end = off + n
        if self.nesterov:
            assert self.buf is not None, "torch refuses Nesterov without momentum"
            p, buf = self.param[off:end], self.buf[off:end]
            d = grad + np.float32(self.weight_decay) * p if self.weight_decay else grad
            buf *= np.float32(self.momentum)
            buf += d
            p -= np.float32(self.lr) * (d + np.float32(self.momentum) * buf)  # torch's: d + μ·buf, after buf moved
            return
        kernels.sgd_step(self.param[off:end], grad, None if self.buf is None else self.buf[off:end], lr=self.lr,
                         momentum=self.momentum, weight_decay=self.weight_decay)  # fmt: skip

    def finish(self) -> None:
        """Nothing to count: SGD's state is its buffer, already stepped."""


@dataclass
class AdamStep:
    """One Adam(W) step's hyper-parameters, step number and state views; ``chunk`` steps one range."""

    param: np.ndarray
    lr: float
    weight_decay: float
    step: int  # this step's number (torch's ``state["step"]`` + 1)
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    betas: tuple[float, float]
    eps: float
    decoupled: bool  # AdamW's weight decay
    counter: torch.Tensor  # torch's ``state["step"]``, set to ``step`` by ``finish``

    def chunk(self, off: int, n: int, grad: np.ndarray) -> None:
        """Step ``[off, off + n)`` of the parameter with ``grad`` (those ``n`` values)."""
        end = off + n
        kernels.adam_step(self.param[off:end], grad, self.exp_avg[off:end], self.exp_avg_sq[off:end], lr=self.lr,
                          step=self.step, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                          decoupled=self.decoupled)  # fmt: skip

    def finish(self) -> None:
        self.counter.fill_(self.step)


class ChunkedStep:
    """Steps the optimizer ``build_optimizer`` made one range of the flat parameter at a time, with the
    native kernels (``kernels.sgd_step`` / ``kernels.adam_step``: one pass over memory, GIL released).

    The state stays torch's own (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so a
    checkpoint's ``optimizer.state_dict()`` and ``load_state_dict`` are unchanged, and the
    hyper-parameters are read from the param group at each ``begin`` (the LR schedule writes ``lr``
    there). One step is ``plan = begin()``, ``plan.chunk(off, n, grad)`` over every range once (any
    order, from any thread, never two overlapping at once), then ``plan.finish()``; ``step(grad)``
    does all three over the whole parameter.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        group = optimizer.param_groups[0]
        self.param = group["params"][0]
        self.adam = isinstance(optimizer, torch.optim.Adam)
        unsupported = [k for k in ("maximize", "amsgrad", "differentiable") if group.get(k)]
        if group.get("dampening", 0) or unsupported or len(optimizer.param_groups) != 1:
            raise ConfigError(f"the chunked optimizer step does not implement {unsupported or 'this optimizer'}")

    def begin(self) -> SGDStep | AdamStep:
        """The step's hyper-parameters (and Adam's step number), with the state tensors made if missing."""
        group = self.optimizer.param_groups[0]
        param = self.param.detach().numpy()
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        if not self.adam:
            momentum, buf = float(group["momentum"]), None
            if momentum:  # (torch's optimizer.state makes an entry when read: plain SGD must not have one)
                state = self.optimizer.state[self.param]
                if state.get("momentum_buffer") is None:  # zeros: the first step's buffer is then the gradient
                    state["momentum_buffer"] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"].numpy()
            return SGDStep(param, lr, weight_decay, momentum, buf, nesterov=bool(group.get("nesterov")))
        state = self.optimizer.state[self.param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
        b1, b2 = group["betas"]
        return AdamStep(
            param,
            lr,
            weight_decay,
            step=int(state["step"].item()) + 1,
            exp_avg=state["exp_avg"].numpy(),
            exp_avg_sq=state["exp_avg_sq"].numpy(),
            betas=(float(b1), float(b2)),
            eps=float(group["eps"]),
            decoupled=isinstance(self.optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False)),
            counter=state["step"],
        )

    def step(self, grad: np.ndarray) -> None:
        """One whole step with ``grad`` (the flat gradient)."""
        plan = self.begin()
        plan.chunk(0, len(grad), grad)
        plan.finish()
