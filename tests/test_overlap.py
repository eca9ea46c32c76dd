"""A step that overlaps: chunks pushed while backward runs, the master's update stepped chunk by chunk
on the native kernels beside the broadcast, in torch's optimizer state."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import async_test, read_jsonl

from hetero_ps.config import JobConfig
from hetero_ps.kernels.chunked_step import ChunkedStep
from hetero_ps.server.model_state import ModelState
from hetero_ps.testing import LocalCluster
from hetero_ps.training import data, models
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.optim import build_optimizer
from hetero_ps.training.sampler import EpochSampler
from hetero_ps.training.trainer import LocalTrainer
from hetero_ps.wire.messages import chunk_layout
from hetero_ps.worker.overlap import ChunkReadiness, PullAborted, PullArrival, chunks_of_parameters

OPTIMIZERS = [
    dict(optimizer="sgd", lr=0.1, weight_decay=1e-3),
    dict(optimizer="momentum", lr=0.05, momentum=0.9, weight_decay=5e-4),
    dict(optimizer="adam", lr=1e-3, weight_decay=1e-2),
    dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2),
]


def _grads(n: int, steps: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(3)
    return [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for _ in range(steps)]


# -- the chunked optimizer step ------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", OPTIMIZERS, ids=[k["optimizer"] for k in OPTIMIZERS])
def test_chunked_step_is_torchs_step_and_keeps_its_state_format(knobs):
    job = JobConfig(lr_schedule="cosine", warmup_steps=2, **knobs)
    n, steps = 10_007, 4
    init = torch.from_numpy(np.random.default_rng(1).standard_normal(n).astype(np.float32))
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt, sched = build_optimizer(job, ours, steps)
    ref_opt, ref_sched = build_optimizer(job, theirs, steps)
    stepper = ChunkedStep(opt)
    chunks = chunk_layout(n, 4096 * 4)[::-1]  # in any order: backward's order is the reverse
    for g in _grads(n, steps):
        plan = stepper.begin()
        for off, k in chunks:
            plan.chunk(off, k, g.numpy()[off : off + k])
        plan.finish()
        with warnings.catch_warnings():  # torch never saw a step(); the schedule is the same
            warnings.simplefilter("ignore")
            sched.step()
        theirs.grad = g.clone()
        ref_opt.step()
        ref_sched.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    mine, ref = opt.state_dict(), ref_opt.state_dict()
    assert mine["state"].keys() == ref["state"].keys()
    for key, value in ref["state"].get(0, {}).items():  # plain SGD: no state in either
        got = mine["state"][0][key]
        assert type(got) is type(value) and got.dtype == value.dtype, key
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
    # A checkpoint of ours loads into a fresh optimizer that continues the same way.
    resumed = torch.nn.Parameter(ours.detach().clone())
    opt2, _ = build_optimizer(job, resumed, steps)
    opt2.load_state_dict(copy.deepcopy(mine))
    g = _grads(n, 1)[0]
    for o in (opt, opt2):
        ChunkedStep(o).step(g.numpy())
    assert torch.equal(ours.detach(), resumed.detach())


def test_the_plain_sgd_update_is_one_rounding():
    """p ← p − lr·g exactly, as numpy's float32 does it (the chaos test's known parameters need it)."""
    job = JobConfig(optimizer="sgd", lr=0.25, lr_schedule="constant")
    p = torch.nn.Parameter(torch.linspace(-3, 3, 1001))
    before = p.detach().numpy().copy()
    stepper = ChunkedStep(build_optimizer(job, p, 10)[0])
    g = _grads(1001, 1)[0]
    plan = stepper.begin()
    plan.chunk(0, 1001, g.numpy())
    assert np.array_equal(p.detach().numpy(), before - np.float32(0.25) * g.numpy())


@async_test(timeout=60)
async def test_a_streamed_update_gives_each_chunk_when_stepped_and_the_same_bits_as_apply():
    job = JobConfig(model="simple_cnn", dataset="digits", optimizer="momentum", momentum=0.9, chunk_bytes=8192)
    info = data.load_datasets(job)[2]
    streamed, whole = ModelState(job, info, 10), ModelState(job, info, 10)
    assert len(streamed.chunks) > 3
    for g in _grads(streamed.numel, 2):
        assert streamed.start_update(g)
        assert streamed.version == 1 + whole.version  # frames of the new version from the start
        frames = [await streamed.params_frame("none", i) for i in reversed(range(len(streamed.chunks)))]
        assert len(frames) == len(streamed.chunks)
        assert await streamed.update_finished() >= 0 and streamed.update is None
        assert whole.apply(g)
        assert torch.equal(streamed.flat.params, whole.flat.params)
    nan = torch.zeros(streamed.numel)
    nan[-1] = float("nan")
    before = streamed.flat.params.clone()
    assert not streamed.start_update(nan) and streamed.update is None  # never applied, nothing in flight
    assert torch.equal(streamed.flat.params, before)


@async_test(timeout=60)
async def test_full_pulls_in_ssp_still_hold_one_version():
    job = JobConfig(model="simple_cnn", dataset="digits", sync="ssp", chunk_bytes=8192)
    state = ModelState(job, data.load_datasets(job)[2], 10)
    frames = state.encoded_params("none")
    assert state.apply(_grads(state.numel, 1)[0])
    again = state.encoded_params("none")
    assert all(a is not b for a, b in zip(frames, again))  # another version: encoded anew, all at once


# -- which chunks backward has finished ----------------------------------------------------------------
def _trainer(chunk_bytes: int, micro_batch: int = 0):
    job = JobConfig(model="simple_cnn", dataset="digits", seed=0)
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    flat = FlatParams(model)
    chunks = chunk_layout(flat.numel, chunk_bytes)
    return LocalTrainer(job, model, flat, train, info, micro_batch=micro_batch), flat, chunks


@pytest.mark.parametrize("micro_batch", [0, 8])
def test_each_chunk_is_told_once_when_backward_has_finished_it(micro_batch):
    trainer, flat, chunks = _trainer(chunk_bytes=4096, micro_batch=micro_batch)
    readiness = ChunkReadiness(flat, chunks)
    seen: list[tuple[int, np.ndarray]] = []

    def on_ready(c: int) -> None:
        off, n = chunks[c]
        seen.append((c, flat.grads.numpy()[off : off + n].copy()))  # what a push would send now

    trainer.compute_gradient(np.arange(32))  # not armed: nothing
    assert seen == []
    trainer.compute_gradient(np.arange(32), before_last_backward=lambda: readiness.arm(on_ready))
    readiness.disarm()
    order = [c for c, _ in seen]
    assert sorted(order) == list(range(len(chunks)))  # every chunk, once
    assert order[0] == len(chunks) - 1 and order[-1] == 0  # the last layer first, the first layer last
    for c, early in seen:  # the gradient was final when the chunk was told
        off, n = chunks[c]
        assert np.array_equal(early, flat.grads.numpy()[off : off + n]), c


def test_a_parameter_without_a_gradient_holds_its_chunks_back():
    trainer, flat, chunks = _trainer(chunk_bytes=1 << 30)  # one chunk
    readiness = ChunkReadiness(flat, chunks)
    frozen_use = flat.parameters()[0]
    seen: list[int] = []
    readiness.arm(seen.append)
    loss = sum(p.sum() for p in flat.parameters() if p is not frozen_use)
    loss.backward()
    assert seen == []  # the worker pushes it after backward, with the rest


# -- layers waiting for their parameter chunks ---------------------------------------------------------
def _pull_while_computing(per_layer: bool) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """A step computed while its parameters arrive chunk by chunk (NaN until each is in): the
    gradient, the gradient on the parameters in place, the chunks in when the first layer ran,
    the chunks it needs and the chunks of the model."""
    trainer, flat, chunks = _trainer(chunk_bytes=4096)
    first = next(m for m in trainer.model.modules() if list(m.parameters(recurse=False)))
    by_param = chunks_of_parameters(flat, chunks)
    index = {id(p): i for i, p in enumerate(flat.parameters())}
    needs = max(c for p in first.parameters(recurse=False) for c in by_param[index[id(p)]]) + 1
    arrival = PullArrival(trainer.model, flat, chunks, per_layer)
    idx = np.arange(24)
    params = flat.params.clone()
    trainer.compute_gradient(idx)
    expected = flat.grads.clone()

    delivered, ran_with, ran = [0], [-1], threading.Event()

    def note(_m: object, _args: object) -> None:  # runs after PullArrival's hook: what the layer saw
        if ran_with[0] < 0:
            ran_with[0] = delivered[0]
            ran.set()

    first.register_forward_pre_hook(note)
    flat.params.fill_(float("nan"))
    arrival.expect()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        step = pool.submit(trainer.compute_gradient, idx)
        for c, (off, n) in enumerate(chunks):
            if per_layer and c == needs:  # the first layer may run now, before the rest arrives
                assert ran.wait(timeout=60), "the first layer did not run once its chunks were in"
            flat.params[off : off + n] = params[off : off + n]
            delivered[0] = c + 1
            arrival.arrived(c)
        step.result(timeout=60)
    return flat.grads.clone(), expected, ran_with[0], needs, len(chunks)


def test_each_layer_runs_once_its_chunks_are_in_and_reads_no_parameter_early():
    got, expected, ran_with, needs, n_chunks = _pull_while_computing(per_layer=True)
    assert torch.equal(got, expected)  # a NaN read anywhere would show
    assert ran_with == needs < n_chunks


def test_a_model_without_per_layer_waits_starts_once_the_whole_pull_is_in():
    got, expected, ran_with, _, n_chunks = _pull_while_computing(per_layer=False)
    assert torch.equal(got, expected) and ran_with == n_chunks


def test_a_pull_that_will_not_come_releases_the_waiting_forward():
    trainer, flat, chunks = _trainer(chunk_bytes=4096)
    arrival = PullArrival(trainer.model, flat, chunks, per_layer=True)
    arrival.expect()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        step = pool.submit(trainer.compute_gradient, np.arange(8))  # waits for chunk 0 (or gets there late)
        arrival.abort()
        with pytest.raises(PullAborted):
            step.result(timeout=60)
    arrival.expect()
    for c in range(len(chunks)):
        arrival.arrived(c)
    arrival.abort()  # a pull that is complete is not touched
    trainer.compute_gradient(np.arange(8))
    arrival.expect()
    for c in range(len(chunks)):
        arrival.arrived(c)
    assert not arrival.expecting
    trainer.compute_gradient(np.arange(8))


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_worker_pushes_during_backward_and_the_run_trains(tmp_path):
    args = ["--world-size", "3", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--global-batch-size", "64", "--max-steps", "12", "--chunk-mb", "0.01", "--experiment", "ov"]
    args += ["--optimizer", "momentum", "--lr", "0.05", "--eval-samples", "300"]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"]]) as c:
        assert c.wait(timeout=180) == 0, c.output("server")[-3000:]
        steps = read_jsonl(os.path.join(c.experiment_dir(), "metrics", "steps.jsonl"))
    assert len(steps) == 12 and all(s["applied"] for s in steps)
    early = [w["early_chunks"] for s in steps for w in s["workers"].values()]
    assert sum(early) > 0, "no chunk was pushed before its worker's backward ended"
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(s["server"]["optimizer_s"] > 0 for s in steps)


def test_the_readiness_queue_runs_on_the_loop():
    """Backward's thread hands chunks to the event loop (call_soon_threadsafe), never touching its queue."""

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[int] = asyncio.Queue()
        trainer, flat, chunks = _trainer(chunk_bytes=4096)
        readiness = ChunkReadiness(flat, chunks)
        arm = lambda: readiness.arm(lambda c: loop.call_soon_threadsafe(q.put_nowait, c))  # noqa: E731
        await asyncio.to_thread(trainer.compute_gradient, np.arange(16), arm)
        await asyncio.sleep(0)
        return [q.get_nowait() for _ in range(q.qsize())], len(chunks)

    got, n_chunks = asyncio.run(main())
    assert sorted(got) == list(range(n_chunks))


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_steps_scheduled_ahead_of_their_parameters_are_exactly_sequential_sgd(tmp_path, overlap):
    """Steps 1.. are scheduled before the previous update's pull (their workers compute while the
    parameters arrive, layer by layer); the result is still exactly three SGD steps on the union batches."""
    steps_n, lr = 3, 0.5
    args = ["--world-size", "3", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--global-batch-size", "64", "--worker-batch-sizes", "1:23,2:41", "--max-steps", str(steps_n)]
    args += ["--optimizer", "sgd", "--lr", str(lr), "--lr-schedule", "constant", "--experiment", "ahead"]
    args += ["--chunk-mb", "0.01"] + ([] if overlap else ["--no-overlap"])
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"]]) as c:
        assert c.wait(timeout=180) == 0, c.output("server")[-3000:]
        exp = c.experiment_dir()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    ahead = {s["step"]: sorted(r for r, w in s["workers"].items() if w["scheduled_ahead"]) for s in steps}
    assert ahead == ({0: [], 1: ["1", "2"], 2: ["1", "2"]} if overlap else {0: [], 1: [], 2: []})

    job = JobConfig(model="simple_cnn", dataset="digits", global_batch=64, optimizer="sgd", lr=lr, momentum=0.0)
    trainer, flat, _ = _trainer(chunk_bytes=4096)
    sampler = EpochSampler(len(trainer.train_set), job.seed)
    for step in range(steps_n):  # one process, the union batch of each step
        trainer.compute_gradient(sampler.indices(0, 64 * step, 64))
        flat.params.sub_(lr * flat.grads)
    expected = flat.params.clone()
    state = torch.load(os.path.join(exp, "model.pt"), weights_only=True)
    trainer.model.load_state_dict(state.get("model", state))  # the model's parameters are views of flat's
    torch.testing.assert_close(flat.params, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected, _trainer(chunk_bytes=4096)[1].params)  # the steps moved it
