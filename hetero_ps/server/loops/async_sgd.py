"""Stale-synchronous (SSP) and asynchronous (ASP) training: each worker at its own pace.

Every worker runs its own loop on the master: take the next slice of the epoch's permutation (its
scheduled batch size ``b_i``), send it the newest parameters and the slice, wait for its push, and
apply the push as one optimizer update at once.

Staleness. The server's parameter version ``V`` counts updates. A gradient computed on version
``v`` and applied at ``V`` has staleness ``τ = V − v`` (updates by others in between) and is applied
as ``(b_i / B) · s(τ) · g``: weighted by its share of a global batch ``B``, like BSP, and damped by
``s(τ)`` (``--staleness-scaling``: ``inverse`` 1/(1+τ), the default; ``sqrt`` 1/sqrt(1+τ); ``none``).

SSP. A worker's clock is the number of updates it has pushed. Before a new slice, a worker whose
clock is more than ``S`` (``--staleness``) ahead of the slowest live worker's waits, so the logged
``staleness`` (clock lead over the slowest when the slice was given) never exceeds ``S``. ASP never
waits. The scheduler's equal-time split (``--enable-load-balancing``) makes clocks advance at the
same pace, which keeps leads — and waits — small.

Work is never lost: a worker that leaves with a slice in flight puts it back for the others, and a
newcomer starts at the slowest clock so it does not stall anyone. A checkpoint (taken between two
updates) counts the slices in flight as given back, so a resumed run hands them out again. The learning-rate schedule
advances once per B samples applied, as in BSP, so the same ``--epochs`` give the same schedule.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Any

import torch

from hetero_ps.observe.records import AsyncStep, ServerTiming, StepRecord, WorkerTiming
from hetero_ps.server.assignment import Assignment, WorkerLost
from hetero_ps.server.loops.host import LoopHost
from hetero_ps.server.registry import WorkerHandle

log = logging.getLogger("hetero_ps.server")

SCALINGS = {
    "inverse": lambda tau: 1.0 / (1.0 + tau),
    "sqrt": lambda tau: 1.0 / math.sqrt(1.0 + tau),
    "none": lambda tau: 1.0,
}


class WorkQueue:
    """Hands out slices of the epochs' permutations; slices given back are handed out first."""

    def __init__(self, n: int, epochs: int, max_samples: int):
        self.n, self.epochs = n, epochs
        self.epoch, self.offset = 0, 0
        self.left = max_samples  # samples still to hand out in total
        self.returned: collections.deque = collections.deque()

    def take(self, count: int) -> tuple[int, int, int] | None:
        if self.returned:
            epoch, off, cnt = self.returned.popleft()
            if cnt > count:  # give back the rest for someone else
                self.returned.appendleft((epoch, off + count, cnt - count))
                cnt = count
            return epoch, off, cnt
        if self.left <= 0 or self.epoch >= self.epochs:
            return None
        cnt = min(count, self.n - self.offset, self.left)
        out = (self.epoch, self.offset, cnt)
        self.offset += cnt
        self.left -= cnt
        if self.offset >= self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        return out

    def give_back(self, epoch: int, offset: int, count: int) -> None:
        self.returned.append((epoch, offset, count))

    def checkpoint_state(self, in_flight: list[tuple[int, int, int]]) -> dict[str, Any]:
        """Where the queue is; ``in_flight`` (handed out, not applied) counts as given back."""
        returned = [list(p) for p in [*self.returned, *in_flight]]
        return {"epoch": self.epoch, "offset": self.offset, "left": self.left, "returned": returned}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset, self.left = int(state["epoch"]), int(state["offset"]), int(state["left"])
        self.returned = collections.deque((int(e), int(o), int(c)) for e, o, c in state["returned"])

    @property
    def exhausted(self) -> bool:
        return not self.returned and (self.left <= 0 or self.epoch >= self.epochs)


