"""Batch-size solver: split a global batch so every worker finishes a step at the same time.

Model. Worker *i* takes ``t_i(b) = c_i + b / r_i`` seconds for a batch of ``b`` samples: a fixed cost
``c_i`` (communication, framework overhead) plus ``b`` samples at ``r_i`` samples/s. With BSP the step
lasts ``max_i t_i(b_i)``, so the best split makes every ``t_i`` equal to one ``T``:

    b_i = r_i · (T − c_i),    Σ b_i = B   ⇒   T = (B + Σ r_i c_i) / Σ r_i

Bounds ``lo_i ≤ b_i ≤ hi_i`` (a minimum so no worker idles, a memory cap) are met by water-filling:
a worker whose ideal share falls outside its bounds is pinned to the bound and ``T`` is solved again
for the others, until nothing moves. Rounding to integers keeps ``Σ b_i = B`` exactly (largest
remainders first, never past a bound), so the global batch — and the optimisation — never changes.
"""

from __future__ import annotations

import math
from typing import Sequence


def solve_continuous(c: Sequence[float], r: Sequence[float], total: float,
                     lo: Sequence[float], hi: Sequence[float]) -> list[float]:
    """Real-valued shares with equal predicted times under bounds. See the module docstring."""
    n = len(r)
    if not (len(c) == len(lo) == len(hi) == n):
        raise ValueError("c, r, lo and hi must have one entry per worker")
    if n == 0:
        raise ValueError("no workers to schedule")
    if any(x <= 0 or not math.isfinite(x) for x in r):
        raise ValueError(f"rates must be positive and finite, got {list(r)}")
    if sum(lo) > total or sum(hi) < total:
        raise ValueError(f"bounds cannot hold a batch of {total}: sum(lo)={sum(lo)}, sum(hi)={sum(hi)}")
    pinned: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in pinned]
        rest = total - sum(pinned.values())
        rate = sum(r[i] for i in free)
        t = (rest + sum(r[i] * c[i] for i in free)) / rate
        share = {i: r[i] * (t - c[i]) for i in free}
        # Pin the worst violator only, then re-solve: pinning all at once can overshoot.
        worst, worst_gap, bound = None, 0.0, 0.0
        for i, b in share.items():
            if b < lo[i] and lo[i] - b > worst_gap:
                worst, worst_gap, bound = i, lo[i] - b, lo[i]
            elif b > hi[i] and b - hi[i] > worst_gap:
                worst, worst_gap, bound = i, b - hi[i], hi[i]
        if worst is None:
            return [pinned[i] if i in pinned else share[i] for i in range(n)]
        pinned[worst] = bound


def round_preserving_sum(x: Sequence[float], total: int, lo: Sequence[int], hi: Sequence[int]) -> list[int]:
    """Integers close to ``x`` that sum to ``total`` and stay within ``[lo, hi]`` (largest remainder)."""
    base = [min(max(int(math.floor(v)), lo[i]), hi[i]) for i, v in enumerate(x)]
    short = total - sum(base)
    order = sorted(range(len(x)), key=lambda i: (x[i] - math.floor(x[i])), reverse=short > 0)
    step = 1 if short > 0 else -1
    while short != 0:
        moved = False
        for i in order:
            if short == 0:
                break
            nb = base[i] + step
            if lo[i] <= nb <= hi[i]:
                base[i] = nb
                short -= step
                moved = True
        if not moved:
            raise ValueError(f"cannot round {list(x)} to a sum of {total} within bounds")
    return base


def solve_batch_sizes(c: Sequence[float], r: Sequence[float], total: int,
                      lo: Sequence[int] | None = None, hi: Sequence[int] | None = None) -> list[int]:
    """Integer batch sizes summing to ``total`` with (nearly) equal predicted step times.

    >>> solve_batch_sizes([0, 0, 0], [4, 2, 1], 70)
    [40, 20, 10]
    """
    n = len(r)
    lo = [1] * n if lo is None else list(lo)
    hi = [total] * n if hi is None else list(hi)
    shares = solve_continuous(c, r, total, lo, hi)
    return round_preserving_sum(shares, total, lo, hi)


def predicted_step_time(c: Sequence[float], r: Sequence[float], sizes: Sequence[int]) -> float:
    """The BSP step time ``max_i c_i + b_i / r_i`` of a split."""
    return max(ci + b / ri for ci, ri, b in zip(c, r, sizes))
