"""Batch-size solver: split a global batch so every worker finishes a step at the same time.

Model. Worker *i* takes ``t_i(b) = c_i + b / r_i`` seconds for a batch of ``b`` samples: a fixed cost
``c_i`` (communication, framework overhead) plus ``b`` samples at ``r_i`` samples/s. With BSP the step
lasts ``max_i t_i(b_i)``, so the best split makes every ``t_i`` equal to one ``T``:

    b_i = r_i · (T − c_i),    Σ b_i = B   ⇒   T = (B + Σ r_i c_i) / Σ r_i

Bounds ``lo_i ≤ b_i ≤ hi_i`` (a minimum so no worker idles, a memory cap). With bounds the shares
are ``b_i(T) = clip(r_i (T − c_i), lo_i, hi_i)``; their sum is continuous, non-decreasing and
piecewise linear in ``T`` with breakpoints where a worker reaches a bound, so ``T`` is found exactly
by walking the sorted breakpoints to the segment where the sum crosses ``B`` and solving that
segment's linear equation ("water-filling"). A worker pinned to a bound keeps its bound; every other
worker finishes at exactly ``T``.

Rounding. Integer sizes must keep ``Σ b_i = B`` exactly (the global batch, hence the optimisation,
never changes). Starting from the floors, each remaining sample goes to the worker that would finish
earliest with it (``c_i + (b_i + 1) / r_i`` smallest); this greedy choice minimises the rounded
step time ``max_i t_i(b_i)``, so rounding costs at most one sample's time on one worker.

Standby. With a barrier, a worker whose fixed cost ``c_j`` (its link, mostly) exceeds the step the
others take without it lengthens every step whatever its share: even ``lo_j`` samples end at
``c_j + lo_j / r_j`` while the rest could finish the whole batch sooner. ``worth_waiting_for`` drops
such workers one at a time, the largest ``c_j + lo_j / r_j`` first, while the step of the workers
left, solved again, is shorter than the step with them; dropping the slowest finisher first is
enough, because a worker that pays off next to it pays off next to anyone faster.

SSP/ASP. Without a barrier, worker *i* pushes every ``t_i`` seconds and the server applies every
push, so while it computes, the others apply ``τ_i = t_i · Σ_{j≠i} 1 / t_j`` updates: the expected
staleness of its gradients (``expected_staleness``). The update-weighted mean of ``τ_i`` is always
``n − 1``, but the slowest worker's is the largest and grows with the spread of the ``t_i``; equal
times (the same split as BSP) make every ``τ_i = n − 1`` and keep SSP clocks from drifting apart.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def _check(c: Sequence[float], r: Sequence[float], lo: Sequence[float], hi: Sequence[float], total: float) -> int:
    n = len(r)
    if not (len(c) == len(lo) == len(hi) == n):
        raise ValueError("c, r, lo and hi must have one entry per worker")
    if n == 0:
        raise ValueError("no workers to schedule")
    if any(not (x > 0 and math.isfinite(x)) for x in r):
        raise ValueError(f"rates must be positive and finite, got {list(r)}")
    if any(not math.isfinite(x) for x in c):
        raise ValueError(f"fixed costs must be finite, got {list(c)}")
    if any(a > b for a, b in zip(lo, hi)):
        raise ValueError(f"a lower bound exceeds its upper bound: lo={list(lo)}, hi={list(hi)}")
    if sum(lo) > total or sum(hi) < total:
        raise ValueError(f"bounds cannot hold a batch of {total}: sum(lo)={sum(lo)}, sum(hi)={sum(hi)}")
    return n


def solve_time(c: Sequence[float], r: Sequence[float], total: float, lo: Sequence[float], hi: Sequence[float]) -> float:
    """The common finishing time ``T`` of the bounded equal-time split (see the module docstring)."""
    n = _check(c, r, lo, hi, total)
    # Worker i is at lo below T = c_i + lo_i / r_i, at hi above c_i + hi_i / r_i, linear between.
    # At equal times a worker leaves lo before anyone's hi is processed, so lo == hi stays consistent.
    events = sorted([(c[i] + lo[i] / r[i], 0, i) for i in range(n)] + [(c[i] + hi[i] / r[i], 1, i) for i in range(n)])
    # Below the first breakpoint every worker sits at lo: sum(b) = sum(lo).
    fixed = float(sum(lo))  # contribution of pinned workers
    slope = 0.0  # Σ r_i over the workers between their bounds
    offset = 0.0  # Σ r_i c_i over the same workers
    prev_t = events[0][0]
    if fixed >= total:  # every worker at its minimum already fills the batch
        return prev_t
    for t, kind, i in events:
        if slope > 0:
            at_t = fixed + slope * t - offset
            if at_t >= total:  # the crossing lies in [prev_t, t]
                return (total - fixed + offset) / slope
        if kind == 0:  # i leaves lo and starts growing
            fixed -= lo[i]
            slope += r[i]
            offset += r[i] * c[i]
        else:  # i reaches hi and stops growing
            fixed += hi[i]
            slope -= r[i]
            offset -= r[i] * c[i]
        prev_t = t
    return prev_t  # sum(hi) == total: everyone at hi


def solve_continuous(
    c: Sequence[float], r: Sequence[float], total: float, lo: Sequence[float], hi: Sequence[float]
) -> list[float]:
    """Real-valued shares with equal predicted times under bounds. See the module docstring."""
    t = solve_time(c, r, total, lo, hi)
    shares = [min(max(r[i] * (t - c[i]), lo[i]), hi[i]) for i in range(len(r))]
    # Float round-off: put the tiny residual on the worker with the most room for it.
    gap = total - sum(shares)
    if shares and gap:
        room = [(hi[i] - shares[i]) if gap > 0 else (shares[i] - lo[i]) for i in range(len(shares))]
        j = max(range(len(shares)), key=room.__getitem__)
        shares[j] += gap
    return shares


def round_preserving_sum(x: Sequence[float], total: int, lo: Sequence[int], hi: Sequence[int]) -> list[int]:
    """Integers close to ``x`` that sum to ``total`` and stay within ``[lo, hi]`` (largest remainder)."""
    if sum(lo) > total or sum(hi) < total:
        raise ValueError(f"bounds cannot hold a sum of {total}: sum(lo)={sum(lo)}, sum(hi)={sum(hi)}")
    base = [min(max(int(math.floor(v)), lo[i]), hi[i]) for i, v in enumerate(x)]
    short = total - sum(base)
    order = sorted(range(len(x)), key=lambda i: x[i] - math.floor(x[i]), reverse=short > 0)
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
        if not moved:  # unreachable given the check above; kept as a guard against an endless loop
            raise ValueError(f"cannot round {list(x)} to a sum of {total} within bounds")
    return base


def round_min_makespan(
    x: Sequence[float], total: int, c: Sequence[float], r: Sequence[float], lo: Sequence[int], hi: Sequence[int]
) -> list[int]:
    """Integers near ``x`` summing to ``total`` within bounds, with the smallest ``max_i c_i + b_i/r_i``.

    From the floors (clipped to the bounds) each missing sample goes to the worker that would finish
    earliest with it; each surplus sample (only when lower bounds pushed floors up) is taken from
    the worker that finishes last. A heap keeps this O(n log n) per sample moved, and at most ``n``
    samples move.
    """
    n = len(x)
    base = [min(max(int(math.floor(v + 1e-9)), lo[i]), hi[i]) for i, v in enumerate(x)]
    short = total - sum(base)
    if short > 0:
        heap = [(c[i] + (base[i] + 1) / r[i], i) for i in range(n) if base[i] < hi[i]]
        heapq.heapify(heap)
        while short > 0:
            if not heap:
                raise ValueError(f"cannot round {list(x)} to a sum of {total} within bounds")
            _, i = heapq.heappop(heap)
            base[i] += 1
            short -= 1
            if base[i] < hi[i]:
                heapq.heappush(heap, (c[i] + (base[i] + 1) / r[i], i))
    elif short < 0:
        heap = [(-(c[i] + base[i] / r[i]), i) for i in range(n) if base[i] > lo[i]]
        heapq.heapify(heap)
        while short < 0:
            if not heap:
                raise ValueError(f"cannot round {list(x)} to a sum of {total} within bounds")
            _, i = heapq.heappop(heap)
            base[i] -= 1
            short += 1
            if base[i] > lo[i]:
                heapq.heappush(heap, (-(c[i] + base[i] / r[i]), i))
    return base


def solve_batch_sizes(
    c: Sequence[float], r: Sequence[float], total: int, lo: Sequence[int] | None = None, hi: Sequence[int] | None = None
) -> list[int]:
    """Integer batch sizes summing to ``total`` with (nearly) equal predicted step times.

    ``c`` are fixed costs in seconds, ``r`` rates in samples/s, ``lo``/``hi`` per-worker bounds
    (default 1 and ``total``). Raises ``ValueError`` when the bounds cannot hold ``total`` or a rate
    is not positive.

    >>> solve_batch_sizes([0, 0, 0], [4, 2, 1], 70)
    [40, 20, 10]
    >>> solve_batch_sizes([0.5, 0, 0], [10, 10, 10], 31)   # a slow link costs worker 0 five samples
    [7, 12, 12]
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"the batch must be a non-negative integer, got {total!r}")
    n = len(r)
    lo = [1] * n if lo is None else [int(v) for v in lo]
    hi = [total] * n if hi is None else [int(v) for v in hi]
    shares = solve_continuous(c, r, total, lo, hi)
    return round_min_makespan(shares, total, c, r, lo, hi)


