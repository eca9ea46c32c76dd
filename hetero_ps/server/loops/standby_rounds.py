"""A BSP worker on standby runs local rounds instead of idling (``--standby-role local``).

The scheduler stands a worker by when waiting for it would lengthen every BSP step (its link,
mostly: ``scheduler.py``). Such a worker still computes as fast as ever; what it cannot do is
exchange parameters every step. So between two BSP steps the loop gives it a *round*: the next
``count = H · b`` samples of the epoch's order (the BSP steps go on after them, so every sample is
still trained once per epoch), with ``b`` its share of the global batch by speed and H such that its
link costs at most a tenth of the round (``LoopHost.round_for``). It runs H steps of its own
optimizer from the version it was sent and pushes the change ``Δ = θ_v − θ_after`` (docs/PROTOCOL.md,
"Local steps"), while the others keep stepping.

When the round is in, the next BSP update applies it beside its own step, in the same version:
``θ ← step(θ, acc) − w · Δ`` with ``w = scale(τ / H)``, ``τ`` the updates applied since its version
and ``scale`` the job's staleness scaling (``--staleness-scaling``, as SSP damps a stale gradient).
A round that was about as long as H BSP steps has ``τ / H ≈ 1``. The round's samples count in that
step's record, with the worker's timing (``local_steps`` H). A round is only given when it should be
back before the BSP steps reach the epoch's end; at the end the loop waits for the rounds still out
(so an epoch's evaluation has all its samples) and applies them as an update of their own.

A worker lost mid-round, or past its stall limit (counted from when the loop starts waiting for it),
loses that round only (its samples go untrained). Each round ends
in a ``local_round`` event (applied with its weight, lost, or non-finite). The round's report feeds
the scheduler as a BSP step of the worker would have taken (its compute per inner step plus its
transfer), so it comes back into the steps when its link allows, without probe steps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from hetero_ps.server.assignment import Assignment, WorkerLost
from hetero_ps.server.loops.async_sgd import SCALINGS
from hetero_ps.server.loops.host import LoopHost
from hetero_ps.server.registry import WorkerHandle
from hetero_ps.server.streamed_update import Changes
from hetero_ps.training.optim import all_finite

log = logging.getLogger("hetero_ps.server")


@dataclass
class Round:
    """One standby worker's round in flight."""

    h: WorkerHandle
    a: Assignment


@dataclass
class Applied:
    """A round whose change goes into an update, with its weight."""

    round: Round
    weight: float
    staleness: int


def fitting_steps(left: int, global_batch: int, step_s: float, batch: int, inner_s: float, transfer_s: float) -> int:
    """The most inner steps of ``batch`` samples (``inner_s`` each, plus ``transfer_s`` once) a round
    may have so that it is back before the BSP steps (``step_s`` per ``global_batch``) have trained
    the ``left`` samples of the epoch that the round does not take: ``H · inner_s + transfer_s ≤
    ((left − H · batch) / B) · step_s``."""
    per_step = inner_s + batch * step_s / global_batch
    return max(0, math.floor((left * step_s / global_batch - transfer_s) / per_step))


class StandbyRounds:
    def __init__(self, ps: LoopHost):
        self.ps = ps
        self.out: dict[int, Round] = {}  # wid -> its round in flight
        self.scale = SCALINGS[ps.job.staleness_scaling]

    def plans(self, epoch: int, offset: int) -> list[tuple[WorkerHandle, int, int]]:
        """``(worker, samples, H)`` of the rounds to give at ``offset``: to each standby worker without
        one, as long a round as its link wants (``round_for``) and as should be back before the BSP
        steps reach the epoch's end (none if not even one inner step would)."""
        ps = self.ps
        if not ps.standby_rounds:
            return []
        step_s = ps.predicted_step_s()
        if not step_s:
            return []
        n, b = ps.train_samples, ps.job.global_batch
        out = []
        for h in ps.ready_workers():
            if not ps.on_standby(h) or h.wid in self.out:
                continue
            plan = ps.round_for(h)
            if plan is None:
                continue
            batch, wanted, inner_s, transfer_s = plan
            steps = min(wanted, fitting_steps(n - offset, b, step_s, batch, inner_s, transfer_s))
            if steps < max(1, wanted // 4):  # a short round would spend its link on few samples
                continue
            out.append((h, batch * steps, steps))
            offset += batch * steps
        return out

    async def give(self, epoch: int, offset: int) -> int:
        """Give the rounds due at ``offset``; the offset the BSP steps go on from."""
        ps = self.ps
        for h, count, steps in self.plans(epoch, offset):
            a = Assignment.for_sizes(
                step=ps.step,
                attempt=0,
                total=count,
                sizes={h.wid: count},
                n_chunks=ps.n_chunks,
                acc=torch.zeros(ps.numel, dtype=torch.float32),
                version=ps.version,
            )
            a.local_steps, a.lr = steps, ps.lr
            a.slices[h.wid] = (epoch, offset, count)
            if not (await ps.send_params(h) and await ps.send_schedule(h, a)):
                continue  # lost on the way: nothing was given
            self.out[h.wid] = Round(h, a)
            ps.set_busy(h.wid, True)
            log.info("%s (standby): a local round of %d steps on %d samples", h.name, steps, count)
            offset += count
        return offset

    def free(self, workers: list[WorkerHandle]) -> list[WorkerHandle]:
        """Those of ``workers`` not computing a round (one that finished it may take a step)."""
        return [h for h in workers if h.wid not in self.out or self.out[h.wid].a.done.done()]

    def take_done(self) -> list[Applied]:
        """The rounds that are in, finite and still worth applying (each with its weight); lost and
        non-finite ones are dropped, each with its event."""
        ps, applied = self.ps, []
        for wid, r in list(self.out.items()):
            if not r.a.done.done():
                continue
            del self.out[wid]
            ps.set_busy(wid, False)
            if r.h.assignment is r.a:
                r.h.assignment = None
            count, steps = r.a.total, r.a.local_steps
            base = dict(rank=r.h.rank, samples=count, local_steps=steps)
            if r.a.done.exception() is not None:
                why = r.a.done.exception()
                log.warning("%s: its local round was lost (%s); its %d samples go untrained", r.h.name, why, count)
                ps.emit_event("local_round", **base, staleness=0, weight=0.0, outcome="lost")
                continue
            tau = ps.version - r.a.version
            if r.a.reports[wid].nonfinite or not all_finite(r.a.acc):
                log.error("%s: its local round's change is not finite; not applied", r.h.name)
                ps.emit_event("local_round", **base, staleness=tau, weight=0.0, outcome="nonfinite")
                continue
            weight = self.scale(tau / steps)
            ps.emit_event("local_round", **base, staleness=tau, weight=round(weight, 6), outcome="applied")
            applied.append(Applied(r, weight, tau))
        return applied

    @staticmethod
    def changes(applied: list[Applied]) -> Changes:
        return [(x.round.a.acc.numpy(), x.weight) for x in applied]

    async def wait_all(self) -> None:
        """Wait for every round out (a stalled worker is suspended and its round lost). The stall
        limit counts from now, not from the round's start: what it bounds is how long the others wait
        here, and a round that runs late under load (it was not waited for until now) still lands."""
        since = time.perf_counter()
        for r in list(self.out.values()):
            try:
                await self.ps.wait_done(r.a, stalls=True, since=since)
            except WorkerLost:  # take_done reports it
                pass
