"""What a step loop may ask of the master: the whole interface between ``loops/`` and ``server.py``.

A loop decides *which samples go where and when an update is applied*; the master owns the workers'
connections, the parameters and optimizer, the scheduler and the records. The loops see the master
only through this protocol (``ParameterServer`` implements it), so each side can be read — and
tested — alone.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import torch

from hetero_ps.config import JobConfig
from hetero_ps.observe.records import StepRecord
from hetero_ps.server.assignment import Assignment
from hetero_ps.server.registry import WorkerHandle
from hetero_ps.server.streamed_update import Changes


class LoopHost(Protocol):
    job: JobConfig
    total_steps: int  # steps the run takes (epochs × steps per epoch, or max_steps)
    resumed_loop: dict[str, Any] | None  # the loop's ``checkpoint_state()`` to go on from (None: a fresh run)

    @property
    def train_samples(self) -> int: ...  # size of the training split

    @property
    def step(self) -> int: ...  # steps recorded so far: the index of the next one

    @property
    def version(self) -> int: ...  # parameter version (optimizer updates applied)

    @property
    def lr(self) -> float: ...  # the learning rate the next update will use

    @property
    def numel(self) -> int: ...  # trainable parameters

    @property
    def n_chunks(self) -> int: ...  # gradient chunks every worker pushes per step

    # -- workers ---------------------------------------------------------------------------------
    def ready_workers(self) -> list[WorkerHandle]: ...
    def is_live(self, h: WorkerHandle) -> bool: ...
    def on_standby(self, h: WorkerHandle) -> bool: ...  # BSP: kept out of the steps by the scheduler
    @property
    def standby_rounds(self) -> bool: ...  # standby workers run local rounds (--standby-role local)
    def round_for(self, h: WorkerHandle) -> tuple[int, int, float, float] | None: ...  # (b, H, step_s, transfer_s)
    def predicted_step_s(self) -> float | None: ...  # the current split's predicted step
    def set_busy(self, wid: int, busy: bool) -> None: ...  # on a local round: the scheduler does not probe it
    def rank_of(self, wid: int) -> int: ...
    async def wait_for_workers(self, n: int) -> None: ...
    def next_membership_change(self) -> asyncio.Task[Any]: ...

    # -- one step ----------------------------------------------------------------------------------
    def split_batch(
        self, workers: list[WorkerHandle], total: int | None = None, step: int | None = None
    ) -> dict[int, int]:
        """The scheduler's sizes (wid -> samples) for ``total`` samples (default: the global batch) in
        ``step`` (default: the next one to be recorded)."""
        ...

    async def send_params(self, h: WorkerHandle) -> bool: ...  # False: lost on the way
    async def send_schedule(self, h: WorkerHandle, a: Assignment) -> bool: ...
    async def wait_done(  # raises WorkerLost (stalls: BSP)
        self, a: Assignment, stalls: bool = False, since: float | None = None
    ) -> None: ...
    # ``changes``: (Δ, w) of standby workers' local rounds, applied as θ −= w·Δ after the step
    def apply_update(self, grad: torch.Tensor, changes: Changes = ()) -> bool: ...  # False: non-finite, skipped
    def start_update(self, grad: torch.Tensor, changes: Changes = ()) -> bool: ...  # stepped beside send_params
    def apply_changes(self, changes: Changes) -> None: ...  # only local rounds' changes: an update of their own
    async def update_finished(self) -> float: ...  # waits for start_update's stepping; its seconds
    def step_lr(self) -> None: ...
    def feed_scheduler(self, a: Assignment) -> None: ...  # measured times -> the model (and auto's codecs)

    # -- records -------------------------------------------------------------------------------------
    def record_step(self, rec: StepRecord) -> None: ...
    def emit_event(self, kind: str, **fields: Any) -> None: ...
    def end_epoch(self, epoch: int) -> None: ...  # score this epoch's parameters (in the background)
    def update_done(self) -> None: ...  # a consistent point (the loop's state is whole): checkpoint if due
