"""Figures and a Markdown report from a finished (or running) experiment folder.

::

    python -m hetero_ps.report experiments/NAME [--out DIR] [--ideal SAMPLES_PER_S]
    python -m hetero_ps.report --compare experiments/A experiments/B [--out DIR]

The first writes ``experiments/NAME/report/`` (or ``--out``): ``throughput.png``, ``batch_shares.png``,
``loss_accuracy.png``, ``time_split.png`` and ``report.md``, which embeds them by relative path. The
second overlays two experiments in ``experiments/compare-A-vs-B/``.

It reads the folder the master writes: ``config.json``, ``summary.json``, ``metrics/steps.jsonl``,
``metrics/epochs.jsonl``, ``metrics/events.jsonl`` (the formats are in docs/ARCHITECTURE.md). A
truncated last line (a run killed mid-write) is ignored; any other bad line is an error naming it.

Definitions used throughout:

* a worker's throughput is its contribution ``b_i / step_s`` — the workers' curves sum to the total;
* the ideal throughput is ``Σ_i r_i``, each worker's solo samples/s: ``--ideal``, else
  ``summary.json``'s ``ideal_samples_per_s``, else the sum of the calibration probes the workers
  reported when they joined (``profile.probe_samples_per_s`` in ``worker_joined`` events);
* communication overhead is ``1 − Σ_steps max_i compute_i / Σ_steps step_s`` (as in summary.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from hetero_ps.errors import DataError
from hetero_ps.observe.jsonl import read_jsonl

PHASES = (
    ("compute_s", "compute", "#2f6fde"),
    ("encode_s", "encode", "#945ecf"),
    ("push_s", "push", "#e8743b"),
    ("wait_s", "wait", "#aab3bf"),
    ("pull_s", "pull", "#13a4b4"),
)
RANK_COLORS = (
    "#2f6fde",
    "#e8743b",
    "#19a979",
    "#945ecf",
    "#d64545",
    "#13a4b4",
    "#c98a00",
    "#ed4a7b",
    "#6f7d8c",
    "#7aa329",
)
FIGSIZE = (9.0, 4.2)
DPI = 110


def rank_color(rank) -> str:
    return RANK_COLORS[int(rank) % len(RANK_COLORS)]


# -- loading -------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object")
    return d


@dataclass
class Experiment:
    """One experiment folder, loaded."""

    path: str
    name: str
    config: dict
    summary: dict
    steps: list
    epochs: list
    events: list
    ideal: float | None = None
    ideal_source: str = ""
    ranks: list = field(default_factory=list)


def load_experiment(path: str, ideal: float | None = None) -> Experiment:
    path = os.path.normpath(path)
    metrics = os.path.join(path, "metrics")
    if not os.path.isfile(os.path.join(metrics, "steps.jsonl")):
        raise DataError(f"{path} is not an experiment folder: {os.path.join(metrics, 'steps.jsonl')} is missing")
    steps = read_jsonl(os.path.join(metrics, "steps.jsonl"))
    if not steps:
        raise DataError(f"{path}: no step was recorded yet (metrics/steps.jsonl is empty)")
    for i, r in enumerate(steps):
        if not isinstance(r.get("step"), int) or not isinstance(r.get("workers", {}), dict):
            raise DataError(f"{path}/metrics/steps.jsonl: record {i + 1} has no integer 'step' or a bad 'workers'")
    exp = Experiment(
        path=path,
        name=os.path.basename(path),
        config=_read_json(os.path.join(path, "config.json")),
        summary=_read_json(os.path.join(path, "summary.json")),
        steps=steps,
        epochs=read_jsonl(os.path.join(metrics, "epochs.jsonl"), required=False),
        events=read_jsonl(os.path.join(metrics, "events.jsonl"), required=False),
    )
    exp.ranks = sorted({int(r) for s in steps for r in s.get("workers", {})})
    exp.ideal, exp.ideal_source = _ideal(exp, ideal)
    return exp


def _ideal(exp: Experiment, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "given with --ideal"
    s = exp.summary.get("ideal_samples_per_s")
    if isinstance(s, (int, float)) and s > 0:
        return float(s), "summary.json"
    probes: dict[object, Any] = {}  # rank -> probe rate as read from the JSON event
    for e in exp.events:
        if e.get("event") == "worker_joined":
            p = (e.get("profile") or {}).get("probe_samples_per_s")
            probes[e.get("rank")] = p
    if probes and all(isinstance(p, (int, float)) and p > 0 for p in probes.values()) and set(probes) >= set(exp.ranks):
        return float(sum(probes.values())), "sum of the workers' calibration probes"
    return None, ""


# -- series ----------------------------------------------------------------------------------------
def smooth(values: list, window: int) -> list:
    """Trailing mean over ``window`` values (None ignored) — keeps the x positions."""
    out, buf = [], []
    for v in values:
        buf.append(v)
        if len(buf) > window:
            buf.pop(0)
        ok = [x for x in buf if x is not None]
        out.append(sum(ok) / len(ok) if ok else None)
    return out


def _window(n: int) -> int:
    return max(1, min(50, n // 40))


def _nan(v):
    return math.nan if v is None else v


def worker_series(exp: Experiment, rank: int, key: str) -> list:
    """Per step, worker ``rank``'s value of ``key`` (``"throughput"``/``"share"`` derived), None if absent."""
    out: list[float | None] = []
    for s in exp.steps:
        w = s.get("workers", {}).get(str(rank))
        if w is None:
            out.append(None)
        elif key == "throughput":
            out.append(w.get("batch", 0) / s["step_s"] if s.get("step_s") else None)
        elif key == "share":
            out.append(100.0 * w.get("batch", 0) / s["samples"] if s.get("samples") else None)
        else:
            out.append(w.get(key))
    return out


