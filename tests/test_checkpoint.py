"""The checkpoint file: atomic, never unpickled, a damaged one falls back, another job is named."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch

from hetero_ps import __version__
from hetero_ps.errors import ConfigError
from hetero_ps.server import checkpoint


def _state(step: int) -> dict:
    return {"step": step, "numel": 3, "params": torch.full((3,), float(step)), "job": {"model": "m", "lr": 0.1}}


def test_the_newest_checkpoint_is_loaded_and_a_damaged_one_falls_back_to_the_previous(tmp_path, caplog):
    checkpoint.save(str(tmp_path), _state(10))
    checkpoint.save(str(tmp_path), _state(20))
    assert checkpoint.load(str(tmp_path))["step"] == 20
    with open(tmp_path / checkpoint.CHECKPOINT, "r+b") as f:  # a torn write or a bad sector
        f.truncate(os.path.getsize(tmp_path / checkpoint.CHECKPOINT) // 2)
    ckpt = checkpoint.load(str(tmp_path))
    assert ckpt["step"] == 10 and torch.equal(ckpt["params"], torch.full((3,), 10.0))
    assert "cannot be read" in caplog.text and "resuming from the previous checkpoint" in caplog.text
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temporary file left behind


def test_a_checkpoint_holding_arbitrary_objects_is_refused_not_unpickled(tmp_path):
    torch.save({"format": checkpoint.FORMAT, "evil": os.system}, tmp_path / checkpoint.CHECKPOINT)
    with pytest.raises(ConfigError, match="no readable checkpoint .*Unpickl|no readable checkpoint .*weights_only"):
        checkpoint.load(str(tmp_path))


def test_a_checkpoint_of_another_job_names_what_differs():
    ckpt = {**_state(5), "software": __version__}
    checkpoint.check_compatible(ckpt, {"model": "m", "lr": 0.1}, 3)
    with pytest.raises(ConfigError, match=r"lr: 0\.1 in the checkpoint, 0\.2 now"):
        checkpoint.check_compatible(ckpt, {"model": "m", "lr": 0.2}, 3)
    with pytest.raises(ConfigError, match="has 3 parameters, this job's has 4"):
        checkpoint.check_compatible(ckpt, {"model": "m", "lr": 0.1}, 4)
    with pytest.raises(ConfigError, match="written by hetero_ps 0.0.0"):
        checkpoint.check_compatible({**ckpt, "software": "0.0.0"}, {"model": "m", "lr": 0.1}, 3)


# -- what a master's checkpoint carries, in process: no workers needed -----------------------------


def _server(root, name: str, reuse: bool = False):
    from hetero_ps.config import JobConfig
    from hetero_ps.observe.experiment import Experiment
    from hetero_ps.server.loops.bsp import BSPLoop
    from hetero_ps.server.server import ParameterServer, ServerConfig

    job = JobConfig(model="simple_cnn", dataset="digits", global_batch=32, epochs=1)
    exp = Experiment(str(root), name, job=job, reuse=reuse)
    ps = ParameterServer(job, ServerConfig(host="127.0.0.1", port=0), exp)
    ps.loop = BSPLoop(ps)
    return ps, exp


def _a_step(ps, step: int) -> None:
    """What a BSP step leaves behind: an update, its record, a step boundary."""
    from hetero_ps.observe.records import ServerTiming, StepRecord

    ps.apply_update(torch.full((ps.numel,), 0.01))
    ps.records.add_step(
        StepRecord(step=step, epoch=0, attempts=1, loss=1.0, lr=ps.lr, version=ps.version, samples=32, step_s=0.1,
                   samples_per_s=320.0, applied=True, staleness=0, server=ServerTiming(0.0, 0.0, 0.0), workers={})
    )  # fmt: skip
    ps.loop.position = (0, 32 * (step + 1))
    ps.update_done()


def test_an_evaluation_the_crash_interrupted_is_scored_on_resume_with_its_own_parameters(tmp_path):
    async def before_the_crash():
        ps, exp = _server(tmp_path, "run")
        _a_step(ps, 0)
        ps.end_epoch(0)  # a snapshot of version 1, not scored yet (nothing has yielded to its task)
        wanted = [p.detach().clone() for p in ps.model.parameters()]
        _a_step(ps, 1)  # the parameters move on before the checkpoint
        ps.save_checkpoint()
        ps.evaluator.stop()
        exp.metrics.close()
        return wanted

    wanted = asyncio.run(before_the_crash())
    saved = checkpoint.load(str(tmp_path / "run"))
    assert [(e["epoch"], e["version"]) for e in saved["evaluations"]] == [(0, 1)]
    assert torch.equal(saved["evaluations"][0]["params"][0], wanted[0])

    async def resumed():
        ps, exp = _server(tmp_path, "run", reuse=True)
        ps.resume_from(exp.path)
        await ps.evaluator.drain()
        exp.metrics.close()
        return ps

    ps = asyncio.run(resumed())
    assert [(r.epoch, r.step, r.version) for r in ps.records.evaluations] == [(0, 1, 1)]
    epochs = [json.loads(line) for line in open(tmp_path / "run" / "metrics" / "epochs.jsonl")]
    assert [(r["epoch"], r["version"]) for r in epochs] == [(0, 1)]
    assert ps.step == 2 and ps.resumed_loop == {"epoch": 0, "offset": 64}


def test_metrics_files_cut_short_by_an_os_crash_fall_back_to_the_previous_checkpoint(tmp_path, caplog):
    async def run():
        ps, exp = _server(tmp_path, "run")
        _a_step(ps, 0)
        ps.save_checkpoint()
        kept = exp.metrics.positions()
        _a_step(ps, 1)
        ps.save_checkpoint()
        ps.evaluator.stop()
        exp.metrics.close()
        return kept

    kept = asyncio.run(run())
    os.truncate(tmp_path / "run" / "metrics" / "steps.jsonl", kept["steps"])  # the second step's line was lost

    async def resumed():
        ps, exp = _server(tmp_path, "run", reuse=True)
        ps.resume_from(exp.path)
        exp.metrics.close()
        return ps

    ps = asyncio.run(resumed())
    assert ps.step == 1 and ps.version == 1 and ps.resumed_loop == {"epoch": 0, "offset": 32}
    assert "steps.jsonl holds" in caplog.text and "trying the one before it" in caplog.text


def test_a_checkpoint_carries_the_training_time_so_far(tmp_path):
    async def run():
        ps, exp = _server(tmp_path, "run")
        ps._train_s_before = 12.5  # as if resumed from a run that had trained 12.5 s
        _a_step(ps, 0)
        ps.save_checkpoint()
        ps.evaluator.stop()
        exp.metrics.close()

    asyncio.run(run())
    assert checkpoint.load(str(tmp_path / "run"))["train_s"] >= 12.5


def test_metrics_keep_rewrites_through_a_temporary_file_and_appends_after(tmp_path):
    from hetero_ps.observe.experiment import MetricsWriter

    m = MetricsWriter(str(tmp_path))
    for i in range(4):
        m.log_epoch({"epoch": i, "step": 10 * i})
    m.keep("epochs", lambda rec: rec["step"] <= 10)
    m.log_epoch({"epoch": 9, "step": 90})
    m.close()
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "epochs.jsonl")] == [0, 1, 9]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
