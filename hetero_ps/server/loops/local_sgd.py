"""Local steps (``--sync local``): every worker runs H steps of its own optimizer on its slice, then
the master applies the workers' weighted mean parameter change with an outer Nesterov step (DiLoCo).

A *round* is one step of :class:`BSPLoop` (its split, slices, chunked pushes, two buffers, streamed
broadcast and schedules ahead) over H global batches instead of one:

1. the scheduler splits the global batch B into per-step sizes ``b_i`` as in BSP; worker *i* gets
   ``n_i ≈ H · b_i`` consecutive samples of the epoch's permutation (largest remainder, so the
   slices tile the round's ``n = min(H · B, rest of the epoch)`` samples: every sample once);
2. it runs the job's optimizer (its own state, kept across rounds) over H consecutive parts of its
   slice, from the round's parameters θ, and pushes ``Δ_i = θ − θ_i`` (docs/PROTOCOL.md, "Local steps");
3. ``acc = Σ_i (n_i / n) · Δ_i`` and the outer step ``v ← μ v + acc``, ``θ ← θ − η (acc + μ v)``.

Every change of a round is computed from the round's version: staleness 0, recorded as such. With
``η = 1, μ = 0`` the master's θ becomes ``Σ (n_i / n) θ_i`` (federated averaging), and with one
worker exactly H steps of its optimizer: tests/test_local_steps.py checks both to the bit.

``--local-steps auto``: after each round, H becomes the smallest that keeps every worker's measured
transfer (encode + push + pull) under ``AUTO_HIDE`` of its compute for the round (so a slow link
costs at most a tenth of the round), within ``[least, AUTO_MAX]``: the largest such H of the last
``AUTO_WINDOW`` rounds (a link's transfer varies), taken when larger than the current H or at most
half of it. The least is 1 with plain averaging, ``AUTO_MIN_MOMENTUM`` with an outer momentum.

A worker lost (or stalled) before it pushed anything of its round is left out of it: the others'
changes are re-weighted to the samples that remain and only its own slice goes untrained
(``round_salvaged`` event). One lost mid-push has part of its change in ``acc``: that round is
redone by the others, as a BSP step is.

A checkpoint holds ``(epoch, offset)`` and H; ``--max-steps`` and the inner LR schedule count global
batches (``H`` of them per round), so a local run and a BSP run at the same number of samples take
the same learning rates.
"""

from __future__ import annotations

import collections
import functools
import logging
import math

from hetero_ps.server.assignment import Assignment, WorkerLost
from hetero_ps.server.loops.bsp import BSPLoop, _Issued
from hetero_ps.server.loops.host import LoopHost
from hetero_ps.server.registry import WorkerHandle
from hetero_ps.server.solver import round_preserving_sum
from hetero_ps.training import recipes
from hetero_ps.training.optim import lr_factor
from hetero_ps.wire.messages import StepReport

log = logging.getLogger("hetero_ps.server")

AUTO_START = 4  # H of the first round with --local-steps auto (a round to measure the links)...
AUTO_HIDE = 0.1  # auto: a worker's transfer may take at most this fraction of its round's compute
AUTO_MAX = 64  # auto: at most this many inner steps per round
AUTO_WINDOW = 5  # auto: H hides the largest transfer of this many recent rounds
# ...and auto's least H with an outer momentum (measured, gpt2 tiny, DiLoCo's 0.7 / 0.9: perplexity
# 36.9 at H = 4, 32.9 at 16, BSP 35.5; at H = 1 on loopback 55.7). Plain averaging goes down to 1.
AUTO_MIN_MOMENTUM = 16


def needed_local_steps(transfers: list[tuple[float, float]], least: int = 1) -> tuple[int, str]:
    """The least H (within ``[least, AUTO_MAX]``) that keeps every worker's transfer under
    ``AUTO_HIDE`` of its round's compute, and why; ``transfers``: each worker's (transfer seconds,
    compute seconds for its share of one global batch), as measured in a round."""
    need, why = least, "every transfer is small against its compute"
    for transfer_s, step_s in transfers:
        if step_s <= 0:
            continue
        h = math.ceil(transfer_s / (AUTO_HIDE * step_s))
        if h > need:
            need, why = h, f"a transfer of {transfer_s:.3g} s against {step_s:.3g} s of compute per inner step"
    return max(least, min(AUTO_MAX, need)), why


def next_local_steps(current: int, recent: list[int]) -> int:
    """auto's H after a round: the largest need of the ``recent`` rounds (a link's measured transfer
    varies from round to round; the worst recent one is what must hide), taken when it is larger
    than ``current`` or at most half of it (a margin, so H does not flip between two values)."""
    target = max(recent)
    return target if target > current or 2 * target <= current else current


def _transfer_s(r: StepReport) -> float:
    """What a worker's round spent moving its change and parameters (not computing)."""
    return r.encode_s + r.push_s + r.pull_s