def phase_means(exp: Experiment) -> dict:
    """rank → {phase key: mean seconds per step}, and ``"all"`` → the mean over workers and steps."""
    out = {}
    for r in exp.ranks:
        out[r] = {k: _mean([v for v in worker_series(exp, r, k) if v is not None]) for k, _, _ in PHASES}
    out["all"] = {
        k: _mean(
            [_mean([w.get(k) or 0.0 for w in s.get("workers", {}).values()]) for s in exp.steps if s.get("workers")]
        )
        for k, _, _ in PHASES
    }
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else 0.0


def totals(exp: Experiment) -> dict:
    """What the report's summary table shows, from the summary where present, else from the steps."""
    steps = exp.steps
    train_s = sum(s.get("step_s") or 0.0 for s in steps)
    samples = sum(s.get("samples") or 0 for s in steps)
    slowest = sum(max((w.get("compute_s") or 0.0 for w in s.get("workers", {}).values()), default=0.0) for s in steps)
    sm = exp.summary
    sps = sm.get("samples_per_s") or (samples / train_s if train_s else None)
    last_epoch = exp.epochs[-1] if exp.epochs else {}
    return {
        "steps": sm.get("steps", len(steps)),
        "samples": sm.get("samples", samples),
        "train_s": sm.get("train_s", train_s),
        "samples_per_s": sps,
        "ideal_samples_per_s": exp.ideal,
        "efficiency": sps / exp.ideal if sps and exp.ideal else None,
        "final_loss": sm.get("final_loss", steps[-1].get("loss")),
        "final_eval_accuracy": sm.get("final_eval_accuracy", last_epoch.get("eval_accuracy")),
        "final_eval_loss": last_epoch.get("eval_loss"),
        "communication_overhead": sm.get("communication_overhead", 1 - slowest / train_s if train_s else None),
        "skipped_steps": sum(1 for s in steps if s.get("applied") is False),
        "retried_steps": sum(1 for s in steps if (s.get("attempts") or 1) > 1),
    }


# -- figures ---------------------------------------------------------------------------------------
def _figure(ncols: int = 1, figsize=FIGSIZE):
    # The object-oriented API on an Agg canvas: no pyplot, no global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e6e9ee", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path)
    return name


def decisions(exp: Experiment) -> list[tuple[dict, int, object]]:
    """Schedule events with runs of identical batch sizes folded: (first event, how many, last step)."""
    out: list[tuple[dict, int, object]] = []
    for e in exp.events:
        if e.get("event") != "schedule":
            continue
        if out and out[-1][0].get("sizes") == e.get("sizes"):
            first, n, _ = out[-1]
            out[-1] = (first, n + 1, e.get("step"))
        else:
            out.append((e, 1, e.get("step")))
    return out


