"""The typed records (hetero_ps/observe/records.py): their JSON form, their sums, and their docs."""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest

from hetero_ps.observe import records
from hetero_ps.observe.records import (
    EVENT_KINDS,
    AsyncStep,
    EpochRecord,
    Event,
    RunSummary,
    RunTotals,
    ServerTiming,
    StepRecord,
    WorkerTiming,
)
from hetero_ps.testing import LocalCluster

ROOT = Path(__file__).resolve().parent.parent

# The steps.jsonl format users' scripts read: changing it is a breaking change, not a refactor.
BSP_STEP_KEYS = {
    "step",
    "epoch",
    "attempts",
    "loss",
    "lr",
    "version",
    "samples",
    "step_s",
    "samples_per_s",
    "applied",
    "staleness",
    "local_steps",
    "server",
    "workers",
}
ASYNC_STEP_KEYS = BSP_STEP_KEYS | {"worker", "tau", "scale", "clock"}
WORKER_KEYS = {
    "batch",
    "loss",
    "compute_s",
    "encode_s",
    "push_s",
    "wait_s",
    "pull_s",
    "bytes_out",
    "bytes_in",
    "early_chunks",
    "scheduled_ahead",
    "local_steps",
}


def _timing(batch: int, compute_s: float) -> WorkerTiming:
    return WorkerTiming(
        batch=batch,
        loss=0.5,
        compute_s=compute_s,
        encode_s=0.01,
        push_s=0.02,
        wait_s=0.03,
        pull_s=0.04,
        bytes_out=100.0,
        bytes_in=200.0,
    )


def _step(step: int, step_s: float, workers: dict[str, WorkerTiming], asynchronous: AsyncStep | None = None):
    samples = sum(w.batch for w in workers.values())
    return StepRecord(
        step=step,
        epoch=0,
        attempts=1,
        loss=0.25 * (step + 1),
        lr=0.1,
        version=step + 1,
        samples=samples,
        step_s=step_s,
        samples_per_s=samples / step_s,
        applied=True,
        staleness=0,
        server=ServerTiming(0.1, 0.2, 0.3),
        workers=workers,
        asynchronous=asynchronous,
    )


def test_bsp_step_record_json_keeps_the_file_format_and_round_trips():
    rec = _step(3, 0.5, {"1": _timing(40, 0.2), "2": _timing(24, 0.3)})
    out = json.loads(json.dumps(rec.to_json()))
    assert set(out) == BSP_STEP_KEYS
    assert set(out["server"]) == {"aggregate_s", "optimizer_s", "broadcast_s"}
    assert all(set(w) == WORKER_KEYS for w in out["workers"].values())
    assert StepRecord.from_json(out) == rec


def test_async_step_record_flattens_its_fields_and_round_trips():
    rec = _step(7, 0.2, {"2": _timing(16, 0.1)}, AsyncStep(worker=2, tau=3, scale=0.25, clock=5))
    out = json.loads(json.dumps(rec.to_json()))
    assert set(out) == ASYNC_STEP_KEYS and (out["worker"], out["tau"], out["clock"]) == (2, 3, 5)
    assert StepRecord.from_json(out) == rec


