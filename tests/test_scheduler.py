"""The scheduler's policies and its speed model, driven by simulated workers (no processes)."""

from __future__ import annotations

import math
import random

import pytest

from hetero_ps.server.scheduler import Decision, Scheduler, WorkerModel
from hetero_ps.server.solver import predicted_step_time, solve_batch_sizes


class SimCluster:
    """Workers whose step takes ``c_i + b / r_i`` seconds times lognormal noise, with rare spikes."""

    def __init__(self, c, r, noise=0.03, spike_p=0.0, spike=2.5, seed=0):
        self.c, self.r = list(c), list(r)
        self.noise, self.spike_p, self.spike = noise, spike_p, spike
        self.rng = random.Random(seed)

    def time(self, w, b):
        t = (self.c[w] + b / self.r[w]) * math.exp(self.rng.gauss(0.0, self.noise))
        if self.rng.random() < self.spike_p:
            t *= self.spike
        return t

    def slow(self, w, factor):  # the whole machine slows: compute and its fixed costs
        self.c[w] *= factor
        self.r[w] /= factor

    def efficiency(self, sizes: dict, total: int) -> float:
        """The optimum's step time over this split's (1.0 = as good as the true model allows)."""
        wids = sorted(sizes)
        best = predicted_step_time(self.c, self.r, solve_batch_sizes(self.c, self.r, total))
        return best / predicted_step_time(self.c, self.r, [sizes[w] for w in wids])


def run(s: Scheduler, sim: SimCluster, steps: range, wids=(0, 1, 2), on_step=None):
    decisions = []
    for step in steps:
        if on_step:
            on_step(step)
        sizes, d = s.assign(step, list(wids))
        if d is not None:
            decisions.append((step, d))
        for w, b in sizes.items():
            if b:
                s.observe(w, b, sim.time(w, b))
    return decisions


def make(policy="dynamic", n=3, batch=512, interval=10, hints=None, **kw):
    s = Scheduler(batch, policy, interval, **kw)
    for w in range(n):
        s.add_worker(w, rate_hint=(hints[w] if hints else 0.0))
    return s


def test_uniform_policy_splits_evenly_and_never_moves():
    s = make("uniform", hints=[4000, 2000, 1000])
    sizes, d = s.assign(0, [0, 1, 2])
    assert sorted(sizes.values()) == [170, 171, 171] and d.policy == "uniform"
    assert run(s, SimCluster([0.0] * 3, [4000, 2000, 1000]), range(1, 60)) == []


def test_proportional_uses_probe_hints_and_never_changes():
    s = make("proportional", hints=[4000, 2000, 1000], batch=700)
    sizes, d = s.assign(0, [0, 1, 2])
    assert sizes == {0: 400, 1: 200, 2: 100}
    assert "profile" in d.reason and d.inputs[0]["r"] == 4000
    assert run(s, SimCluster([0.0] * 3, [1000, 1000, 1000]), range(1, 60)) == []


def test_proportional_uses_fitted_probe_model_when_given():
    s = Scheduler(31, "proportional")
    s.add_worker(0, rate_hint=9.0, c_hint=0.5, r_hint=10.0)
    s.add_worker(1, rate_hint=10.0, r_hint=10.0)
    s.add_worker(2, rate_hint=10.0, r_hint=10.0)
    assert s.assign(0, [0, 1, 2])[0] == {0: 7, 1: 12, 2: 12}


def test_proportional_without_hints_falls_back_to_uniform():
    s = make("proportional", batch=300)
    sizes, d = s.assign(0, [0, 1, 2])
    assert sizes == {0: 100, 1: 100, 2: 100} and d.policy == "uniform"