def _legend_outside(fig, ax, ncols: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)


def fig_throughput(exp: Experiment, out_dir: str) -> str:
    fig, (ax,) = _figure()
    x = [s["step"] for s in exp.steps]
    w = _window(len(x))
    for r in exp.ranks:
        ax.plot(
            x,
            [_nan(v) for v in smooth(worker_series(exp, r, "throughput"), w)],
            color=rank_color(r),
            linewidth=1.3,
            label=f"rank {r}",
        )
    ax.plot(
        x,
        [_nan(v) for v in smooth([s.get("samples_per_s") for s in exp.steps], w)],
        color="#1c2430",
        linewidth=2.2,
        label="total",
    )
    if exp.ideal:
        ax.axhline(exp.ideal, color="#6b7684", linestyle="--", linewidth=1.4, label="ideal (Σ solo rates)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s")
    ax.set_title(f"Throughput per worker and total{f' (mean of {w} steps)' if w > 1 else ''}")
    _legend_outside(fig, ax, len(exp.ranks) + 2)
    return _save(fig, out_dir, "throughput.png")


def fig_batch_shares(exp: Experiment, out_dir: str) -> str:
    fig, (ax,) = _figure()
    x = [s["step"] for s in exp.steps]
    ys = [[v or 0.0 for v in worker_series(exp, r, "share")] for r in exp.ranks]
    ax.stackplot(
        x,
        ys,
        colors=[rank_color(r) for r in exp.ranks],
        labels=[f"rank {r}" for r in exp.ranks],
        alpha=0.9,
        linewidth=0,
    )
    for e, _, _ in decisions(exp)[1:61]:  # where the split changed
        if isinstance(e.get("step"), int):
            ax.axvline(e["step"], color="white", linewidth=0.8, alpha=0.9)
    ax.set_ylim(0, 100)
    ax.set_xlim(x[0], x[-1] if x[-1] > x[0] else x[0] + 1)
    ax.set_xlabel("step (white lines: the scheduler changed the split)")
    ax.set_ylabel("% of the step's samples")
    ax.set_title("Batch-size shares")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, out_dir, "batch_shares.png")


def fig_loss_accuracy(exp: Experiment, out_dir: str) -> str:
    fig, (ax, ax2) = _figure(2, (11.0, 4.0))
    x = [s["step"] for s in exp.steps]
    loss = [s.get("loss") for s in exp.steps]
    ax.plot(x, [_nan(v) for v in loss], color="#2f6fde", alpha=0.3, linewidth=0.8)
    ax.plot(x, [_nan(v) for v in smooth(loss, _window(len(x)))], color="#2f6fde", linewidth=1.8, label="train loss")
    ev = [e for e in exp.epochs if e.get("eval_loss") is not None]
    if ev:
        ax.plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o-", color="#e8743b", label="eval loss")
    ax.set_xlabel("step")
    ax.set_title("Loss")
    ax.legend(fontsize=8)
    acc = [e for e in exp.epochs if e.get("eval_accuracy") is not None]
    if acc:
        ax2.plot([e["step"] for e in acc], [100 * e["eval_accuracy"] for e in acc], "o-", color="#19a979")
        ax2.set_ylabel("%")
    else:
        ax2.text(
            0.5,
            0.5,
            "accuracy not measured\nfor this task" if exp.epochs else "no evaluation recorded",
            ha="center",
            va="center",
            transform=ax2.transAxes,
            color="#6b7684",
        )
    ax2.set_xlabel("step")
    ax2.set_title("Eval accuracy (per epoch)")
    return _save(fig, out_dir, "loss_accuracy.png")


def fig_time_split(exp: Experiment, out_dir: str) -> str:
    fig, (ax, ax2) = _figure(2, (11.0, max(3.2, 1.2 + 0.45 * len(exp.ranks))))
    means = phase_means(exp)
    labels = [f"rank {r}" for r in exp.ranks]
    left = [0.0] * len(exp.ranks)
    for k, name, c in PHASES:
        vals = [means[r][k] for r in exp.ranks]
        ax.barh(labels, vals, left=left, color=c, label=name, height=0.6)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("mean seconds per step")
    ax.set_title("Where each worker's step time goes")
    _legend_outside(fig, ax, len(PHASES))
    x = [s["step"] for s in exp.steps]
    w = _window(len(x))
    ys = [
        smooth([_mean([wk.get(k) or 0.0 for wk in s.get("workers", {}).values()]) for s in exp.steps], w)
        for k, _, _ in PHASES
    ]
    ax2.stackplot(x, [[v or 0.0 for v in y] for y in ys], colors=[c for _, _, c in PHASES], linewidth=0)
    ax2.set_xlabel("step")
    ax2.set_ylabel("seconds (mean of workers)")
    ax2.set_title("Time split over the run")
    return _save(fig, out_dir, "time_split.png")


