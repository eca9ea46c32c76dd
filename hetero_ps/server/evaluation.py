"""Evaluation on the master: a snapshot of the parameters, scored on the held-out split.

The snapshot is taken at once (SSP/ASP keep updating the live parameters while it is scored in a
thread). BatchNorm statistics are never trained on the master, so a model that has them gets them
re-estimated on training data first ("precise BN"), and the live model keeps those statistics for
its checkpoint.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import torch

from hetero_ps.config import JobConfig
from hetero_ps.training.trainer import evaluate


class Evaluator:
    def __init__(self, job: JobConfig, model: torch.nn.Module, eval_set: Any, train_set: Any):
        self.job, self.eval_set, self.train_set = job, eval_set, train_set
        self.snapshot = copy.deepcopy(model)
        self.has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                 for m in self.snapshot.modules())

    async def score(self, model: torch.nn.Module) -> tuple[float, float | None, float]:
        """``(loss, accuracy, seconds)`` of ``model``'s current parameters on the eval split."""
        t0 = time.perf_counter()
        with torch.no_grad():
            for dst, src in zip(self.snapshot.parameters(), model.parameters()):
                dst.copy_(src)
        loss, acc = await asyncio.to_thread(evaluate, self.snapshot, self.eval_set, 256, self.job,
                                            calib_set=self.train_set if self.has_batchnorm else None)
        if self.has_batchnorm:
            model.load_state_dict(self.snapshot.state_dict())   # keep the estimated statistics
        return loss, acc, time.perf_counter() - t0
