"""The master's optimizer step, one range of the flat parameter at a time, on the native kernels.

``optim.build_optimizer`` makes a torch optimizer over the one flat parameter; this steps it with
``kernels.sgd_step`` / ``kernels.adam_step`` instead of ``optimizer.step()``: one pass over memory
per range (torch's foreach step makes one per tensor operation), the GIL released, and any range on
its own, so BSP can step a chunk and send it while the next one is stepped (``streamed_update.py``).
"""

from __future__ import annotations

import torch

from hetero_ps import kernels
from hetero_ps.errors import ConfigError


class ChunkedStep:
    """Steps the optimizer ``build_optimizer`` made one range of the flat parameter at a time, with the
    native kernels (``kernels.sgd_step`` / ``kernels.adam_step``: one pass over memory, GIL released).

    The state stays torch's own (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so a
    checkpoint's ``optimizer.state_dict()`` and ``load_state_dict`` are unchanged, and the
    hyper-parameters are read from the param group at each ``begin`` (the LR schedule writes ``lr``
    there). One step is ``begin()``, ``chunk(plan, off, n, grad)`` over every range once (any order,
    from any thread, never two overlapping at once), then ``finish(plan)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        group = optimizer.param_groups[0]
        self.param = group["params"][0]
        self.kind = "adam" if isinstance(optimizer, torch.optim.Adam) else "sgd"
        unsupported = [k for k in ("nesterov", "maximize", "amsgrad", "differentiable") if group.get(k)]
        if group.get("dampening", 0) or unsupported or len(optimizer.param_groups) != 1:
            raise ConfigError(f"the chunked optimizer step does not implement {unsupported or 'this optimizer'}")

    def begin(self) -> dict:
        """The step's hyper-parameters (and Adam's step number), with the state tensors made if missing."""
        group = self.optimizer.param_groups[0]
        plan: dict = {"lr": float(group["lr"]), "weight_decay": float(group["weight_decay"])}
        if self.kind == "sgd":
            plan["momentum"], plan["buf"] = float(group["momentum"]), None
            if plan["momentum"]:  # torch keeps no state for plain SGD: neither do we
                state = self.optimizer.state[self.param]
                if state.get("momentum_buffer") is None:  # zeros: the first step's buffer is then the gradient
                    state["momentum_buffer"] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
                plan["buf"] = state["momentum_buffer"].numpy()
        else:
            state = self.optimizer.state[self.param]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
            plan["step"] = int(state["step"].item()) + 1
            plan["exp_avg"], plan["exp_avg_sq"] = state["exp_avg"].numpy(), state["exp_avg_sq"].numpy()
            plan["betas"], plan["eps"] = tuple(group["betas"]), float(group["eps"])
            plan["decoupled"] = isinstance(self.optimizer, torch.optim.AdamW) or bool(
                group.get("decoupled_weight_decay", False)
            )
        plan["param"] = self.param.detach().numpy()
        return plan

    def chunk(self, plan: dict, off: int, n: int, grad) -> None:
        """Step ``[off, off + n)`` of the parameter with ``grad`` (those ``n`` values)."""
        k, p, end = kernels, plan["param"], off + n
        if self.kind == "sgd":
            buf = plan["buf"]
            k.sgd_step(p[off:end], grad, None if buf is None else buf[off:end], lr=plan["lr"],
                       momentum=plan["momentum"], weight_decay=plan["weight_decay"])  # fmt: skip
        else:
            k.adam_step(p[off:end], grad, plan["exp_avg"][off:end], plan["exp_avg_sq"][off:end], lr=plan["lr"],
                        step=plan["step"], betas=plan["betas"], eps=plan["eps"], weight_decay=plan["weight_decay"],
                        decoupled=plan["decoupled"])  # fmt: skip

    def finish(self, plan: dict) -> None:
        if self.kind == "adam":
            self.optimizer.state[self.param]["step"].fill_(plan["step"])