# -- markdown ------------------------------------------------------------------------------------
def _fmt(v, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if kind == "%":
        return f"{100 * v:.1f} %"
    if kind == "s":
        return f"{v * 1e3:.1f} ms" if abs(v) < 1 else f"{v:.2f} s"
    if kind == "B":
        for m, u in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(v) >= m:
                return f"{v / m:.1f} {u}"
        return f"{v:.0f} B"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v) + "`"
    return str(v).replace("|", "\\|")


def _table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _summary_rows(t: dict, ideal_source: str) -> list:
    return [
        ("throughput", f"{_fmt(t['samples_per_s'])} samples/s"),
        (
            "ideal throughput",
            f"{_fmt(t['ideal_samples_per_s'])} samples/s ({ideal_source})" if t["ideal_samples_per_s"] else "unknown",
        ),
        ("efficiency (throughput / ideal)", _fmt(t["efficiency"], "%")),
        ("final eval accuracy", _fmt(t["final_eval_accuracy"], "%")),
        ("final eval loss", _fmt(t["final_eval_loss"])),
        ("final train loss", _fmt(t["final_loss"])),
        ("communication overhead", _fmt(t["communication_overhead"], "%")),
        ("steps / samples", f"{t['steps']} / {t['samples']}"),
        ("training time", _fmt(t["train_s"], "s")),
        ("steps skipped (non-finite) / retried", f"{t['skipped_steps']} / {t['retried_steps']}"),
    ]


def _worker_rows(exp: Experiment) -> list:
    rows, means = [], phase_means(exp)
    info = exp.summary.get("workers") or {}
    for r in exp.ranks:
        joined: dict = next((e for e in exp.events if e.get("event") == "worker_joined" and e.get("rank") == r), {})
        wi = info.get(str(r), {})
        batches = [v for v in worker_series(exp, r, "batch") if v is not None]
        sent = sum(v or 0 for v in worker_series(exp, r, "bytes_out"))
        recv = sum(v or 0 for v in worker_series(exp, r, "bytes_in"))
        rows.append(
            [
                r,
                _fmt(wi.get("host") or joined.get("host")),
                _fmt(wi.get("device") or joined.get("device")),
                len(batches),
                _fmt(_mean(batches)),
                _fmt(_mean([v for v in worker_series(exp, r, "share") if v is not None]) / 100, "%"),
                _fmt(_mean([v for v in worker_series(exp, r, "throughput") if v is not None])),
                *(_fmt(means[r][k], "s") for k, _, _ in PHASES),
                _fmt(sent, "B"),
                _fmt(recv, "B"),
            ]
        )
    return rows


def _prediction(before, after) -> str:
    """A decision's predicted step time, "before → after"; 0 means the policy had no model (uniform,
    or nothing measured yet), which is shown as unknown rather than as a 0 ms step."""

    def known(v) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v) and v > 0

    if known(before) and known(after):
        return f"{_fmt(before, 's')} → {_fmt(after, 's')}"
    return _fmt(after, "s") if known(after) else "—"