def test_dynamic_learns_the_split_from_measurements():
    sim = SimCluster([0.004, 0.008, 0.016], [4000, 2000, 1000], noise=0.03)
    s = make("dynamic")
    decisions = run(s, sim, range(40))
    first = decisions[0][1]
    assert first.policy == "uniform" and "membership" in first.reason
    measured = [d for _, d in decisions if "measured" in d.reason]
    assert measured and decisions[1][0] == s.warmup_observations  # re-solved as soon as measured
    assert sim.efficiency(s.sizes, 512) > 0.95
    assert sum(s.sizes.values()) == 512
    d = measured[-1]
    assert set(d.inputs[0]) >= {"c", "r", "observations", "source"} and d.predicted_step_s > 0


def test_dynamic_counts_communication_in_the_fixed_cost():
    # Equal compute, but worker 2 spends 40 ms per step on a slow link: it must get fewer samples.
    sim = SimCluster([0.002, 0.002, 0.042], [3000, 3000, 3000], noise=0.01)
    s = make("dynamic", batch=300)
    # Partial batches at epoch ends give the fit a second batch size to separate c from r.
    for step in range(60):
        total = 300 if step % 4 else 200
        sizes, _ = s.assign(step, [0, 1, 2], total)
        for w, b in sizes.items():
            s.observe(w, b, sim.time(w, b))
    assert s.sizes[2] < s.sizes[0] - 80 and s.sizes[2] < s.sizes[1] - 80
    assert s.models[2].fixed == pytest.approx(0.042, rel=0.35)
    assert sim.efficiency(s.sizes, 300) > 0.95


def test_hybrid_starts_from_the_probe_then_switches_to_measurements():
    # The probe is wrong about worker 2 (it is really as fast as worker 1).
    sim = SimCluster([0.0, 0.0, 0.0], [2000, 1000, 1000], noise=0.02)
    s = make("hybrid", hints=[2000, 1000, 250], batch=600, warmup_observations=3)
    sizes, d = s.assign(0, [0, 1, 2])
    # 600 · (8, 4, 1) / 13 = 369.2, 184.6, 46.2: the spare sample may go to 0 or 1 (both finish at 0.185 s).
    assert sizes in ({0: 369, 1: 185, 2: 46}, {0: 370, 1: 184, 2: 46}) and "profile" in d.reason
    decisions = run(s, sim, range(1, 30))
    step, switch = decisions[0]
    assert step == 4 and "measured" in switch.reason and switch.policy == "hybrid"  # measured at 1, 2, 3
    assert abs(s.sizes[1] - s.sizes[2]) <= 20 and abs(s.sizes[0] - 300) <= 20


def test_fixed_sizes_from_the_command_line_win():
    s = Scheduler(64, "dynamic", 1, fixed_sizes={1: 5, 2: 17, 3: 42})
    for w in (10, 11, 12):
        s.add_worker(w)
    ranks = {10: 1, 11: 2, 12: 3}
    sizes, d = s.assign(0, [10, 11, 12], ranks=ranks)
    assert sizes == {10: 5, 11: 17, 12: 42} and d.policy == "fixed"
    for step in range(1, 20):
        for w, b in sizes.items():
            s.observe(w, b, b / 100.0)
        sizes, d = s.assign(step, [10, 11, 12], ranks=ranks)
        assert d is None and sizes == {10: 5, 11: 17, 12: 42}


def test_membership_changes_resplit_at_once():
    sim = SimCluster([0.0] * 4, [3000, 1000, 1000, 1000], noise=0.01)
    s = make("dynamic", n=3, batch=600)
    run(s, sim, range(20))
    s.add_worker(3)
    sizes, d = s.assign(20, [0, 1, 2, 3])
    assert d is not None and "membership" in d.reason and set(sizes) == {0, 1, 2, 3}
    assert sum(sizes.values()) == 600
    run(s, sim, range(21, 50), wids=(0, 1, 2, 3))
    assert s.sizes[0] > 2 * s.sizes[3]
    s.remove_worker(0)
    sizes, d = s.assign(50, [1, 2, 3])
    assert d is not None and sum(sizes.values()) == 600 and set(sizes) == {1, 2, 3}
    assert max(sizes.values()) - min(sizes.values()) <= 2


