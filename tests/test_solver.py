"""The batch-size solver: exact answers, and properties over random clusters (hypothesis)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hetero_ps.server.solver import (
    expected_staleness,
    predicted_step_time,
    round_min_makespan,
    round_preserving_sum,
    solve_batch_sizes,
    solve_continuous,
    solve_time,
    worth_waiting_for,
)

rates = st.floats(min_value=1.0, max_value=1e5, allow_nan=False, allow_infinity=False)
costs = st.floats(min_value=0.0, max_value=0.2, allow_nan=False, allow_infinity=False)


@st.composite
def clusters(draw, max_workers=8, bounded=True):
    n = draw(st.integers(1, max_workers))
    total = draw(st.integers(n, 4096))
    r = draw(st.lists(rates, min_size=n, max_size=n))
    c = draw(st.lists(costs, min_size=n, max_size=n))
    lo, hi = [1] * n, [total] * n
    if bounded:
        lo = [draw(st.integers(0, max(0, total // n))) for _ in range(n)]
        hi = [draw(st.integers(lo[i], total)) for i in range(n)]
        assume(sum(hi) >= total and sum(lo) <= total)
    return c, r, total, lo, hi


# -- exact answers ------------------------------------------------------------------------------


def test_proportional_to_rates_without_fixed_costs():
    assert solve_batch_sizes([0, 0, 0], [4, 2, 1], 70) == [40, 20, 10]
    assert solve_batch_sizes([0, 0], [1, 1], 10) == [5, 5]


def test_fixed_cost_takes_samples_away():
    # T = (31 + 10·0.5) / 30 = 1.2 s: worker 0 computes 0.7 s of samples, the others 1.2 s.
    assert solve_batch_sizes([0.5, 0, 0], [10, 10, 10], 31) == [7, 12, 12]
    assert solve_time([0.5, 0, 0], [10, 10, 10], 31, [0] * 3, [31] * 3) == pytest.approx(1.2)


def test_memory_cap_pins_a_worker_and_the_rest_share_equally():
    # Worker 0 would take 80 of 100 but fits 30; the other two (equal) split the remaining 70.
    assert solve_batch_sizes([0, 0, 0], [8, 1, 1], 100, hi=[30, 100, 100]) == [30, 35, 35]


def test_minimum_keeps_a_hopeless_worker_busy():
    # Worker 2's link costs more than the whole step of the others: it keeps the minimum.
    assert solve_batch_sizes([0, 0, 5.0], [10, 10, 10], 100, lo=[4, 4, 4]) == [48, 48, 4]


def test_lower_and_upper_bounds_interact():
    # A pinned-at-lo worker must be released when another's cap raises T (water-filling, not greedy).
    c, r, lo, hi = [0, 0, 0.3], [100, 100, 100], [0, 0, 10], [20, 20, 100]
    shares = solve_continuous(c, r, 100, lo, hi)
    assert shares == pytest.approx([20, 20, 60])


def test_rounding_gives_leftovers_to_who_finishes_first():
    # Continuous shares 33.33 each; equal workers: any worker may get the extra sample, sum exact.
    sizes = solve_batch_sizes([0, 0, 0], [1, 1, 1], 100)
    assert sorted(sizes) == [33, 33, 34]
    # With one slower worker the spare sample must not go to it.
    sizes = round_min_makespan([10.5, 10.5], 21, [0, 0], [1, 2], [0, 0], [21, 21])
    assert sizes == [10, 11]


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        solve_batch_sizes([0, 0], [1, 0], 10)
    with pytest.raises(ValueError, match="bounds"):
        solve_batch_sizes([0, 0], [1, 1], 10, hi=[4, 4])
    with pytest.raises(ValueError, match="one entry per worker"):
        solve_batch_sizes([0], [1, 1], 10)
    with pytest.raises(ValueError, match="no workers"):
        solve_batch_sizes([], [], 10)
    with pytest.raises(ValueError, match="non-negative integer"):
        solve_batch_sizes([0], [1], 2.5)
    with pytest.raises(ValueError, match="lower bound exceeds"):
        solve_batch_sizes([0, 0], [1, 1], 10, lo=[6, 0], hi=[5, 10])


def test_predicted_time_and_staleness():
    assert predicted_step_time([0.1, 0.0], [10, 20], [10, 10]) == pytest.approx(1.1)
    assert expected_staleness([0, 0], [1, 1], [2, 4]) == pytest.approx([0.5, 2.0])
    # Equal times: everyone sees the other n - 1 workers push once per own push.
    tau = expected_staleness([0, 0, 0], [4, 2, 1], [40, 20, 10])
    assert tau == pytest.approx([2.0, 2.0, 2.0])
    assert expected_staleness([0, 0], [1, 1], [0, 3]) == [0.0, 0.0]


def test_round_preserving_sum_rejects_impossible_bounds():
    with pytest.raises(ValueError):
        round_preserving_sum([1.5, 1.5], 3, [0, 0], [1, 1])
    assert round_preserving_sum([1.5, 1.5, 0.0], 3, [0, 0, 0], [3, 3, 3]) in ([2, 1, 0], [1, 2, 0])


# -- properties -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_sum_and_bounds_are_kept(case):
    c, r, total, lo, hi = case
    sizes = solve_batch_sizes(c, r, total, lo, hi)
    assert sum(sizes) == total
    assert all(isinstance(b, int) for b in sizes)
    assert all(lo[i] <= sizes[i] <= hi[i] for i in range(len(sizes)))


@settings(max_examples=300, deadline=None)
@given(clusters(bounded=False))
def test_unbounded_workers_finish_together_within_rounding(case):
    c, r, total, _, _ = case
    n = len(r)
    lo, hi = [0] * n, [total] * n
    t = solve_time(c, r, total, lo, hi)
    free = [i for i in range(n) if 0 < r[i] * (t - c[i]) < total]  # not pinned to a bound
    sizes = solve_batch_sizes(c, r, total, lo, hi)
    one = max((1.0 / r[i] for i in free), default=0.0)  # the longest single sample among them
    eps = 1e-9 * max(1.0, t)
    for i in free:
        # Nobody loses more than its own sample (floors), nobody overshoots by more than the
        # longest one sample: a split rounded to nearest already achieves that, and ours is optimal.
        ti = c[i] + sizes[i] / r[i]
        assert t - 1.0 / r[i] - eps <= ti <= t + one + eps


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_rounding_is_as_good_as_any_neighbouring_integer_split(case):
    """No single sample moved from the slowest worker to another would finish the step earlier."""
    c, r, total, lo, hi = case
    sizes = solve_batch_sizes(c, r, total, lo, hi)
    t = predicted_step_time(c, r, sizes)
    times = [c[i] + sizes[i] / r[i] if sizes[i] > 0 else 0.0 for i in range(len(r))]
    slow = max(range(len(r)), key=times.__getitem__)
    if sizes[slow] <= lo[slow]:
        return
    for j in range(len(r)):
        if j != slow and sizes[j] < hi[j]:
            moved = list(sizes)
            moved[slow] -= 1
            moved[j] += 1
            assert predicted_step_time(c, r, moved) >= t - 1e-12


@settings(max_examples=200, deadline=None)
@given(clusters(bounded=False), st.lists(st.floats(-0.01, 0.01), min_size=8, max_size=8))
def test_stable_under_noise(case, noise):
    """±1 % noise on the rates moves each share by about 1 % of the batch, plus a sample of rounding."""
    c, r, total, _, _ = case
    noisy = [ri * (1 + e) for ri, e in zip(r, noise)]
    a = solve_batch_sizes(c, r, total)
    b = solve_batch_sizes(c, noisy, total)
    for x, y in zip(a, b):
        assert abs(x - y) <= 0.03 * total + 2


@settings(max_examples=200, deadline=None)
@given(clusters(bounded=False))
def test_equal_split_is_never_predicted_faster(case):
    c, r, total, _, _ = case
    n = len(r)
    sizes = solve_batch_sizes(c, r, total)
    even = round_preserving_sum([total / n] * n, total, [1] * n, [total] * n)
    assert predicted_step_time(c, r, sizes) <= predicted_step_time(c, r, even) + 1e-12


@settings(max_examples=100, deadline=None)
@given(st.lists(rates, min_size=2, max_size=6), st.integers(10, 2000))
def test_scaling_all_rates_changes_nothing(r, total):
    assume(total >= len(r))
    c = [0.0] * len(r)
    assert solve_batch_sizes(c, r, total) == solve_batch_sizes(c, [3.0 * x for x in r], total)
    assert math.isclose(sum(solve_continuous(c, r, total, [0] * len(r), [total] * len(r))), total)


# -- which workers a BSP step should wait for ----------------------------------------------------------
def _makespan(c, r, total, members):
    shares = solve_continuous([c[i] for i in members], [r[i] for i in members], total, [1] * len(members),
                              [total] * len(members))  # fmt: skip
    return max(c[i] + b / r[i] for i, b in zip(members, shares))


def test_worth_waiting_for_drops_only_workers_that_lengthen_the_step():
    assert worth_waiting_for([0.0, 0.0, 3.0], [100, 100, 100], 64, [1] * 3, [64] * 3) == [True, True, False]
    assert worth_waiting_for([0.0, 0.2], [100, 100], 64, [1, 1], [64, 64]) == [True, True]
    assert worth_waiting_for([5.0, 9.0], [100, 100], 64, [1, 1], [64, 64]) == [True, False]  # one always stays
    # The fast one's memory cap cannot hold the batch alone: the slow one stays whatever it costs.
    assert worth_waiting_for([0.0, 3.0], [100, 100], 64, [1, 1], [40, 64]) == [True, True]


def test_worth_waiting_for_finds_the_fastest_set_of_workers():
    rng = random.Random(7)
    for _ in range(300):
        n, total = rng.randint(2, 5), rng.randint(8, 256)
        c = [rng.choice([0.0, rng.uniform(0, 0.2), rng.uniform(0, 5)]) for _ in range(n)]
        r = [rng.uniform(20, 800) for _ in range(n)]
        keep = worth_waiting_for(c, r, total, [1] * n, [total] * n)
        chosen = _makespan(c, r, total, [i for i in range(n) if keep[i]])
        best = min(_makespan(c, r, total, [i for i in range(n) if mask >> i & 1]) for mask in range(1, 1 << n))
        assert chosen <= best * (1 + 1e-9), (c, r, total, keep)
