"""DGC's momentum correction (--momentum-correction): the worker's velocity, top-k of what it accumulated,
momentum factor masking, the sparsity warm-up, the master stepping without momentum, and a run that learns."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import read_jsonl

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError
from hetero_ps.server.model_state import ModelState
from hetero_ps.testing import LocalCluster
from hetero_ps.training import data
from hetero_ps.wire import codecs
from hetero_ps.worker.dgc import START_RATIO, MomentumCorrection


def _reference_dgc(grads: list[np.ndarray], m: float, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The paper's algorithm in plain numpy: what each step sends (indices, values)."""
    u = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    out = []
    for g in grads:
        u = np.float32(m) * u + g
        v = v + u
        idx = np.sort(np.argsort(-np.abs(v), kind="stable")[:k]).astype(np.int32)
        out.append((idx, v[idx].copy()))
        v[idx] = 0.0
        u[idx] = 0.0
    return out


def _encode(dgc: MomentumCorrection, codec, i: int, step: int, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the worker's push does with one chunk (worker._push_chunk)."""
    codec.k = dgc.k(step, g.size)
    fields, segments = codec.encode(dgc.velocity(i, g))
    idx = np.frombuffer(segments[0], dtype=np.int32).copy()
    dgc.mask(i, idx)
    return idx, np.frombuffer(segments[1], dtype=np.float32).copy()


def test_what_is_pushed_is_the_papers_momentum_corrected_top_k():
    rng = np.random.default_rng(5)
    n, steps, m = 2000, 8, 0.9
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]
    dgc = MomentumCorrection(m, 0.01, warmup_steps=0, n_chunks=1)
    codec = codecs.make_codec("topk:0.01", n)
    for step, (g, (want_idx, want_vals)) in enumerate(zip(grads, _reference_dgc(grads, m, 20))):
        idx, vals = _encode(dgc, codec, 0, step, g)
        assert np.array_equal(idx, want_idx) and np.array_equal(vals, want_vals), step


def test_nothing_is_lost_and_sent_values_restart_their_momentum():
    rng = np.random.default_rng(6)
    n, m = 500, 0.5
    dgc = MomentumCorrection(m, 0.02, warmup_steps=0, n_chunks=1)
    codec = codecs.make_codec("topk:0.02", n)
    g = rng.standard_normal(n).astype(np.float32)
    idx, vals = _encode(dgc, codec, 0, 0, g)
    total = codec.feedback().copy()  # what the codec still holds...
    total[idx] += vals  # ...plus what was sent is everything accumulated: u = g after one step
    assert np.array_equal(total, g)
    u_after = dgc.velocity(0, np.zeros(n, np.float32))  # one more step of zero gradient: u ← m·u
    assert np.all(u_after[idx] == 0)  # masked: the velocity of what was sent starts over
    keep = np.setdiff1d(np.arange(n), idx)
    assert np.array_equal(u_after[keep], np.float32(m) * g[keep])


def test_the_warm_up_sends_a_quarter_first_and_the_target_ratio_from_its_end():
    dgc = MomentumCorrection(0.9, 0.001, warmup_steps=100, n_chunks=1)
    ratios = [dgc.ratio(s) for s in range(0, 120, 10)]
    assert ratios[0] == START_RATIO and ratios[-1] == 0.001 and dgc.ratio(100) == 0.001
    assert all(a > b for a, b in zip(ratios, ratios[1:11]))  # falls every step of the warm-up
    assert dgc.k(0, 1000) == 250 and dgc.k(500, 1000) == 1
    assert MomentumCorrection(0.9, 0.5, warmup_steps=100, n_chunks=1).ratio(0) == 0.5  # never more than asked


def test_save_and_restore_undo_an_aborted_push():
    rng = np.random.default_rng(7)
    dgc = MomentumCorrection(0.9, 0.1, warmup_steps=0, n_chunks=2)
    codec = codecs.make_codec("topk:0.1", 100)
    _encode(dgc, codec, 0, 0, rng.standard_normal(100).astype(np.float32))
    dgc.save()
    before = dgc.velocity(0, np.zeros(100, np.float32)).copy() / np.float32(0.9)  # u, undone by the restore below
    dgc.restore()
    _encode(dgc, codec, 0, 1, rng.standard_normal(100).astype(np.float32))  # the aborted attempt
    dgc.restore()
    assert np.allclose(dgc.velocity(0, np.zeros(100, np.float32)), np.float32(0.9) * before)
    dgc.save()  # chunk 1 never pushed: nothing to keep, nothing made up
    dgc.restore()
    assert dgc._u[1] is None


def _job(**kw) -> JobConfig:
    base = dict(model="simple_cnn", dataset="digits", optimizer="momentum", momentum=0.9, lr=0.05)
    base.update(kw)
    return JobConfig(momentum_correction=True, lr_schedule="constant", weight_decay=0.0, warmup_steps=0, **base)


def test_the_master_steps_without_momentum_and_bad_combinations_are_refused():
    info = data.load_datasets(JobConfig())[2]
    state = ModelState(_job(compression="topk:0.01"), info, 10)
    assert state.optimizer.param_groups[0]["momentum"] == 0.0
    with pytest.raises(ConfigError, match="needs top-k pushes"):
        ModelState(_job(compression="fp16"), info, 10)
    with pytest.raises(ConfigError, match="needs top-k pushes"):
        ModelState(_job(compression="auto"), info, 10)
    with pytest.raises(ConfigError, match="needs --optimizer momentum"):
        ModelState(_job(compression="topk:0.01", optimizer="adam", momentum=None), info, 10)


@pytest.mark.slow
def test_a_run_with_momentum_correction_learns(tmp_path):
    args = ["--world-size", "3", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--global-batch-size", "64", "--epochs", "4", "--experiment", "dgc", "--compression", "topk:0.01"]
    args += ["--momentum-correction", "--optimizer", "momentum", "--lr", "0.05", "--warmup-steps", "20"]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"]]) as c:
        assert c.wait(timeout=300) == 0, c.output("server")[-3000:]
        epochs = read_jsonl(os.path.join(c.experiment_dir(), "metrics", "epochs.jsonl"))
        pushed = [w["bytes_out"] for s in read_jsonl(os.path.join(c.experiment_dir(), "metrics", "steps.jsonl"))
                  for w in s["workers"].values()]  # fmt: skip
    assert epochs[-1]["eval_accuracy"] >= 0.85, epochs
    assert pushed[0] > 10 * pushed[-1]  # the warm-up's first pushes carry a quarter; the last ones 1 %
