"""Overlap on loopback: one and two workers against one worker's compute alone, overlapped and serial.

The model is issue 11's 10.5 M-parameter network (simple_cnn with a 10240-wide hidden layer, 42 MB of
fp32) on synthetic_image, global batch 64, one torch thread per worker, BSP, uncompressed; quick
mode (CI) uses simple_cnn on digits for a few steps.

* **compute only** — ``LocalTrainer.compute_gradient`` on this process's one thread, the same
  model, batch and data, nothing else: the rate a worker could train at if communication were free;
* **overlapped** — the default step: each gradient chunk pushed as soon as backward has finished it
  (``worker/overlap.py``), the master's update stepped chunk by chunk on the C++ kernels while each
  stepped chunk goes out (``server/streamed_update.py``);
* **serial** — ``--no-overlap``: push after backward, the whole update, then the broadcast (the
  baseline, measured in the same run).

Full mode adds one worker behind a real 1 Gbit/s link (``netlinks.Link``: a network namespace and a
``tc tbf``-limited veth pair), overlapped and serial: where a push takes as long as backward, hiding
it behind backward is worth most (skipped with the reason where namespaces cannot be made).

Throughput is training samples/s over the steps after the first ``WARM`` (Σ samples / Σ step_s).
The goals (issue 11): one worker ≥ 0.8 × compute only; two workers beat one.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import numpy as np
import pytest
import torch

from benchmarks.conftest import FULL, report_value
from hetero_ps.config import JobConfig
from hetero_ps.observe.jsonl import read_jsonl
from hetero_ps.testing import LocalCluster, netlinks

if FULL:
    MODEL = {"model": "simple_cnn", "model_args": {"hidden": 10240}, "dataset": "synthetic_image"}
    WARM, MEASURED = 4, 16
else:
    MODEL = {"model": "simple_cnn", "model_args": {}, "dataset": "digits"}
    WARM, MEASURED = 2, 6
BATCH = 64


def _args(overlap: bool, workers: int) -> list[str]:
    args = ["--model", MODEL["model"], "--dataset", MODEL["dataset"], "--global-batch-size", str(BATCH)]
    for k, v in MODEL["model_args"].items():
        args += ["--model-arg", f"{k}={v}"]
    args += ["--lr", "0.01", "--no-dashboard", "--eval-samples", "500", "--host", "0.0.0.0"]
    args += ["--world-size", str(workers + 1), "--no-local-worker", "--experiment", "overlap"]
    args += ["--epochs", "50", "--max-steps", str(WARM + MEASURED)]
    return args + ([] if overlap else ["--no-overlap"])


def _cluster(tmp_path, label: str, overlap: bool, workers: int, link_mbit: float = 0.0) -> tuple[float, list]:
    d = tmp_path / label
    d.mkdir()
    link = netlinks.Link(link_mbit) if link_mbit else None
    with LocalCluster(d, _args(overlap, workers)) as c, link or contextlib.nullcontext():
        for rank in range(1, workers + 1):
            c.add_worker(["--rank", str(rank), "--torch-threads", "1"], link=link)
        assert c.wait(timeout=900 if FULL else 180) == 0, c.output("server")[-3000:]
        steps = read_jsonl(os.path.join(c.experiment_dir(), "metrics", "steps.jsonl"))[WARM:]
    return sum(s["samples"] for s in steps) / sum(s["step_s"] for s in steps), steps


def _compute_only() -> float:
    """Samples/s of the worker's compute alone, on one thread, as the cluster's workers run it."""
    from hetero_ps.training import data, models
    from hetero_ps.training.flat import FlatParams
    from hetero_ps.training.trainer import LocalTrainer

    job = JobConfig(model=MODEL["model"], model_args=MODEL["model_args"], dataset=MODEL["dataset"])
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    trainer = LocalTrainer(job, model, FlatParams(model), train, info)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = np.random.default_rng(0).permutation(len(train))
        times = []
        for i in range(WARM + MEASURED):
            t0 = time.perf_counter()
            trainer.compute_gradient(order[(i * BATCH) % (len(train) - BATCH) :][:BATCH])
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return BATCH / statistics.mean(times[WARM:])


def _median(steps: list, *path: str) -> float:
    values = []
    for s in steps:
        v = s
        for key in path:
            v = v[key]
        values.append(float(v))
    return statistics.median(values)


@pytest.mark.slow
@pytest.mark.timeout(3600 if FULL else 400)
def bench_overlap(tmp_path):
    compute = _compute_only()
    one, steps1 = _cluster(tmp_path, "one", True, 1)
    serial, steps_serial = _cluster(tmp_path, "one_serial", False, 1)
    two, _ = _cluster(tmp_path, "two", True, 2)
    two_serial, _ = _cluster(tmp_path, "two_serial", False, 2)
    linked = {}
    why_not = netlinks.unavailable()
    if FULL and not why_not:
        for overlap in (True, False):
            linked[overlap] = _cluster(tmp_path, f"link_{overlap}", overlap, 1, link_mbit=1000.0)[0]
        report_value(
            "overlap: one worker behind a 1 Gbit/s link, samples/s",
            linked[True],
            "samples/s",
            {"serial step (--no-overlap)": linked[False], "compute only": compute},
        )
    elif FULL:
        print(f"[bench] overlap: the 1 Gbit/s link scenario skipped: {why_not}")
    early = statistics.mean(sum(w["early_chunks"] for w in s["workers"].values()) for s in steps1)
    extra = {
        "model": MODEL,
        "step_s": _median(steps1, "step_s"),
        "serial_step_s": _median(steps_serial, "step_s"),
        "optimizer_s": _median(steps1, "server", "optimizer_s"),
        "serial_optimizer_s": _median(steps_serial, "server", "optimizer_s"),
        "broadcast_s": _median(steps1, "server", "broadcast_s"),
        "serial_broadcast_s": _median(steps_serial, "server", "broadcast_s"),
        "early_chunks_per_step": early,
    }
    rec = report_value(
        "overlap: one worker on loopback, samples/s",
        one,
        "samples/s",
        {"compute only (goal: >= 0.8x)": compute, "serial step (--no-overlap)": serial},
        extra=extra,
    )
    report_value(
        "overlap: two workers on loopback, samples/s",
        two,
        "samples/s",
        {"one worker (goal: > 1x)": one, "two workers, serial step": two_serial},
    )
    ratio = rec["baselines"]["compute only (goal: >= 0.8x)"]["ratio"]
    print(
        f"[bench] overlap: one worker {one:.1f} samples/s = {ratio:.2f}x its compute alone ({compute:.1f}); "
        f"serial {serial:.1f}; two workers {two:.1f} (serial {two_serial:.1f}); "
        f"step {extra['step_s']:.3f} s vs serial {extra['serial_step_s']:.3f} s; "
        f"optimizer {extra['optimizer_s']:.4f} s vs {extra['serial_optimizer_s']:.4f} s; "
        f"{early:.1f} chunks a step pushed during backward"
    )
