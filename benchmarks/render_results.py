"""Render the JSON lines written by ``benchmarks/conftest.py:report`` into ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys


def machine_info() -> list[str]:
    import numpy
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from hetero_ps import kernels

        backend = kernels.BACKEND
    except Exception as exc:  # report, do not fail the rendering
        backend = f"unavailable ({exc})"
    return [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; RAM {psutil.virtual_memory().total / 2**30:.1f} GiB",
        f"- Python {platform.python_version()}, numpy {numpy.__version__}, torch {torch.__version__}",
        f"- kernels backend: {backend}",
    ]


def render(records: list[dict]) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `scripts/bench.sh` (full mode). Ratios above 1 mean",
        "hetero_ps is faster than that baseline, measured in the same run.",
        "",
        "## Machine",
        "",
    ]
    lines += machine_info()
    lines += [
        "",
        "## Results",
        "",
        "| benchmark | size | ours | baseline | baseline speed | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    values = [r for r in records if r.get("kind") == "value"]
    for r in records:
        if r.get("kind") == "value":
            continue
        mib = f"{r['bytes'] / 2**20:.0f} MiB"
        ours = f"{r['ours_gbps']:.2f} GB/s"
        if not r["baselines"]:
            lines.append(f"| {r['name']} | {mib} | {ours} | | | |")
        for name, b in r["baselines"].items():
            lines.append(f"| {r['name']} | {mib} | {ours} | {name} | {b['gbps']:.2f} GB/s | {b['ratio']:.2f}x |")
    if values:
        lines += [
            "",
            "## Measured figures",
            "",
            "Ratios are ours / baseline (above 1: ours is ahead).",
            "",
            "| benchmark | ours | baseline | baseline value | ratio |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in values:
            ours = f"{_num(r['value'])} {r['unit']}"
            if not r["baselines"]:
                lines.append(f"| {r['name']} | {ours} | | | |")
            for name, b in r["baselines"].items():
                ratio = "" if b.get("ratio") is None else f"{b['ratio']:.2f}x"
                lines.append(f"| {r['name']} | {ours} | {name} | {_num(b['value'])} {r['unit']} | {ratio} |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


# Sections a benchmark writes into RESULTS.md itself (bench_convergence.py, bench_chaos.py): a re-render keeps them.
KEPT_SECTIONS = (
    ("<!-- convergence: begin -->", "<!-- convergence: end -->"),
    ("<!-- chaos: begin -->", "<!-- chaos: end -->"),
    ("<!-- overlap: begin -->", "<!-- overlap: end -->"),  # written by hand from bench_overlap/_dgc's output
    ("<!-- planes: begin -->", "<!-- planes: end -->"),  # written by hand from bench_planes's output
)


def kept_sections(path: str) -> str:
    """The marked sections of an existing results file, to carry into its re-rendered version."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    out = []
    for begin, end in KEPT_SECTIONS:
        if begin in text and end in text:
            out.append(text[text.index(begin) : text.index(end) + len(end)])
    return "".join(f"\n{section}\n" for section in out)


def main(argv: list[str]) -> None:
    src, dst = argv
    with open(src) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = kept_sections(dst)
    with open(dst, "w") as f:
        f.write(render(records) + kept)


if __name__ == "__main__":
    main(sys.argv[1:])