class LocalLoop(BSPLoop):
    def __init__(self, ps: LoopHost):
        super().__init__(ps)
        resumed = ps.resumed_loop or {}
        self.least = 1 if recipes.outer_step(ps.job)[1] == 0 else AUTO_MIN_MOMENTUM  # auto's least H
        self.local_steps = ps.job.local_steps or int(resumed.get("local_steps", max(AUTO_START, self.least)))
        self.recent_needs: collections.deque[int] = collections.deque(maxlen=AUTO_WINDOW)  # auto: measured needs
        self.inner_lr = lr_factor(ps.job, ps.total_steps)  # × job.lr, of the round's first global batch
        self.steps_per_epoch = math.ceil(ps.train_samples / ps.job.global_batch)

    def checkpoint_state(self) -> dict[str, int]:
        return {**super().checkpoint_state(), "local_steps": self.local_steps}

    def _batches(self, epoch: int, offset: int) -> int:
        """Global batches trained before ``(epoch, offset)``: the clock of ``--max-steps`` and the LR."""
        return epoch * self.steps_per_epoch + math.ceil(offset / self.ps.job.global_batch)

    def _round(self, epoch: int, offset: int) -> tuple[int, int, int] | None:
        """The round from ``(epoch, offset)``: ``(epoch, offset, samples)``, or None at the epoch's end
        or when the run's global batches are used up."""
        ps, b = self.ps, self.ps.job.global_batch
        left = ps.total_steps - self._batches(epoch, offset)
        if offset >= ps.train_samples or left <= 0:
            return None
        return epoch, offset, min(min(self.local_steps, left) * b, ps.train_samples - offset)

    async def run(self) -> int:
        ps = self.ps
        epoch, offset = self.position
        while self._batches(epoch, offset) < ps.total_steps:
            while (r := self._round(epoch, offset)) is not None:
                after = offset + r[2]
                await self._step(*r, functools.partial(self._round, epoch, after))
                offset = after
                if offset < ps.train_samples:
                    self.position = (epoch, offset)
                    ps.update_done()
            ps.end_epoch(epoch)
            epoch, offset = epoch + 1, 0
            self.position = (epoch, 0)
            ps.update_done()
        return epoch

    # -- BSPLoop's hooks --------------------------------------------------------------------------
    def _split(self, live: list[WorkerHandle], total: int, step: int) -> dict[int, int]:
        """Each worker's share of the global batch (the scheduler's, as in BSP), times the round."""
        per_step = self.ps.split_batch(live, None, step)
        wids = sorted(per_step)
        b = sum(per_step.values())
        shares = [total * per_step[w] / b for w in wids]
        return dict(zip(wids, round_preserving_sum(shares, total, [0] * len(wids), [total] * len(wids))))

    def _shape(self, a: Assignment, epoch: int, offset: int) -> None:
        a.local_steps = math.ceil(a.total / self.ps.job.global_batch)
        a.lr = float(self.ps.job.lr or 0.0) * self.inner_lr(self._batches(epoch, offset))

    def _after_reports(self, a: Assignment) -> None:
        """``--local-steps auto``: the next rounds' H, from each worker's transfer against its compute
        for its share of one global batch (a round at an epoch's end is shorter, not faster)."""
        if self.ps.job.local_steps:
            return
        b = self.ps.job.global_batch
        need, why = needed_local_steps(
            [(_transfer_s(r), r.compute_s * b / a.total) for r in a.reports.values()], self.least
        )
        self.recent_needs.append(need)
        h = next_local_steps(self.local_steps, list(self.recent_needs))
        if h == self.local_steps:
            return
        if need != h:
            why = f"the largest need of the last {len(self.recent_needs)} rounds"
        log.info("--local-steps auto: %d inner steps per round from now on (was %d): %s", h, self.local_steps, why)
        self.ps.emit_event("local_steps", local_steps=h, previous=self.local_steps, reason=why)
        self.local_steps = h

    def _salvage(self, issued: _Issued, exc: WorkerLost) -> bool:
        """Go on without the workers that left before pushing any of their round (their samples are
        lost, nobody else's work is) or after finishing it (its change counts); False when one left
        mid-push or nobody would be left."""
        ps, a = self.ps, issued.a
        ready = {h.wid for h in ps.ready_workers()}
        kept = [h for h in issued.workers if h.wid in ready]
        # One that finished its part before it left: its change is in, whole; nothing to drop.
        out = [h for h in issued.workers if h.wid not in ready and not a.worker_finished(h.wid)]
        if len(out) == len(a.sizes) or any(h.wid in a.pushed for h in out):
            return False
        for h in out:
            samples = a.sizes[h.wid]
            a.drop(h.wid)
            h.discarded_step, h.assignment = a.step, None
            log.warning(
                "round %d: %s (%s) before pushing; the round goes on with the other %d worker(s), its %d samples "
                "untrained",
                a.step,
                h.name,
                exc,
                len(kept),
                samples,
            )
            ps.emit_event("round_salvaged", rank=h.rank, reason=str(exc), samples=samples)
        issued.workers = kept
        issued.unsent = [h for h in issued.unsent if h.wid in ready]
        a.reopen()
        return True
