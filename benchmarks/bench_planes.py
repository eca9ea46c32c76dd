"""Data planes: the master's TCP (``--backend tcp``) against torch.distributed gloo collectives
(``--backend gloo``), both against a plain synchronous all-reduce with equal batches (what DDP does).

Three workers whose compute is 1×, 2×, 4× as slow (``--simulate-slowdown``; one torch thread each),
simple_cnn on digits, global batch 512, in the same run:

* tcp and gloo, each with equal batches (``uniform``) and with the scheduler's (``dynamic``);
* the baseline: ``benchmarks/allreduce_baseline.py``, three ranks averaging their gradients with one
  gloo all-reduce per step, equal batches, the same slowdowns.

Throughput is training samples/s over the steps after the first few (``Σ samples / Σ step_s``; the
baseline's wall time over the same steps). Where network namespaces can be made (root, ``ip``), the
three workers run in one namespace and the master outside it, joined by a veth pair: what crosses
that pair is exactly what goes through the master's network interface, read from its byte counters
between the warm-up's end and the run's end, per step, both directions together. (The workers'
all-reduce among themselves stays inside their namespace.) Without namespaces everything runs on
loopback and the bytes are not measured.

Full mode also limits the master's end of the pair to 100 Mbit/s each way (``tc tbf``) for a dynamic
run of each plane: a master on a slower link than its workers share, where the plane's bytes
through the master decide the step time.

Quick mode (CI): the dynamic runs only, 12 steps each. Full mode (``HETERO_PS_BENCH_FULL=1``): 80 steps a run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from benchmarks.conftest import FULL, report_value
from hetero_ps.errors import DataError
from hetero_ps.observe.jsonl import read_jsonl
from hetero_ps.testing import LocalCluster, netlinks

SLOWDOWNS = (1.0, 2.0, 4.0)
GLOBAL_BATCH = 512
STEPS = 80 if FULL else 12
SKIP = 4  # warm-up steps left out of throughput and bytes
RUN_TIMEOUT = 600 if FULL else 150
JOB = ["--model", "simple_cnn", "--dataset", "digits", "--lr", "0.05", "--no-dashboard", "--join-timeout", "120"]
POLICIES = {"uniform": [], "dynamic": ["--enable-load-balancing", "--load-balance-policy", "dynamic"]}
MASTER_LINK_MBIT = 100.0  # full mode: the master's link in the limited runs


def _counters(link) -> int:
    """Bytes through the master's end of the veth pair so far, both directions."""
    base = f"/sys/class/net/{link.host_dev}/statistics"
    return sum(int(open(f"{base}/{d}_bytes").read()) for d in ("tx", "rx"))


def _steps(c: LocalCluster) -> list:
    try:
        return read_jsonl(os.path.join(c.experiment_dir(), "metrics", "steps.jsonl"), required=False)
    except (RuntimeError, DataError):  # no experiment folder yet; a record being written
        return []


