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
