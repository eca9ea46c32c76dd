"""Per-worker batch sizes: which policy, which measurements, when to change.

Policies (``--load-balance-policy``, active with ``--enable-load-balancing``):

* ``uniform``  — equal shares (what a homogeneous DDP job does); the default without load balancing.
* ``proportional`` — shares from what each worker reported at join: its calibration probe of the
  job's model (samples/s), else a spec-based guess (cores, GPU). Never changes afterwards.
* ``dynamic`` — shares from measured step times: each worker's ``t_i(b) = c_i + b / r_i`` is fitted
  from its recent (batch, seconds) observations with an EWMA, then the solver in ``solver.py``
  equalises predicted times. Re-solved every ``rebalance_interval`` steps.
* ``hybrid`` — ``proportional`` until every worker has ``warmup_observations`` measurements, then
  ``dynamic``.

Hysteresis: a new split is adopted only if it shortens the predicted step by more than
``min_gain`` (default 3 %), so noise does not make shares oscillate. Every decision is returned with
its inputs and its reason so the server can log it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hetero_ps.server.solver import predicted_step_time, round_preserving_sum, solve_batch_sizes


@dataclass
class WorkerModel:
    """What the scheduler knows about one worker's speed."""

    rate_hint: float = 0.0          # samples/s from the join-time probe or specs (0 = unknown)
    max_batch: int = 0              # the largest batch that fits its memory (0 = no cap)
    observations: list = field(default_factory=list)   # recent (batch, seconds) pairs, newest last
    rate: float = 0.0               # fitted samples/s (EWMA)
    fixed: float = 0.0              # fitted fixed cost per step in seconds (EWMA)

    def observe(self, batch: int, seconds: float, alpha: float = 0.3, keep: int = 20) -> None:
        """Add a measurement and refit ``c`` and ``r``.

        With two or more distinct batch sizes in the window a least-squares line ``t = c + b/r``
        is fitted; with one, ``c`` keeps its estimate and ``r = b / (t - c)``. The fit is blended
        into the running estimate with weight ``alpha`` (EWMA), and outliers beyond 3x the median
        time per sample are ignored.
        """
        if batch <= 0 or not (seconds > 0 and math.isfinite(seconds)):
            return
        self.observations.append((batch, seconds))
        del self.observations[:-keep]
        per = sorted(t / b for b, t in self.observations)
        median = per[len(per) // 2]
        obs = [(b, t) for b, t in self.observations if t / b <= 3 * median]
        bs = {b for b, _ in obs}
        c_new, r_new = self.fixed, 0.0
        if len(bs) >= 2:
            n = len(obs)
            mb = sum(b for b, _ in obs) / n
            mt = sum(t for _, t in obs) / n
            sbb = sum((b - mb) ** 2 for b, _ in obs)
            slope = sum((b - mb) * (t - mt) for b, t in obs) / sbb
            if slope > 0:
                c_new = max(0.0, mt - slope * mb)
                r_new = 1.0 / slope
        if r_new <= 0:
            b, t = obs[-1]
            c_new = min(self.fixed, 0.5 * t)
            r_new = b / (t - c_new)
        if self.rate <= 0:
            self.rate, self.fixed = r_new, c_new
        else:
            self.rate += alpha * (r_new - self.rate)
            self.fixed += alpha * (c_new - self.fixed)


@dataclass(frozen=True)
class Decision:
    """A split and why it was chosen (logged as a metrics event)."""

    sizes: dict            # worker id -> batch size
    policy: str
    reason: str
    predicted_step_s: float = 0.0
    previous_predicted_s: float = 0.0
    inputs: dict = field(default_factory=dict)   # worker id -> {"c": s, "r": samples/s}


class Scheduler:
    """Decides every worker's batch size; the server asks it each step."""

    def __init__(self, global_batch: int, policy: str = "uniform", rebalance_interval: int = 10,
                 min_batch: int = 1, min_gain: float = 0.03, warmup_observations: int = 3,
                 fixed_sizes: dict | None = None):
        self.global_batch = global_batch
        self.policy = policy
        self.rebalance_interval = max(1, rebalance_interval)
        self.min_batch = min_batch
        self.min_gain = min_gain
        self.warmup_observations = warmup_observations
        self.fixed_sizes = fixed_sizes or {}   # rank -> size, from --worker-batch-sizes
        self.models: dict[int, WorkerModel] = {}
        self.sizes: dict[int, int] = {}
        self._last_solve_step = -1

    # -- membership -------------------------------------------------------------------------
    def add_worker(self, wid: int, rate_hint: float = 0.0, max_batch: int = 0) -> None:
        self.models[wid] = WorkerModel(rate_hint=rate_hint, max_batch=max_batch)
        self.sizes = {}   # membership changed: next assign() re-solves

    def remove_worker(self, wid: int) -> None:
        self.models.pop(wid, None)
        self.sizes = {}

    def observe(self, wid: int, batch: int, seconds: float) -> None:
        if wid in self.models:
            self.models[wid].observe(batch, seconds)

    # -- decisions ----------------------------------------------------------------------------
    def assign(self, step: int, workers: list[int], total: int | None = None,
               ranks: dict[int, int] | None = None) -> tuple[dict[int, int], Decision | None]:
        """The sizes for this step, and a Decision when the split changed (else None).

        ``total`` is this step's batch: the global batch, or the remainder at an epoch's end, which
        is split in the current proportions without a new decision.
        """
        total = self.global_batch if total is None else total
        wids = sorted(workers)
        decision = None
        if set(self.sizes) != set(wids):
            decision = self._decide(step, wids, ranks, "membership changed")
        elif self.policy in ("dynamic", "hybrid") and step - self._last_solve_step >= self.rebalance_interval:
            decision = self._decide(step, wids, ranks, f"rebalance interval ({self.rebalance_interval} steps)")
        if total == self.global_batch:
            return dict(self.sizes), decision
        cur = [self.sizes[w] for w in wids]
        shares = [total * b / self.global_batch for b in cur]
        partial = round_preserving_sum(shares, total, [0] * len(wids), [total] * len(wids))
        return dict(zip(wids, partial)), decision

    def _bounds(self, wids: list[int]) -> tuple[list[int], list[int]]:
        total, n = self.global_batch, len(wids)
        lo = [max(1, min(self.min_batch, total // n))] * n
        hi = [self.models[w].max_batch or total for w in wids]
        if sum(hi) < total:   # memory caps cannot hold the batch: ignore them rather than fail
            hi = [total] * n
        return lo, hi

    def _inputs(self, wids: list[int]) -> tuple[list[float], list[float], str]:
        """(c, r, source) for the active policy."""
        ms = [self.models[w] for w in wids]
        measured = all(m.rate > 0 for m in ms)
        warm = all(len(m.observations) >= self.warmup_observations for m in ms)
        if measured and (self.policy == "dynamic" or (self.policy == "hybrid" and warm)):
            return [m.fixed for m in ms], [m.rate for m in ms], "measured"
        if self.policy != "uniform" and all(m.rate_hint > 0 for m in ms):
            return [0.0] * len(ms), [m.rate_hint for m in ms], "profile"
        return [0.0] * len(ms), [1.0] * len(ms), "uniform"

    def _decide(self, step: int, wids: list[int], ranks: dict[int, int] | None, why: str) -> Decision | None:
        self._last_solve_step = step
        total = self.global_batch
        if len(wids) > total:
            raise ValueError(f"{len(wids)} workers cannot share a global batch of {total}")
        fixed = self.fixed_sizes
        if fixed and ranks and all(ranks.get(w) in fixed for w in wids) \
                and sum(fixed[ranks[w]] for w in wids) == total:
            return self._adopt({w: fixed[ranks[w]] for w in wids}, "fixed", f"{why}; --worker-batch-sizes")
        lo, hi = self._bounds(wids)
        c, r, source = self._inputs(wids)
        new = solve_batch_sizes(c, r, total, lo, hi)
        t_new = predicted_step_time(c, r, new)
        inputs = {w: {"c": ci, "r": ri} for w, ci, ri in zip(wids, c, r)}
        if set(self.sizes) == set(wids):
            t_old = predicted_step_time(c, r, [self.sizes[w] for w in wids])
            if t_old - t_new <= self.min_gain * t_old:
                return None   # hysteresis: not worth moving samples around
            return self._adopt(dict(zip(wids, new)), self.policy,
                               f"{why}; {source} model predicts {t_old * 1e3:.1f} ms -> {t_new * 1e3:.1f} ms",
                               t_new, t_old, inputs)
        return self._adopt(dict(zip(wids, new)), self.policy if source != "uniform" else "uniform",
                           f"{why}; split from {source} rates", t_new, 0.0, inputs)

    def _adopt(self, sizes: dict[int, int], policy: str, reason: str, t_new: float = 0.0,
               t_old: float = 0.0, inputs: dict | None = None) -> Decision:
        self.sizes = sizes
        return Decision(sizes=dict(sizes), policy=policy, reason=reason, predicted_step_s=t_new,
                        previous_predicted_s=t_old, inputs=inputs or {})