def cluster_run(tmp_path, name: str, backend: str, policy: str, link) -> dict:
    """One run of the three workers; its samples/s and (with a link) bytes per step through the master."""
    d = tmp_path / name
    d.mkdir()
    epochs = -(-STEPS * GLOBAL_BATCH // 1438) + 1
    args = ["--world-size", str(len(SLOWDOWNS) + 1), "--no-local-worker", *JOB, "--global-batch-size"]
    args += [str(GLOBAL_BATCH), "--epochs", str(epochs), "--max-steps", str(STEPS), "--experiment", name]
    args += ["--backend", backend, *POLICIES[policy]]
    if link is not None:
        args += ["--host", "0.0.0.0"]
    marks: dict[str, tuple[int, int]] = {}
    with LocalCluster(d, args, workers=[]) as c:
        for i, f in enumerate(SLOWDOWNS):
            c.add_worker(["--rank", str(i + 1), "--torch-threads", "1", "--simulate-slowdown", str(f)], link=link)
        if link is not None:  # the counters at the warm-up's end, read while the run goes on

            def watch() -> None:
                deadline = time.monotonic() + RUN_TIMEOUT
                while time.monotonic() < deadline and c.server.poll() is None:
                    n = len(_steps(c))
                    if n >= SKIP:
                        marks["start"] = (n, _counters(link))
                        return
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        rc = c.wait(timeout=RUN_TIMEOUT)
        assert rc == 0, c.output("server")[-3000:]
        if link is not None:
            watcher.join(timeout=5)
            marks["end"] = (STEPS, _counters(link))
        steps = _steps(c)
    timed = [s for s in steps if s["step"] >= SKIP]
    rate = sum(s["samples"] for s in timed) / sum(s["step_s"] for s in timed)
    per_step = None
    if "start" in marks:
        (n0, b0), (n1, b1) = marks["start"], marks["end"]
        per_step = (b1 - b0) / max(1, n1 - n0)
    batches = {
        r: sum(s["workers"][r]["batch"] for s in timed if r in s["workers"]) / len(timed)
        for r in sorted({r for s in timed for r in s["workers"]})
    }
    return {"rate": rate, "bytes_per_step": per_step, "batches": batches}


def baseline_run() -> float:
    """The plain synchronous all-reduce: three ranks, equal batches, the same slowdowns."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.allreduce_baseline", "--rank", str(r), "--world-size"]
            + [str(len(SLOWDOWNS)), "--port", str(port), "--global-batch", str(GLOBAL_BATCH), "--steps"]
            + [str(STEPS), "--skip", str(SKIP), "--slowdown", str(f)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, f in enumerate(SLOWDOWNS)
    ]
    try:
        outs = [p.communicate(timeout=RUN_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return float(json.loads(outs[0][0].strip().splitlines()[-1])["samples_per_s"])


def _runs(tmp_path, rate: float, policies) -> dict:
    """Each plane under each policy, the workers in one namespace, the master behind a link of
    ``rate`` Mbit/s (0: unlimited); on loopback when namespaces cannot be made (``rate`` 0 only)."""
    link = None if netlinks.unavailable() else netlinks.Link(rate)
    if link is not None:
        link.open()
    try:
        tag = f"-{rate:g}mbit" if rate else ""
        return {
            (backend, policy): cluster_run(tmp_path, f"{backend}-{policy}{tag}", backend, policy, link)
            for backend in ("tcp", "gloo")
            for policy in policies
        }
    finally:
        if link is not None:
            link.close()


def bench_planes(tmp_path):
    why = netlinks.unavailable()
    runs = _runs(tmp_path, 0.0, POLICIES if FULL else ["dynamic"])
    limited = _runs(tmp_path, MASTER_LINK_MBIT, ["dynamic"]) if FULL and not why else {}
    sync = baseline_run()
    print(f"\n[planes] workers slowed {SLOWDOWNS}, global batch {GLOBAL_BATCH}, {STEPS} steps a run")
    print(f"[planes] synchronous all-reduce, equal batches: {sync:.0f} samples/s")
    for (backend, policy), r in runs.items():
        moved = "" if r["bytes_per_step"] is None else f"; {r['bytes_per_step'] / 1e6:.2f} MB/step through the master"
        print(f"[planes] {backend} {policy}: {r['rate']:.0f} samples/s, batches {r['batches']}{moved}")
        base = {"synchronous all-reduce, equal batches": sync}
        if backend == "gloo":
            base[f"tcp {policy}"] = runs["tcp", policy]["rate"]
        report_value(f"planes {backend} {policy}: training samples/s", r["rate"], "samples/s", base)
        if r["bytes_per_step"] is not None:
            report_value(f"planes {backend} {policy}: bytes through the master per step", r["bytes_per_step"], "B")
    for (backend, policy), r in limited.items():
        name = f"planes {backend} {policy}, master on {MASTER_LINK_MBIT:g} Mbit/s"
        print(f"[planes] {name}: {r['rate']:.0f} samples/s, batches {r['batches']}")
        base = {"synchronous all-reduce, equal batches (no master)": sync}
        if backend == "gloo":
            base[f"tcp {policy}, master on {MASTER_LINK_MBIT:g} Mbit/s"] = limited["tcp", policy]["rate"]
        report_value(f"{name}: training samples/s", r["rate"], "samples/s", base)
    if why:
        print(f"[planes] bytes through the master not measured: {why}")
