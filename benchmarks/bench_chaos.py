"""The chaos and load test at size: steps/s of one master with 8, 32 and 64 simulated workers, and
how long the job takes to recover from a kill, a stall and a corrupted frame.

Simulated workers (``hetero_ps/testing/sim_worker.py``: the real protocol, numpy gradients, no
torch) all run in this process against one real master, on loopback, on a model of 5450 parameters:
the figures are the master's (and the protocol's) overhead per step, with next to no compute. Every
run must also pass the chaos checks (``hetero_ps/testing/chaos.py``: every step applied once, the
parameters exactly as predicted, every fault noticed, the master's memory flat).

* quick mode (CI): 4 and 8 workers for 30 steps, then 8 workers with 3 faults; proves it runs.
* full mode (``scripts/bench.sh``): 8, 32 and 64 workers for 300 steps without faults, then 64
  workers for 300 steps with 12 faults (4 of each kind); writes the "Chaos and load" section of
  ``benchmarks/RESULTS.md`` (between its markers, which ``render_results`` keeps).
"""

from __future__ import annotations

import math
import statistics
import time

import pytest

from benchmarks.conftest import FULL, report_value, write_results_section
from hetero_ps.testing.chaos import ChaosConfig, ChaosReport, run_chaos

EPOCHS = 30 if FULL else 3  # of 10 steps
CLEAN = (8, 32, 64) if FULL else (4, 8)
CHAOS = ChaosConfig(workers=64, epochs=30, faults=12, seed=7) if FULL else ChaosConfig(workers=8, epochs=6, faults=3)


def run(tmp_path, cfg: ChaosConfig) -> ChaosReport:
    report = run_chaos(tmp_path / f"w{cfg.workers}-f{cfg.faults}", cfg)
    print("\n" + report.summary())
    assert report.problems() == [], report.summary()
    return report


def load_row(r: ChaosReport) -> str:
    c = r.config
    steps_s = r.steps_per_s()
    _, _, growth = r.rss_growth()
    cpu = r.cpu_share()
    return (
        f"| {c.workers} | {c.faults} | {c.total_steps} | {steps_s:.1f} | {steps_s * c.global_batch:.0f} | "
        f"{cpu.get('master', math.nan):.2f} | {cpu.get('simulated workers', math.nan):.2f} | "
        f"+{growth:.1f} MB (bound {c.rss_bound_mb:.0f}) |"
    )


@pytest.mark.slow
@pytest.mark.timeout(1800 if FULL else 300)
def bench_chaos(tmp_path):
    t_start = time.monotonic()
    clean = [run(tmp_path, ChaosConfig(workers=n, epochs=EPOCHS, faults=0)) for n in CLEAN]
    chaotic = run(tmp_path, CHAOS)
    for r in clean:
        report_value(
            f"chaos and load: steps/s of one master with {r.config.workers} simulated workers",
            r.steps_per_s(),
            "steps/s",
            extra={"global_batch": r.config.global_batch, "rss_growth_mb": r.rss_growth()[2], "cores": r.cpu_share()},
        )
    back = chaotic.back_at_work()
    rows = []
    for kind, times in chaotic.recoveries().items():
        report_value(
            f"chaos and load: next update after a {kind} ({chaotic.config.workers} workers, median)",
            statistics.median(times),
            "s",
            extra={"max_s": max(times), "n": len(times), "back_at_work_s": back[kind]},
        )
        rows.append(
            f"| {kind} | {len(times)} | {statistics.median(times):.3f} s | {max(times):.3f} s | "
            f"{statistics.median(back[kind]):.2f} s |"
        )
    print(f"\n[bench] chaos and load ({'full' if FULL else 'quick'} mode, {time.monotonic() - t_start:.0f} s)")
    if FULL:
        c = CHAOS
        write_results_section(
            "chaos",
            "Chaos and load",
            [
                "`bench_chaos.py`: one master (`python -m hetero_ps.server`, dashboard off) and N simulated",
                "workers (`hetero_ps/testing/sim_worker.py`: the real protocol, numpy gradients, all in one",
                "process) on loopback, `simple_cnn` of 5450 parameters, global batch 4 N, two 16 KiB chunks per",
                "push and pull, so the figures are the protocol's and the master's cost per step with next to",
                "no compute. Master and workers share the 2 cores. Every run also passed the chaos checks",
                "(each step applied once, parameters bit-exact, every fault noticed, master RSS flat).",
                "",
                "CPU is in cores (1.00 = one core busy), after the warm-up.",
                "",
                "| workers | faults | steps | steps/s | samples/s | master CPU | workers' CPU | master RSS growth |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
                *(load_row(r) for r in [*clean, chaotic]),
                "",
                f"Recovery, {c.workers} workers, {c.faults} faults (seed {c.seed}): seconds from the fault to the",
                "next update any worker received, and until the faulty worker had completed a step again (a",
                f"killed one stays away {c.down_steps[0]}-{c.down_steps[1]} steps by design). A stall is",
                f"noticed after `--stall-floor {c.stall_floor_s:g}` s; a kill or a checksum error at once.",
                "",
                "| fault | count | next update: median | max | its worker back at work: median |",
                "| --- | --- | --- | --- | --- |",
                *rows,
                "",
            ],
        )
