"""Bulk-synchronous steps: every worker computes on the same parameters, one update per step.

Step ``s`` over ``total`` samples (the global batch B, or an epoch's remainder):

1. the scheduler splits ``total`` into per-worker sizes ``b_i``; worker *i* gets the consecutive
   slice ``perm[offset_i : offset_i + b_i]`` of the epoch's seeded permutation;
2. its chunks are accumulated as ``acc += (b_i / total) · decode(chunk)``, so ``acc`` is the mean
   gradient over the union of the slices — exactly what one process would compute on that batch;
3. one optimizer update, stepped chunk by chunk on a thread while each stepped chunk is encoded once
   and written to every worker (``streamed_update.py``: the optimizer hides behind the broadcast).

With ``overlap`` the next step's schedules go out *before* that broadcast, to the workers that take
a schedule ahead of its parameters (HELLO ``schedule_ahead``): they fetch their samples and run each
layer as soon as its chunk is in (``worker/overlap.py``) instead of after the whole pull. The split
is made from the reports just in, as it would be after the broadcast, and so is ``--compression auto``'s codec
choice (a worker moved to a delta pull gets this broadcast as its full resync). The update reads its
gradient until it is finished, so consecutive steps accumulate in two buffers.

A worker lost mid-step aborts the attempt: ``acc`` is cleared and the same samples are re-split
among the workers that remain (pushes of the old attempt are ignored), so every sample counts once.

A checkpoint holds the position of the next step, ``(epoch, offset)``; a resumed run starts there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hetero_ps.observe.records import ServerTiming, StepRecord, WorkerTiming
from hetero_ps.server.assignment import Assignment, WorkerLost
from hetero_ps.server.loops.host import LoopHost
from hetero_ps.server.loops.standby_rounds import Applied, StandbyRounds
from hetero_ps.server.registry import WorkerHandle

log = logging.getLogger("hetero_ps.server")

Then = Callable[[], "tuple[int, int, int] | None"]  # the next step's (epoch, offset, total), asked for late


def _constant(then: tuple[int, int, int] | None) -> Then:
    return lambda: then


@dataclass
class _Issued:
    """A step's assignment and the workers it was given; ``unsent``: those whose SCHEDULE is still to go."""

    a: Assignment
    workers: list[WorkerHandle]
    unsent: list[WorkerHandle] = field(default_factory=list)


