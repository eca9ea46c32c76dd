"""Heterogeneity: three unequal workers (compute 1×, 2×, 4× as slow) against the sum of their speeds.

Real processes on loopback (``hetero_ps.testing.local_cluster.LocalCluster``): simple_cnn on digits, a fixed global
batch, one torch thread per worker, ``--simulate-slowdown`` 1, 2, 4.

The ideal. The three workers train at the same time *without synchronising*: three single-worker
jobs, each with its own master, all running concurrently so they share this machine's cores as the
cluster's workers will. Job *i* trains on its equal-time share of the global batch,
``B · (1/F_i) / Σ_j (1/F_j)`` — what it computes per step in a perfectly balanced cluster — so each
pays the per-step costs it would pay there. The ideal is the sum of their samples/s.

The cluster. Uniform BSP (equal batches, no load balancing) and every policy (proportional, dynamic,
hybrid) with BSP, SSP and ASP, each reported as a fraction of the ideal (measured again between
groups of runs — a shared machine's load drifts — and each run compared with the mean of the
measurements just before and after it), with its time to 95 % eval accuracy (from the first step)
and its final accuracy. Then the same with worker 1 on a paced
50 Mbit/s link (``--simulate-bandwidth``; against an ideal whose job 1 is paced too), and a run in
which worker 1 is slowed 3× mid-run by a CONTROL message (against the ideal of the new speeds),
with the throughput per rebalance interval after the change.

Throughput is training samples/s: BSP ``Σ samples / Σ step_s`` after the first steps (evaluation
pauses excluded, as in the ideal, whose jobs are BSP too); SSP/ASP over whole epochs of wall time
(their evaluations run beside training, in a thread, so they are not subtracted). "End-to-end" is
the summary's samples / train_s, evaluations and all.

Quick mode (CI): a dozen steps of uniform vs dynamic BSP (no ideal), well under 90 s; it proves
the benchmark runs and prints dynamic's ratio to uniform. Full mode (``HETERO_PS_BENCH_FULL=1``):
everything above, 30 epochs each (15-20 minutes on a 2-core machine).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from benchmarks.conftest import FULL, report_value
from hetero_ps.errors import DataError
from hetero_ps.observe.jsonl import read_jsonl
from hetero_ps.testing import LocalCluster

SLOWDOWNS = (1.0, 2.0, 4.0)
GLOBAL_BATCH = 512  # compute dominates per-step costs here (a step is ~0.1 s of compute)
EPOCHS = 30 if FULL else 5
MAX_STEPS = 0 if FULL else 12
IDEAL_STEPS = 60 if FULL else 12
SKIP_STEPS = 4  # warm-up steps left out of BSP throughput
REBALANCE = 10  # --rebalance-interval
SLOW_AT = 24  # full mode: worker 1 is slowed 3× after this step
LINK_MBIT = 50.0
TRAIN_SIZE = 1438  # digits' training split
RUN_TIMEOUT = 420 if FULL else 80
JOB = ["--model", "simple_cnn", "--dataset", "digits", "--lr", "0.05", "--no-dashboard", "--join-timeout", "120"]


@dataclass
class Run:
    """What one job left behind: its summary and metric streams."""

    name: str
    summary: dict
    steps: list
    epochs: list
    events: list
    wall_s: float
    extra: dict = field(default_factory=dict)

    @property
    def sync(self) -> str:
        return self.summary.get("sync", "bsp")

    def rate(self, first: int = SKIP_STEPS, last: int | None = None) -> float:
        """Training samples/s (see the module docstring)."""
        if self.sync == "bsp" or last is not None:
            steps = self.steps[first:last]
            return sum(s["samples"] for s in steps) / sum(s["step_s"] for s in steps)
        ep = self.epochs
        if len(ep) >= 3:  # epochs 2..E: wall time between the ends of epoch 1 and epoch E
            return TRAIN_SIZE * (len(ep) - 1) / (ep[-1]["elapsed_s"] - ep[0]["elapsed_s"])
        return self.summary["samples_per_s"]

    def time_to(self, accuracy: float) -> float | None:
        """Seconds from the first step to the first evaluation at or above ``accuracy``."""
        if not self.epochs:
            return None
        start = self.epochs[-1]["elapsed_s"] - self.summary["train_s"]
        for e in self.epochs:
            if (e.get("eval_accuracy") or 0.0) >= accuracy:
                return e["elapsed_s"] - start
        return None

    @property
    def final_accuracy(self) -> float | None:
        return self.summary.get("final_eval_accuracy")

    def decisions(self) -> list:
        return [e for e in self.events if e.get("event") == "schedule"]

    def breakdown(self) -> dict:
        """Mean per-step seconds: each worker's compute/push/wait/pull, the server's phases (BSP)."""
        steps = self.steps[SKIP_STEPS:] or self.steps
        out = {"step_s": sum(s["step_s"] for s in steps) / len(steps)}
        for k in ("aggregate_s", "optimizer_s", "broadcast_s"):
            out[f"server_{k}"] = sum(s["server"].get(k, 0.0) for s in steps) / len(steps)
        ranks = sorted({r for s in steps for r in s["workers"]})
        for r in ranks:
            ws = [s["workers"][r] for s in steps if r in s["workers"]]
            out[f"w{r}"] = {
                k: sum(w.get(k, 0.0) for w in ws) / len(ws)
                for k in ("batch", "compute_s", "encode_s", "push_s", "wait_s", "pull_s")
            }
        return out


def _collect(name: str, c: LocalCluster, t0: float) -> Run:
    exp = c.experiment_dir()
    m = os.path.join(exp, "metrics")
    return Run(
        name,
        c.summary(),
        read_jsonl(os.path.join(m, "steps.jsonl"), required=False),
        read_jsonl(os.path.join(m, "epochs.jsonl"), required=False),
        read_jsonl(os.path.join(m, "events.jsonl"), required=False),
        time.monotonic() - t0,
    )


def _worker_args(rank: int, slowdown: float, extra=()) -> list:
    return ["--rank", str(rank), "--torch-threads", "1", "--simulate-slowdown", str(slowdown), *extra]


def _shares(slowdowns, total: int) -> list[int]:
    from hetero_ps.server.solver import solve_batch_sizes

    return solve_batch_sizes([0.0] * len(slowdowns), [1.0 / f for f in slowdowns], total)


def server_supports(flag: str, value: str | None = None) -> bool:
    """Whether this build's master accepts ``flag`` (and ``value`` among its choices)."""
    out = subprocess.run(
        [sys.executable, "-m", "hetero_ps.server", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    return flag in out and (value is None or value in out.split(flag, 1)[1][:200])


def worker_supports(flag: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "hetero_ps.worker", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    return flag in out


def ideal(tmp_path, tag: str = "ideal", slowdowns=SLOWDOWNS, link=None, steps=IDEAL_STEPS) -> tuple[float, list]:
    """The sum of the workers' samples/s, each training alone on its share, all at the same time."""
    shares = _shares(slowdowns, GLOBAL_BATCH)
    clusters = []
    try:
        for i, (_slowdown, b) in enumerate(zip(slowdowns, shares)):
            d = tmp_path / f"{tag}{i}"
            d.mkdir()
            epochs = -(-steps * b // TRAIN_SIZE) + 1
            args = [
                "--world-size",
                "2",
                "--no-local-worker",
                *JOB,
                "--global-batch-size",
                str(b),
                "--epochs",
                str(epochs),
                "--max-steps",
                str(steps),
                "--experiment",
                f"ideal{i}",
            ]
            c = LocalCluster(d, args)
            c.start()
            clusters.append(c)
        t0 = time.monotonic()
        for i, (c, f) in enumerate(zip(clusters, slowdowns)):  # workers together, once every master listens
            c.add_worker(_worker_args(1, f, ["--simulate-bandwidth", str(link)] if link and i == 0 else []))
        runs = []
        for i, c in enumerate(clusters):
            rc = c.wait(timeout=RUN_TIMEOUT)
            assert rc == 0, c.output("server")[-3000:]
            runs.append(_collect(f"ideal{i}", c, t0))
    finally:
        for c in clusters:
            c.close()
    # Trim the ends as well: the jobs start and stop a little apart.
    rates = [r.rate(first=SKIP_STEPS, last=len(r.steps) - SKIP_STEPS // 2) for r in runs]
    return sum(rates), rates


def cluster(tmp_path, name: str, server_args=(), slowdowns=SLOWDOWNS, worker_extra=None, during=None) -> Run:
    """One cluster run: a master and a worker per slowdown; ``during(cluster)`` runs while it trains."""
    d = tmp_path / name
    d.mkdir()
    args = [
        "--world-size",
        str(len(slowdowns) + 1),
        "--no-local-worker",
        *JOB,
        "--global-batch-size",
        str(GLOBAL_BATCH),
        "--epochs",
        str(EPOCHS),
        "--max-steps",
        str(MAX_STEPS),
        "--rebalance-interval",
        str(REBALANCE),
        "--experiment",
        name,
        *server_args,
    ]
    workers = [_worker_args(i + 1, f, (worker_extra or {}).get(i + 1, ())) for i, f in enumerate(slowdowns)]
    t0 = time.monotonic()
    with LocalCluster(d, args, workers=workers) as c:
        extra = during(c) if during else {}
        rc = c.wait(timeout=RUN_TIMEOUT)
        assert rc == 0, c.output("server")[-3000:]
        run = _collect(name, c, t0)
    run.extra = extra or {}
    return run


def _wait_for_step(c: LocalCluster, step: int, timeout: float) -> None:
    """Poll the run's steps stream until it reaches ``step`` (a benchmark, not a test: polling is fine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            path = os.path.join(c.experiment_dir(), "metrics", "steps.jsonl")
            if len(read_jsonl(path, required=False)) > step:
                return
        except (RuntimeError, DataError):  # no experiment folder yet; a record being written
            pass
        if c.server.poll() is not None:
            raise RuntimeError(f"the master exited before step {step}:\n{c.output('server')[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached within {timeout} s")


def slow_down_midway(rank: int, factor: float, at_step: int):
    def during(c: LocalCluster) -> dict:
        from hetero_ps.tools.control import send_control

        _wait_for_step(c, at_step, RUN_TIMEOUT)
        asyncio.run(send_control("127.0.0.1", c.port, c.token, rank, {"simulate_slowdown": factor}))
        return {"slowed_rank": rank, "factor": factor}

    return during


def _row(label: str, run: Run | None, ideal_rate: float | None, note: str = "") -> str:
    if run is None:
        return f"| {label} | n/a | | | | | | {note} |"
    rate = run.rate()
    t95 = run.time_to(0.95)
    acc = run.final_accuracy
    frac = f"{rate / ideal_rate:.2f}" if ideal_rate else "n/m"
    used = f"{ideal_rate:.0f}" if ideal_rate else ""
    return (
        f"| {label} | {rate:.0f} | {frac} | {used} | {run.summary['samples_per_s']:.0f} | "
        f"{'—' if t95 is None else f'{t95:.1f} s'} | {'n/a' if acc is None else f'{100 * acc:.1f} %'} | "
        f"{len(run.decisions())} decisions {note} |"
    )


def _report(label: str, run: Run, ideal_rate: float | None, uniform: Run | None) -> None:
    rate = run.rate()
    base = {"ideal (sum of solo rates)": ideal_rate} if ideal_rate else {}
    if uniform is not None and uniform is not run:
        base["uniform BSP"] = uniform.rate()
    report_value(
        f"heterogeneity {label}: training samples/s",
        rate,
        "samples/s",
        base,
        extra={
            "fraction_of_ideal": rate / ideal_rate if ideal_rate else None,
            "time_to_95_s": run.time_to(0.95),
            "final_accuracy": run.final_accuracy,
            "decisions": len(run.decisions()),
        },
    )
    if FULL and run.final_accuracy is not None:
        report_value(
            f"heterogeneity {label}: final eval accuracy",
            100 * run.final_accuracy,
            "%",
            {"uniform BSP": 100 * uniform.final_accuracy}
            if uniform is not None and uniform is not run and uniform.final_accuracy
            else {},
        )
        t95 = run.time_to(0.95)
        if t95 is not None:
            report_value(f"heterogeneity {label}: seconds to 95 % accuracy", t95, "s")


def _print_breakdown(run: Run) -> None:
    b = run.breakdown()
    ws = " ".join(
        f"{k}: b={v['batch']:.0f} compute {1e3 * v['compute_s']:.0f} push {1e3 * v['push_s']:.1f} "
        f"wait {1e3 * v['wait_s']:.0f} pull {1e3 * v['pull_s']:.1f} ms;"
        for k, v in b.items()
        if k.startswith("w")
    )
    print(
        f"[bench]   {run.name}: step {1e3 * b['step_s']:.0f} ms = server aggregate "
        f"{1e3 * b['server_aggregate_s']:.0f} + optimizer {1e3 * b['server_optimizer_s']:.1f} "
        f"+ broadcast {1e3 * b['server_broadcast_s']:.1f} ms; {ws}"
    )


@pytest.mark.slow
@pytest.mark.timeout(3600 if FULL else 150)
def bench_heterogeneity(tmp_path):
    t_start = time.monotonic()
    lb = ["--enable-load-balancing", "--load-balance-policy"]
    # The load of a shared machine drifts: the ideal is measured again between groups of runs, and
    # each run is compared with the mean of the measurements just before and just after it.
    plan: list = [("uniform BSP", "uniform-bsp", []), ("dynamic BSP", "dynamic-bsp", lb + ["dynamic"])]
    if FULL:
        plan = [
            "ideal",
            *plan,
            "ideal",
            ("proportional BSP", "proportional-bsp", lb + ["proportional"]),
            ("hybrid BSP", "hybrid-bsp", lb + ["hybrid"]),
            "ideal",
        ]
        for sync in ("ssp", "asp"):
            plan += [
                (
                    f"{policy} {sync.upper()}",
                    f"{policy}-{sync}",
                    ["--sync", sync] + ([] if policy == "uniform" else lb + [policy]),
                )
                for policy in ("uniform", "proportional", "dynamic", "hybrid")
            ]
        plan.append("ideal")
    runs: dict[str, Run | None] = {}
    notes: dict[str, str] = {}
    ideal_of: dict[str, float] = {}
    ideals: list[float] = []
    pending: list[str] = []
    for item in plan:
        if item == "ideal":
            rate, solo = ideal(tmp_path, f"ideal{len(ideals)}-")
            print(
                f"\n[bench] ideal #{len(ideals)}: solo rates {[round(r) for r in solo]} samples/s on shares "
                f"{_shares(SLOWDOWNS, GLOBAL_BATCH)} -> {rate:.0f} samples/s"
            )
            ideals.append(rate)
            for label in pending:
                ideal_of[label] = sum(ideals[-2:]) / len(ideals[-2:])
            pending = []
            continue
        label, name, args = item
        sync = args[args.index("--sync") + 1] if "--sync" in args else "bsp"
        if sync != "bsp" and not server_supports("--sync", sync):
            notes[label] = "not available in this build (--sync has no such choice)"
            continue
        try:
            runs[label] = cluster(tmp_path, name, args)
        except (AssertionError, RuntimeError, TimeoutError) as exc:
            if sync == "bsp":
                raise
            runs[label] = None
            notes[label] = f"failed: {str(exc).splitlines()[0][:120]}"
        pending.append(label)
    uniform = runs["uniform BSP"]
    lines = [
        "| run | samples/s | of ideal | ideal used | end-to-end samples/s | to 95 % | final acc | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, run in runs.items():
        lines.append(_row(label, run, ideal_of.get(label), notes.get(label, "")))
        if run is not None:
            _report(label, run, ideal_of.get(label), uniform)
    for label, note in notes.items():
        if label not in runs:
            lines.append(f"| {label} | n/a | | | | | | {note} |")

    if FULL:
        # A worker slowed 3× mid-run: throughput per rebalance interval after the change.
        new = (3.0,) + SLOWDOWNS[1:]
        new_ideal, _ = ideal(tmp_path, "ideal-slowed", slowdowns=new)
        run = cluster(tmp_path, "dynamic-bsp-slowed", lb + ["dynamic"], during=slow_down_midway(1, 3.0, SLOW_AT))
        new_after, _ = ideal(tmp_path, "ideal-slowed-after", slowdowns=new)
        print(f"[bench] ideal of the new speeds {new}: {new_ideal:.0f} before, {new_after:.0f} after the run")
        new_ideal = (new_ideal + new_after) / 2
        runs["dynamic BSP, rank 1 slowed 3x"] = run
        ctl = next((e for e in run.events if e.get("event") == "control"), None)
        at = ctl["step"] if ctl else SLOW_AT
        windows = [
            run.rate(first=at + k * REBALANCE, last=at + (k + 1) * REBALANCE)
            for k in range(3)
            if at + (k + 1) * REBALANCE <= len(run.steps)
        ]
        print(
            f"[bench] slowed 3x at step {at}: new ideal {new_ideal:.0f} samples/s; per rebalance interval "
            f"after: {[f'{w:.0f} ({w / new_ideal:.2f})' for w in windows]}"
        )
        if len(windows) >= 2:
            report_value(
                "heterogeneity dynamic BSP, 2nd rebalance interval after a 3x slowdown",
                windows[1],
                "samples/s",
                {"new ideal": new_ideal},
                extra={"windows": windows, "at_step": at},
            )
        lines.append(
            _row(
                "dynamic BSP, rank 1 slowed 3x mid-run",
                run,
                new_ideal,
                f"(vs the new ideal; intervals after: {', '.join(f'{w / new_ideal:.2f}' for w in windows)})",
            )
        )

        # Worker 1 (the fastest) on a paced 50 Mbit/s link.
        if worker_supports("--simulate-bandwidth"):
            link_ideal, _ = ideal(tmp_path, "ideal-paced", link=LINK_MBIT)
            link = {1: ["--simulate-bandwidth", str(LINK_MBIT)]}
            for label, name, args in (
                ("uniform BSP", "uniform-bsp-50mbit", []),
                ("dynamic BSP", "dynamic-bsp-50mbit", lb + ["dynamic"]),
                ("dynamic ASP", "dynamic-asp-50mbit", ["--sync", "asp"] + lb + ["dynamic"]),
            ):
                if "asp" in name and not server_supports("--sync", "asp"):
                    continue
                run = cluster(tmp_path, name, args, worker_extra=link)
                runs[f"{label}, 50 Mbit"] = run
                lines.append(
                    _row(f"{label}, rank 1 on {LINK_MBIT:.0f} Mbit/s", run, link_ideal, "(vs the paced ideal)")
                )
                _report(f"{label}, rank 1 on a {LINK_MBIT:.0f} Mbit/s link", run, link_ideal, None)
        else:
            lines.append("| 50 Mbit/s link | n/a | | | | | | the worker has no --simulate-bandwidth yet |")

    shown = (
        (" / ".join(f"{r:.0f}" for r in ideals) + " samples/s (measured in turn)")
        if ideals
        else "not measured in quick mode"
    )
    print(
        f"\n[bench] heterogeneity, slowdowns {SLOWDOWNS}, global batch {GLOBAL_BATCH}, ideal {shown} "
        f"({'full' if FULL else 'quick'} mode, {time.monotonic() - t_start:.0f} s)"
    )
    print("\n".join(lines))
    for run in runs.values():
        if run is not None and run.sync == "bsp":
            _print_breakdown(run)
    dyn = runs["dynamic BSP"]
    assert dyn is not None and sum(s["samples"] for s in dyn.steps) > 0
    assert all(sum(w["batch"] for w in s["workers"].values()) == s["samples"] for s in dyn.steps)
