"""Per-worker batch sizes: which policy, which measurements, when to change.

Policies (``--load-balance-policy``, active with ``--enable-load-balancing``):

* ``uniform``  — equal shares (what a homogeneous DDP job does); the default without load balancing.
* ``proportional`` — shares from what each worker reported at join: its calibration probe of the
  job's model (``rate_hint`` samples/s, and ``c_hint``/``r_hint`` when the probe fitted them).
  Never changes afterwards.
* ``dynamic`` — shares from measured step times: each worker's ``t_i(b) = c_i + b / r_i`` is fitted
  from its (batch, seconds) observations (``WorkerModel``), then the solver in ``solver.py``
  equalises predicted times. Uniform until every worker has ``warmup_observations`` measurements,
  then re-solved every ``rebalance_interval`` steps, and also: at once when a worker's speed
  changes abruptly (a detected regime change), so a machine slowed 3× mid-run gets a smaller share
  within a few steps, not a few intervals; and ``warmup_observations`` steps after any move, when
  the workers' new batch sizes have shown how their times scale (the fixed costs), so the first
  splits converge in a handful of steps.
* ``hybrid`` — ``proportional`` until every worker has ``warmup_observations`` measurements, then
  ``dynamic``.

Hysteresis: a new split is adopted only if it shortens the predicted step by more than
``min_gain`` (default 3 %), so noise does not make shares oscillate. Every decision is returned with
its inputs and its reason so the server can log it.

The observed seconds should be a worker's whole step minus the barrier wait (compute + encode +
push + pull), so ``c_i`` includes its communication and a worker on a slow link gets less.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hetero_ps.server.solver import (
    expected_staleness,
    predicted_step_time,
    round_preserving_sum,
    solve_batch_sizes,
    worth_waiting_for,
)

POLICIES = ("uniform", "proportional", "dynamic", "hybrid")


def trimmed_mean(values: list[float], weights: list[float], trim: float = 0.25) -> float:
    """Weighted mean of the values between the ``trim`` and ``1 − trim`` weight quantiles.

    With ``trim = 0.25`` (the interquartile mean) a single wild value among a handful moves it
    little, while it keeps most of a mean's efficiency on well-behaved noise.
    """
    pairs = sorted(zip(values, weights))
    total = sum(weights)
    lo, hi = trim * total, (1.0 - trim) * total
    acc = num = den = 0.0
    for v, w in pairs:
        # the part of this value's weight that lies inside [lo, hi]
        inside = max(0.0, min(acc + w, hi) - max(acc, lo))
        num += inside * v
        den += inside
        acc += w
    return num / den if den > 0 else pairs[len(pairs) // 2][0]


@dataclass
class WorkerModel:
    """What the scheduler knows about one worker's speed, fitted from ``(batch, seconds)`` pairs.

    Model: ``t(b) = c + b / r``. Two time scales, because the two parameters play different parts.

    * ``r`` must predict the batch sizes in use now, and follow drift: it is the weighted
      interquartile mean of the rates ``b_k / (t_k − c)`` the recent observations imply,
      observation ``k`` steps old with weight ``(1 − alpha)^k`` (a robust EWMA: a single odd step
      cannot drag it).
    * ``c`` only shapes how the time changes when the batch does (so a slow link, a slow start-up,
      shows up as a smaller share rather than a wrong one). It is learned from every observation
      of the current regime (up to ``keep``), by least squares weighed against the join probe's
      (``_fit_fixed``) — and only once the regime has ``2 · regime_after`` observations.

    Regimes. In steady state an observation at a familiar batch size (near those in the window; at
    a new size the observation is what corrects the model) that is off the prediction by more than
    ``gate``× either way is held back as a suspect, not fitted: a GC pause or a busy neighbour
    moves nothing. But ``regime_after`` suspects in a row on the same side mean the machine itself
    changed (slowed, throttled, freed): the window is replaced by those suspects, ``c`` scaled by
    the same factor (a machine 3× slower is 3× slower at everything), and ``changed`` set so the
    scheduler re-solves at once. A real 3× slowdown is thus adopted after ``regime_after`` steps,
    at full strength. A new regime is on probation for its first ``2 · regime_after`` observations: nothing
    is gated (the model is too new to judge by) and ``c`` stays as scaled, so the first moves to
    other batch sizes refine ``r`` without a noisy two-point fit swinging ``c``.
    """

    rate_hint: float = 0.0  # samples/s from the join-time probe or specs (0 = unknown)
    max_batch: int = 0  # the largest batch that fits its memory (0 = no cap)
    c_hint: float = 0.0  # fixed cost per step from the probe (s), a prior for ``fixed``
    r_hint: float = 0.0  # per-sample rate from the probe (samples/s), 0 = use rate_hint
    alpha: float = 0.1  # EWMA weight decay per observation (for the rate)
    gate: float = 1.5  # an observation off the prediction by more than this factor is a suspect
    regime_after: int = 3  # this many suspects in a row on one side = a new regime
    keep: int = 30  # observations kept per regime (for the fixed cost)
    prior_sd: float = 0.1  # uncertainty of the probe's fixed cost, as a share of the step time
    observations: list = field(default_factory=list)  # (batch, seconds) of the current regime, newest last
    suspects: list = field(default_factory=list)  # consecutive off-model (batch, seconds, slower?)
    rate: float = 0.0  # fitted samples/s (0 = not measured yet)
    fixed: float = 0.0  # fitted fixed cost per step in seconds
    count: int = 0  # observations accepted or adopted over the model's life
    rejected: int = 0  # observations held back as outliers and never adopted
    regimes: int = 0  # regime changes detected
    changed: bool = False  # a regime change the scheduler has not acted on yet
    changed_why: str = "changed speed"  # what the rebalance's reason says about it

    @property
    def settled(self) -> bool:
        """Past the current regime's probation (see the class docstring)."""
        return len(self.observations) >= 2 * self.regime_after

    def predict(self, batch: float) -> float:
        """Predicted seconds for ``batch`` samples (needs a fit)."""
        return self.fixed + batch / self.rate

    def observe(self, batch: int, seconds: float) -> str:
        """Add a measurement; returns what became of it: ``fit``, ``suspect``, ``regime`` or ``ignored``."""
        if batch <= 0 or not (seconds > 0 and math.isfinite(seconds)):
            return "ignored"
        if self.rate > 0 and self.settled and self._familiar(batch):
            q = seconds / self.predict(batch)
            if q > self.gate or q < 1.0 / self.gate:
                return self._suspect(batch, seconds, q > 1.0)
        if self.rate <= 0:  # the first observation: the probe's split of fixed vs per-sample time
            self.fixed = self._probe_fixed(batch, seconds)
        self.rejected += len(self.suspects)
        self.suspects = []
        self.observations.append((batch, seconds))
        del self.observations[: -self.keep]
        self.count += 1
        if self.settled:
            self.fixed = self._fit_fixed()
        self._fit_rate()
        return "fit"

    def shift_fixed(
        self, delta_s: float, why: str, floor_fixed_s: float = 1e-3, floor_per_sample_s: float = 0.0
    ) -> None:
        """A known change of the fixed cost per step (``delta_s`` seconds; the master changed this
        worker's codecs): the regime's observations move by it, so the next split uses the new
        cost at once instead of after ``regime_after`` off-model steps. No observation of ``b``
        samples falls below ``floor_fixed_s + b · floor_per_sample_s`` (what the new transfer and the
        compute alone take): an observation that held less transfer than ``-delta_s`` (the first
        step's pull came before it was scheduled) must not make the worker look infinitely fast."""
        if not self.observations:
            return
        floor = max(floor_fixed_s, 1e-3)
        self.observations = [(b, max(t + delta_s, floor + b * floor_per_sample_s)) for b, t in self.observations]
        # Never below the new transfer either: a fit from one batch size may have put the old transfer
        # in the rate (fixed 0), and the shift would leave the link out of the model.
        self.fixed = max(floor, self.fixed + delta_s)
        self.suspects = []
        self.changed, self.changed_why = True, why
        self._fit_rate()

    def _familiar(self, batch: int) -> bool:
        """Whether ``batch`` lies near the batch sizes the regime has seen (so a prediction for it is
        an interpolation to judge by, not an extrapolation that the observation should correct)."""
        sizes = [b for b, _ in self.observations]
        return 0.8 * min(sizes) <= batch <= 1.25 * max(sizes)

    def _suspect(self, batch: int, seconds: float, slower: bool) -> str:
        if self.suspects and self.suspects[-1][2] != slower:  # both sides: noise, not a regime
            self.rejected += len(self.suspects)
            self.suspects = []
        self.suspects.append((batch, seconds, slower))
        if len(self.suspects) < self.regime_after:
            return "suspect"
        ratio = sum(t for _, t, _ in self.suspects) / sum(self.predict(b) for b, _, _ in self.suspects)
        self.fixed *= ratio
        self.observations = [(b, t) for b, t, _ in self.suspects]
        self.count += len(self.suspects)
        self.suspects = []
        self.regimes += 1
        self.changed, self.changed_why = True, "changed speed"
        self._fit_rate()
        return "regime"

    def _fit_rate(self) -> None:
        obs = self.observations
        t_min = min(t for _, t in obs)
        self.fixed = min(max(self.fixed, 0.0), 0.9 * t_min)  # keep every implied rate finite
        w = [(1.0 - self.alpha) ** (len(obs) - 1 - k) for k in range(len(obs))]
        self.rate = trimmed_mean([b / (t - self.fixed) for b, t in obs], w)

    def _fit_fixed(self) -> float:
        """``c`` from the regime's observations, weighed against the probe's.

        Ordinary least squares over the ``n`` observations gives ``ĉ`` with standard error
        ``se² = σ̂²/n · (1 + b̄²/var b)``; the prior ``c₀`` — the probe's share of fixed time applied
        to the measured step (0 without a probe) — counts as a measurement of standard deviation
        ``sd₀ = prior_sd · t̄``:

            c = (ĉ / se² + c₀ / sd₀²) / (1 / se² + 1 / sd₀²)

        Alike batch sizes or noisy times (no real information about ``c``) leave the prior; a clear
        spread of sizes (a rebalance, an epoch's short last step) with consistent times lets the
        data decide; noise-free data give ``ĉ`` exactly. The prior is deliberately not the previous
        estimate: on a shared machine the workers' times depend on each other's load, and a fit
        fed back into its own prior would drift with that noise.
        """
        obs = self.observations
        n = len(obs)
        mb = sum(b for b, _ in obs) / n
        mt = sum(t for _, t in obs) / n
        c0 = self._probe_fixed(mb, mt)
        vb = sum((b - mb) ** 2 for b, _ in obs) / n
        if n < 3 or vb <= (1e-6 * mb) ** 2:
            return c0
        s = sum((b - mb) * (t - mt) for b, t in obs) / n / vb
        c_ls = mt - s * mb
        sigma2 = sum((t - c_ls - s * b) ** 2 for b, t in obs) / (n - 2)
        se2 = sigma2 / n * (1.0 + mb * mb / vb)
        sd02 = (self.prior_sd * mt) ** 2
        if se2 <= 1e-12 * sd02:
            return c_ls
        return (c_ls / se2 + c0 / sd02) / (1.0 / se2 + 1.0 / sd02)

    def _probe_fixed(self, batch: int, seconds: float) -> float:
        """The fixed cost to assume before any evidence: the probe's share of the time, else 0."""
        ref = self.profile_model()
        if ref is None or ref[0] <= 0:
            return 0.0
        c, r = ref  # the probe's split of a step into fixed and per-sample time, at the measured speed
        return c * seconds / (c + batch / r)

    def profile_model(self) -> tuple[float, float] | None:
        """``(c, r)`` from the join probe, or None when the worker reported none."""
        if self.r_hint > 0:
            return max(0.0, self.c_hint), self.r_hint
        if self.rate_hint > 0:
            return 0.0, self.rate_hint
        return None


