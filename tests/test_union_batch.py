"""The invariant to test forever: N workers on any split of a step == one process on the union batch.

Covers the sampler (every sample exactly once per epoch, whatever the split, the last partial step
included) and the gradient path: per-worker mean gradients, encoded, sent as read-only bytes, and
combined with ``decode_accumulate(acc, ..., b_i / B)`` equal the single-process gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetero_ps.config import JobConfig
from hetero_ps.server.scheduler import Scheduler
from hetero_ps.training.data import load_datasets
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.models import build_model
from hetero_ps.training.optim import build_optimizer
from hetero_ps.training.sampler import EpochSampler, epoch_steps, steps_per_epoch, worker_slices
from hetero_ps.training.trainer import LocalTrainer
from hetero_ps.wire import codecs

# -- sampler ---------------------------------------------------------------------------------------


@st.composite
def _jobs(draw):
    n = draw(st.integers(1, 400))
    b = draw(st.integers(1, 80))
    workers = draw(st.integers(1, min(5, b)))  # the scheduler refuses more workers than samples
    cuts = sorted(draw(st.lists(st.integers(0, b), min_size=workers - 1, max_size=workers - 1)))
    sizes = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, b])]  # >= 0 each, sum B
    return n, b, sizes, draw(st.integers(0, 2**31))


@settings(max_examples=150, deadline=None)
@given(_jobs())
def test_every_sample_exactly_once_per_epoch_for_any_split(job):
    n, b, sizes, seed = job
    master = EpochSampler(n, seed)
    workers = [EpochSampler(n, seed) for _ in sizes]  # each node computes the permutation itself
    # The split the master uses: the scheduler, here with the user's fixed sizes (rank = worker id).
    scheduler = Scheduler(b, "uniform", fixed_sizes=dict(enumerate(sizes)))
    for w in range(len(sizes)):
        scheduler.add_worker(w)
    ranks = {w: w for w in range(len(sizes))}
    assert len(epoch_steps(n, b)) == steps_per_epoch(n, b)
    step = 0
    for epoch in range(2):
        seen = []
        for offset, total in epoch_steps(n, b):
            assert 0 < total <= b
            share, _ = scheduler.assign(step, list(ranks), total, ranks=ranks)
            step += 1
            assert sum(share.values()) == total and all(v >= 0 for v in share.values())
            if total == b:
                assert list(share.values()) == sizes  # full steps keep the split as given
            for w, (off, count) in worker_slices(offset, share).items():
                seen.append(workers[w].indices(epoch, off, count))
        seen = np.concatenate(seen)
        assert len(seen) == n and np.array_equal(np.sort(seen), np.arange(n))
        assert np.array_equal(seen, master.permutation(epoch))  # slices tile the epoch in order


def test_permutations_differ_by_epoch_and_seed():
    a, b = EpochSampler(1000, 1), EpochSampler(1000, 1)
    assert np.array_equal(a.permutation(3), b.permutation(3))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), EpochSampler(1000, 2).permutation(0))


def test_slices_outside_the_epoch_are_refused():
    s = EpochSampler(10, 0)
    for off, count in ((8, 3), (-1, 2), (0, 0), (10, 1)):
        with pytest.raises(ValueError, match="outside this epoch"):
            s.indices(0, off, count)
    with pytest.raises(ValueError, match="integer"):
        s.indices(0, 1.5, 2)


def test_a_partial_step_keeps_the_proportions_and_its_exact_total():
    scheduler = Scheduler(64, "uniform", fixed_sizes={1: 5, 2: 17, 3: 42})
    for w in (1, 2, 3):
        scheduler.add_worker(w)
    ranks = {1: 1, 2: 2, 3: 3}
    assert scheduler.assign(0, [1, 2, 3], ranks=ranks)[0] == {1: 5, 2: 17, 3: 42}
    assert scheduler.assign(1, [1, 2, 3], 10, ranks=ranks)[0] == {1: 1, 2: 3, 3: 6}  # largest remainders


# -- gradients -------------------------------------------------------------------------------------

SPLIT = (5, 17, 42)
B = sum(SPLIT)


def _replica(job, train, info):
    model = build_model(job, info)  # every node builds identical weights from job.seed
    flat = FlatParams(model)
    return model, flat, LocalTrainer(job, model, flat, train, info, "cpu")


def _combine(job, train, info, indices, codec_spec, chunk):
    """Server-side accumulator after three workers pushed their shares through ``codec_spec``."""
    acc = None
    offset = 0
    for b in SPLIT:
        _, flat, trainer = _replica(job, train, info)
        trainer.compute_gradient(indices[offset : offset + b])
        offset += b
        g = flat.grads.numpy()
        if acc is None:
            acc = np.zeros(flat.numel, dtype=np.float32)
            chunks = [(o, min(chunk, flat.numel - o)) for o in range(0, flat.numel, chunk)]
            enc = [codecs.make_codec(codec_spec, n) for _, n in chunks]
            dec = [codecs.make_codec(codec_spec, n) for _, n in chunks]
        for (o, n), e, d in zip(chunks, enc, dec):
            fields, segments = e.encode(g[o : o + n])
            wire = [memoryview(bytes(s)) for s in segments]  # what the transport hands over: read-only bytes
            d.decode_accumulate(acc[o : o + n], dict(fields), wire, b / B)
    return torch.from_numpy(acc)


@pytest.fixture(scope="module")
def digits():
    job = JobConfig(model="simple_cnn", dataset="digits", optimizer="sgd", lr=0.5, lr_schedule="constant")
    train, _, info = load_datasets(job)
    indices = EpochSampler(len(train), job.seed).indices(0, 0, B)
    _, flat, trainer = _replica(job, train, info)
    trainer.compute_gradient(indices)
    return job, train, info, indices, flat.grads.clone(), flat.params.clone()


@pytest.mark.parametrize("spec,rtol", [("none", 1e-5), ("fp16", 2e-3), ("bf16", 1.6e-2)])
def test_weighted_shares_equal_the_union_batch_gradient(digits, spec, rtol):
    job, train, info, indices, union, _ = digits
    acc = _combine(job, train, info, indices, spec, chunk=40_000)  # several chunks, a ragged last one
    rel = float((acc - union).norm() / union.norm())
    assert rel < rtol, f"{spec}: relative error {rel:.2e}"
    scale = float(union.abs().max())
    torch.testing.assert_close(acc, union, rtol=rtol, atol=rtol * scale)


def test_one_step_from_the_shares_equals_one_step_on_the_union(digits):
    job, train, info, indices, union, params0 = digits
    acc = _combine(job, train, info, indices, "none", chunk=1 << 30)
    results = []
    for grad in (union, acc):
        model, flat, _ = _replica(job, train, info)
        param = torch.nn.Parameter(flat.params)
        opt, sched = build_optimizer(job, param, total_steps=10)
        param.grad = grad.clone()
        opt.step()
        sched.step()
        results.append(flat.params.clone())
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), flat.params)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[0], params0 - 0.5 * union, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0], params0)
