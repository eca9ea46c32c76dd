"""Gradients whose every weighted sum is exact in float32, and the parameters they must produce.

A simulated worker given the slice ``S`` of an epoch's sample order pushes

    g(S) = (L / |S|) · Σ_{i ∈ S} h(i) · 2^-SHIFT                         (float32)

where ``h(i)`` is row ``i`` of a seeded table of integers in [-3, 3] (one per parameter) and
``L = lcm(1..MAX_BATCH) = 840``. Why every figure is exact, whatever the split:

* ``|S| ≤ MAX_BATCH`` divides ``L``, so ``g(S)`` is an integer below ``3 L < 2^24`` times a power of
  two: float32 holds it exactly. (A plain mean would not always be: ``fl(31 / 7) · 7 / 64`` is not
  ``31 / 64`` in float32.) (Every simulated worker reports ``max_batch = MAX_BATCH`` in its
  probe; the master's scheduler keeps to those caps while the live workers' caps cover the batch,
  that is while at least ``B / MAX_BATCH`` of them are live.)
* The master adds ``float32(b / B) · g(S)`` for each slice (``b = |S|``). With ``B`` a power of two,
  ``b / B`` is exact and the product is ``L · Σ_S h · 2^-SHIFT / B``: exact. Every partial sum is
  ``L · (a sum of at most 3 B) · 2^-SHIFT / B``, an integer below ``3 L B < 2^24`` times a power of
  two, so the order in which the pushes arrive, and FMA or not, change nothing: the aggregate is
  exactly ``G_s = L · Σ_{i ∈ step s} h(i) · 2^-SHIFT / B``, a function of the step's samples only —
  whoever computed them and whoever redid the step.
* Plain SGD at a power-of-two ``lr`` (momentum 0, weight decay 0, constant schedule, no warmup)
  updates ``p ← p − lr · G_s``: ``lr · G_s`` is exact, so the update rounds once, as numpy's float32
  subtraction does. The parameters after ``v`` updates are therefore known bit for bit from version 0.

The step → samples map is the sampler's (``hetero_ps/training/sampler.py``, which this room may not
import): step ``s`` covers ``perm(s // spe)[(s % spe)·B : +B]`` with ``perm(e) =
default_rng([seed, e]).permutation(n)``; ``n`` must be a multiple of ``B`` (no partial last step,
whose ``total`` would not be a power of two). ``tests/test_chaos.py`` checks the two samplers agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError

MAX_BATCH = 8  # the largest slice a simulated worker accepts (its probe's max_batch)
L = math.lcm(*range(1, MAX_BATCH + 1))  # 840: divisible by every slice size up to MAX_BATCH
SHIFT = 12  # gradients are integers times 2^-SHIFT: modest steps keep the model's numbers sane
H_MAX = 3  # |h(i)[j]| ≤ H_MAX


def _power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def check_exact_job(job: JobConfig, n_samples: int) -> None:
    """Raise ``ConfigError`` unless ``job`` keeps every update exact (see the module docstring)."""
    wrong = []
    if job.sync != "bsp":
        wrong.append(f"sync {job.sync} (needs bsp)")
    if job.optimizer != "sgd":
        wrong.append(f"optimizer {job.optimizer} (needs sgd)")
    if job.lr is None or not _power_of_two(float(job.lr)):
        wrong.append(f"lr {job.lr} (needs a power of two)")
    if job.weight_decay or job.lr_schedule != "constant" or job.warmup_steps:
        wrong.append(f"weight decay {job.weight_decay}, schedule {job.lr_schedule}, warmup {job.warmup_steps}")
    if job.compression != "none" or job.pull_compression != "none":
        wrong.append(f"codecs {job.compression}/{job.pull_compression} (need none)")
    B = job.global_batch
    if not _power_of_two(B) or n_samples % B:
        wrong.append(f"global batch {B} with {n_samples} samples (needs a power of two dividing them)")
    if H_MAX * L * B >= 2**24:
        wrong.append(f"global batch {B} too large: sums would leave float32's exact integers")
    if wrong:
        raise ConfigError("this job's updates are not exactly predictable: " + "; ".join(wrong))


class KnownGradients:
    """The table ``h``, the sample order, and the gradients of a slice and of a whole step."""

    def __init__(self, n_samples: int, numel: int, seed: int, global_batch: int):
        self.n, self.numel, self.seed, self.B = n_samples, numel, seed, global_batch
        self.steps_per_epoch = n_samples // global_batch
        # int8 rows: n × numel bytes (2560 × 5454 = 14 MB for the largest benchmark)
        self.h = np.random.default_rng([seed, 0x5EED]).integers(-H_MAX, H_MAX + 1, (n_samples, numel), dtype=np.int8)
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs' orders

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(np.int64)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1} | {epoch: perm}
        return perm

    def indices(self, epoch: int, offset: int, count: int) -> np.ndarray:
        if count <= 0 or offset < 0 or offset + count > self.n:
            raise ValueError(f"slice offset={offset} count={count} is outside an epoch of {self.n} samples")
        return self.permutation(epoch)[offset : offset + count]

    def step_slice(self, step: int) -> tuple[int, int]:
        """``(epoch, offset)`` of step ``step``'s ``B`` samples."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.B

    def _h_sum(self, idx: np.ndarray) -> np.ndarray:
        return self.h[idx].sum(axis=0, dtype=np.int64)

    def worker_gradient(self, idx: np.ndarray) -> np.ndarray:
        """``g(S)`` for the samples ``idx``: exact when ``len(idx)`` divides ``L`` (up to MAX_BATCH), the
        mean rounded to float32 otherwise (then the aggregate may be off in its last bit)."""
        b = len(idx)
        scaled = self._h_sum(idx) * (L // b) if L % b == 0 else self._h_sum(idx) * (L / b)
        return np.ldexp(scaled.astype(np.float32), -SHIFT)

    def step_gradient(self, step: int) -> np.ndarray:
        """``G_s``: the mean over the step's samples, exactly what the master must aggregate."""
        epoch, offset = self.step_slice(step)
        total = self._h_sum(self.indices(epoch, offset, self.B)) * L
        return np.ldexp(total.astype(np.float32), -SHIFT - int(math.log2(self.B)))

    @staticmethod
    def loss(idx: np.ndarray) -> float:
        """A known loss per slice (mean of ``1 + (i mod 16) / 16``): the step's must be its sample mean."""
        return float(np.mean(1.0 + (idx % 16) / 16.0))

    def step_loss(self, step: int) -> float:
        return self.loss(self.indices(*self.step_slice(step), self.B))


@dataclass
class Mismatch:
    """A parameter version that differed from the prediction."""

    version: int
    rank: int
    differing: int  # elements whose bits differ
    max_abs_diff: float


@dataclass
class ExpectedParams:
    """Every parameter version predicted from version 0, and every version the workers received checked.

    Version 0 is taken from the first worker that receives it (the master's random init); version
    ``v + 1`` is ``v − lr · G_v`` in float32. ``first_seen`` (monotonic seconds) says when each version
    reached the first worker: the run's clock for steps/s and recovery times.
    """

    known: KnownGradients
    lr: float
    versions: dict[int, np.ndarray] = field(default_factory=dict)  # the newest few predictions
    first_seen: dict[int, float] = field(default_factory=dict)
    verified: int = 0  # versions × workers compared bit for bit
    unverified: int = 0  # received before anyone saw version 0, or older than the predictions kept
    mismatches: list[Mismatch] = field(default_factory=list)
    on_new_version: Callable[[int], None] | None = None  # called as each version reaches its first worker

    @property
    def latest(self) -> int:
        """The newest version any worker has received (-1 before the first)."""
        return max(self.first_seen, default=-1)

    KEEP = 4  # versions kept: workers receive a version at most a step after each other

    def expected(self, version: int) -> np.ndarray:
        lr = np.float32(self.lr)
        v = max(self.versions)
        while v < version:
            self.versions[v + 1] = np.subtract(self.versions[v], lr * self.known.step_gradient(v), dtype=np.float32)
            v += 1
            self.versions.pop(v - self.KEEP, None)
        return self.versions[version]

    def observe(self, version: int, params: np.ndarray, rank: int) -> bool:
        """Check a whole received version; False (and a ``Mismatch``) when it differs from the prediction."""
        if version not in self.first_seen:
            self.first_seen[version] = time.monotonic()
            if self.on_new_version is not None:
                self.on_new_version(version)
        if not self.versions:
            if version != 0:
                self.unverified += 1
                return False
            self.versions[0] = params.copy()
        if version < min(self.versions):
            self.unverified += 1
            return False
        want = self.expected(version)
        self.verified += 1
        if np.array_equal(want.view(np.uint32), params.view(np.uint32)):
            return True
        differ = want.view(np.uint32) != params.view(np.uint32)
        diff = float(np.max(np.abs(want.astype(np.float64) - params.astype(np.float64))))
        self.mismatches.append(Mismatch(version, rank, int(differ.sum()), diff))
        return False


class Oracle:
    """What the simulated workers of one run share: the job, its known gradients, the expected
    parameters, and every problem they saw (a protocol or exactness violation, in words)."""

    MAX_PROBLEMS = 200  # a broken run says enough in its first few hundred

    def __init__(self, n_samples: int, on_new_version: Callable[[int], None] | None = None):
        self.n_samples = n_samples
        self.on_new_version = on_new_version
        self.job: JobConfig | None = None
        self.known: KnownGradients | None = None
        self.expected: ExpectedParams | None = None
        self.problems: list[str] = []

    def attach(self, job: JobConfig, numel: int) -> KnownGradients:
        """The known gradients of ``job`` (built at the first welcome; every later one must match)."""
        if self.known is None:
            check_exact_job(job, self.n_samples)
            self.job, self.known = job, KnownGradients(self.n_samples, numel, job.seed, job.global_batch)
            self.expected = ExpectedParams(self.known, float(job.lr or 0.0), on_new_version=self.on_new_version)
        elif job != self.job or numel != self.known.numel:
            raise ConfigError("a welcome carried another job than the first one")
        return self.known

    def problem(self, text: str) -> None:
        if len(self.problems) < self.MAX_PROBLEMS:
            self.problems.append(text)
