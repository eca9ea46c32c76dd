"""The checkpoint file: atomic, never unpickled, a damaged one falls back, another job is named."""

from __future__ import annotations

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
