"""Bulk-synchronous steps: every worker computes on the same parameters, one update per step.

Step ``s`` over ``total`` samples (the global batch B, or an epoch's remainder):

1. the scheduler splits ``total`` into per-worker sizes ``b_i``; worker *i* gets the consecutive
   slice ``perm[offset_i : offset_i + b_i]`` of the epoch's seeded permutation;
2. its chunks are accumulated as ``acc += (b_i / total) · decode(chunk)``, so ``acc`` is the mean
   gradient over the union of the slices — exactly what one process would compute on that batch;
3. one optimizer update, stepped chunk by chunk on a thread while each stepped chunk is encoded once
   and written to every worker (``streamed_update.py``: the optimizer hides behind the broadcast).

A worker lost mid-step aborts the attempt: ``acc`` is cleared and the same samples are re-split
among the workers that remain (pushes of the old attempt are ignored), so every sample counts once.

A checkpoint holds the position of the next step, ``(epoch, offset)``; a resumed run starts there.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from hetero_ps.observe.records import ServerTiming, StepRecord, WorkerTiming
from hetero_ps.server.assignment import Assignment, WorkerLost
from hetero_ps.server.loops.host import LoopHost

log = logging.getLogger("hetero_ps.server")


class BSPLoop:
    def __init__(self, ps: LoopHost):
        self.ps = ps
        self.acc = torch.zeros(ps.numel, dtype=torch.float32)  # reused by every step
        resumed = ps.resumed_loop or {}
        self.position = (int(resumed.get("epoch", 0)), int(resumed.get("offset", 0)))  # of the next step

    def checkpoint_state(self) -> dict[str, int]:
        return {"epoch": self.position[0], "offset": self.position[1]}

    async def run(self) -> int:
        """All epochs (or ``max_steps``); returns the number of epochs started."""
        ps, n = self.ps, self.ps.train_samples
        epoch, offset = self.position
        while ps.step < ps.total_steps:
            while offset < n and ps.step < ps.total_steps:
                total = min(ps.job.global_batch, n - offset)
                await self._step(epoch, offset, total)
                offset += total
                if offset < n:
                    self.position = (epoch, offset)
                    ps.update_done()
            ps.end_epoch(epoch)
            epoch, offset = epoch + 1, 0
            self.position = (epoch, 0)
            ps.update_done()  # after the epoch's evaluation was taken: a resume never repeats it
        return epoch

    async def _step(self, epoch: int, offset: int, total: int) -> None:
        ps = self.ps
        t0 = time.perf_counter()
        attempt = 0
        while True:
            if not ps.ready_workers():
                log.warning("no workers left; waiting for one to join")
                await ps.wait_for_workers(1)
            live = ps.ready_workers()
            for h in live:  # newcomers first get the current parameters
                await ps.send_params(h)
            live = ps.ready_workers()
            if not live:
                continue
            sizes = {w: b for w, b in ps.split_batch(live, total).items() if b}
            self.acc.zero_()
            a = Assignment.for_sizes(
                step=ps.step,
                attempt=attempt,
                total=total,
                sizes=sizes,
                n_chunks=ps.n_chunks,
                acc=self.acc,
                version=ps.version,
            )
            cursor = offset
            for h in live:
                if h.wid in sizes:
                    a.slices[h.wid] = (epoch, cursor, sizes[h.wid])
                    cursor += sizes[h.wid]
            try:
                for h in live:
                    if h.wid in sizes:
                        await ps.send_schedule(h, a)
                if a.done.done():
                    a.done.result()  # raises WorkerLost if someone left while we were sending
                await ps.wait_done(a, stalls=True)
                break
            except WorkerLost as exc:
                for h in live:
                    if h.wid in sizes:
                        h.discarded_step = a.step  # told with its next SCHEDULE if that is for another step
                attempt += 1
                log.warning(
                    "step %d: %s; redoing the step with the %d remaining worker(s)",
                    ps.step,
                    exc,
                    len(ps.ready_workers()),
                )
            finally:
                for h in live:
                    h.assignment = None
        await self._apply(a, epoch, t0, time.perf_counter())

    async def _apply(self, a: Assignment, epoch: int, t0: float, t_agg: float) -> None:
        ps = self.ps
        lr = ps.lr
        t_opt = time.perf_counter()
        # Overlapped: stepped chunk by chunk beside the sends below; else all of it before them.
        applied = ps.start_update(self.acc) if ps.job.overlap else ps.apply_update(self.acc)
        optimizer_s = time.perf_counter() - t_opt
        if not applied:
            names = {h.wid: h.name for h in ps.ready_workers()}
            flagged = [names[w] for w, r in a.reports.items() if r.nonfinite and w in names]
            log.error(
                "step %d: non-finite gradient (from %s); step skipped, parameters unchanged",
                a.step,
                ", ".join(flagged) or "the aggregate",
            )
            ps.emit_event("nonfinite_gradient", workers=flagged)
        ps.step_lr()  # the update read its LR when it started
        await asyncio.gather(*(ps.send_params(h) for h in ps.ready_workers()))
        optimizer_s = await ps.update_finished() or optimizer_s
        t_end = time.perf_counter()
        ps.feed_scheduler(a)
        step_s = t_end - t0
        loss = sum(r.loss * a.sizes[w] for w, r in a.reports.items()) / max(1, a.total)
        ps.record_step(
            StepRecord(
                step=a.step,
                epoch=epoch,
                attempts=a.attempt + 1,
                loss=loss,
                lr=lr,
                version=ps.version,
                samples=a.total,
                step_s=step_s,
                samples_per_s=a.total / step_s,
                applied=applied,
                staleness=0,
                server=ServerTiming(aggregate_s=t_agg - t0, optimizer_s=optimizer_s, broadcast_s=t_end - t_agg),
                workers={
                    str(ps.rank_of(w)): WorkerTiming.from_report(a.sizes[w], r.to_map(), a.early.get(w, 0))
                    for w, r in a.reports.items()
                },
            )
        )