@dataclass(frozen=True)
class Decision:
    """A split and why it was chosen (logged as a metrics event)."""

    sizes: dict  # worker id -> batch size
    policy: str
    reason: str
    predicted_step_s: float = 0.0
    previous_predicted_s: float = 0.0
    inputs: dict = field(default_factory=dict)  # worker id -> {"c": s, "r": samples/s, "source", ...}
    roles: dict = field(default_factory=dict)  # worker id -> (role, why) for each worker whose role changed


# A standby worker gets one probe step (its minimum batch) now and then, to see whether its link or
# speed changed; the gap between probes keeps their cost under PROBE_COST of the run's time.
PROBE_COST = 0.025
PROBE_MIN_STEPS = 50


class Scheduler:
    """Decides every worker's batch size; the server asks it each step (or each SSP/ASP task)."""

    def __init__(
        self,
        global_batch: int,
        policy: str = "uniform",
        rebalance_interval: int = 10,
        min_batch: int = 1,
        min_gain: float = 0.03,
        warmup_observations: int = 3,
        fixed_sizes: dict | None = None,
        standby: bool = False,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise ValueError(f"the global batch must be a positive integer, got {global_batch!r}")
        self.global_batch = global_batch
        self.policy = policy
        self.rebalance_interval = max(1, int(rebalance_interval))
        self.min_batch = max(1, int(min_batch))
        self.min_gain = float(min_gain)
        self.warmup_observations = max(1, int(warmup_observations))
        self.fixed_sizes = dict(fixed_sizes or {})  # rank -> size, from --worker-batch-sizes
        self.models: dict[int, WorkerModel] = {}
        self.sizes: dict[int, int] = {}
        self.source = ""  # what the current split was computed from
        self._last_solve_step = -1
        self._follow_up: int | None = None  # step at which to re-check a freshly moved measured split
        self._ranks: dict[int, int] = {}  # worker id -> rank, for readable reasons
        self._remembered: dict[int, WorkerModel] = {}  # rank -> model from a checkpoint, until it rejoins
        # BSP: a worker that only lengthens the step sits it out (standby); wid -> step it went on standby
        self.allow_standby = standby
        self.standby: dict[int, int] = {}
        self._probing: set[int] = set()  # standby workers given a probe step by the current split
        self.busy: set[int] = set()  # standby workers running a local round: measured by it, never probed

    # -- membership -------------------------------------------------------------------------
    def add_worker(
        self,
        wid: int,
        rate_hint: float = 0.0,
        max_batch: int = 0,
        c_hint: float = 0.0,
        r_hint: float = 0.0,
        rank: int | None = None,
    ) -> None:
        """Count a ready worker. ``rate_hint`` is its probe's samples/s; ``c_hint``/``r_hint`` the
        probe's fitted fixed cost (s) and rate (samples/s), when it has them; ``max_batch`` its memory
        cap (0 = none). A ``rank`` whose model a checkpoint held (``restore``) starts from that model."""

        def num(x):
            x = float(x or 0.0)
            return x if math.isfinite(x) and x > 0 else 0.0

        hints = dict(
            rate_hint=num(rate_hint), max_batch=max(0, int(max_batch or 0)), c_hint=num(c_hint), r_hint=num(r_hint)
        )
        remembered = self._remembered.pop(rank, None) if rank is not None else None
        if remembered is not None:
            self.models[wid] = dataclasses.replace(remembered, **hints, changed=False)
        else:
            self.models[wid] = WorkerModel(**hints)
        if rank is not None:
            self._ranks[wid] = rank
        self.sizes = {}  # membership changed: next assign() re-solves

    # -- checkpoints --------------------------------------------------------------------------
    def export_state(self) -> dict[str, dict[str, Any]]:
        """Each ranked worker's fitted model (plain numbers and lists), for the master's checkpoint."""
        return {str(self._ranks[w]): dataclasses.asdict(m) for w, m in self.models.items() if w in self._ranks}

    def restore(self, state: dict[str, dict[str, Any]]) -> None:
        """Take the models of ``export_state``: each rank starts from its own when it joins again, so a
        resumed run keeps its balanced split instead of measuring every worker afresh."""
        names = {f.name for f in dataclasses.fields(WorkerModel)}
        self._remembered = {
            int(rank): WorkerModel(**{k: v for k, v in fields.items() if k in names}) for rank, fields in state.items()
        }

    def remove_worker(self, wid: int) -> None:
        self.models.pop(wid, None)
        self._ranks.pop(wid, None)
        self.standby.pop(wid, None)
        self._probing.discard(wid)
        self.busy.discard(wid)
        self.sizes = {}

    def predicted_seconds(self, wid: int, batch: int) -> float | None:
        """What ``batch`` samples should take ``wid`` (its measured model), or None before it has a
        couple of measurements in its current regime (a new or returning worker is not judged yet)."""
        m = self.models.get(wid)
        if m is None or m.rate <= 0 or len(m.observations) < 2:
            return None
        return m.predict(batch)

    def predicted_step_s(self) -> float | None:
        """The current split's predicted BSP step (its workers with a share), or None before every
        one of them is measured."""
        active = [w for w, b in self.sizes.items() if b > 0 and w in self.models]
        ms = [self.models[w] for w in active]
        if not ms or any(m.rate <= 0 for m in ms):
            return None
        return predicted_step_time([m.fixed for m in ms], [m.rate for m in ms], [self.sizes[w] for w in active])

    def shift_fixed(self, wid: int, delta_s: float, why: str, **floor: float) -> None:
        """``wid``'s fixed cost per step changed by a known ``delta_s`` (see ``WorkerModel.shift_fixed``)."""
        if wid in self.models:
            self.models[wid].shift_fixed(delta_s, why, **floor)

    def observe(self, wid: int, batch: int, seconds: float) -> None:
        """A worker's measured step: ``batch`` samples in ``seconds`` (without the barrier wait).

        A standby worker's probe step moves its fixed cost to what the probe measured at once (its
        link is what changes while it waits; one off-model step would otherwise be a mere suspect)."""
        m = self.models.get(wid)
        if m is None:
            return
        if wid in self._probing and m.rate > 0:
            self._probing.discard(wid)
            delta = seconds - m.predict(batch)
            m.shift_fixed(delta, f"measured {seconds:.3g} s for {batch} samples in its probe")
            return
        m.observe(batch, seconds)

    # -- decisions ----------------------------------------------------------------------------
    def assign(
        self, step: int, workers: list[int], total: int | None = None, ranks: dict[int, int] | None = None
    ) -> tuple[dict[int, int], Decision | None]:
        """The sizes for this step, and a Decision when the split changed (else None).

        ``total`` is this step's batch: the global batch, or the remainder at an epoch's end, which
        is split in the current proportions without a new decision.
        """
        total = self.global_batch if total is None else total
        wids = sorted(workers)
        unknown = [w for w in wids if w not in self.models]
        if unknown:
            raise ValueError(f"workers {unknown} were never added to the scheduler")
        if not 0 <= total <= self.global_batch:
            raise ValueError(f"a step's batch must be within [0, {self.global_batch}], got {total}")
        if not wids:
            return {}, None
        if ranks:
            self._ranks.update(ranks)
        decision = None
        if set(self.sizes) != set(wids):
            decision = self._decide(step, wids, ranks, "membership changed")
        elif self.policy in ("dynamic", "hybrid"):
            why = self._why_rebalance(step, wids)
            if why:
                decision = self._decide(step, wids, ranks, why)
        if total == self.global_batch:
            return dict(self.sizes), decision
        cur = [self.sizes[w] for w in wids]
        shares = [total * b / self.global_batch for b in cur]
        partial = round_preserving_sum(shares, total, [0] * len(wids), [total] * len(wids))
        return dict(zip(wids, partial)), decision

    def _why_rebalance(self, step: int, wids: list[int]) -> str:
        if self.source == "fixed":  # --worker-batch-sizes: the user's split, never second-guessed
            return ""
        ms = [self.models[w] for w in wids]
        if self.source != "measured" and self._warm(ms):
            return "every worker measured"
        moved = [w for w, m in zip(wids, ms) if m.changed]
        if moved and self.source == "measured":
            return ", ".join(f"{self._label(w)} {self.models[w].changed_why}" for w in moved)
        due = self._probes_due(step, wids)
        if due:
            self._probing = set(due)
            names = ", ".join(f"{self._label(w)} (standby since step {self.standby[w]})" for w in due)
            return f"probe step for {names}"
        if self._follow_up is not None and step >= self._follow_up:
            # The last move put each worker at a new batch size: that spread tells the fit where the
            # fixed costs are, so look again now instead of a whole interval later.
            self._follow_up = None
            return "follow-up on the last move"
        if step - self._last_solve_step >= self.rebalance_interval:
            return f"rebalance interval ({self.rebalance_interval} steps)"
        return ""

    def _probes_due(self, step: int, wids: list[int]) -> list[int]:
        """Standby workers whose next probe is due: the gap keeps a probe's extra time (its step
        against the others') under ``PROBE_COST`` of the time between probes."""
        if not self.standby or self.source != "measured":
            return []
        active = [w for w in wids if w not in self.standby]
        t_active = predicted_step_time(
            [self.models[w].fixed for w in active],
            [self.models[w].rate for w in active],
            [self.sizes[w] for w in active],
        )
        if t_active <= 0:
            return []
        smallest = self._bounds(wids)[0][0]
        due = []
        for w in wids:
            if w not in self.standby or w in self.busy:
                continue
            extra = max(0.0, self.models[w].predict(smallest) - t_active)
            gap = max(PROBE_MIN_STEPS, math.ceil(extra / (PROBE_COST * t_active)))
            if step - self.standby[w] >= gap:
                due.append(w)
        return due

    def _label(self, w: int) -> str:
        return f"rank {self._ranks[w]}" if w in self._ranks else f"worker {w}"

    def _warm(self, ms: list[WorkerModel]) -> bool:
        return all(m.rate > 0 and m.count >= self.warmup_observations for m in ms)

    def _bounds(self, wids: list[int]) -> tuple[list[int], list[int]]:
        total, n = self.global_batch, len(wids)
        lo = [max(1, min(self.min_batch, total // n))] * n
        hi = [max(lo[0], self.models[w].max_batch or total) for w in wids]
        if sum(hi) < total:  # memory caps cannot hold the batch: ignore them rather than fail
            hi = [total] * n
        return lo, hi

    def _inputs(self, wids: list[int]) -> tuple[list[float], list[float], str]:
        """(c, r, source) for the active policy."""
        ms = [self.models[w] for w in wids]
        if self.policy in ("dynamic", "hybrid") and self._warm(ms):
            return [m.fixed for m in ms], [m.rate for m in ms], "measured"
        if self.policy in ("proportional", "hybrid"):
            prof = [m.profile_model() for m in ms]
            known = [p for p in prof if p is not None]
            if len(known) == len(prof):
                return [p[0] for p in known], [p[1] for p in known], "profile"
        return [0.0] * len(ms), [1.0] * len(ms), "uniform"

    def _decide(self, step: int, wids: list[int], ranks: dict[int, int] | None, why: str) -> Decision | None:
        self._last_solve_step = step
        for w in wids:
            self.models[w].changed = False
        total = self.global_batch
        if len(wids) > total:
            raise ValueError(f"{len(wids)} workers cannot share a global batch of {total}")
        fixed = self.fixed_sizes
        if fixed and ranks and all(ranks.get(w) in fixed for w in wids) and sum(fixed[ranks[w]] for w in wids) == total:
            self.source = "fixed"
            return self._adopt({w: fixed[ranks[w]] for w in wids}, "fixed", f"{why}; --worker-batch-sizes")
        lo, hi = self._bounds(wids)
        c, r, source = self._inputs(wids)
        keep = [True] * len(wids)
        if self.allow_standby and source == "measured" and len(wids) > 1:
            keep = worth_waiting_for(c, r, total, lo, hi)
            keep = [k or w in self._probing for k, w in zip(keep, wids)]
        act = [i for i, k in enumerate(keep) if k]
        part = solve_batch_sizes(
            [c[i] for i in act], [r[i] for i in act], total, [lo[i] for i in act], [hi[i] for i in act]
        )
        new = [0] * len(wids)
        for i, b in zip(act, part):
            new[i] = b
        t_new = predicted_step_time(c, r, new)
        inputs = {w: self._describe(w, ci, ri, source) for w, ci, ri in zip(wids, c, r)}
        roles = self._roles(step, wids, keep, c, r, lo, new, t_new)
        same_members = set(self.sizes) == set(wids)
        if same_members and source == self.source and not roles and not self._probing:
            t_old = predicted_step_time(c, r, [self.sizes[w] for w in wids])
            if t_old - t_new <= self.min_gain * t_old:
                return None  # hysteresis: not worth moving samples around
            self.source = source
            return self._adopt(
                dict(zip(wids, new)),
                self.policy,
                f"{why}; {source} model predicts {t_old * 1e3:.1f} ms -> {t_new * 1e3:.1f} ms",
                t_new,
                t_old,
                inputs,
            )
        t_old = predicted_step_time(c, r, [self.sizes[w] for w in wids]) if same_members else 0.0
        self.source = source
        policy = self.policy if source != "uniform" else "uniform"
        decision = self._adopt(dict(zip(wids, new)), policy, f"{why}; split from {source} rates", t_new, t_old, inputs)
        decision = dataclasses.replace(decision, roles=roles)
        if self._probing:  # one probe step, then look again with what it measured
            self._follow_up = step + 1
        return decision

    def _roles(
        self,
        step: int,
        wids: list[int],
        keep: list[bool],
        c: list[float],
        r: list[float],
        lo: list[int],
        new: list[int],
        t_step: float,
    ) -> dict[int, tuple[str, str]]:
        """Record who goes on standby or comes back (``self.standby``); each change with its reason
        (``t_step``: the new split's predicted step, which the workers on standby sit out)."""
        roles: dict[int, tuple[str, str]] = {}
        for i, w in enumerate(wids):
            alone = c[i] + lo[i] / r[i]
            if not keep[i] and w not in self.standby:
                self.standby[w] = step
                roles[w] = (
                    "standby",
                    f"its smallest share would take {alone:.3g} s (fixed cost {c[i]:.3g} s: its link) while the "
                    f"others take the whole batch in {t_step:.3g} s, so waiting for it would lengthen every step",
                )
            elif keep[i] and w in self.standby and w not in self._probing:
                del self.standby[w]
                roles[w] = ("training", f"its share now fits the step: {c[i] + new[i] / r[i]:.3g} s of {t_step:.3g} s")
            elif w in self._probing:
                self.standby[w] = step  # the next probe's gap counts from this one
        return roles

    def _describe(self, w: int, c: float, r: float, source: str) -> dict:
        m = self.models[w]
        return {
            "c": c,
            "r": r,
            "source": source,
            "observations": m.count,
            "rejected": m.rejected,
            "regimes": m.regimes,
            "rate_hint": m.rate_hint,
            "max_batch": m.max_batch,
        }

    def _adopt(
        self,
        sizes: dict[int, int],
        policy: str,
        reason: str,
        t_new: float = 0.0,
        t_old: float = 0.0,
        inputs: dict | None = None,
    ) -> Decision:
        moved = self.source == "measured" and self.sizes and sizes != self.sizes
        self._follow_up = self._last_solve_step + self.warmup_observations if moved else None
        self.sizes = sizes
        return Decision(
            sizes=dict(sizes),
            policy=policy,
            reason=reason,
            predicted_step_s=t_new,
            previous_predicted_s=t_old,
            inputs=inputs or {},
        )

    # -- SSP/ASP --------------------------------------------------------------------------------
    def expected_staleness(self, workers: list[int] | None = None) -> dict[int, float]:
        """Per worker, the updates others apply while it computes one task with the current split
        (``solver.expected_staleness``), from the measured model; empty until every worker is measured."""
        wids = sorted(self.sizes if workers is None else workers)
        found = [self.models.get(w) for w in wids]
        ms = [m for m in found if m is not None]
        if not wids or len(ms) != len(found) or any(m.rate <= 0 for m in ms) or any(w not in self.sizes for w in wids):
            return {}
        tau = expected_staleness([m.fixed for m in ms], [m.rate for m in ms], [self.sizes[w] for w in wids])
        return dict(zip(wids, tau))
