"""Top-k with momentum: the master's momentum against DGC's momentum correction, in the same run.

simple_cnn on digits, two workers on loopback, global batch 64, momentum SGD 0.9 with a warm-up, for
each top-k ratio: uncompressed (the reference), ``--compression topk:R`` (the master's momentum sees
the values top-k held back late, once) and ``--compression topk:R --momentum-correction`` (the
workers keep the momentum; ``worker/dgc.py``). The figure is the last evaluation's accuracy; the
loss after the first epoch shows how fast each starts.

Quick mode (CI): one epoch at ratio 0.01. Full mode: ``EPOCHS`` epochs at ratios 0.01 and 0.001.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.conftest import FULL, report_value
from hetero_ps.observe.jsonl import read_jsonl
from hetero_ps.testing import LocalCluster

EPOCHS = 6 if FULL else 1
RATIOS = (0.01, 0.001) if FULL else (0.01,)
JOB = ["--model", "simple_cnn", "--dataset", "digits", "--global-batch-size", "64", "--optimizer", "momentum"]
JOB += ["--momentum", "0.9", "--lr", "0.05", "--lr-schedule", "cosine", "--warmup-steps", "30"]
JOB += ["--world-size", "3", "--no-local-worker", "--no-dashboard", "--epochs", str(EPOCHS)]


def _accuracy(tmp_path, label: str, extra: list[str]) -> tuple[float, float]:
    d = tmp_path / label
    d.mkdir()
    with LocalCluster(d, [*JOB, *extra, "--experiment", "dgc"]) as c:
        for rank in (1, 2):
            c.add_worker(["--rank", str(rank), "--torch-threads", "1"])
        assert c.wait(timeout=1800 if FULL else 300) == 0, c.output("server")[-3000:]
        epochs = read_jsonl(os.path.join(c.experiment_dir(), "metrics", "epochs.jsonl"))
    return float(epochs[-1]["eval_accuracy"]), float(epochs[0]["eval_loss"])


@pytest.mark.slow
@pytest.mark.timeout(7200 if FULL else 600)
def bench_dgc(tmp_path):
    dense, _ = _accuracy(tmp_path, "none", [])
    for ratio in RATIOS:
        plain, plain_loss = _accuracy(tmp_path, f"topk{ratio}", ["--compression", f"topk:{ratio}"])
        dgc, dgc_loss = _accuracy(tmp_path, f"dgc{ratio}", ["--compression", f"topk:{ratio}", "--momentum-correction"])
        report_value(
            f"top-k {ratio:g} with momentum correction: accuracy after {EPOCHS} epoch(s)",
            dgc,
            "accuracy",
            {"top-k, the master's momentum": plain, "uncompressed": dense},
            extra={"first_epoch_eval_loss": {"momentum_correction": dgc_loss, "master_momentum": plain_loss}},
        )
        print(
            f"[bench] dgc: top-k {ratio:g}: momentum correction {100 * dgc:.2f} % (first-epoch eval loss "
            f"{dgc_loss:.3f}), the master's momentum {100 * plain:.2f} % ({plain_loss:.3f}), "
            f"uncompressed {100 * dense:.2f} %"
        )