def test_worker_timing_from_a_report_counts_what_is_missing_or_not_a_number_as_zero():
    t = WorkerTiming.from_report(12, {"loss": 1.5, "compute_s": 2, "push_s": "fast", "util": {"cpu_util": 3}})
    assert t == WorkerTiming(12, 1.5, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_summary_sums_the_history():
    history = [_step(0, 1.0, {"1": _timing(40, 0.5), "2": _timing(24, 0.25)}), _step(1, 2.0, {"1": _timing(30, 1.0)})]
    evals = [EpochRecord(epoch=0, step=2, version=2, eval_loss=0.3, eval_accuracy=0.9, eval_s=0.1, elapsed_s=4.0)]
    s = RunSummary.of_run(
        experiment="e",
        model="m",
        dataset="d",
        parameters=10,
        epochs=1,
        train_s=4.0,
        totals=RunTotals.of(history),
        evaluations=evals,
        probes=[100.0, 50.0],
        compression="none",
        sync="bsp",
    )
    assert (s.steps, s.samples, s.samples_per_s, s.final_loss) == (2, 94, 23.5, 0.5)
    # busy = the slowest worker's compute per step: 0.5 + 1.0 of 3.0 s of steps
    assert s.communication_overhead == pytest.approx(0.5)
    assert s.ideal_samples_per_s == 150.0 and s.final_eval_accuracy == 0.9
    assert s.workers["1"].samples == 70 and s.workers["1"].steps == 2 and s.workers["2"].steps == 1
    assert s.workers["1"].compute_s == pytest.approx(1.5)
    out = json.loads(json.dumps(s.to_json()))
    assert out["eval"]["eval_accuracy"] == 0.9 and out["workers"]["2"]["samples"] == 24


def test_summary_of_an_async_run_or_an_unprobed_worker_leaves_those_figures_out():
    history = [_step(0, 1.0, {"1": _timing(8, 0.5)})]
    s = RunSummary.of_run(
        experiment="e",
        model="m",
        dataset="d",
        parameters=10,
        epochs=1,
        train_s=0.0,
        totals=RunTotals.of(history),
        evaluations=[],
        probes=[100.0, 0.0],
        compression="none",
        sync="ssp",
    )
    assert s.communication_overhead is None and s.ideal_samples_per_s is None
    assert s.samples_per_s == 0.0 and s.eval is None and s.final_eval_accuracy is None


def test_an_event_of_an_undocumented_kind_is_refused():
    assert Event("control", 3, 1.0, {"rank": 1}).to_json() == {"event": "control", "step": 3, "t": 1.0, "rank": 1}
    with pytest.raises(ValueError, match="EVENT_KINDS"):
        Event("surprise", 0, 0.0)


def _emitted_event_kinds() -> set[str]:
    """First string argument of every ``event(...)``/``_event(...)``/``emit_event(...)`` call in the package."""
    kinds = set()
    for path in (ROOT / "hetero_ps").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("event", "_event", "emit_event"):
                    kinds.add(node.args[0].value)
    return kinds


def test_every_event_the_code_emits_is_documented():
    emitted = _emitted_event_kinds()
    assert {"worker_joined", "worker_lost", "schedule"} <= emitted  # the scan finds them
    assert emitted <= set(EVENT_KINDS), f"undocumented: {emitted - set(EVENT_KINDS)}"


def test_architecture_doc_shows_the_records_as_the_code_defines_them():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    begin, end = "<!-- records: begin -->\n", "<!-- records: end -->"
    section = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert section.strip() == records.markdown().strip(), (
        "docs/ARCHITECTURE.md is stale: paste the output of `python -m hetero_ps.observe.records` between the markers"
    )


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["bsp", "ssp"])
def test_a_real_runs_files_parse_as_the_typed_records(tmp_path, sync):
    args = [
        "--world-size",
        "2",
        "--model",
        "simple_cnn",
        "--dataset",
        "digits",
        "--global-batch-size",
        "64",
        "--max-steps",
        "4",
        "--sync",
        sync,
        "--experiment",
        f"rec-{sync}",
        "--local-slowdown",
        "1",
    ]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"]]) as c:
        assert c.wait(timeout=180) == 0, c.output("server")
        exp = c.experiment_dir()
    steps = [StepRecord.from_json(r) for r in _jsonl(os.path.join(exp, "metrics", "steps.jsonl"))]
    assert sorted(r.step for r in steps) == list(range(len(steps)))
    # --max-steps 4 is 4 global batches: 4 BSP steps, or as many SSP updates as slices cover them
    assert sum(r.samples for r in steps) == 4 * 64 and (sync != "bsp" or len(steps) == 4)
    assert all((r.asynchronous is None) == (sync == "bsp") for r in steps)
    assert all(sum(w.batch for w in r.workers.values()) == r.samples for r in steps)
    evals = [EpochRecord.from_json(r) for r in _jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))]
    assert evals and all(math.isfinite(e.eval_loss) for e in evals)
    events = _jsonl(os.path.join(exp, "metrics", "events.jsonl"))
    assert {e["event"] for e in events} <= set(EVENT_KINDS)
    with open(os.path.join(exp, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) == {f.name for f in records.dataclasses.fields(RunSummary)}
    assert summary["steps"] == len(steps) and summary["samples"] == sum(r.samples for r in steps)