class AsyncLoop:
    def __init__(self, ps: LoopHost):
        self.ps = ps
        job = ps.job
        self.ssp = job.sync == "ssp"
        self.bound = job.staleness
        self.scale = SCALINGS[job.staleness_scaling]
        n = ps.train_samples
        self.work = WorkQueue(n, job.epochs, ps.total_steps * job.global_batch if job.max_steps else n * job.epochs)
        self.applied_in_epoch: collections.Counter[int] = collections.Counter()  # epoch -> samples applied
        self.samples_since_lr = 0
        self.clock_changed = asyncio.Condition()
        self.next_eval = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)  # (time, samples)
        self.drivers: dict[int, asyncio.Task] = {}
        self.accs: dict[int, torch.Tensor] = {}
        self.in_flight: dict[int, tuple[int, int, int]] = {}  # wid -> the slice it is computing
        if ps.resumed_loop:
            self._restore(ps.resumed_loop)

    def checkpoint_state(self) -> dict[str, Any]:
        """Between two updates: the work queue (slices in flight given back), samples applied per
        epoch, the LR schedule's sample count and the next epoch to evaluate."""
        return {
            **self.work.checkpoint_state(list(self.in_flight.values())),
            "applied_in_epoch": {str(e): c for e, c in self.applied_in_epoch.items()},
            "samples_since_lr": self.samples_since_lr,
            "next_eval": self.next_eval,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.work.restore(state)
        self.applied_in_epoch = collections.Counter({int(e): int(c) for e, c in state["applied_in_epoch"].items()})
        self.samples_since_lr = int(state["samples_since_lr"])
        self.next_eval = int(state["next_eval"])

    async def run(self) -> int:
        ps = self.ps
        while True:
            for h in ps.ready_workers():  # a driver for every worker, newcomers included
                if h.wid not in self.drivers:
                    h.clock = self._min_clock()
                    self.drivers[h.wid] = asyncio.create_task(self._drive(h))
            for t in self.drivers.values():
                failure = t.exception() if t.done() and not t.cancelled() else None
                if failure is not None:
                    raise failure
            active = [t for t in self.drivers.values() if not t.done()]
            if not active:
                if self.work.exhausted:
                    break
                log.warning("no workers left; waiting for one to join")
                await ps.wait_for_workers(1)
                continue
            membership = ps.next_membership_change()
            await asyncio.wait([membership, *active], return_when=asyncio.FIRST_COMPLETED)
            membership.cancel()
        while self.next_eval < ps.job.epochs and self.applied_in_epoch[self.next_eval] > 0:
            ps.end_epoch(self.next_eval)  # a partial last epoch (max_steps) is evaluated too
            self.next_eval += 1
        return self.next_eval

    def _min_clock(self) -> int:
        """The slowest clock among workers that still have a driver running."""
        clocks = [h.clock for h in self.ps.ready_workers() if h.wid in self.drivers and not self.drivers[h.wid].done()]
        return min(clocks, default=0)

    async def _drive(self, h: WorkerHandle) -> None:
        try:
            while self.ps.is_live(h) and await self._one(h):
                pass
        finally:
            await self._tick()  # our clock no longer holds anyone back

    async def _one(self, h: WorkerHandle) -> bool:
        """Give ``h`` one slice and apply its push; False when there is no more work for it."""
        ps = self.ps
        lead = 0
        if self.ssp:
            async with self.clock_changed:
                await self.clock_changed.wait_for(
                    lambda: not ps.is_live(h) or h.clock - self._min_clock() <= self.bound
                )
            if not ps.is_live(h):
                return False
            lead = h.clock - self._min_clock()
        sizes = ps.split_batch([w for w in ps.ready_workers() if w.wid in self.drivers])
        piece = self.work.take(max(1, sizes.get(h.wid, 1)))
        if piece is None:
            return False
        if not await ps.send_params(h):
            self.work.give_back(*piece)
            return False
        self.in_flight[h.wid] = piece
        a = Assignment.for_sizes(
            step=h.clock,
            attempt=0,
            total=ps.job.global_batch,
            sizes={h.wid: piece[2]},
            n_chunks=ps.n_chunks,
            acc=self._acc(h),
            version=h.params_version,
        )
        a.slices[h.wid] = piece
        t0 = time.perf_counter()
        try:
            if not await ps.send_schedule(h, a):
                raise WorkerLost(h.name)
            await ps.wait_done(a)
        except WorkerLost:
            self.work.give_back(*piece)  # someone else computes these samples
            return False
        finally:
            h.assignment = None
            self.in_flight.pop(h.wid, None)
        self._apply(h, a, piece, lead, t0)
        self._maybe_eval()
        ps.update_done()  # nothing yielded since the update: the state is whole
        await self._tick()
        return True

    def _acc(self, h: WorkerHandle) -> torch.Tensor:
        """Each worker's accumulator, allocated once (a fresh buffer costs page faults every time)."""
        acc = self.accs.get(h.wid)
        if acc is None:
            acc = self.accs[h.wid] = torch.zeros(self.ps.numel, dtype=torch.float32)
        return acc.zero_()

    async def _tick(self) -> None:
        async with self.clock_changed:
            self.clock_changed.notify_all()

    def _apply(self, h: WorkerHandle, a: Assignment, piece: tuple[int, int, int], lead: int, t0: float) -> None:
        ps = self.ps
        epoch, _, count = piece
        tau = ps.version - a.version
        scale = self.scale(tau)
        lr = ps.lr
        t_opt = time.perf_counter()
        if scale != 1.0:
            a.acc.mul_(scale)
        applied = ps.apply_update(a.acc)
        if not applied:
            log.error("update from %s: non-finite gradient; skipped", h.name)
            ps.emit_event("nonfinite_gradient", workers=[h.name])
        self.samples_since_lr += count
        while self.samples_since_lr >= ps.job.global_batch:
            self.samples_since_lr -= ps.job.global_batch
            ps.step_lr()
        self.applied_in_epoch[epoch] += count
        h.clock += 1
        ps.feed_scheduler(a)
        now = time.perf_counter()
        self.recent.append((now, count))
        span = now - self.recent[0][0]
        rate = sum(c for _, c in list(self.recent)[1:]) / span if span > 0 else count / (now - t0)
        r = a.reports[h.wid]  # the assignment is done: its one report is in
        ps.record_step(
            StepRecord(
                step=ps.step,
                epoch=epoch,
                attempts=1,
                loss=r.loss,
                lr=lr,
                version=ps.version,
                samples=count,
                step_s=now - t0,
                samples_per_s=rate,
                applied=applied,
                staleness=lead,
                server=ServerTiming(aggregate_s=t_opt - t0, optimizer_s=now - t_opt, broadcast_s=0.0),
                workers={str(h.rank): WorkerTiming.from_report(count, r.to_map(), a.early.get(h.wid, 0))},
                asynchronous=AsyncStep(worker=h.rank, tau=tau, scale=scale, clock=h.clock),
            )
        )

    def _maybe_eval(self) -> None:
        """Evaluate an epoch once all of its samples have been applied."""
        ps, n = self.ps, self.ps.train_samples
        while self.next_eval < ps.job.epochs and self.applied_in_epoch[self.next_eval] >= n:
            epoch = self.next_eval
            self.next_eval += 1
            ps.end_epoch(epoch)
