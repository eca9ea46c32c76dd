"""The master's checkpoint: everything a restarted master needs to go on where the run was.

``experiments/NAME/checkpoint.pt`` holds, at a consistent point of the run (a BSP step boundary; in
SSP/ASP, between two updates): the flat parameters, the optimizer's and the LR schedule's state, the
step, the parameter version, the step loop's position in the sample order (BSP: epoch and offset of
the next step; SSP/ASP: the work queue, with the slices in flight counted as not done), the
scheduler's fitted model of each rank, the evaluations not scored yet (with their parameters), the
training time so far, the resolved job, and how long each metrics file was (fsynced first: the
steps after the checkpoint are redone on resume, so their lines are cut off).

Written like a database's WAL: a temporary file, ``fsync``, ``rename`` over the old one, ``fsync`` of
the folder, so a crash at any instant leaves the last good checkpoint; the one before it is kept as
``checkpoint.prev.pt`` for a file that is damaged anyway (a full disk, a bad sector). Loaded with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, never arbitrary
objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

import hetero_ps
from hetero_ps.errors import ConfigError

log = logging.getLogger("hetero_ps.server")

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FORMAT = 2  # 2: the loop's state, scheduler models, evaluations to score, training time


def save(folder: str, state: dict[str, Any]) -> str:
    """Write ``state`` (plus format and software version) atomically as ``folder/checkpoint.pt``."""
    path, prev = os.path.join(folder, CHECKPOINT), os.path.join(folder, PREVIOUS)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "software": hetero_ps.__version__, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, prev)
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves reach the disk
    finally:
        os.close(fd)
    return path


def remove(folder: str) -> None:
    """A finished run keeps no checkpoint (its ``model.pt`` holds the result)."""
    for name in (CHECKPOINT, PREVIOUS):
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass


def exists(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, CHECKPOINT)) or os.path.exists(os.path.join(folder, PREVIOUS))


def readable(folder: str, errors: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, checkpoint)`` of each readable checkpoint in ``folder``, newest first; a damaged one is
    skipped, says so, and adds why to ``errors``."""
    for name in (CHECKPOINT, PREVIOUS):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
                found = ckpt.get("format") if isinstance(ckpt, dict) else None
                raise ValueError(f"not a hetero_ps checkpoint of format {FORMAT} (format {found})")
        except Exception as exc:  # truncated, corrupt, or not ours: try the previous one
            if errors is not None:
                errors.append(f"{path}: {type(exc).__name__}: {exc}")
            log.warning("checkpoint %s cannot be read (%s); trying the one before it", path, exc)
            continue
        if name == PREVIOUS:
            log.warning("resuming from the previous checkpoint %s (step %s)", path, ckpt.get("step"))
        yield path, ckpt


def load(folder: str) -> dict[str, Any]:
    """The newest readable checkpoint of ``folder``; a damaged newest one falls back to the previous, and says so."""
    errors: list[str] = []
    for _, ckpt in readable(folder, errors):
        return ckpt
    why = ": " + "; ".join(errors) if errors else ""
    raise ConfigError(f"no readable checkpoint in {folder}{why} — start without --resume")


def check_compatible(ckpt: dict[str, Any], job: dict[str, Any], numel: int) -> None:
    """Refuse a checkpoint of another job, model size or software version, naming what differs."""
    if ckpt.get("software") != hetero_ps.__version__:
        raise ConfigError(
            f"the checkpoint was written by hetero_ps {ckpt.get('software')}, this is {hetero_ps.__version__}: "
            "resume with the version that wrote it"
        )
    if ckpt.get("numel") != numel:
        raise ConfigError(f"the checkpoint's model has {ckpt.get('numel')} parameters, this job's has {numel}")
    saved = ckpt.get("job", {})
    differ = sorted(k for k in set(saved) | set(job) if saved.get(k) != job.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {job.get(k)!r} now" for k in differ)
        raise ConfigError(f"the checkpoint is of another job ({shown}); resume with the same flags")
