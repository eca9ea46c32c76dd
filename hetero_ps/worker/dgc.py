"""DGC's momentum correction and sparsity warm-up (Lin et al., 2018) for top-k pushes.

With top-k most of a gradient waits in the codec's residual for several steps; the master's momentum
then sees those values late, once, and their momentum is lost. Momentum correction keeps the momentum
on the worker instead. Per chunk, with ``m`` the job's momentum::

    u ← m·u + g                  the worker's velocity
    v ← v + u                    the top-k codec's residual: what was not sent yet
    send top-k of v;  v[sent] ← 0;  u[sent] ← 0      (DGC's "momentum factor masking")

and the master steps plain SGD on the weighted sum of what was sent (``model_state.py`` builds its
optimizer with momentum 0). With every value sent (ratio 1) this is SGD without momentum: the mask
clears the velocity each step, as in the paper.

Warm-up: during the job's LR warm-up (``warmup_steps``) the share of values sent falls geometrically
from ``START_RATIO`` to the codec's ratio, so the first, fast-changing gradients are not held back
(DGC: 75 % → 99.9 % sparsity over the first epochs).
"""

from __future__ import annotations

import math

import numpy as np

START_RATIO = 0.25  # the share of values sent at the first step of the warm-up


class MomentumCorrection:
    """The velocity ``u`` of each chunk, the warm-up's ``k``, and a copy to undo an aborted push."""

    def __init__(self, momentum: float, ratio: float, warmup_steps: int, n_chunks: int):
        self.momentum = np.float32(momentum)
        self.target = float(ratio)
        self.warmup = int(warmup_steps)
        self._u: list[np.ndarray | None] = [None] * n_chunks
        self._saved: list[np.ndarray | None] = [None] * n_chunks

    def ratio(self, step: int) -> float:
        """The share of a chunk's values sent at ``step`` (0-based)."""
        if self.warmup <= 0 or step >= self.warmup or self.target >= START_RATIO:
            return self.target
        t = step / self.warmup
        return START_RATIO ** (1.0 - t) * self.target**t

    def k(self, step: int, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.ratio(step) * numel)))

    def velocity(self, i: int, grad: np.ndarray) -> np.ndarray:
        """``u ← m·u + g`` for chunk ``i``; returns ``u`` (what the top-k codec accumulates)."""
        u = self._u[i]
        if u is None:
            u = self._u[i] = np.zeros(grad.size, dtype=np.float32)
        np.multiply(u, self.momentum, out=u)
        np.add(u, grad, out=u)
        return u

    def mask(self, i: int, sent: np.ndarray) -> None:
        """The values ``sent`` left with this push: their velocity starts over."""
        u = self._u[i]
        if u is not None:
            u[sent] = 0.0

    def save(self) -> None:
        """Copy the velocities (before a push that the master might throw away)."""
        for i, u in enumerate(self._u):
            saved = self._saved[i]
            if u is None:
                self._saved[i] = None
            elif saved is None:
                self._saved[i] = u.copy()
            else:
                np.copyto(saved, u)

    def restore(self) -> None:
        """Put the velocities back as ``save`` found them."""
        for i, saved in enumerate(self._saved):
            if saved is None:
                self._u[i] = None
            else:
                u = self._u[i]
                if u is None:
                    self._u[i] = saved.copy()
                else:
                    np.copyto(u, saved)
