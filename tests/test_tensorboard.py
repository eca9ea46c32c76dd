"""The TensorBoard sink writes event files that TensorBoard reads back with the right values."""

from __future__ import annotations

import glob
import os

import pytest
import synthetic_run

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard==2.21.0)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from hetero_ps.observe.tensorboard import TensorBoardSink  # noqa: E402


def scalars(path: str) -> dict:
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_steps_epochs_and_workers_are_written(tmp_path):
    _, steps, epochs, events = synthetic_run.make_run(30)
    steps[4]["loss"] = float("nan")  # a non-finite value is skipped, not written
    sink = TensorBoardSink(str(tmp_path / "tb"))
    sink.set_ideal(synthetic_run.ideal_samples_per_s())
    for e in events:
        sink.add_event(e)
    for r in steps:
        sink.add_step(r)
    for e in epochs:
        sink.add_epoch(e)
    sink.close()
    sink.close()

    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    main, acc = scalars(str(tmp_path / "tb"))
    loss = dict(main["train/loss"])
    assert len(loss) == 29 and 4 not in loss
    assert loss[7] == pytest.approx(steps[7]["loss"], rel=1e-6)
    assert [s for s, _ in main["train/lr"]] == list(range(30))
    assert dict(main["train/samples_per_s"])[12] == pytest.approx(steps[12]["samples_per_s"], rel=1e-6)
    assert dict(main["server/broadcast_s"])[0] == pytest.approx(steps[0]["server"]["broadcast_s"], rel=1e-6)
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in main["eval/accuracy"]] == [
        (e["step"], e["eval_accuracy"]) for e in epochs
    ]
    assert dict(main["cluster/ideal_samples_per_s"])[0] == pytest.approx(synthetic_run.ideal_samples_per_s())
    assert "events/schedule/text_summary" in acc.Tags()["tensors"]  # text is stored as tensors

    for rank in ("0", "1", "2"):
        wdir = tmp_path / "tb" / f"worker-{rank}"
        assert os.path.isdir(wdir)
        w, _ = scalars(str(wdir))
        rec = steps[20]["workers"][rank]
        assert dict(w["worker/batch"])[20] == rec["batch"]
        assert dict(w["worker/samples_per_s"])[20] == pytest.approx(rec["batch"] / steps[20]["step_s"], rel=1e-6)
        assert dict(w["worker/wait_s"])[20] == pytest.approx(rec["wait_s"], rel=1e-6)
        assert dict(w["worker/compute_s"])[20] == pytest.approx(rec["compute_s"], rel=1e-6)
        assert dict(w["worker/push_s"])[20] == pytest.approx(rec["push_s"], rel=1e-6)
