"""Shared helpers for the benchmarks.

Every benchmark measures a hot path *and its baseline in the same run* and reports the ratio.
Two modes:

* quick (the default, and what ``scripts/test.sh`` and CI run): small inputs, one or two repeats,
  pytest-benchmark disabled. It proves the benchmark runs; its numbers mean little.
* full (``scripts/bench.sh`` sets ``HETERO_PS_BENCH_FULL=1``): the sizes the issues name, several
  repeats, results appended as JSON lines to ``$HETERO_PS_BENCH_OUT`` for ``benchmarks/RESULTS.md``.

Timings never fail a test: the machines are noisy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

FULL = os.environ.get("HETERO_PS_BENCH_FULL") == "1"


def size(full: int, quick: int) -> int:
    """The input size for this mode (bytes or elements, as the caller means it)."""
    return full if FULL else quick


def repeats(full: int = 5, quick: int = 1) -> int:
    return full if FULL else quick


def best_of(fn: Callable[[], object], repeat: int | None = None, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` in seconds over ``repeat`` runs, after ``warmup`` untimed runs."""
    repeat = repeats() if repeat is None else repeat
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def report(name: str, ours_s: float, baselines: dict[str, float], nbytes: int) -> dict:
    """Print ours vs each baseline as GB/s and ratio; append the record to $HETERO_PS_BENCH_OUT.

    ``ours_s`` and each baseline are seconds for the same work over ``nbytes`` bytes; a ratio above 1
    means hetero_ps is faster than that baseline.
    """
    rec = {
        "name": name,
        "bytes": nbytes,
        "mode": "full" if FULL else "quick",
        "ours_s": ours_s,
        "ours_gbps": nbytes / ours_s / 1e9,
        "baselines": {k: {"s": v, "gbps": nbytes / v / 1e9, "ratio": v / ours_s} for k, v in baselines.items()},
    }
    parts = [f"{k} {b['gbps']:.2f} GB/s -> ratio {b['ratio']:.2f}x" for k, b in rec["baselines"].items()]
    print(
        f"\n[bench] {name} ({nbytes / 2**20:.1f} MiB, {rec['mode']}): ours {rec['ours_gbps']:.2f} GB/s; "
        + "; ".join(parts)
    )
    out = os.environ.get("HETERO_PS_BENCH_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def report_value(
    name: str, value: float, unit: str, baselines: dict[str, float] | None = None, extra: dict | None = None
) -> dict:
    """Print a measured figure (samples/s, a fraction, seconds...) against baselines; append it to $HETERO_PS_BENCH_OUT.

    For figures where bigger is better (throughputs): each baseline's ratio is ``value / baseline``,
    above 1 meaning ours is ahead. ``extra`` (JSON-friendly) is stored with the record for the
    results table's notes.
    """
    rec = {
        "kind": "value",
        "name": name,
        "mode": "full" if FULL else "quick",
        "value": value,
        "unit": unit,
        "baselines": {k: {"value": v, "ratio": (value / v if v else None)} for k, v in (baselines or {}).items()},
        "extra": extra or {},
    }
    parts = [
        f"{k} {b['value']:.4g} {unit} -> ratio {b['ratio']:.2f}x"
        if b["ratio"] is not None
        else f"{k} {b['value']:.4g} {unit}"
        for k, b in rec["baselines"].items()
    ]
    print(f"\n[bench] {name} ({rec['mode']}): ours {value:.4g} {unit}" + ("; " if parts else "") + "; ".join(parts))
    out = os.environ.get("HETERO_PS_BENCH_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


@pytest.fixture
def bench_report():
    return report


def write_results_section(key: str, title: str, lines: list[str]) -> None:
    """Replace RESULTS.md's section between ``<!-- KEY: begin/end -->`` (or add it at the end).

    Other sections (render_results' tables, other benchmarks' sections) are left as they are.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    begin, end = f"<!-- {key}: begin -->", f"<!-- {key}: end -->"
    section = "\n".join([begin, f"## {title}", "", *lines, end])
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)
