"""``scripts/bench.sh`` with a selection never replaces the tracked results table with its few rows."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_partial_benchmark_run_writes_beside_the_tracked_results():
    tracked = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    partial = os.path.join(ROOT, "benchmarks", "RESULTS.partial.md")
    before = _digest(tracked)
    if os.path.exists(partial):
        os.remove(partial)
    try:
        r = subprocess.run(
            ["bash", "scripts/bench.sh", "-k", "bench_checksum", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "wrote benchmarks/RESULTS.partial.md" in r.stdout
        assert _digest(tracked) == before
        with open(partial) as f:
            assert "checksum crc32c" in f.read()
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def test_re_rendering_the_results_keeps_the_section_a_benchmark_wrote_itself(tmp_path):
    from benchmarks import render_results

    dst = tmp_path / "RESULTS.md"
    section = "<!-- convergence: begin -->\n## Convergence\n\n| model |\n<!-- convergence: end -->"
    dst.write_text(f"# old table\n\n{section}\n")
    src = tmp_path / "records.jsonl"
    src.write_text('{"kind": "value", "name": "x", "value": 1.0, "unit": "s", "baselines": {}}\n')
    render_results.main([str(src), str(dst)])
    text = dst.read_text()
    assert "# old table" not in text and "| x | 1 s |" in text and text.count(section) == 1
