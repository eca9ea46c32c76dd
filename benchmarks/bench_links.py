"""Real links: workers behind rate-limited network links, for each codec, against the fast worker alone.

Each "remote" worker runs in a network namespace joined to the master's by a veth pair whose two
ends are limited with ``tc tbf`` (``hetero_ps.testing.netlinks``), so pushes and pulls cross a link
of the stated rate each way, with the kernel's real TCP. Where ``ip netns`` is not permitted the
worker's ``--simulate-bandwidth`` pacer stands in (the report says which).

The model is the issue's 10.5 M-parameter network: simple_cnn with a 10240-wide hidden layer
(``--model-arg hidden=10240``, 42 MB of fp32) on synthetic_image, global batch 64, dynamic load
balancing, one torch thread per worker. For each link rate and codec pair (push/pull):

* **fast solo** — one worker on loopback alone; **slow solo** — one worker behind the link alone;
  **Σ-solo** — their sum, the ideal of a cluster of both;
* **fast + slow** — one worker on loopback and one behind the link, in one BSP job;
* **all behind** — two workers, each behind its own link of that rate.

Throughput is training samples/s over the steps after the first ``WARM`` (Σ samples / Σ step_s;
``auto`` rows skip ``WARM_AUTO``: its first three steps measure the link, and the scheduler settles
the split, or puts a worker on standby, over the few after the switch, and measure ``MEASURED_AUTO``
steps, long enough for a standby worker's local rounds to come in; ``local steps`` rows,
``--sync local`` with auto H and auto codecs, skip their first two rounds, which measure the links,
and run ``LOCAL_BATCHES`` global batches);
bytes per step are the link worker's mean pushed and pulled bytes. Accuracy after a fixed sample
budget does not depend on the link in BSP (the same samples, the same weighted sum), only on the
codecs, so it is measured on loopback with two workers, ``ACC_EPOCHS`` epochs per codec pair: the
MLP on synthetic_image, and gpt2 tiny on synthetic_text (perplexity, its recipe's AdamW).

Quick mode (CI): a small model (simple_cnn tiny, digits), 100 Mbit/s, codecs none and top-k, the
fast + slow scenario and the fast worker alone, a few steps each. Full mode
(``HETERO_PS_BENCH_FULL=1``): everything above for 1000, 300, 100 and 20 Mbit/s
(``HETERO_PS_LINK_RATES=100,20`` picks rates, ``HETERO_PS_LINK_CODECS=auto,none`` rows), writing
``benchmarks/RESULTS_links.md``, ``benchmarks/links.png`` and the accuracy runs' loss curves
(``benchmarks/links_curves.png``). ``auto`` is ``--compression auto
--pull-compression auto``: each worker's codecs chosen by the master from its measured link
(``server/codec_choice.py``).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass

import pytest

from benchmarks.conftest import FULL, report_value
from hetero_ps.observe.jsonl import read_jsonl
from hetero_ps.testing import LocalCluster, netlinks
from hetero_ps.wire import codecs
from hetero_ps.wire.messages import chunk_layout

HERE = os.path.dirname(os.path.abspath(__file__))
# A run of some rates or rows only goes beside the tracked results (untracked), not over them.
PARTIAL = ".partial" if os.environ.get("HETERO_PS_LINK_RATES") or os.environ.get("HETERO_PS_LINK_CODECS") else ""
RESULTS = os.path.join(HERE, f"RESULTS_links{PARTIAL}.md")
PLOT = os.path.join(HERE, f"links{PARTIAL}.png")
CURVES = os.path.join(HERE, f"links_curves{PARTIAL}.png")

if FULL:
    MODEL = ["--model", "simple_cnn", "--model-arg", "hidden=10240", "--dataset", "synthetic_image"]
    RATES = tuple(float(r) for r in os.environ.get("HETERO_PS_LINK_RATES", "1000,300,100,20").split(","))
    CODECS = {  # label: (push, pull)
        "none": ("none", "none"),
        "fp16": ("fp16", "fp16"),
        "int8": ("int8", "int8"),
        "top-k 1 %": ("topk:0.01", "topk:0.01"),
        "PowerSGD r4 + int8 pull": ("powersgd:4", "int8"),
        "auto": ("auto", "auto"),
        # --sync local: rounds of H inner steps (auto H), the parameter change pushed with auto's codecs
        "local steps": ("auto", "auto", "--sync", "local"),
    }
    if os.environ.get("HETERO_PS_LINK_CODECS"):  # e.g. "auto,none": a partial run of those rows
        CODECS = {k: v for k, v in CODECS.items() if k in os.environ["HETERO_PS_LINK_CODECS"].split(",")}
    WARM, MEASURED = 4, 8
    WARM_AUTO = 8  # auto measures the link in its first three steps, moves, and the split settles
    MEASURED_AUTO = 120  # a worker on standby runs rounds of up to 64 steps: a window of several
    ACC_EPOCHS = 3
    ACC_LINK = 100.0  # Mbit/s: the second worker's link in the local-steps accuracy runs
else:
    MODEL = ["--model", "simple_cnn", "--model-size", "tiny", "--dataset", "digits"]
    RATES = (100.0,)
    CODECS = {
        "none": ("none", "none"),
        "top-k 1 %": ("topk:0.01", "topk:0.01"),
        "local steps": ("none", "none", "--sync", "local", "--local-steps", "2"),
    }
    WARM, MEASURED = 1, 3
    WARM_AUTO, MEASURED_AUTO = WARM, MEASURED
    ACC_EPOCHS = 0
    ACC_LINK = 0.0
GLOBAL_BATCH = 64
# --sync local rows: global batches per run (auto's first round of 4, then rounds of up to 64, cut
# at each epoch's end: 78 batches of synthetic_image)
LOCAL_BATCHES = 5 * 78 if FULL else 8
# A fixed codec pair whose push + pull alone takes longer than this per step is not run at that rate
# (none at 20 Mbit/s: 34 s a step, 20 minutes for its three scenarios); auto is always run.
MAX_TRANSFER_S = 8.0
MODEL_NUMEL = 10_650_000  # the full mode's MLP, for the estimate


def _transfer_s(codec: tuple[str, str], rate_mbit: float) -> float:
    if "auto" in codec:
        return 0.0
    chunks = chunk_layout(MODEL_NUMEL, 4 << 20)
    nbytes = sum(codecs.make_codec(spec, n).max_encoded_bytes() for spec in codec[:2] for _, n in chunks)
    return 8 * nbytes / (rate_mbit * 1e6)


# The language-model accuracy runs: gpt2 tiny on its recipe (AdamW), perplexity = exp(eval loss).
GPT2_JOB = ["--model", "gpt2", "--model-size", "tiny", "--dataset", "synthetic_text", "--global-batch-size", "64"]
GPT2_JOB += ["--no-dashboard", "--join-timeout", "300", "--eval-samples", "800"]
RUN_TIMEOUT = 1800 if FULL else 120
# lr 0.05 (simple_cnn's recipe) diverges on the 10240-wide layer within 30 steps: 0.01 with a warmup.
LR = ["--lr", "0.01", "--warmup-steps", "10"] if FULL else ["--lr", "0.05"]
JOB = [*MODEL, "--global-batch-size", str(GLOBAL_BATCH), *LR, "--no-dashboard", "--join-timeout", "300"]
JOB += ["--enable-load-balancing", "--load-balance-policy", "dynamic", "--eval-samples", "1000"]


@dataclass
class Run:
    label: str
    steps: list
    summary: dict
    link_rank: str = ""  # the worker behind the link, in the step records' ``workers``
    warm: int = WARM  # steps not measured

    @property
    def rate(self) -> float:
        steps = self.steps[self.warm :] or self.steps
        return sum(s["samples"] for s in steps) / sum(s["step_s"] for s in steps)

    def bytes_per_step(self, key: str) -> float:
        ws = [s["workers"][self.link_rank][key] for s in self.steps[self.warm :] if self.link_rank in s["workers"]]
        return sum(ws) / len(ws) if ws else 0.0


def _run(tmp_path, label: str, codec: tuple[str, str], workers: list, epochs: int = 0, job: list = JOB) -> Run:
    """One job; ``workers`` lists each worker's link (None: loopback). Steps-limited unless ``epochs``."""
    d = tmp_path / label.replace(" ", "_").replace("/", "-").replace("%", "pct")
    d.mkdir()
    args = [*job, "--host", "0.0.0.0", "--world-size", str(len(workers) + 1), "--no-local-worker"]
    args += ["--compression", codec[0], "--pull-compression", codec[1], *codec[2:], "--experiment", "links"]
    warm = WARM_AUTO if "auto" in codec else WARM
    batches = warm + (MEASURED_AUTO if "auto" in codec else MEASURED)
    if "local" in codec:  # a step is a round of H global batches: two rounds measure (auto H, auto codecs)
        warm, batches = 2, LOCAL_BATCHES
    args += ["--epochs", str(epochs)] if epochs else ["--epochs", "50", "--max-steps", str(batches)]
    paced = []
    with LocalCluster(d, args) as c:
        for rank, link in enumerate(workers, start=1):
            extra = ["--rank", str(rank), "--torch-threads", "1"]
            if isinstance(link, float):  # no namespaces here: the pacer stands in for the link
                paced.append(rank)
                extra += ["--simulate-bandwidth", str(link)]
            c.add_worker(extra, link=link if isinstance(link, netlinks.Link) else None)
        rc = c.wait(timeout=RUN_TIMEOUT)
        assert rc == 0, c.output("server")[-3000:]
        m = os.path.join(c.experiment_dir(), "metrics")
        steps = read_jsonl(os.path.join(m, "steps.jsonl"))
        summary = c.summary()
    link_rank = next((str(r) for r, w in enumerate(workers, start=1) if w is not None), "")
    return Run(label, steps, summary, link_rank, warm)


