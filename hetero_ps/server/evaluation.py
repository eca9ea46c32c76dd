"""Evaluation on the master: a snapshot of the parameters, scored on the held-out split.

The snapshot is taken at once (SSP/ASP keep updating the live parameters while it is scored in a
thread). BatchNorm statistics are never trained on the master, so a model that has them gets them
re-estimated on training data first ("precise BN"), and the live model keeps those statistics for
its checkpoint.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any

import torch

from hetero_ps.config import JobConfig
from hetero_ps.training.trainer import evaluate

# Small enough that a shutdown waits at most one batch (a ResNet-50 batch of 256 took 15 s on 2 CPU cores).
EVAL_BATCH = 64


class Evaluator:
    def __init__(self, job: JobConfig, model: torch.nn.Module, eval_set: Any, train_set: Any, max_samples: int = 0):
        self.job, self.eval_set, self.train_set = job, eval_set, train_set
        self.max_samples = max_samples  # 0: the whole eval split (--eval-samples)
        self.snapshot = copy.deepcopy(model)
        self.has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.snapshot.modules())
        self.running = False
        self._stop = threading.Event()

    async def score(self, model: torch.nn.Module) -> tuple[float, float | None, float]:
        """``(loss, accuracy, seconds)`` of ``model``'s current parameters on the eval split.

        Raises ``EvaluationStopped`` when :meth:`stop` is called meanwhile."""
        t0 = time.perf_counter()
        with torch.no_grad():
            for dst, src in zip(self.snapshot.parameters(), model.parameters()):
                dst.copy_(src)
        self.running = True
        try:
            loss, acc = await asyncio.to_thread(
                evaluate,
                self.snapshot,
                self.eval_set,
                EVAL_BATCH,
                self.job,
                max_samples=self.max_samples,
                calib_set=self.train_set if self.has_batchnorm else None,
                stop=self._stop,
            )
        finally:
            self.running = False
        if self.has_batchnorm:
            model.load_state_dict(self.snapshot.state_dict())  # keep the estimated statistics
        return loss, acc, time.perf_counter() - t0

    def stop(self) -> None:
        """End an evaluation in progress after its current batch (the thread cannot be cancelled)."""
        self._stop.set()
