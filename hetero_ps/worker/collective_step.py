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

import datetime
import logging
import threading
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
        self._store_lock = threading.Lock()

    # -- the group ------------------------------------------------------------------------------
    def needs_group(self, s: Schedule) -> bool:
        return self.group is None or self.group.epoch != s.group

    def join(self, s: Schedule, local_addr: str) -> Group:
        """Join the group ``s`` names (blocks: run it on a thread; the caller makes it ``self.group``
        if it still wants it). ConfigError: this node cannot take part at all (no such interface, the
        store unreachable); CollectiveError: the group did not form (a member missing or unreachable:
        the master redoes the step)."""
        assert s.group is not None, "a collective plane's SCHEDULE names its group"
        with self._store_lock:  # (a join given up may still be running on another thread)
            if self._store is None:
                try:
                    store = collective.connect_store(self.master_addr, self.job.collective_port, STORE_CONNECT_S)
                except ConfigError as exc:
                    raise ConfigError(f"{self.node}: {exc}") from None
                store.set_timeout(_delta(self.timeout))
                self._store = store
            store = self._store
        if self.backend == "nccl":  # NCCL's communicator lives on this thread's current device
            torch.cuda.set_device(torch.device(self.device))
        try:
            group = collective.open_group(
                store, self.backend, s.group, s.group_rank, s.group_size, local_addr, self.timeout, self.node
            )
        except CollectiveError:
            with self._store_lock:  # its connection may be what broke: the next join makes a new one
                if self._store is store:
                    self._store = None
            raise
        log.info("joined %s group %d as rank %d of %d, bound to %s", self.backend, s.group, s.group_rank,
                 s.group_size, group.bound)  # fmt: skip
        return group

    def use(self, group: Group | None) -> None:
        """Make ``group`` this node's group, leaving the one before."""
        if self.group is not None and self.group is not group:
            self.group.abandon()
        self.group = group

    def close(self) -> None:
        if self.group is not None:
            self.group.abandon()
            self.group = None

    # -- one step -------------------------------------------------------------------------------
    def reduction(self, group: Group, grad: torch.Tensor, scale: float) -> Reduction:
        """This step's all-reduce of ``scale · grad`` (on the CPU for gloo, on the device for nccl):
        fed chunk by chunk from backward (``on_ready``), or all at once by ``finish``."""
        dtype = collective.CAST[self.job.compression]
        return Reduction(group, grad, scale, self.chunks, dtype, self.timeout, self.node)

    def keep(self, step: int, total: torch.Tensor, lr: float) -> None:
        self.pending = Pending(step, total, lr)

    def settle(self, s: Schedule, held: int) -> bool | None:
        """Before step ``s``: apply the pending update if the master committed it — ``s`` is a later
        step on the next version (True; False if the sum was not finite: the master skipped it too) —
        or drop it: a redo of its step, or a version that did not move (the step was redone without
        this node and skipped). None when nothing was applied. Blocks: run it on a thread."""
        pending, self.pending = self.pending, None
        if pending is None or s.step <= pending.step or s.version != held + 1:
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


class Reduction:
    """One step's all-reduce, a chunk at a time in descending chunk order (the master's order too),
    each launched as soon as it and every chunk after it are final: backward finishes the last layers
    first, so on the CPU most of the all-reduce runs while backward goes on (DDP's buckets, in order).
    Each chunk is scaled into a buffer of its own (an abandoned all-reduce may still write into it)."""

    def __init__(
        self,
        group: Group,
        grad: torch.Tensor,
        scale: float,
        chunks: list[tuple[int, int]],
        dtype: torch.dtype,
        timeout: float,
        node: str,
    ):
        self.group, self.grad, self.scale, self.chunks = group, grad, scale, chunks
        self.dtype, self.timeout, self.node = dtype, timeout, node
        self._ready = [False] * len(chunks)
        self._next = len(chunks) - 1  # the next chunk to launch
        self._bufs: list[torch.Tensor | None] = [None] * len(chunks)
        self._works: list[Any] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.launched_early = 0  # chunks launched while backward ran

    def on_ready(self, chunk: int) -> None:
        """Chunk ``chunk``'s gradient is final (called from backward's thread)."""
        with self._lock:
            self._ready[chunk] = True
            self._launch(early=True)

    def _launch(self, early: bool) -> None:
        while self._error is None and self._next >= 0 and self._ready[self._next]:
            i = self._next
            off, n = self.chunks[i]
            buf = (self.grad[off : off + n] * self.scale).to(self.dtype)
            self._bufs[i] = buf
            try:
                self._works.append(self.group.pg.allreduce([buf]))
            except (RuntimeError, OSError) as exc:  # (never into backward: finish() raises it)
                self._error = exc
                return
            self.launched_early += early
            self._next -= 1

    def finish(self) -> tuple[torch.Tensor, Reduced]:
        """Launch what is left, wait for all of it (blocks: run it on a thread); the sum in fp32 on the
        CPU, and what it cost; CollectiveError naming this node and the group when it failed."""
        t0 = time.perf_counter()
        with self._lock:
            self._ready = [True] * len(self.chunks)
            self._launch(early=False)
        t1 = time.perf_counter()
        try:
            if self._error is not None:
                raise self._error
            for w in self._works:
                w.wait(datetime.timedelta(seconds=self.timeout))
        except (RuntimeError, OSError) as exc:
            raise collective.failure(self.group, self.node, exc) from None
        t2 = time.perf_counter()
        bufs = [b for b in self._bufs if b is not None]
        total = torch.cat([b.float().cpu() for b in bufs]) if len(bufs) > 1 else bufs[0].float().cpu()
        size = self.group.size
        nbytes = int(2 * (size - 1) / size * sum(b.numel() * b.element_size() for b in bufs))
        return total, Reduced(cast_s=(t1 - t0) + (time.perf_counter() - t2), reduce_s=t2 - t1, nbytes=nbytes)


def _delta(seconds: float) -> Any:
    return datetime.timedelta(seconds=seconds)