def test_partial_last_batch_keeps_proportions():
    s = make("proportional", hints=[3000, 2000, 1000], batch=600)
    full, _ = s.assign(0, [0, 1, 2])
    part, d = s.assign(1, [0, 1, 2], total=90)
    assert d is None and full == {0: 300, 1: 200, 2: 100}
    assert part == {0: 45, 1: 30, 2: 15}
    tiny, _ = s.assign(2, [0, 1, 2], total=2)
    assert sum(tiny.values()) == 2 and all(b >= 0 for b in tiny.values())
    with pytest.raises(ValueError):
        s.assign(3, [0, 1, 2], total=601)


def test_memory_cap_is_respected():
    s = Scheduler(600, "proportional")
    s.add_worker(0, rate_hint=5000, max_batch=200)
    s.add_worker(1, rate_hint=1000)
    s.add_worker(2, rate_hint=1000)
    sizes, _ = s.assign(0, [0, 1, 2])
    assert sizes == {0: 200, 1: 200, 2: 200}
    s = Scheduler(600, "proportional")  # caps that cannot hold the batch are ignored, not fatal
    for w in range(3):
        s.add_worker(w, rate_hint=1000, max_batch=100)
    assert sum(s.assign(0, [0, 1, 2])[0].values()) == 600


@pytest.mark.parametrize("interval", [5, 10, 20])
def test_a_worker_slowed_3x_gets_a_smaller_share_within_two_intervals(interval):
    sim = SimCluster([0.004, 0.008, 0.016], [4000, 2000, 1000], noise=0.03, spike_p=0.03, seed=interval)
    s = make("dynamic", interval=interval)
    run(s, sim, range(60))
    before = dict(s.sizes)
    assert sim.efficiency(before, 512) > 0.95

    def slow_at_60(step):
        if step == 60:
            sim.slow(0, 3.0)

    run(s, sim, range(60, 60 + 2 * interval), on_step=slow_at_60)
    assert s.sizes[0] < 0.7 * before[0]
    assert sim.efficiency(s.sizes, 512) > 0.9
    assert s.models[0].regimes >= 1


def test_hysteresis_holds_under_noise():
    """Once converged, 5 % timing noise and 5 % spikes move the split rarely (52 chances each run)."""
    moves, worst = [], 1.0
    for seed in range(10):
        sim = SimCluster([0.004, 0.008, 0.016], [4000, 2000, 1000], noise=0.05, spike_p=0.05, seed=seed)
        s = make("dynamic", interval=5)
        run(s, sim, range(40))
        moves.append(len(run(s, sim, range(40, 300))))
        worst = min(worst, sim.efficiency(s.sizes, 512))
    assert sum(moves) <= 20 and max(moves) <= 6, moves
    assert worst > 0.95


def test_decisions_carry_inputs_and_reasons():
    sim = SimCluster([0.01, 0.01, 0.01], [3000, 1500, 750], noise=0.0)
    s = make("dynamic")
    decisions = run(s, sim, range(30))
    for _, d in decisions:
        assert isinstance(d, Decision) and d.reason and d.policy in ("uniform", "dynamic")
        assert sum(d.sizes.values()) == 512
    d = decisions[-1][1]
    assert d.previous_predicted_s > d.predicted_step_s > 0
    assert {w: round(v["r"]) for w, v in d.inputs.items()} == {0: 3000, 1: 1500, 2: 750}


def test_bad_configuration_and_unknown_workers():
    with pytest.raises(ValueError, match="policy"):
        Scheduler(64, "fastest")
    with pytest.raises(ValueError, match="global batch"):
        Scheduler(0)
    s = make("dynamic", n=2, batch=1)
    with pytest.raises(ValueError, match="cannot share"):
        s.assign(0, [0, 1])
    with pytest.raises(ValueError, match="never added"):
        make("dynamic", n=2).assign(0, [0, 1, 7])
    assert make("dynamic").assign(0, []) == ({}, None)


# -- the speed model on its own ---------------------------------------------------------------------