def worth_waiting_for(
    c: Sequence[float], r: Sequence[float], total: int, lo: Sequence[int], hi: Sequence[int]
) -> list[bool]:
    """Which workers a BSP step should wait for: False for each one whose fixed cost makes the step
    longer than the others would take for the whole batch (see the module docstring). At least one
    worker stays; a drop that the others' bounds cannot absorb is not made.

    >>> worth_waiting_for([0.0, 0.0, 3.0], [100, 100, 100], 64, [1, 1, 1], [64, 64, 64])
    [True, True, False]
    >>> worth_waiting_for([0.0, 0.2], [100, 100], 64, [1, 1], [64, 64])   # 0.2 s < the 0.64 s alone
    [True, True]
    """
    keep = [True] * len(r)

    def step_of(members: list[int]) -> float:  # the makespan: a worker held at lo may end after T
        cs, rs = [c[i] for i in members], [r[i] for i in members]
        shares = solve_continuous(cs, rs, total, [lo[i] for i in members], [hi[i] for i in members])
        return max(ci + b / ri for ci, ri, b in zip(cs, rs, shares))

    while sum(keep) > 1:
        members = [i for i, k in enumerate(keep) if k]
        slowest = max(members, key=lambda i: c[i] + lo[i] / r[i])
        rest = [i for i in members if i != slowest]
        if sum(lo[i] for i in rest) > total or sum(hi[i] for i in rest) < total:
            break
        if step_of(rest) >= step_of(members):
            break
        keep[slowest] = False
    return keep


def predicted_step_time(c: Sequence[float], r: Sequence[float], sizes: Sequence[int]) -> float:
    """The BSP step time ``max_i c_i + b_i / r_i`` of a split (workers with ``b_i = 0`` sit out)."""
    return max((ci + b / ri for ci, ri, b in zip(c, r, sizes) if b > 0), default=0.0)


def expected_staleness(c: Sequence[float], r: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Per worker, the updates others apply while it computes one push (SSP/ASP): ``t_i Σ_{j≠i} 1/t_j``.

    ``t_i = c_i + b_i / r_i``. Workers with ``b_i = 0`` push nothing: their entry is 0 and they do
    not count for the others. Equal times give ``n − 1`` for everyone (the smallest possible maximum).

    >>> expected_staleness([0, 0], [1, 1], [2, 4])
    [0.5, 2.0]
    """
    t = [ci + b / ri if b > 0 else 0.0 for ci, ri, b in zip(c, r, sizes)]
    freq = [1.0 / x if x > 0 else 0.0 for x in t]
    total = sum(freq)
    return [x * (total - f) if x > 0 else 0.0 for x, f in zip(t, freq)]
