"""Profiling the first steps of a worker with torch.profiler (``--profile-steps N``).

The worker loop wraps each step::

    profiler = StepProfiler(os.path.join(experiment_dir, "profiles"), steps=3, rank=rank, device=device)
    for step in ...:
        with profiler.step(step):
            with profiler.region("compute"):
                loss = ...; loss.backward()
            with profiler.region("push"):
                ...

Steps ``skip .. skip+steps-1`` *of those this profiler sees* are recorded, each on its own, and
written when the step ends as

* ``worker-<rank>-step<k>.json`` — a Chrome trace (open in ``chrome://tracing`` or
  https://ui.perfetto.dev), ``k`` being the step number passed to :meth:`StepProfiler.step`;
* ``worker-<rank>-step<k>.txt`` — the operator table (``key_averages``) sorted by self time.

Other steps run untouched: :meth:`step` and :meth:`region` cost one comparison then. ``skip=1`` leaves
out the first step, whose one-off costs (allocations, lazy initialisation, cuDNN autotuning) are
rarely what one wants to look at. On a CUDA device, kernel activity is recorded too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TypedDict

import torch

log = logging.getLogger("hetero_ps.observe.profiling")


class _ProfileOptions(TypedDict):
    """The ``torch.profiler.profile`` keyword arguments a StepProfiler passes through."""

    record_shapes: bool
    profile_memory: bool
    with_stack: bool


class StepProfiler:
    """Records ``steps`` consecutive steps (after ``skip``) of one worker into ``out_dir``."""

    def __init__(
        self,
        out_dir: str,
        steps: int = 3,
        rank: int = 0,
        skip: int = 0,
        device: str = "cpu",
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ):
        if steps < 1:
            raise ValueError(f"steps to profile must be at least 1, got {steps}")
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.out_dir, self.steps, self.rank, self.skip = out_dir, steps, rank, skip
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if str(device).startswith("cuda") and torch.cuda.is_available():
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.options: _ProfileOptions = {
            "record_shapes": record_shapes,
            "profile_memory": profile_memory,
            "with_stack": with_stack,
        }
        self.seen = 0  # steps passed to step() so far
        self.written: list[str] = []  # trace files written, in order
        self._recording = False

    @property
    def done(self) -> bool:
        """True once every step this profiler should record has been seen."""
        return self.seen >= self.skip + self.steps

    @contextlib.contextmanager
    def step(self, step: int):
        """Wrap one training step; records it if it is one of the steps to profile."""
        index = self.seen
        self.seen += 1
        if not (self.skip <= index < self.skip + self.steps):
            yield
            return
        os.makedirs(self.out_dir, exist_ok=True)
        prof = torch.profiler.profile(activities=self.activities, **self.options)
        prof.start()
        self._recording = True
        ok = False
        try:
            with torch.profiler.record_function(f"step {step}"):
                yield
            ok = True
        finally:
            self._recording = False
            if torch.cuda.is_available() and torch.profiler.ProfilerActivity.CUDA in self.activities:
                torch.cuda.synchronize()  # so the step's kernels are in the trace
            prof.stop()
        if ok:
            self._write(prof, step)

    def region(self, name: str):
        """A named span inside the step being recorded (a no-op outside recorded steps)."""
        return torch.profiler.record_function(name) if self._recording else contextlib.nullcontext()

    def _write(self, prof, step: int) -> None:
        base = os.path.join(self.out_dir, f"worker-{self.rank}-step{step}")
        tmp = base + ".json.tmp"
        prof.export_chrome_trace(tmp)
        os.replace(tmp, base + ".json")  # a reader never sees half a trace
        sort = "self_cuda_time_total" if len(self.activities) > 1 else "self_cpu_time_total"
        with open(base + ".txt", "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        self.written.append(base + ".json")
        log.info("profile of step %d written to %s.json", step, base)
