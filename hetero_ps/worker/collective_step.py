"""A worker's part of a collective data plane (``--backend gloo|nccl``; ``server/loops/collective.py``).

Per step: join the group its SCHEDULE names (a new membership epoch: a new process group), scale
the mean gradient by ``b_i / total``, all-reduce it chunk by chunk (as fp16/bf16 with those codecs,
as torch's DDP comm hooks do), and keep the sum as the step's *pending* update. The next SCHEDULE
settles it: a later step means the master committed it (every report was in) and it is applied with
this node's own optimizer — the job's, stepped on the native kernels exactly as the master steps its
copy — while a redo of the same step drops it. Full PARAMS from the master (a newcomer, a worker back
from standby) replace the parameters and, in their ``state`` frames, the optimizer's state.

On a GPU the gradient is staged through host memory for gloo (the master, rank 0, reduces on the
CPU); nccl reduces on the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError
from hetero_ps.kernels.chunked_step import ChunkedStep
from hetero_ps.training import optim
from hetero_ps.wire import collective
from hetero_ps.wire.collective import CollectiveError, Group
from hetero_ps.wire.messages import Params, Schedule

log = logging.getLogger("hetero_ps.worker")

STORE_CONNECT_S = 30.0  # give up reaching the master's rendezvous store after this long


@dataclass
class Pending:
    """A reduced step not yet known to be committed."""

    step: int
    grad: torch.Tensor  # the union batch's mean gradient (fp32, on the CPU)
    lr: float


@dataclass
class Reduced:
    """What one step's all-reduce cost this node."""

    cast_s: float
    reduce_s: float
    nbytes: int  # bytes this node sent (as many came in): a ring's 2·(n−1)/n of the buffer


class CollectiveMember:
    def __init__(
        self,
        job: JobConfig,
        params_cpu: torch.Tensor,
        chunks: list[tuple[int, int]],
        master_addr: str,
        node: str,
        total_steps: int,
        device: str = "cpu",
    ):
        self.job = job
        self.backend = job.backend
        self.timeout = job.collective_timeout
        self.chunks = chunks
        self.master_addr = master_addr
        self.device = device
        self.node = node  # names this worker in errors: "rank 2 (host)"
        self.param = torch.nn.Parameter(params_cpu, requires_grad=False)  # shares params_cpu's storage
        self.optimizer, _ = optim.build_optimizer(job, self.param, total_steps)
        self.stepper = ChunkedStep(self.optimizer)
        self.group: Group | None = None
        self.pending: Pending | None = None
        self._store: Any = None

    # -- the group ------------------------------------------------------------------------------
    def needs_group(self, s: Schedule) -> bool:
        return self.group is None or self.group.epoch != s.group

    def join(self, s: Schedule, local_addr: str) -> Group:
        """Join the group ``s`` names, leaving the last one (blocks: run it on a thread)."""
        assert s.group is not None, "a collective plane's SCHEDULE names its group"
        if self.group is not None:
            self.group.abandon()
            self.group = None
        if self._store is None:
            try:
                store = collective.connect_store(self.master_addr, self.job.collective_port, STORE_CONNECT_S)
            except ConfigError as exc:
                raise CollectiveError(f"{self.node}: {exc}") from None
            store.set_timeout(_delta(self.timeout))
            self._store = store
        if self.backend == "nccl":  # NCCL's communicator lives on this thread's current device
            torch.cuda.set_device(torch.device(self.device))
        self.group = collective.open_group(
            self._store, self.backend, s.group, s.group_rank, s.group_size, local_addr, self.timeout, self.node
        )
        return self.group

    def close(self) -> None:
        if self.group is not None:
            self.group.abandon()
            self.group = None

    # -- one step -------------------------------------------------------------------------------
    def reduce(self, group: Group, grad: torch.Tensor, scale: float, device: str) -> tuple[torch.Tensor, Reduced]:
        """``Σ_i scale_i · grad_i`` over the group (blocks: run it on a thread). ``grad`` is this node's
        mean gradient (on the CPU for gloo, on ``device`` for nccl); the sum comes back in fp32 on the CPU,
        a tensor of its own (an abandoned all-reduce may still write into its buffers)."""
        t0 = time.perf_counter()
        dtype = collective.CAST[self.job.compression]
        on = device if self.backend == "nccl" else "cpu"
        bufs = [(grad[off : off + n].to(on) * scale).to(dtype) for off, n in self.chunks]
        t1 = time.perf_counter()
        collective.allreduce_sum(group, bufs, self.timeout, self.node)
        t2 = time.perf_counter()
        total = torch.cat([b.float().cpu() for b in bufs]) if len(bufs) > 1 else bufs[0].float().cpu()
        nbytes = int(2 * (group.size - 1) / group.size * sum(b.numel() * b.element_size() for b in bufs))
        return total, Reduced(cast_s=(t1 - t0) + (time.perf_counter() - t2), reduce_s=t2 - t1, nbytes=nbytes)

    def keep(self, step: int, total: torch.Tensor, lr: float) -> None:
        self.pending = Pending(step, total, lr)

    def settle(self, s: Schedule) -> bool | None:
        """Before step ``s``: apply the pending update if ``s`` comes after it (the master committed it:
        True if it was finite and applied, False if skipped as the master skipped it), or drop it (a
        redo of its step); None when nothing was pending. Blocks: run it on a thread."""
        pending, self.pending = self.pending, None
        if pending is None or s.step <= pending.step:
            return None
        if not optim.all_finite(pending.grad):
            return False  # the master skipped it too: the same sum, the same check
        self.optimizer.param_groups[0]["lr"] = pending.lr
        self.stepper.step(pending.grad.numpy())
        return True

    def drop_pending(self) -> None:
        """Full parameters came: whatever was pending is in them already (or was never committed)."""
        self.pending = None

    def load_state(self, p: Params, segment: Any) -> None:
        """One chunk of the master's optimizer state (a PARAMS frame with ``state``)."""
        off, n = p.offset, p.numel
        if p.codec != "none" or off + n > self.param.numel() or memoryview(segment).nbytes != 4 * n:
            raise ConfigError(f"master sent optimizer state {p.state} chunk {p.chunk} this node cannot hold")
        state = self.optimizer.state[self.param]
        buf = state.get(p.state)
        if not isinstance(buf, torch.Tensor):
            buf = state[str(p.state)] = torch.zeros_like(self.param.detach())
        buf.numpy()[off : off + n] = np.frombuffer(segment, dtype=np.float32)
        if isinstance(self.optimizer, torch.optim.Adam) and p.state != "momentum_buffer":  # (AdamW too)
            state["step"] = torch.tensor(float(p.opt_step))


def _delta(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)
