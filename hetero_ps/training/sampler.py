"""The master is the sampler: one seeded permutation per epoch, handed out as (epoch, offset, count).

Every node computes the same permutation of ``range(n)`` from ``(seed, epoch)`` alone, so a worker
only needs three integers to know its samples: ``perm(epoch)[offset : offset + count]``.

Steps within an epoch (``epoch_steps``)::

    step s covers perm[s·B : min((s+1)·B, n)]       for s = 0 … ceil(n / B) − 1

so the **last step of an epoch is partial** when B does not divide n: it covers exactly the
``n mod B`` remaining samples (no sample is dropped, none repeated, no padding from the next epoch).
Its per-worker shares are the usual shares scaled to the smaller total (the scheduler's ``assign``:
proportional, largest remainders, sum exact), so the union of one epoch's slices is exactly ``range(n)``.
The optimizer still steps once on that smaller batch; its gradient is the mean over those samples,
because the server weights worker *i* by ``b_i / total`` with ``total`` the step's own size.

Within a step, workers get consecutive slices in the order the master lists them
(``worker_slices``). Whatever the sizes, slices of one step tile ``[offset, offset + total)``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)


class EpochSampler:
    """Seeded per-epoch permutations of ``range(n)``; identical on every node for the same numpy.

    ``numpy.random.default_rng([seed, epoch])`` (PCG64 seeded through SeedSequence) drives
    ``permutation``; the result is cached for the most recent epoch, so a worker asking for many
    slices of one epoch pays for the permutation once (n = 50 000: ~0.5 ms).
    """

    def __init__(self, n: int, seed: int):
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"a sampler needs a positive number of samples, got {n!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n = int(n)
        self.seed = int(seed)
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch`` (int64, read-only)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch or self._perm is None:
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n).astype(np.int64)
            perm.setflags(write=False)
            self._perm, self._epoch = perm, int(epoch)
        return self._perm

    def indices(self, epoch: int, offset: int, count: int) -> np.ndarray:
        """Samples ``perm(epoch)[offset : offset + count]`` (an int64 view; do not modify).

        Raises ``ValueError`` when the slice does not lie inside ``[0, n)`` — the values usually
        come from the network, so they are checked, never clipped.
        """
        for name, v in (("epoch", epoch), ("offset", offset), ("count", count)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if count <= 0 or offset < 0 or offset + count > self.n:
            raise ValueError(f"slice offset={offset} count={count} is outside this epoch of {self.n} samples")
        return self.permutation(epoch)[offset : offset + count]


def steps_per_epoch(n: int, global_batch: int) -> int:
    """``ceil(n / B)``: the last step covers the remainder."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    return math.ceil(n / global_batch)


def epoch_steps(n: int, global_batch: int) -> list[tuple[int, int]]:
    """``[(offset, total), ...]`` of every step of an epoch; totals sum to ``n``, all but the last are B."""
    steps_per_epoch(n, global_batch)  # validates B
    return [(o, min(global_batch, n - o)) for o in range(0, n, global_batch)]


def worker_slices(offset: int, sizes: Mapping[K, int]) -> dict[K, tuple[int, int]]:
    """Consecutive ``(offset, count)`` per worker, in the mapping's order; zero-size workers get none."""
    out: dict[K, tuple[int, int]] = {}
    cursor = offset
    for k, b in sizes.items():
        if b < 0:
            raise ValueError(f"negative batch size {b} for {k!r}")
        if b:
            out[k] = (cursor, int(b))
            cursor += b
    return out