class Links:
    """Makes the links a scenario needs (namespaces, or the pacer's rate where they cannot be made)."""

    def __init__(self):
        self.why_paced = netlinks.unavailable()
        self.open: list[netlinks.Link] = []

    def make(self, rate: float):
        if self.why_paced:
            return rate
        link = netlinks.Link(rate)
        link.open()
        self.open.append(link)
        return link

    def close(self) -> None:
        for link in self.open:
            link.close()
        self.open.clear()


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f}" if nbytes >= 1e5 else f"{nbytes / 1e6:.4f}"


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(4 * 3600 if FULL else 300)
def bench_links(tmp_path):
    t_start = time.monotonic()
    links = Links()
    kind = "paced (" + links.why_paced + ")" if links.why_paced else "tc tbf veth links"
    rows, accuracy, curves, measured, skipped = [], {}, {}, {}, []
    try:
        for rate in RATES:
            if not links.why_paced:
                with netlinks.Link(rate) as probe:
                    measured[rate] = probe.measure_mbit(max(1 << 20, int(rate * 1e6 / 8 * 0.5)))
            for label, codec in CODECS.items():
                if FULL and _transfer_s(codec, rate) > MAX_TRANSFER_S:
                    skipped.append(f"{label} at {rate:g} Mbit/s ({_transfer_s(codec, rate):.0f} s of transfer a step)")
                    continue
                fast = _run(tmp_path, f"{rate:g} {label} fast solo", codec, [None])
                pair = _run(tmp_path, f"{rate:g} {label} fast+slow", codec, [None, links.make(rate)])
                links.close()
                slow = both = None
                if FULL:
                    slow = _run(tmp_path, f"{rate:g} {label} slow solo", codec, [links.make(rate)])
                    links.close()
                    both = _run(tmp_path, f"{rate:g} {label} all behind", codec, [links.make(rate), links.make(rate)])
                    links.close()
                ideal = fast.rate + (slow.rate if slow else 0.0)
                base = {"fast worker alone": fast.rate}
                if slow:
                    base["sum of solo rates"] = ideal
                report_value(
                    f"links {rate:g} Mbit/s, {label}: fast + slow-link worker, samples/s",
                    pair.rate,
                    "samples/s",
                    base,
                    extra={
                        "link": kind,
                        "push_bytes_per_step": pair.bytes_per_step("bytes_out"),
                        "pull_bytes_per_step": pair.bytes_per_step("bytes_in"),
                        "all_behind_samples_per_s": both.rate if both else None,
                    },
                )
                rows.append((rate, label, fast, slow, pair, both))
        for label, codec in CODECS.items() if ACC_EPOCHS else ():
            # BSP computes the same whatever the link; local steps do not (auto's H follows the link):
            # those run with the second worker behind a 100 Mbit/s link.
            far = (lambda: links.make(ACC_LINK)) if "local" in codec else (lambda: None)
            acc = _run(tmp_path, f"accuracy {label}", codec, [None, far()], epochs=ACC_EPOCHS)
            links.close()
            lm = _run(tmp_path, f"gpt2 {label}", codec, [None, far()], epochs=ACC_EPOCHS, job=GPT2_JOB)
            links.close()
            accuracy[label] = (acc.summary.get("final_eval_accuracy"), math.exp(lm.summary["eval"]["eval_loss"]))
            curves[label] = (acc.steps, lm.steps)
    finally:
        links.close()
        if FULL and rows:  # what was measured is kept even if a later run failed
            write_results(rows, accuracy, measured, kind, skipped)
            plot(rows, PLOT)
        if curves:
            plot_curves(curves, CURVES)
    for rate, label, fast, _slow, pair, _both in rows:
        print(
            f"[bench]   {rate:g} Mbit/s {label}: fast+slow {pair.rate:.1f} samples/s = "
            f"{pair.rate / fast.rate:.2f}x the fast worker alone ({fast.rate:.1f}); link worker pushes "
            f"{_mb(pair.bytes_per_step('bytes_out'))} MB, pulls {_mb(pair.bytes_per_step('bytes_in'))} MB per step"
        )
    print(f"[bench] links: {kind}, {time.monotonic() - t_start:.0f} s ({'full' if FULL else 'quick'} mode)")