def test_model_fits_line_from_two_batch_sizes():
    m = WorkerModel()
    for b in (100, 200) * 5:
        m.observe(b, 0.01 + b / 2000)
    assert m.fixed == pytest.approx(0.01, rel=1e-6) and m.rate == pytest.approx(2000, rel=1e-6)


def test_model_ignores_a_single_spike_but_adopts_a_regime_change():
    m = WorkerModel(c_hint=0.01)
    for _ in range(10):
        m.observe(200, 0.11)
    rate = m.rate
    assert m.observe(200, 0.5) == "suspect" and m.rate == rate  # one GC pause: ignored
    assert m.observe(200, 0.11) == "fit"
    assert [m.observe(200, 0.33) for _ in range(3)] == ["suspect", "suspect", "regime"]
    assert m.predict(200) == pytest.approx(0.33, rel=1e-6) and m.changed
    assert m.rate == pytest.approx(rate / 3, rel=0.05)


def test_model_recovers_when_the_first_step_was_a_warm_up_outlier():
    m = WorkerModel()
    m.observe(100, 0.5)  # first step: allocations, imports
    for _ in range(8):
        m.observe(100, 0.05)
    assert m.predict(100) == pytest.approx(0.05, rel=0.05)


def test_model_rejects_garbage():
    m = WorkerModel()
    for b, t in ((0, 1.0), (10, 0.0), (10, -1.0), (10, float("nan")), (10, float("inf"))):
        assert m.observe(b, t) == "ignored"
    assert m.rate == 0.0 and m.count == 0


def test_expected_staleness_from_the_current_split():
    sim = SimCluster([0.0, 0.0, 0.0], [3000, 1500, 750], noise=0.0)
    s = make("dynamic", batch=525)
    assert s.expected_staleness() == {}
    run(s, sim, range(20))
    tau = s.expected_staleness()
    assert set(tau) == {0, 1, 2} and all(v == pytest.approx(2.0, rel=0.05) for v in tau.values())


def test_a_resumed_scheduler_starts_from_each_ranks_model_not_from_uniform():
    sim = SimCluster([0.004, 0.008, 0.016], [4000, 2000, 1000], noise=0.0)
    s = Scheduler(512, "dynamic", 10)
    for w in range(3):
        s.add_worker(w, rank=w + 1)
    run(s, sim, range(30))
    balanced = dict(s.sizes)
    saved = s.export_state()
    assert set(saved) == {"1", "2", "3"} and saved["1"]["rate"] > 0

    again = Scheduler(512, "dynamic", 10)
    again.restore(saved)
    for wid, rank in ((7, 1), (8, 2), (9, 3)):  # new connections, the same ranks (the same machines)
        again.add_worker(wid, rank=rank)
    sizes, d = again.assign(30, [7, 8, 9])
    assert d is not None and d.policy == "dynamic" and all(i["source"] == "measured" for i in d.inputs.values())
    assert [sizes[w] for w in (7, 8, 9)] == [balanced[w] for w in (0, 1, 2)]
    fresh = Scheduler(512, "dynamic", 10)
    fresh.restore(saved)
    fresh.add_worker(5)  # a worker without a remembered rank is measured afresh
    assert fresh.models[5].rate == 0


def test_a_known_change_of_a_workers_push_is_adopted_at_the_next_split():
    """--compression auto moves worker 1 off a slow uncompressed push after its first steps: its
    measured times drop by the predicted push time at once, so the first measured split already
    gives it its share (not a sample, then a few rebalances as its steps turn out shorter)."""
    sim = SimCluster([0.01, 1.2], [300, 300], noise=0.01)
    s = make("dynamic", n=2, batch=64)
    run(s, sim, range(3), wids=(0, 1))  # uniform, 1.2 s of push a step on worker 1
    sim.c[1] = 0.01  # its pushes are top-k now
    s.shift_fixed(1, -1.19, "pushes with topk:0.01 now (-1.19 s a step)")
    sizes, decision = s.assign(3, [0, 1])
    assert decision is not None and abs(sizes[0] - sizes[1]) <= 6, (sizes, decision)
    # Measured already: a shift makes the next split say why.
    sim.c[1] = 0.5
    s.shift_fixed(1, 0.49, "pushes with fp16 now (+0.49 s a step)")
    sizes, decision = s.assign(4, [0, 1])
    assert decision is not None and "pushes with fp16 now" in decision.reason and sizes[1] < sizes[0] - 20
    s.shift_fixed(5, 1.0, "unknown worker")  # a worker the scheduler does not hold: nothing happens


