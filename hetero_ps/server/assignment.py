"""Work in flight: what each worker was given in one step or task, and what has come back.

An :class:`Assignment` is one BSP step (every worker with a batch) or one SSP/ASP task (one worker).
It is done when every assigned worker has pushed each gradient chunk once and sent its report;
a worker lost before that fails it with :class:`WorkerLost`, and the loop redoes the work.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hetero_ps.errors import RemoteError
from hetero_ps.wire.messages import StepReport


def _seen(done: asyncio.Future[None]) -> None:
    """Mark a failure as retrieved: one scheduled ahead may fail after its loop stopped (the run
    ended), and nobody is left to await it; a waiter still gets the exception from ``result()``."""
    if not done.cancelled():
        done.exception()


class WorkerLost(Exception):
    """A worker left while work was assigned to it; that work must be redone by others."""


class CollectiveFailed(WorkerLost):
    """A collective plane's group could not be joined or its all-reduce failed: the step is redone
    in a new group (by the same workers, unless one was lost)."""


@dataclass
class Assignment:
    step: int
    attempt: int
    total: int  # the divisor of the weights: samples in the BSP step, or B
    sizes: dict[int, int]  # wid -> samples
    pending: dict[int, set[int]]  # wid -> chunk indices still expected
    acc: torch.Tensor  # where the weighted gradients accumulate
    version: int = 0  # parameter version the work was computed on
    slices: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # wid -> (epoch, offset, count)
    reports: dict[int, StepReport] = field(default_factory=dict)  # wid -> the worker's report
    codecs: dict[int, str] = field(default_factory=dict)  # wid -> the push codec its SCHEDULE named
    early: dict[int, int] = field(default_factory=dict)  # wid -> chunks it pushed during its backward pass
    ahead: set[int] = field(default_factory=set)  # wids whose SCHEDULE went before the parameters (BSP)
    local_steps: int = 0  # --sync local: inner steps each worker runs on its slice (0: a gradient step)
    lr: float = 0.0  # --sync local: the inner learning rate of this round
    pushed: set[int] = field(default_factory=set)  # wids that sent at least one chunk
    # gloo/nccl (loops/collective.py): the step's membership epoch, its workers' ranks in that group
    # and its size (the master is rank 0), and the master's part of the all-reduce
    group: int | None = None
    group_ranks: dict[int, int] = field(default_factory=dict)
    group_size: int = 0
    reduced: asyncio.Future[torch.Tensor] | None = None
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.perf_counter)
    acc_np: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.acc_np = self.acc.numpy()
        self.done.add_done_callback(_seen)

    @classmethod
    def for_sizes(
        cls,
        *,
        step: int,
        attempt: int,
        total: int,
        sizes: dict[int, int],
        n_chunks: int,
        acc: torch.Tensor,
        version: int,
    ) -> Assignment:
        """Every worker in ``sizes`` owes every chunk and a report."""
        return cls(
            step=step,
            attempt=attempt,
            total=total,
            sizes=sizes,
            pending={w: set(range(n_chunks)) for w in sizes},
            acc=acc,
            version=version,
        )

    def is_current(self, step: Any, attempt: Any) -> bool:
        """Whether a push/report for ``(step, attempt)`` belongs here (an aborted attempt's does not)."""
        return bool(step == self.step and attempt == self.attempt)

    def weight(self, wid: int) -> float:
        """A worker's share of the step: its gradient enters the mean with ``b_i / total``."""
        return self.sizes[wid] / self.total

    def take_chunk(self, wid: int, chunk: Any, name: str, early: bool = False) -> None:
        """Mark chunk ``chunk`` of ``wid`` received; a chunk not owed (or owed twice) is a protocol error."""
        if wid not in self.pending:
            raise RemoteError("unexpected_push", f"{name} was not given step {self.step}")
        if not isinstance(chunk, int) or chunk not in self.pending[wid]:
            raise RemoteError(
                "bad_chunk", f"chunk {chunk!r} does not match this model's chunking or was already received"
            )
        self.pending[wid].discard(chunk)
        self.pushed.add(wid)
        if early:
            self.early[wid] = self.early.get(wid, 0) + 1

    def add_report(self, wid: int, report: StepReport) -> None:
        self.reports[wid] = report

    def worker_finished(self, wid: int) -> bool:
        return not self.pending.get(wid) and wid in self.reports

    def complete_if_all_in(self) -> None:
        if (
            all(not p for p in self.pending.values())
            and len(self.reports) == len(self.pending)
            and not self.done.done()
        ):
            self.done.set_result(None)

    def fail(self, wid: int, why: str) -> None:
        """``wid`` was lost or stalled (``why``, with its name): if it owed anything here, the
        assignment fails with :class:`WorkerLost`."""
        if wid in self.sizes and not self.done.done():
            self.done.set_exception(WorkerLost(why))

    def abort(self, exc: WorkerLost) -> None:
        """Fail the whole assignment with ``exc`` (a collective failed: nobody's part counts)."""
        if not self.done.done():
            self.done.set_exception(exc)

    def drop(self, wid: int) -> bool:
        """Leave out ``wid``, which pushed nothing here, and weight the others by the samples that
        remain: ``acc``, which holds ``Σ (b_i / total) · chunk`` of what came in, is rescaled to the new
        ``total``. False (nothing changed) if it pushed a chunk already or is the only worker left."""
        if wid not in self.sizes:
            return True
        if wid in self.pushed or len(self.sizes) == 1:
            return False
        old, n = self.total, self.sizes.pop(wid)
        self.total = old - n
        self.pending.pop(wid, None)
        self.reports.pop(wid, None)
        self.acc.mul_(old / self.total)
        return True

    def reopen(self) -> None:
        """After ``drop``: wait for the workers that remain (a failure was already raised and seen)."""
        if self.done.done():
            self.done = asyncio.get_running_loop().create_future()
            self.done.add_done_callback(_seen)
        self.complete_if_all_in()

    def waiting_for(self) -> list[int]:
        """Workers that still owe a chunk or their report."""
        return [wid for wid in self.pending if not self.worker_finished(wid)]


def per_step(a: Assignment, wid: int) -> tuple[int, int]:
    """``(batch, steps)``: what one step of ``wid``'s part of ``a`` computes, and how many steps it
    ran: ``(its samples, 1)``, or for a local round ``(samples / H, H)`` (the scheduler models one step)."""
    n = a.sizes[wid]
    steps = max(1, min(a.local_steps, n))
    return math.ceil(n / steps), steps
