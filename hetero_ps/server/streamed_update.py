"""One optimizer update, chunk by chunk in a thread, while the loop sends each chunk as it is done.

BSP's update is the master's serial stretch: every worker waits from its push until its next
parameters arrive. Stepping the chunks in order on another thread (the kernels release the GIL) and
sending chunk *i* to every worker as soon as it is stepped overlaps the optimizer with the broadcast,
so that stretch costs about the longer of the two instead of their sum. The parameters of a chunk
are final when its future resolves; nothing reads a chunk before that. Parameter changes from
local rounds (``changes``) are subtracted from each chunk right after it is stepped, in the same version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import torch

from hetero_ps import kernels
from hetero_ps.kernels.chunked_step import ChunkedStep

Changes = Sequence[tuple[np.ndarray, float]]  # (a parameter change Δ, its weight w): θ ← θ − w·Δ, after the step


class StreamedUpdate:
    def __init__(self, stepper: ChunkedStep, chunks: list[tuple[int, int]], grad: torch.Tensor, changes: Changes = ()):
        loop = asyncio.get_running_loop()
        self._ready = [loop.create_future() for _ in chunks]
        self.seconds = 0.0  # the stepping thread's time (the optimizer's share of the update)
        plan = stepper.begin()  # here, on the loop: the LR is read before anything may change it
        grad_np = grad.numpy()

        def step_all() -> None:
            t0 = time.perf_counter()
            for fut, (off, n) in zip(self._ready, chunks):
                plan.chunk(off, n, grad_np[off : off + n])
                subtract_changes(plan.param[off : off + n], changes, off)
                loop.call_soon_threadsafe(_resolve, fut)
            plan.finish()
            self.seconds = time.perf_counter() - t0

        self._task = asyncio.ensure_future(asyncio.to_thread(step_all))

    async def chunk(self, i: int) -> None:
        """Wait until chunk ``i`` holds its new parameters (raises what the stepping thread raised)."""
        if not self._ready[i].done():
            await asyncio.wait({self._ready[i], self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready[i].done():
            self._task.result()  # the thread failed before this chunk

    async def finished(self) -> None:
        await self._task


def subtract_changes(param: np.ndarray, changes: Changes, off: int = 0) -> None:
    """``param -= w · Δ[off : off + len(param)]`` for each change (a standby worker's local round)."""
    for delta, weight in changes:  # the weighted-reduction kernel: in place, no temporary, GIL released
        kernels.weighted_accumulate(param, delta[off : off + len(param)], -weight)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