def test_a_shift_never_makes_a_time_zero_or_negative():
    m = WorkerModel()
    for b in (10, 20, 10, 20, 10, 20, 10):
        m.observe(b, 0.5 + b / 100)
    m.shift_fixed(-5.0, "a wild estimate")
    assert all(t > 0 for _, t in m.observations) and m.fixed >= 0 and m.rate > 0
    # With what compute alone takes as the floor, the rate stays that of the compute.
    m.shift_fixed(-5.0, "a wild estimate", floor_fixed_s=0.01, floor_per_sample_s=1 / 100)
    assert all(t == 0.01 + b / 100 for b, t in m.observations)
    assert 90 < m.rate < 110, m.rate
    assert m.changed and m.changed_why == "a wild estimate"


# -- standby: a worker that would only lengthen every BSP step ------------------------------------------
def test_a_worker_whose_link_lengthens_every_step_stands_by_and_the_rest_take_the_batch():
    sim = SimCluster([0.02, 0.02, 3.0], [400, 400, 400], noise=0.01)  # rank 2 pays 3 s a step for its link
    s = make("dynamic", n=3, batch=64, standby=True)
    decisions = run(s, sim, range(8))
    roles = [(step, d.roles) for step, d in decisions if d.roles]
    assert len(roles) == 1 and list(roles[0][1]) == [2], decisions
    role, why = roles[0][1][2]
    assert role == "standby" and "waiting for it would lengthen every step" in why
    sizes, _ = s.assign(8, [0, 1, 2])
    assert sizes[2] == 0 and sizes[0] + sizes[1] == 64 and s.standby == {2: roles[0][0]}
    # Without standby (SSP/ASP, or --no-standby) it keeps its minimum share.
    s2 = make("dynamic", n=3, batch=64)
    run(s2, sim, range(8))
    assert s2.assign(8, [0, 1, 2])[0][2] >= 1 and not s2.standby


def test_a_standby_worker_is_probed_now_and_then_and_comes_back_when_its_link_is_fast_again():
    sim = SimCluster([0.02, 3.0], [400, 400], noise=0.01)
    s = make("dynamic", n=2, batch=64, standby=True)
    run(s, sim, range(8), wids=(0, 1))
    assert 1 in s.standby
    since = s.standby[1]
    sim.c[1] = 0.02  # its link got fast
    decisions = run(s, sim, range(8, 1000), wids=(0, 1))
    probes = [step for step, d in decisions if "probe step" in d.reason]
    back = [(step, d.roles[1]) for step, d in decisions if 1 in d.roles]
    assert probes and probes[0] - since >= 50, (probes, since)  # not before PROBE_MIN_STEPS
    assert back and back[0][1][0] == "training" and back[0][0] == probes[0] + 1, (back, probes)
    assert not s.standby and s.assign(1000, [0, 1])[0][1] > 16


def test_a_probe_that_finds_the_link_still_slow_keeps_it_on_standby_and_costs_little():
    sim = SimCluster([0.02, 3.0], [400, 400], noise=0.01)
    s = make("dynamic", n=2, batch=64, standby=True)
    decisions = run(s, sim, range(2000), wids=(0, 1))
    probes = [step for step, d in decisions if "probe step" in d.reason]
    assert probes and not any(1 in d.roles and d.roles[1][0] == "training" for _, d in decisions)
    # Each probe costs ~3 s against a ~0.2 s step: they are spaced to keep that under 2.5 % of the time.
    assert all(b - a >= 3.0 / (0.025 * 0.2) * 0.8 for a, b in zip(probes, probes[1:])), probes