class BSPLoop:
    schedules_ahead = True  # with the job's overlap: the next step's schedules go out before the broadcast

    def __init__(self, ps: LoopHost):
        self.ps = ps
        # Two gradient buffers: step s + 1 may accumulate while step s's update still reads its own.
        self.accs = (torch.zeros(ps.numel, dtype=torch.float32), torch.zeros(ps.numel, dtype=torch.float32))
        resumed = ps.resumed_loop or {}
        self.position = (int(resumed.get("epoch", 0)), int(resumed.get("offset", 0)))  # of the next step
        self._ahead: _Issued | None = None  # the next step, scheduled before the last update's broadcast
        self.rounds = StandbyRounds(ps)  # standby workers' local rounds (standby_rounds.py)

    def checkpoint_state(self) -> dict[str, int]:
        return {"epoch": self.position[0], "offset": self.position[1]}

    async def run(self) -> int:
        """All epochs (or ``max_steps``); returns the number of epochs started."""
        ps, n = self.ps, self.ps.train_samples
        epoch, offset = self.position
        while ps.step < ps.total_steps:
            while offset < n and ps.step < ps.total_steps:
                if self._ahead is None:  # (a step scheduled ahead holds the samples from here)
                    offset = await self.rounds.give(epoch, offset)
                total = min(ps.job.global_batch, n - offset)
                after = offset + total
                # The next step of this epoch may be scheduled ahead, beside this one's broadcast,
                # unless a standby worker's round is to be given there first.
                then = (epoch, after, min(ps.job.global_batch, n - after)) if after < n else None
                if then is not None and self.rounds.plans(epoch, after):
                    then = None
                await self._step(epoch, offset, total, _constant(then) if ps.step + 1 < ps.total_steps else None)
                offset = after
                if offset < n:
                    self.position = (epoch, offset)
                    ps.update_done()
            await self._finish_rounds(epoch)  # the epoch's evaluation sees all of its samples
            ps.end_epoch(epoch)
            epoch, offset = epoch + 1, 0
            self.position = (epoch, 0)
            ps.update_done()  # after the epoch's evaluation was taken: a resume never repeats it
        return epoch

    async def _step(self, epoch: int, offset: int, total: int, then: Then | None) -> None:
        """One step over ``total`` samples from ``offset``; ``then()`` (after this step's reports are
        in): the next step's ``(epoch, offset, total)`` to schedule ahead, or None."""
        ps = self.ps
        t0 = time.perf_counter()
        acc = self.accs[ps.step % 2]
        issued, self._ahead = self._ahead, None
        attempt = 0
        try:
            while True:
                if issued is None:
                    issued = await self._issue(ps.step, attempt, epoch, offset, total, acc)
                    if issued is None:
                        continue
                a = issued.a
                try:
                    lost = [h for h in issued.workers if not ps.is_live(h)]
                    if lost:  # lost between a schedule sent ahead and now (its push will never come)
                        raise WorkerLost(f"{lost[0].name} left before step {a.step} began")
                    for h in issued.unsent:  # schedules not sent ahead: the parameters went first
                        await ps.send_schedule(h, a)
                    issued.unsent = []
                    if a.done.done():
                        a.done.result()  # raises WorkerLost if someone left while we were sending
                    await ps.wait_done(a, stalls=True)
                    await self._complete(issued)
                    break
                except WorkerLost as exc:
                    if self._salvage(issued, exc):
                        continue
                    for h in issued.workers:
                        h.discarded_step = a.step  # told with its next SCHEDULE if that is for another step
                        h.assignment = None
                    attempt += 1
                    issued = None
                    log.warning(
                        "step %d: %s; redoing the step with the %d remaining worker(s)",
                        ps.step,
                        exc,
                        len(ps.ready_workers()),
                    )
        finally:
            for h in issued.workers if issued is not None else ():
                h.assignment = None
        await self._apply(a, epoch, t0, time.perf_counter(), then)

    def _salvage(self, issued: _Issued, exc: WorkerLost) -> bool:
        """Whether the step goes on without the workers it lost (a BSP step never does: it is redone)."""
        return False

    async def _complete(self, issued: _Issued) -> None:
        """Every report (and push) of the step is in; raises WorkerLost if the step must be redone."""

    def _owed_chunks(self) -> int:
        """Gradient chunks each worker of a step pushes to the master."""
        return self.ps.n_chunks

    def _split(self, live: list[WorkerHandle], total: int, step: int) -> dict[int, int]:
        """Samples per worker (wid -> count) for a step of ``total`` samples."""
        return self.ps.split_batch(live, total, step)

    def _shape(self, a: Assignment, epoch: int, offset: int) -> None:
        """Anything a step's assignment carries besides its slices (local steps: H and the inner LR)."""

    def _after_reports(self, a: Assignment) -> None:
        """The step's reports are in and fed to the scheduler; the next step is not issued yet."""

    async def _issue(
        self, step: int, attempt: int, epoch: int, offset: int, total: int, acc: torch.Tensor, ahead: bool = False
    ) -> _Issued | None:
        """Split ``total`` samples among the ready workers and send their schedules (None: nobody is left).

        ``ahead`` (before the broadcast of the parameters the step is computed on): only the
        workers that take a schedule ahead get theirs now; the rest are ``unsent``, for after the
        broadcast. Otherwise each worker of the step gets the current parameters first (a newcomer,
        or one back from standby: the broadcast goes only to the workers of the next step)."""
        ps = self.ps
        if not ps.ready_workers():
            log.warning("no workers left; waiting for one to join")
            await ps.wait_for_workers(1)
        if not self.rounds.free(ps.ready_workers()):  # only workers on a local round are left
            await self.rounds.wait_all()
        # Slices in rank order (reproducible); a worker on a local round has its own samples already.
        live = sorted(self.rounds.free(ps.ready_workers()), key=lambda h: h.rank)
        if not live:
            return None
        sizes = {w: b for w, b in self._split(live, total, step).items() if b}
        acc.zero_()
        owed = self._owed_chunks()
        a = Assignment.for_sizes(
            step=step, attempt=attempt, total=total, sizes=sizes, n_chunks=owed, acc=acc, version=ps.version
        )
        self._shape(a, epoch, offset)
        issued = _Issued(a, [h for h in live if h.wid in sizes])
        if not ahead:
            for h in issued.workers:
                await ps.send_params(h)
        cursor = offset
        for h in issued.workers:
            a.slices[h.wid] = (epoch, cursor, sizes[h.wid])
            cursor += sizes[h.wid]
        for h in issued.workers:
            if ahead and not h.schedule_ahead:
                issued.unsent.append(h)
            else:
                if ahead:
                    a.ahead.add(h.wid)
                await ps.send_schedule(h, a)
        return issued

    async def _apply(self, a: Assignment, epoch: int, t0: float, t_agg: float, then: Then | None) -> None:
        ps = self.ps
        lr = a.lr if a.local_steps else ps.lr  # local steps: the inner optimizer's (the outer one's is fixed)
        rounds = self.rounds.take_done()  # standby workers' rounds that are in: applied with this step
        changes = StandbyRounds.changes(rounds)
        t_opt = time.perf_counter()
        # Overlapped: stepped chunk by chunk beside the sends below; else all of it before them.
        applied = ps.start_update(a.acc, changes) if ps.job.overlap else ps.apply_update(a.acc, changes)
        if not applied and changes:
            ps.apply_changes(changes)  # the step's gradient was not finite; the rounds' changes are
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
        ps.feed_scheduler(a)  # and codec choice: before the next schedule, which names each worker's push codec
        for x in rounds:
            ps.feed_scheduler(x.round.a)
        self._after_reports(a)
        nxt = then() if then is not None else None
        if nxt is not None and ps.job.overlap and self.schedules_ahead and ps.ready_workers():
            # The next step's schedules go out first: its workers start while the parameters arrive.
            self._ahead = await self._issue(a.step + 1, 0, *nxt, self.accs[(a.step + 1) % 2], ahead=True)
        # To the workers of the next step: one on standby would hold up the step with a pull it does not need.
        targets = (
            self._ahead.workers if self._ahead is not None else [h for h in ps.ready_workers() if not ps.on_standby(h)]
        )
        await asyncio.gather(*(ps.send_params(h) for h in targets))
        if self._ahead is not None:  # its stall limits count from here, as for a step scheduled after the pull
            self._ahead.a.started = time.perf_counter()
        optimizer_s = await ps.update_finished() or optimizer_s
        t_end = time.perf_counter()
        step_s = t_end - t0
        loss = sum(r.loss * a.sizes[w] for w, r in a.reports.items()) / max(1, a.total)
        workers = {
            str(ps.rank_of(w)): WorkerTiming.from_report(
                a.sizes[w], r.to_map(), a.early.get(w, 0), w in a.ahead, a.local_steps
            )
            for w, r in a.reports.items()
        }
        samples = a.total + sum(x.round.a.total for x in rounds)  # the rounds' samples entered this update
        ps.record_step(
            StepRecord(
                step=a.step,
                epoch=epoch,
                attempts=a.attempt + 1,
                loss=loss,
                lr=lr,
                version=ps.version,
                samples=samples,
                step_s=step_s,
                samples_per_s=samples / step_s,
                applied=applied,
                staleness=0,
                local_steps=a.local_steps,
                server=ServerTiming(aggregate_s=t_agg - t0, optimizer_s=optimizer_s, broadcast_s=t_end - t_agg),
                workers={**workers, **self._round_timings(rounds)},
            )
        )

    def _round_timings(self, rounds: list[Applied]) -> dict[str, WorkerTiming]:
        return {
            str(self.ps.rank_of(x.round.h.wid)): WorkerTiming.from_report(
                x.round.a.total, x.round.a.reports[x.round.h.wid].to_map(), local_steps=x.round.a.local_steps
            )
            for x in rounds
        }

    async def _finish_rounds(self, epoch: int) -> None:
        """Wait for the standby workers' rounds still out and apply them as an update of their own
        (recorded as a step of their samples): the epoch ends with all of its samples trained."""
        ps = self.ps
        if not self.rounds.out:
            return
        t0 = time.perf_counter()
        await self.rounds.wait_all()
        rounds = self.rounds.take_done()
        if not rounds:
            return
        ps.apply_changes(StandbyRounds.changes(rounds))
        for x in rounds:
            ps.feed_scheduler(x.round.a)
        samples = sum(x.round.a.total for x in rounds)
        step_s = max(1e-9, time.perf_counter() - t0)
        reports = [(x.round.a.reports[x.round.h.wid], x.round.a.total) for x in rounds]
        ps.record_step(
            StepRecord(
                step=ps.step,
                epoch=epoch,
                attempts=1,
                loss=sum(r.loss * n for r, n in reports) / samples,
                lr=ps.lr,
                version=ps.version,
                samples=samples,
                step_s=step_s,
                samples_per_s=samples / step_s,
                applied=True,
                staleness=max(x.staleness for x in rounds),
                server=ServerTiming(aggregate_s=step_s, optimizer_s=0.0, broadcast_s=0.0),
                workers=self._round_timings(rounds),
            )
        )
