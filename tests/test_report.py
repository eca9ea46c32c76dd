"""``python -m hetero_ps.report``: figures and report.md from an experiment folder, and comparisons."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import synthetic_run

from hetero_ps.errors import DataError
from hetero_ps.tools import report

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(md_path: str) -> list[str]:
    with open(md_path) as f:
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", f.read())
    base = os.path.dirname(md_path)
    for link in links:
        assert not os.path.isabs(link), link
        with open(os.path.join(base, link), "rb") as f:
            head = f.read()
        assert head[:8] == PNG and len(head) > 10_000, link
    return links


def test_report_writes_figures_and_markdown(tmp_path):
    path = synthetic_run.write_experiment(str(tmp_path), "run1", 80, truncated_tail=True)
    md = report.write_report(path)
    assert md == os.path.join(path, "report", "report.md")
    assert sorted(images(md)) == ["batch_shares.png", "loss_accuracy.png", "throughput.png", "time_split.png"]
    text = open(md).read()
    with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    assert f"{summary['samples_per_s']:,.1f} samples/s" in text
    assert f"{100 * summary['final_eval_accuracy']:.1f} %" in text
    assert f"{100 * summary['samples_per_s'] / summary['ideal_samples_per_s']:.1f} %" in text  # efficiency
    for r in ("0", "1", "2"):
        assert f"| {r} | node{r}.lan |" in text
    # 8 decisions: the uniform start and one change, then repeats folded into one row.
    assert "8 load-balancing decision(s), 1 of which changed the split" in text
    assert "| 10–70 (7×) | dynamic | r0=33, r1=210, r2=13 |" in text
    assert "| global_batch | 256 |" in text


def test_ideal_falls_back_to_the_join_probes(tmp_path):
    path = synthetic_run.write_experiment(str(tmp_path), "probes", 20)
    os.remove(os.path.join(path, "summary.json"))
    events = report.read_jsonl(os.path.join(path, "metrics", "events.jsonl"))
    with open(os.path.join(path, "metrics", "events.jsonl"), "w") as f:
        for e in events:
            if e["event"] == "worker_joined":
                e["profile"] = {"probe_samples_per_s": 100.0 * (e["rank"] + 1)}
            f.write(json.dumps(e) + "\n")
    exp = report.load_experiment(path)
    assert exp.ideal == 600.0 and "probes" in exp.ideal_source
    assert report.load_experiment(path, ideal=42.0).ideal == 42.0
    text = open(report.write_report(path, str(tmp_path / "out"))).read()
    assert "600.0 samples/s (sum of the workers' calibration probes)" in text


def test_compare_overlays_two_experiments(tmp_path):
    a = synthetic_run.write_experiment(str(tmp_path), "A", 40)
    b = synthetic_run.write_experiment(str(tmp_path), "B", 30, global_batch=512, seed=5)
    md = report.write_comparison(a, b)
    assert md == os.path.join(str(tmp_path), "compare-A-vs-B", "report.md")
    assert sorted(images(md)) == ["loss_accuracy.png", "throughput.png", "time_split.png"]
    text = open(md).read()
    sa, sb = (json.load(open(os.path.join(p, "summary.json"))) for p in (a, b))
    assert f"| throughput ratio (B / A) | 1 | {sb['samples_per_s'] / sa['samples_per_s']:.3f} |" in text
    assert "| global_batch | 256 | 512 |" in text
    with pytest.raises(DataError, match="two different"):
        report.write_comparison(a, a)


def test_bad_input_gets_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not an experiment folder"):
        report.load_experiment(str(tmp_path))
    path = synthetic_run.write_experiment(str(tmp_path), "broken", 10)
    steps = os.path.join(path, "metrics", "steps.jsonl")
    lines = open(steps).read().splitlines()
    lines[3] = "{not json"
    open(steps, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"steps.jsonl:4: not a JSON record"):
        report.load_experiment(path)
    open(steps, "w").write("")
    with pytest.raises(DataError, match="no step was recorded"):
        report.load_experiment(path)


def test_command_line(tmp_path, capsys):
    path = synthetic_run.write_experiment(str(tmp_path), "cli", 15)
    assert report.main([path, "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([])
    # The module runs as a program, as the README says.
    r = subprocess.run(
        [sys.executable, "-m", "hetero_ps.report", "--compare", path, path + "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "not an experiment folder" in r.stderr


def test_a_split_without_a_model_shows_its_predicted_step_time_as_unknown():
    assert report._prediction(32.0, 0.0) == "—"  # the uniform split predicts nothing
    assert report._prediction(0.0, 0.25) == "250.0 ms"  # the first measured split: no "0 ms →"
    assert report._prediction(2.0, 0.5) == "2.00 s → 500.0 ms"
    assert report._prediction(None, float("nan")) == "—"