def _event_lines(exp: Experiment, limit: int = 25) -> list:
    n_sched = sum(1 for e in exp.events if e.get("event") == "schedule")
    folded = decisions(exp)
    lines = [
        f"{n_sched} load-balancing decision(s), {max(0, len(folded) - 1)} of which changed the split "
        "(repeats of the same split are folded into one row)."
    ]
    if folded:
        shown = folded if len(folded) <= limit else folded[: limit - 5] + folded[-5:]
        rows = []
        for e, n, last in shown:
            sizes = ", ".join(f"r{r}={b}" for r, b in sorted((e.get("sizes") or {}).items(), key=lambda kv: int(kv[0])))
            pred = _prediction(e.get("previous_predicted_s"), e.get("predicted_step_s"))
            when = f"{e.get('step')}" if n == 1 else f"{e.get('step')}–{last} ({n}×)"
            rows.append([when, _fmt(e.get("policy")), sizes, pred, _fmt(e.get("reason"))])
        if len(folded) > limit:
            lines.append(f"The first {limit - 5} and the last 5 rows are shown.")
        lines += [""] + _table(["step", "policy", "batch sizes", "predicted step time", "reason"], rows)
    other = [e for e in exp.events if e.get("event") in ("worker_joined", "worker_lost", "nonfinite_gradient")]
    if other:
        lines.append("Membership and failures:")
        lines.append("")
        for e in other[:100]:
            detail = e.get("reason") or e.get("device") or ", ".join(e.get("workers") or [])
            lines.append(
                f"- step {e.get('step')}: {e['event'].replace('_', ' ')}"
                f"{' rank ' + str(e['rank']) if 'rank' in e else ''}{' — ' + str(detail) if detail else ''}"
            )
        lines.append("")
    return lines


def write_report(exp_path: str, out_dir: str | None = None, ideal: float | None = None) -> str:
    """Write the figures and ``report.md`` for one experiment; returns the path of ``report.md``."""
    exp = load_experiment(exp_path, ideal)
    out_dir = out_dir or os.path.join(exp.path, "report")
    os.makedirs(out_dir, exist_ok=True)
    figs = [
        ("Throughput", fig_throughput(exp, out_dir)),
        ("Batch-size shares", fig_batch_shares(exp, out_dir)),
        ("Loss and accuracy", fig_loss_accuracy(exp, out_dir)),
        ("Time split", fig_time_split(exp, out_dir)),
    ]
    t = totals(exp)
    md = [
        f"# Experiment `{exp.name}`",
        "",
        f"Generated by `python -m hetero_ps.report` on {datetime.datetime.now():%Y-%m-%d %H:%M} from `{exp.path}`.",
        "",
        "## Summary",
        "",
    ] + _table(["", ""], _summary_rows(t, exp.ideal_source))
    md += [
        "## Workers",
        "",
        "Throughput is each worker's contribution (its batch / step time); times are means per step.",
        "",
    ]
    md += _table(
        [
            "rank",
            "host",
            "device",
            "steps",
            "mean batch",
            "mean share",
            "samples/s",
            *(n for _, n, _ in PHASES),
            "sent",
            "received",
        ],
        _worker_rows(exp),
    )
    md += ["## Load balancing", ""] + _event_lines(exp)
    md += ["## Figures", ""]
    for title, name in figs:
        md += [f"### {title}", "", f"![{title}]({os.path.relpath(os.path.join(out_dir, name), out_dir)})", ""]
    md += ["## Configuration", ""] + _table(["setting", "value"], [(k, _fmt(v)) for k, v in sorted(exp.config.items())])
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return path


