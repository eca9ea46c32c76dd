"""A synthetic but self-consistent run, in the master's record formats, for the dashboard/report tests.

Three workers of unequal speed under a dynamic policy: each worker's step time is
``t_i = c_i + b_i / r_i``; the scheduler starts uniform and every ``rebalance`` steps moves the split
to ``b_i ∝ r_i`` (equal times, ignoring c_i); the step takes the slowest worker plus server time, so
faster workers wait. Loss decays exponentially with noise. Nothing here is a hard-coded result:
tests derive what they check from these records.
"""

from __future__ import annotations

import json
import math
import os
import random

RATES = {0: 400.0, 1: 2500.0, 2: 150.0}  # samples/s each worker computes alone
FIXED = {0: 0.02, 1: 0.03, 2: 0.02}  # seconds of fixed cost per step
DEVICES = {0: "cpu", 1: "cuda:0", 2: "cpu"}
GRAD_BYTES = 4 << 20


def job(total_steps: int, global_batch: int = 256, name: str = "synthetic") -> dict:
    return {
        "experiment": name,
        "model": "simple_cnn",
        "dataset": "digits",
        "global_batch": global_batch,
        "epochs": 3,
        "total_steps": total_steps,
        "sync": "bsp",
        "load_balancing": True,
        "policy": "dynamic",
        "rebalance_interval": 10,
        "compression": "none",
        "lr": 0.05,
    }


def split(total: int, weights: dict) -> dict:
    """Integer sizes ∝ weights that sum to ``total`` (largest remainders)."""
    s = sum(weights.values())
    raw = {k: total * w / s for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: total - sum(out.values())]:
        out[k] += 1
    return out


def make_run(
    n_steps: int = 60,
    global_batch: int = 256,
    rebalance: int = 10,
    seed: int = 0,
    t0: float = 1.7e9,
    name: str = "synthetic",
):
    """(job, steps, epochs, events) for ``n_steps`` steps over 3 epochs."""
    rnd = random.Random(seed)
    ranks = sorted(RATES)
    steps, epochs, events = [], [], []
    t = t0
    for r in ranks:
        events.append(
            {"event": "worker_joined", "step": 0, "t": t, "rank": r, "host": f"node{r}.lan", "device": DEVICES[r]}
        )
    sizes = split(global_batch, {r: 1 for r in ranks})
    per_epoch = max(1, n_steps // 3)
    prev_pred = None
    for step in range(n_steps):
        if step % rebalance == 0:
            new = sizes if step == 0 else split(global_batch, RATES)
            pred = max(FIXED[r] + new[r] / RATES[r] for r in ranks)
            events.append(
                {
                    "event": "schedule",
                    "step": step,
                    "t": t,
                    "policy": "dynamic",
                    "sizes": {str(r): b for r, b in new.items()},
                    "reason": "initial uniform split" if step == 0 else "equalise fitted step times",
                    "predicted_step_s": pred,
                    "previous_predicted_s": prev_pred,
                    "inputs": {str(r): {"c": FIXED[r], "r": RATES[r]} for r in ranks},
                }
            )
            sizes, prev_pred = new, pred
        times = {r: (FIXED[r] + sizes[r] / RATES[r]) * rnd.uniform(0.95, 1.05) for r in ranks}
        server = {"aggregate_s": 0.004, "optimizer_s": 0.002, "broadcast_s": 0.003}
        step_s = max(times.values()) + sum(server.values())
        loss = 2.3 * math.exp(-step / (n_steps / 2)) + 0.1 + rnd.uniform(-0.03, 0.03)
        workers = {}
        for r in ranks:
            compute = times[r] * 0.8
            encode, push, pull = times[r] * 0.05, times[r] * 0.15, 0.003
            workers[str(r)] = {
                "batch": sizes[r],
                "loss": loss + rnd.uniform(-0.05, 0.05),
                "compute_s": compute,
                "encode_s": encode,
                "push_s": push,
                "wait_s": step_s - times[r] - pull,
                "pull_s": pull,
                "bytes_out": GRAD_BYTES,
                "bytes_in": GRAD_BYTES // 2,
            }
        t += step_s
        steps.append(
            {
                "step": step,
                "epoch": step // per_epoch,
                "attempts": 1,
                "loss": loss,
                "lr": 0.05 * 0.5 * (1 + math.cos(math.pi * step / n_steps)),
                "version": step + 1,
                "samples": global_batch,
                "step_s": step_s,
                "samples_per_s": global_batch / step_s,
                "applied": True,
                "server": server,
                "workers": workers,
            }
        )
        if (step + 1) % per_epoch == 0 and len(epochs) < 3:
            e = len(epochs)
            epochs.append(
                {
                    "epoch": e,
                    "step": step + 1,
                    "eval_loss": loss * 1.1,
                    "eval_accuracy": 1 - loss / 2.6,
                    "eval_s": 0.4,
                    "elapsed_s": t - t0,
                }
            )
    return job(n_steps, global_batch, name), steps, epochs, events


def ideal_samples_per_s() -> float:
    return sum(RATES.values())


def feed(hub, n_steps: int = 60, **kw) -> tuple:
    """Push a whole synthetic run into a MetricsHub, in the order the master would."""
    j, steps, epochs, events = make_run(n_steps, **kw)
    hub.set_job(j)
    hub.set_ideal(ideal_samples_per_s())
    ev = iter(events)
    pending = next(ev, None)
    by_step = {e["step"]: e for e in epochs}
    for rec in steps:
        while pending is not None and pending["step"] <= rec["step"]:
            hub.add_event(pending)
            pending = next(ev, None)
        hub.add_step(rec)
        for r in rec["workers"]:
            hub.update_worker(
                int(r),
                cpu_util=50.0 + int(r),
                mem_bytes=(1 + int(r)) << 30,
                staleness=0,
                gpu_util=87.0 if r == "1" else None,
                gpu_mem_bytes=(6 << 30) if r == "1" else None,
            )
        if rec["step"] + 1 in by_step:
            hub.add_epoch(by_step[rec["step"] + 1])
    return j, steps, epochs, events


def write_experiment(root: str, name: str = "synthetic", n_steps: int = 60, truncated_tail: bool = False, **kw) -> str:
    """An experiment folder as the master writes it; returns its path."""
    j, steps, epochs, events = make_run(n_steps, name=name, **kw)
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, "metrics"), exist_ok=True)
    os.makedirs(os.path.join(path, "logs"), exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(j, f)
    for fname, recs in (("steps.jsonl", steps), ("epochs.jsonl", epochs), ("events.jsonl", events)):
        with open(os.path.join(path, "metrics", fname), "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
            if truncated_tail and fname == "steps.jsonl":
                f.write('{"step": 99999, "epo')  # a run killed mid-write
    train_s = sum(r["step_s"] for r in steps)
    slowest = sum(max(w["compute_s"] for w in r["workers"].values()) for r in steps)
    summary = {
        "experiment": name,
        "steps": len(steps),
        "samples": sum(r["samples"] for r in steps),
        "train_s": train_s,
        "samples_per_s": sum(r["samples"] for r in steps) / train_s,
        "final_eval_accuracy": epochs[-1]["eval_accuracy"],
        "communication_overhead": 1 - slowest / train_s,
        "ideal_samples_per_s": ideal_samples_per_s(),
        "workers": {
            str(r): {"host": f"node{r}.lan", "device": DEVICES[r], "samples": 0, "steps": len(steps)} for r in RATES
        },
    }
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)
    return path
