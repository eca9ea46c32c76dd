"""The join-time calibration probe, the memory estimate, and the simulated slow link."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from hetero_ps.worker.pacing import BURST_BYTES, BandwidthPacer
from hetero_ps.worker.profile import calibrate, estimate_max_batch, hardware_profile


@pytest.fixture(scope="module")
def trainer():
    from hetero_ps.config import JobConfig
    from hetero_ps.training import data, models
    from hetero_ps.training.flat import FlatParams
    from hetero_ps.training.trainer import LocalTrainer

    job = JobConfig(model="simple_cnn", dataset="digits")
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    return LocalTrainer(job, model, FlatParams(model), train, info, "cpu")


def test_calibrate_reports_a_sane_fit(trainer):
    before = trainer.flat.params.clone()
    p = calibrate(trainer, len(trainer.train_set))
    assert p["probe_batch_sizes"] == [8, 32]
    assert 0 < p["probe_samples_per_s"] < 1e6  # a rate, never a timing bound: CI machines are noisy
    assert p["probe_r"] > 0 and p["probe_c_s"] >= 0
    # The fit reproduces the larger size's time: c + 32 / r = 32 / samples_per_s (or c = 0, r = rate).
    assert p["probe_c_s"] + 32 / p["probe_r"] == pytest.approx(32 / p["probe_samples_per_s"], rel=1e-6)
    assert p["probe_wall_s"] >= 2 * sum(p["probe_seconds"])  # it ran every size twice, timed, plus warm-ups
    assert torch.equal(trainer.flat.params, before), "calibration must not change the parameters"


class _LinearTrainer:
    """A trainer whose gradient takes exactly ``c + b / r`` seconds on a fake clock."""

    device = "cpu"

    def __init__(self, clock, c, r):
        self.clock, self.c, self.r = clock, c, r
        self.calls = []

    def compute_gradient(self, idx):
        self.calls.append(len(idx))
        self.clock[0] += self.c + len(idx) / self.r + (0.5 if len(self.calls) == 1 else 0.0)  # slow warm-up


@pytest.mark.parametrize("slowdown", [1.0, 2.0, 4.0])
def test_calibrate_fits_the_line_and_scales_with_the_slowdown(monkeypatch, slowdown):
    import hetero_ps.worker.profile as prof

    clock = [100.0]
    monkeypatch.setattr(prof.time, "perf_counter", lambda: clock[0])
    t = _LinearTrainer(clock, c=0.002, r=20_000.0)
    p = calibrate(t, 1000, slowdown=slowdown, repeats=2)
    assert t.calls == [8, 8, 8, 32, 32, 32]  # one warm-up and two timed runs per size
    assert p["probe_c_s"] == pytest.approx(0.002 * slowdown)
    assert p["probe_r"] == pytest.approx(20_000.0 / slowdown)
    assert p["probe_samples_per_s"] == pytest.approx(32 / (0.002 + 32 / 20_000.0) / slowdown)
    # What the probe itself took: every run, the slow warm-up included, unstretched by the slowdown.
    assert p["probe_wall_s"] == pytest.approx(0.5 + 3 * (0.002 + 8 / 20_000.0) + 3 * (0.002 + 32 / 20_000.0))


def test_calibrate_of_the_real_model_under_a_2x_slowdown(trainer):
    n = len(trainer.train_set)
    p = calibrate(trainer, n, slowdown=2.0)
    # Everything the probe measured is stretched twice: time for 32 samples = c + 32 / r, as reported.
    assert p["probe_c_s"] + 32 / p["probe_r"] == pytest.approx(p["probe_seconds"][1], rel=1e-6)
    assert p["probe_samples_per_s"] == pytest.approx(32 / p["probe_seconds"][1], rel=1e-6)
    assert 0 < p["probe_samples_per_s"] < 5e5


def test_calibrate_handles_tiny_data_and_bad_arguments(trainer):
    p = calibrate(trainer, 5, batch_sizes=(8, 32), repeats=1)
    assert p["probe_batch_sizes"] == [1, 5] and p["probe_samples_per_s"] > 0
    with pytest.raises(ValueError, match="slowdown"):
        calibrate(trainer, 100, slowdown=0.0)
    with pytest.raises(ValueError, match="at least one"):
        calibrate(trainer, 0)


def test_max_batch_estimate_is_plausible(trainer):
    est = estimate_max_batch(trainer, "cpu", 32)
    assert est >= 32
    # simple_cnn on 8×8 digits keeps tens of KiB per sample: a machine with GiBs fits tens of thousands.
    assert est > 1000
    with pytest.raises(ValueError):
        estimate_max_batch(trainer, "cpu", 0)


class _OOMAbove:
    """A trainer whose gradient runs out of memory above ``limit`` samples (like a small GPU)."""

    device = "cpu"
    micro_batch = 0

    def __init__(self, limit):
        from hetero_ps.training.flat import FlatParams

        self.limit = limit
        self.model = torch.nn.Linear(64, 64)
        self.flat = FlatParams(self.model)
        self.train_set = list(range(1000))
        self.tried = []

    def compute_gradient(self, idx):
        self.tried.append(len(idx))
        if len(idx) > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.flat.zero_grad_()
        self.model(torch.ones(len(idx), 64)).relu().sum().backward()


def test_max_batch_probe_backs_off_when_the_probe_does_not_fit():
    t = _OOMAbove(limit=40)
    est = estimate_max_batch(t, "cpu", 256)
    assert t.tried == [256, 128, 64, 32] and est >= 32
    with pytest.raises(RuntimeError, match="shape"):  # other errors are not mistaken for memory

        class Broken(_OOMAbove):
            def compute_gradient(self, idx):
                raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

        estimate_max_batch(Broken(10), "cpu", 8)


def test_max_batch_is_unbounded_with_micro_batches(trainer):
    trainer.micro_batch = 16
    try:
        assert estimate_max_batch(trainer, "cpu", 32) == 0
    finally:
        trainer.micro_batch = 0


def test_hardware_profile_without_a_gpu():
    p = hardware_profile("cpu")
    assert p["cpu_cores"] >= 1 and p["ram_bytes"] > 0 and isinstance(p["gpus"], list)


# -- pacing -----------------------------------------------------------------------------------------


async def _send(pacer: BandwidthPacer, nbytes: int, chunk: int) -> None:
    for _ in range(nbytes // chunk):
        await pacer.pace(chunk)


def _never_faster(nbytes: int, seconds: float, mbit: float, burst: int = BURST_BYTES) -> bool:
    """``nbytes`` paced at ``mbit`` took at least as long as the link allows: bytes ≤ rate · seconds + burst.

    Only this bound is checked against the real clock: a loaded machine can make a pacer slower than
    its rate, never faster. Its exact accounting is checked with a fake clock below.
    """
    return nbytes <= mbit * 1e6 / 8 * seconds + burst + 1  # + 1: float rounding


@pytest.mark.parametrize("chunk", [16 * 1024, 256 * 1024])
def test_pacer_holds_the_rate(chunk):
    nbytes = 12 * 256 * 1024  # 3 MiB at 50 Mbit/s: about half a second
    t0 = time.monotonic()
    p = BandwidthPacer(50)
    asyncio.run(asyncio.wait_for(_send(p, nbytes, chunk), timeout=60))
    took = time.monotonic() - t0
    assert p.bytes_paced == nbytes and _never_faster(nbytes, took, 50), (nbytes, took)


def test_pacer_rate_change_wakes_a_waiter_at_once():
    async def go():
        p = BandwidthPacer(0.001)  # 125 B/s: a 1 MB transfer owes 8000 s
        waiter = asyncio.create_task(p.pace(1_000_000))
        await asyncio.sleep(0)
        assert not waiter.done()
        p.set_rate(0)  # unlimited: the waiter is released at once
        await asyncio.wait_for(waiter, timeout=60)  # far less than the debt it owed
        assert await p.pace(10_000_000) == 0.0  # still unlimited
        p.set_rate(200)
        assert p.mbit == pytest.approx(200)

    asyncio.run(asyncio.wait_for(go(), timeout=120))


def test_pacer_rate_changes_at_run_time():
    async def go():
        p = BandwidthPacer(100)
        nbytes = 2 * 1024 * 1024
        t0 = time.monotonic()
        await _send(p, nbytes, 64 * 1024)
        t1 = time.monotonic()
        p.set_rate(25)  # from now on credit accrues at 25 Mbit/s
        await _send(p, nbytes, 64 * 1024)
        return nbytes, t1 - t0, time.monotonic() - t1

    nbytes, first, second = asyncio.run(asyncio.wait_for(go(), timeout=120))
    assert _never_faster(nbytes, first, 100) and _never_faster(nbytes, second, 25), (first, second)


def test_pacer_shares_the_link_between_concurrent_transfers():
    async def go():
        p = BandwidthPacer(40)
        t0 = time.monotonic()
        await asyncio.gather(_send(p, 1 << 20, 32 * 1024), _send(p, 1 << 20, 32 * 1024))
        return p.bytes_paced, time.monotonic() - t0

    sent, took = asyncio.run(asyncio.wait_for(go(), timeout=120))
    # Both together stay within one link's rate (each on a link of its own would take half as long).
    assert sent == 2 << 20 and _never_faster(sent, took, 40), (sent, took)


def test_pacer_accounting_with_a_fake_clock():
    now = [0.0]
    p = BandwidthPacer(8, burst=1000, clock=lambda: now[0])  # 1 MB/s, 1000-byte burst
    assert p.reserve(1000) == 0.0  # the burst
    assert p.reserve(500_000) == pytest.approx(0.5)  # 0.5 s of debt
    assert p.reserve(500_000) == pytest.approx(1.0)  # queued behind it
    now[0] = 1.0
    assert p.reserve(0) == pytest.approx(0.0)  # repaid
    now[0] = 10.0
    assert p.reserve(1500) == pytest.approx(0.0005)  # credit never exceeds the burst


def test_pacer_rejects_bad_rates():
    with pytest.raises(ValueError, match="Mbit"):
        BandwidthPacer(-5)
    with pytest.raises(ValueError, match="Mbit"):
        BandwidthPacer(float("nan"))
    p = BandwidthPacer(None)
    assert p.mbit == 0.0 and p.reserve(10**9) == 0.0
    with pytest.raises(ValueError, match="negative"):
        p.reserve(-1)
