"""Bulk-synchronous steps whose gradients go through torch.distributed (``--backend gloo|nccl``).

Everything but the gradient stays as in ``bsp.py``: the scheduler's per-worker sizes, the slices,
reports, records, redone steps. What changes is where the gradient goes:

1. every SCHEDULE names the step's *group* — the master (rank 0) and the step's workers (ranks 1..N
   in rank order) — and the step's learning rate. A step with other workers than the last one's
   opens a new membership epoch (``collective_plane.py``);
2. worker *i* scales its mean gradient by ``b_i / total`` and the group sums them (the master adds
   zeros): every member holds the union batch's mean gradient, exactly what one process would
   compute on that batch;
3. every worker steps its own optimizer with it, the master too (its copy serves evaluation,
   checkpoints and workers that join later: they get its parameters and optimizer state).

A worker applies a step's update only once the master has seen every report of it: when its next
SCHEDULE is for a later step. If instead the step is redone (a worker was lost or stalled, or a
collective failed: its report says so), the survivors drop that update, the group is abandoned and
the redo runs in a new one, so every sample counts once and every copy of the model stays the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging

import torch

from hetero_ps.errors import ConfigError
from hetero_ps.server.assignment import Assignment, CollectiveFailed, WorkerLost
from hetero_ps.server.collective_plane import CollectiveError, CollectivePlane
from hetero_ps.server.loops.bsp import BSPLoop, _Issued
from hetero_ps.server.loops.host import LoopHost
from hetero_ps.server.registry import WorkerHandle

log = logging.getLogger("hetero_ps.server")

MAX_FAILED_GROUPS = 3  # collectives that failed in a row, nobody lost: a setup error, not bad luck


class CollectiveLoop(BSPLoop):
    schedules_ahead = False  # the workers step their own parameters: there is no broadcast to hide behind

    def __init__(self, ps: LoopHost, plane: CollectivePlane):
        super().__init__(ps)
        self.plane = plane
        self._reduced: dict[tuple[int, int], torch.Tensor] = {}
        self._failures: list[str] = []  # why the last collectives failed, while nobody was lost

    def _owed_chunks(self) -> int:
        return 0  # a worker owes its report only: its gradient goes to the group

    def _shape(self, a: Assignment, epoch: int, offset: int) -> None:
        """Name the step's group (a new epoch if its workers changed) and start the master's part."""
        ps = self.ps
        workers = sorted((h for h in ps.ready_workers() if h.wid in a.sizes), key=lambda h: h.rank)
        a.group, a.group_ranks, a.group_size = self.plane.membership([h.wid for h in workers], _reachable(workers))
        a.lr = ps.lr
        a.reduced = reduced = self.plane.start_reduce()

        def failed(f: asyncio.Future[torch.Tensor]) -> None:  # the master's part: no use waiting for reports
            if not f.cancelled() and f.exception() is not None:
                a.abort(CollectiveFailed(str(f.exception())))

        reduced.add_done_callback(failed)

    async def _complete(self, issued: _Issued) -> None:
        """Every report is in, each without an error: the sum is the master's too."""
        a = issued.a
        assert a.reduced is not None, "_shape started it"
        try:
            reduced = await a.reduced
        except CollectiveError as exc:
            raise CollectiveFailed(str(exc)) from None
        self._failures.clear()
        a.acc.copy_(reduced)
        _split_wait_from_link(a)

    def _salvage(self, issued: _Issued, exc: WorkerLost) -> bool:
        """A failed attempt's group is abandoned: the redo opens a new one (never redone in part).
        Collectives that keep failing with nobody lost are a setup error: the run stops and says why."""
        if issued.a.reduced is not None:
            issued.a.reduced.cancel()
        self.plane.invalidate()
        if not isinstance(exc, CollectiveFailed):
            self._failures.clear()  # a worker was lost: its group's failures say nothing about the setup
        else:
            self._failures.append(str(exc))
            if len(self._failures) >= MAX_FAILED_GROUPS:
                raise ConfigError(
                    f"the {self.ps.job.backend} plane failed {len(self._failures)} times in a row with no worker "
                    "lost: " + " | ".join(dict.fromkeys(self._failures))
                )
        return False

    def _after_reports(self, a: Assignment) -> None:
        """The step is committed: its workers apply its update as the master did (with their next
        SCHEDULE), so they hold the new version without a pull."""
        for h in self.ps.ready_workers():
            if h.wid in a.sizes:
                h.params_version = self.ps.version


def _reachable(workers: list[WorkerHandle]) -> str:
    """The master's address its group binds to: this end of a connection from another host if there
    is one (its own worker connects over loopback, which remote members could not reach)."""
    addrs = [h.conn.local_address for h in workers]
    remote = [x for x in addrs if x and not ipaddress.ip_address(x).is_loopback]
    return (remote or addrs or [""])[0]


def _split_wait_from_link(a: Assignment) -> None:
    """A worker's all-reduce time (its report's ``push_s``) holds its wait for the slowest member;
    the one that arrived last waited least, so the shortest is the link's time. The scheduler sees
    each worker's compute plus that (its model of ``t_i(b)``); the rest is reported as ``wait_s``."""
    link = min((r.push_s for r in a.reports.values()), default=0.0)
    for wid, r in a.reports.items():
        a.reports[wid] = dataclasses.replace(r, push_s=link, wait_s=r.wait_s + r.push_s - link)