# -- comparison ------------------------------------------------------------------------------------
def write_comparison(a_path: str, b_path: str, out_dir: str | None = None) -> str:
    """Overlay two experiments; returns the path of the comparison's ``report.md``."""
    a, b = load_experiment(a_path), load_experiment(b_path)
    if a.path == b.path:
        raise DataError(f"--compare needs two different experiments, got {a.path} twice")
    out_dir = out_dir or os.path.join(os.path.dirname(a.path), f"compare-{a.name}-vs-{b.name}")
    os.makedirs(out_dir, exist_ok=True)

    def label(e):
        return e.name if a.name != b.name else e.path

    # Over training time, not steps: two runs may differ in batch size, so step k means different things.
    fig, (ax,) = _figure()
    for e, c in ((a, "#2f6fde"), (b, "#e8743b")):
        t = _train_time(e)
        ax.plot(
            t,
            [_nan(v) for v in smooth([s.get("samples_per_s") for s in e.steps], _window(len(t)))],
            color=c,
            linewidth=1.8,
            label=label(e),
        )
        if e.ideal:
            ax.axhline(e.ideal, color=c, linestyle="--", linewidth=1, label=f"{label(e)} ideal")
    ax.set_ylim(bottom=0)
    ax.set(xlabel="training time (s, evaluation excluded)", ylabel="samples/s", title="Total throughput")
    _legend_outside(fig, ax, 4)
    f_tp = _save(fig, out_dir, "throughput.png")

    fig, (ax, ax2) = _figure(2, (11.0, 4.0))
    for e, c in ((a, "#2f6fde"), (b, "#e8743b")):
        t = _train_time(e)
        ax.plot(
            t, [_nan(v) for v in smooth([s.get("loss") for s in e.steps], _window(len(t)))], color=c, label=label(e)
        )
        at = {s["step"]: x for s, x in zip(e.steps, t)}
        acc = [p for p in e.epochs if p.get("eval_accuracy") is not None and p.get("step", 0) - 1 in at]
        if acc:
            ax2.plot(
                [at[p["step"] - 1] for p in acc], [100 * p["eval_accuracy"] for p in acc], "o-", color=c, label=label(e)
            )
    ax.set(xlabel="training time (s)", title="Train loss")
    ax2.set(xlabel="training time (s)", ylabel="%", title="Eval accuracy")
    _legend_outside(fig, ax, 2)
    f_loss = _save(fig, out_dir, "loss_accuracy.png")

    fig, (ax,) = _figure(figsize=(9.0, 2.8))
    for e in (a, b):
        left, m = 0.0, phase_means(e)["all"]
        for k, name, c in PHASES:
            ax.barh(label(e), m[k], left=left, color=c, label=name if e is a else None, height=0.55)
            left += m[k]
    ax.invert_yaxis()
    ax.set(xlabel="mean seconds per step (mean of workers)", title="Time split")
    _legend_outside(fig, ax, len(PHASES))
    f_split = _save(fig, out_dir, "time_split.png")

    ta, tb = totals(a), totals(b)
    rows = [
        (name, va, vb)
        for (name, va), (_, vb) in zip(_summary_rows(ta, a.ideal_source), _summary_rows(tb, b.ideal_source))
    ]
    if ta["samples_per_s"] and tb["samples_per_s"]:
        rows.insert(1, ("throughput ratio (B / A)", "1", f"{tb['samples_per_s'] / ta['samples_per_s']:.3f}"))
    diff = [
        (k, _fmt(a.config.get(k)), _fmt(b.config.get(k)))
        for k in sorted(set(a.config) | set(b.config))
        if a.config.get(k) != b.config.get(k)
    ]
    md = [
        f"# `{a.name}` (A) vs `{b.name}` (B)",
        "",
        f"Generated by `python -m hetero_ps.report --compare` on {datetime.datetime.now():%Y-%m-%d %H:%M}.",
        "",
        "## Summary",
        "",
    ] + _table(["", f"A: {a.name}", f"B: {b.name}"], rows)
    md += ["## Configuration differences", ""]
    md += _table(["setting", "A", "B"], diff) if diff else ["The two configurations are the same.", ""]
    md += ["## Figures", ""]
    for title, name in (("Throughput", f_tp), ("Loss and accuracy", f_loss), ("Time split", f_split)):
        md += [f"### {title}", "", f"![{title}]({name})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return path


def _train_time(exp: Experiment) -> list[float]:
    """Cumulative step time at the end of each step (seconds)."""
    out, t = [], 0.0
    for s in exp.steps:
        t += s.get("step_s") or 0.0
        out.append(t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hetero_ps.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a typo is an error, not a guess at another flag
    )
    p.add_argument("experiment", nargs="?", help="an experiment folder (experiments/NAME)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="overlay two experiment folders")
    p.add_argument("--out", default="", help="where to write (default: NAME/report/ or compare-A-vs-B/ beside A)")
    p.add_argument(
        "--ideal",
        type=float,
        default=None,
        help="ideal samples/s (Σ of each worker's solo rate), if summary.json lacks it",
    )
    args = p.parse_args(argv)
    if not args.experiment and not args.compare:
        p.error("give an experiment folder, or --compare A B")
    if args.experiment and args.compare and args.out:
        p.error("--out applies to one output: give either an experiment or --compare with it")
    if args.ideal is not None and not (args.ideal > 0 and math.isfinite(args.ideal)):
        p.error("--ideal must be a positive number of samples/s")
    try:
        if args.experiment:
            print(write_report(args.experiment, args.out or None, args.ideal))
        if args.compare:
            first, second = args.compare  # nargs=2
            print(write_comparison(first, second, out_dir=args.out or None))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
