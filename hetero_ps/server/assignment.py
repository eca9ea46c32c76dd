"""Work in flight: what each worker was given in one step or task, and what has come back.

An :class:`Assignment` is one BSP step (every worker with a batch) or one SSP/ASP task (one worker).
It is done when every assigned worker has pushed each gradient chunk once and sent its report;
a worker lost before that fails it with :class:`WorkerLost`, and the loop redoes the work.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hetero_ps.errors import RemoteError
from hetero_ps.wire.messages import StepReport


class WorkerLost(Exception):
    """A worker left while work was assigned to it; that work must be redone by others."""


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
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.perf_counter)
    acc_np: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.acc_np = self.acc.numpy()

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

    def waiting_for(self) -> list[int]:
        """Workers that still owe a chunk or their report."""
        return [wid for wid in self.pending if not self.worker_finished(wid)]