def write_results(rows: list, accuracy: dict, measured: dict, kind: str, skipped: list) -> None:
    lines = [
        "# Links: one job across unequal links",
        "",
        "Written by `scripts/bench.sh -k links` (`benchmarks/bench_links.py`; its docstring says what each",
        f"figure means). Links: {kind}; "
        + ", ".join(f"{r:g} Mbit/s measured at {m:.1f}" for r, m in measured.items())
        + ". Model: simple_cnn with a 10240-wide hidden layer (10.5 M parameters, 42 MB fp32) on",
        f"synthetic_image, global batch {GLOBAL_BATCH}, dynamic balancing, one torch thread per worker, all",
        "processes on one 2-core machine.",
        "",
        "| link | codecs (push / pull) | fast alone | slow alone | Σ-solo | fast + slow | ÷ fast alone | all behind |"
        " push MB/step | pull MB/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, label, fast, slow, pair, both in rows:
        ideal = fast.rate + (slow.rate if slow else 0.0)
        lines.append(
            f"| {rate:g} Mbit/s | {label} | {fast.rate:.1f} | {slow.rate:.1f} | {ideal:.1f} | {pair.rate:.1f} | "
            f"{pair.rate / fast.rate:.2f}× | {both.rate:.1f} | {_mb(pair.bytes_per_step('bytes_out'))} | "
            f"{_mb(pair.bytes_per_step('bytes_in'))} |"
        )
    lines += ["", "Samples/s. `÷ fast alone` is the fast + slow cluster against the fast worker alone.", ""]
    if skipped:
        lines += [f"Not run (more than {MAX_TRANSFER_S:g} s of transfer per step): " + "; ".join(skipped) + ".", ""]
    if accuracy:
        lines += [
            f"After {ACC_EPOCHS} epochs (two workers, loopback; the link does not change what BSP computes,",
            "only the codecs do): the MLP's accuracy on synthetic_image, and gpt2 tiny's perplexity on",
            "synthetic_text (its recipe: AdamW; exp of the last eval loss, lower is better). Local steps:",
            f"the second worker behind a {ACC_LINK:g} Mbit/s link (auto's H follows the link).",
            "",
            "| codecs | synthetic_image accuracy | gpt2 tiny perplexity |",
            "|---|---|---|",
        ]
        for k, (acc, ppl) in accuracy.items():
            lines.append(f"| {k} | {'n/a' if acc is None else f'{100 * acc:.1f} %'} | {ppl:.2f} |")
        lines += ["", f"![training loss against samples]({os.path.basename(CURVES)})", ""]
    lines += [f"![samples/s by codec and link]({os.path.basename(PLOT)})", ""]
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines))


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r[0] for r in rows}, reverse=True)
    labels = list(dict.fromkeys(r[1] for r in rows))
    fig, axes = plt.subplots(1, len(rates), figsize=(4.5 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        mine = {r[1]: r for r in rows if r[0] == rate}
        here = [k for k in labels if k in mine]  # a row skipped at this rate has no bars
        xs = range(len(here))
        ax.bar([x - 0.2 for x in xs], [mine[k][4].rate for k in here], 0.4, label="fast + slow")
        ax.bar([x + 0.2 for x in xs], [mine[k][5].rate for k in here], 0.4, label="all behind")
        ax.plot(xs, [mine[k][2].rate for k in here], "k_", markersize=18, label="fast alone")
        ax.set_xticks(list(xs), here, rotation=30, ha="right", fontsize=7)
        ax.set(title=f"{rate:g} Mbit/s", ylabel="samples/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(curves: dict, path: str) -> None:
    """Training loss against samples trained, per accuracy run: the MLP's and gpt2 tiny's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, which, title in zip(axes, (0, 1), ("MLP on synthetic_image", "gpt2 tiny on synthetic_text")):
        for label, runs in curves.items():
            steps = runs[which]
            seen = list(itertools.accumulate(s["samples"] for s in steps))
            ax.plot(seen, [s["loss"] for s in steps], label=label, linewidth=1)
        ax.set(title=title, xlabel="samples trained", ylabel="training loss", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
