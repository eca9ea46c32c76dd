"""Convergence of each built-in model on its recipe, against the old one-size defaults, in the same run.

Each model trains twice on two workers over loopback: once on its recipe (no optimizer flag: what a
new user gets, ``hetero_ps/training/recipes.py``) and once on the settings every model had before
recipes existed (momentum SGD 0.9, lr 0.05, cosine, no warmup). The figure of merit is the last
evaluation: accuracy for classifiers, eval loss for the language model (lower is better; the
uniform guess over the vocabulary is ln V).

* quick mode (CI): ``simple_cnn`` and ``gpt2`` on small data for one epoch; it proves the benchmark
  runs, its numbers mean little.
* full mode (``scripts/bench.sh``): every built-in model at ``--model-size tiny`` (these machines
  have no GPU) on its data set at the data set's default size, ``EPOCHS`` epochs, global batch 64;
  writes the "Convergence" section of ``benchmarks/RESULTS.md`` (between its markers, which
  ``render_results`` keeps) and the curves in ``benchmarks/convergence.png``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import pytest

from benchmarks.conftest import FULL, report_value, write_results_section
from hetero_ps.observe.jsonl import read_jsonl
from hetero_ps.testing import LocalCluster

HERE = os.path.dirname(os.path.abspath(__file__))
CURVES = os.path.join(HERE, "convergence.png")
EPOCHS = 3 if FULL else 1
GLOBAL_BATCH = 64 if FULL else 32
OLD_DEFAULTS = ["--optimizer", "momentum", "--lr", "0.05", "--momentum", "0.9", "--lr-schedule", "cosine"]
OLD_DEFAULTS += ["--warmup-steps", "0", "--weight-decay", "0"]
VOCAB = 512  # synthetic_text's default vocabulary

# model -> its data arguments (full mode: the data sets' default sizes)
MODELS = {
    "simple_cnn": ["--dataset", "digits"],
    "resnet50": ["--dataset", "digits"],
    "bert": ["--dataset", "synthetic_text"],
    "gpt2": ["--dataset", "synthetic_text"],
}
QUICK = {"simple_cnn": ["--dataset", "digits"], "gpt2": ["--dataset", "synthetic_text", "--dataset-arg", "size=256"]}


@dataclass
class Curve:
    model: str
    variant: str  # "recipe" or "old defaults"
    recipe: str  # what the master said it trained with
    evals: list  # epochs.jsonl
    losses: list  # (step, training loss)
    wall_s: float

    @property
    def last(self) -> dict:
        return max(self.evals, key=lambda e: e["epoch"])

    @property
    def score(self) -> float:
        return score(self.model, self.last)


def score(model: str, evaluation: dict) -> float:
    """Accuracy for classifiers, eval loss for the language model."""
    return evaluation["eval_loss"] if model == "gpt2" else evaluation["eval_accuracy"]


def train(tmp_path, model: str, data: list[str], variant: str) -> Curve:
    name = f"{model}-{variant.replace(' ', '-')}"
    d = tmp_path / name
    d.mkdir()
    args = ["--world-size", "3", "--no-local-worker", "--model", model, "--model-size", "tiny", *data]
    args += ["--epochs", str(EPOCHS), "--global-batch-size", str(GLOBAL_BATCH), "--no-dashboard"]
    args += ["--experiment", name] + (OLD_DEFAULTS if variant == "old defaults" else [])
    args += ["--divergence-factor", "0"]  # the old defaults are measured as they were, diverging or not
    workers = [["--rank", str(r), "--torch-threads", "1"] for r in (1, 2)]
    t0 = time.monotonic()
    with LocalCluster(d, args, workers=workers) as c:
        assert c.wait(timeout=3600 if FULL else 300) == 0, c.output("server")[-3000:]
        exp = c.experiment_dir()
        said = next((line for line in c.output("server").splitlines() if "recipe for" in line), "")
        evals = read_jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))
        steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    recipe = said.split(": ", 1)[-1].split(" — ")[0]
    return Curve(model, variant, recipe, evals, [(s["step"], s["loss"]) for s in steps], time.monotonic() - t0)


def _fmt(model: str, v: float) -> str:
    return f"loss {v:.3f}" if model == "gpt2" else f"{100 * v:.1f} %"


def table(curves: dict) -> list[str]:
    lines = [
        "| model | data | recipe | recipe: eval per epoch | old defaults: eval per epoch | recipe ahead by |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model, (new, old) in curves.items():
        per_epoch = [
            ", ".join(_fmt(model, score(model, e)) for e in sorted(c.evals, key=lambda e: e["epoch"]))
            for c in (new, old)
        ]
        ahead = (old.score - new.score) if model == "gpt2" else (new.score - old.score)
        gain = f"{ahead:.3f} nats" if model == "gpt2" else f"{100 * ahead:.1f} points"
        data = (MODELS if FULL else QUICK)[model][1]
        lines.append(f"| {model} (tiny) | {data} | {new.recipe} | {per_epoch[0]} | {per_epoch[1]} | {gain} |")
    return lines


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (model, pair) in zip(axes[0], curves.items()):
        for c in pair:
            steps, losses = zip(*[(s, loss) for s, loss in c.losses if math.isfinite(loss)]) or ((), ())
            ax.plot(steps, losses, label=f"{c.variant} (train)", alpha=0.7)
            ends = [e["step"] for e in c.evals]
            ax.plot(ends, [e["eval_loss"] for e in c.evals], "o--", label=f"{c.variant} (eval)")
        ax.set(title=f"{model} (tiny)", xlabel="step", ylabel="loss", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@pytest.mark.slow
@pytest.mark.timeout(7200 if FULL else 600)
def bench_convergence(tmp_path):
    t_start = time.monotonic()
    curves = {
        model: (train(tmp_path, model, data, "recipe"), train(tmp_path, model, data, "old defaults"))
        for model, data in (MODELS if FULL else QUICK).items()
    }
    for model, (new, old) in curves.items():
        higher_better = model != "gpt2"
        report_value(
            f"convergence {model} (tiny): last evaluation, recipe vs old defaults",
            new.score,
            "eval loss" if not higher_better else "accuracy",
            {"old defaults": old.score} if higher_better else None,
            extra={"old_defaults": old.score, "recipe": new.recipe, "epochs": EPOCHS},
        )
    lines = table(curves)
    print(f"\n[bench] convergence ({'full' if FULL else 'quick'} mode, {time.monotonic() - t_start:.0f} s)")
    print("\n".join(lines))
    if FULL:
        plot(curves, CURVES)
        write_results_section(
            "convergence",
            "Convergence",
            [
                f"Two workers on loopback, `--model-size tiny`, global batch {GLOBAL_BATCH}, {EPOCHS} epochs, each",
                "data set at its default size; `bench_convergence.py` trains every model twice in the same run:",
                "on its recipe (no optimizer flag) and on the old one-size defaults (momentum SGD 0.05, no",
                "warmup). Accuracy for classifiers, eval loss for gpt2 (uniform over 512 tokens: 6.238).",
                "",
                *lines,
                "",
                "![training and eval loss per step](convergence.png)",
                "",
            ],
        )
    for new, _ in curves.values():  # the recipe must have learned something in any mode
        if new.model == "gpt2":
            assert new.score < math.log(VOCAB), new.last
        else:
            assert new.score > 0.2, new.last
