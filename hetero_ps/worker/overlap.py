"""Compute overlapped with the wire, both ways: gradient chunks pushed as backward finishes them
(``ChunkReadiness``) and layers run as their parameter chunks arrive (``PullArrival``).

Pushes. Like DDP's reducer: a post-accumulate-grad hook on every parameter counts down, for each wire chunk
(``chunk_layout``), the parameters that overlap it; when the last one's gradient is accumulated the
chunk is final and can be pushed while backward goes on with the layers before it. Backward runs
from the last layer to the first, so the chunks come roughly in reverse order.

Only the last micro-batch's backward makes gradients final, so the hooks count only while
``arm``-ed (the trainer arms them just before that backward). A parameter that gets no gradient in a
step (unused in its forward) never fires: its chunks are pushed after backward, with the rest.

Pulls. A step scheduled ahead of its parameters (PROTOCOL.md, "Schedules ahead") starts while they
arrive: its samples are fetched and each module with parameters of its own waits, in a forward
pre-hook, only for the chunks those parameters overlap. The master sends chunk 0 (the first
layers) first, so the first layers run while the last ones are still on the wire. A model whose
``forward`` reads a submodule's parameters before calling it would read them early, so per-layer
waits are for the built-in models; any other model (and a GPU, whose parameters are copied over
once the pull is whole) waits for every chunk before its first module runs, which still overlaps
the pull with fetching the samples.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hetero_ps.training.flat import FlatParams


def chunks_of_parameters(flat: FlatParams, chunks: list[tuple[int, int]]) -> list[list[int]]:
    """For each parameter of ``flat`` (its order), the wire chunks its values overlap."""
    starts = [off for off, _ in chunks]
    out = []
    for _, _, off, n in flat.layout():
        first, last = bisect.bisect_right(starts, off) - 1, bisect.bisect_right(starts, off + n - 1) - 1
        out.append(list(range(first, last + 1)))
    return out


class ChunkReadiness:
    def __init__(self, flat: FlatParams, chunks: list[tuple[int, int]]):
        self._chunks_of = chunks_of_parameters(flat, chunks)  # parameter index -> chunks it overlaps
        self._need = [0] * len(chunks)  # chunk -> parameters overlapping it
        for i, p in enumerate(flat.parameters()):
            for c in self._chunks_of[i]:
                self._need[c] += 1
            p.register_post_accumulate_grad_hook(self._hook(i))
        self._left: list[int] = []
        self._on_ready: Callable[[int], None] | None = None

    def arm(self, on_ready: Callable[[int], None]) -> None:
        """Call ``on_ready(chunk)`` (from backward's thread) as each chunk's gradient becomes final."""
        self._left = list(self._need)
        self._on_ready = on_ready

    def disarm(self) -> None:
        self._on_ready = None

    def _hook(self, i: int) -> Callable[[object], None]:
        def done(_param: object) -> None:
            on_ready = self._on_ready
            if on_ready is None:
                return
            for c in self._chunks_of[i]:
                self._left[c] -= 1
                if self._left[c] == 0:
                    on_ready(c)

        return done


class PullAborted(Exception):
    """The pull a forward pass waited for will not come (the connection ended, the step was cancelled)."""


@dataclass
class _Pull:
    missing: set[int]  # chunks not in yet
    aborted: bool = False


class PullArrival:
    """Forward pre-hooks that hold each module until the parameter chunks it reads have arrived.

    ``expect()`` before a step whose parameters are still to come; ``arrived(chunk)`` (the event loop)
    as each chunk is in place; ``abort()`` fails that pull's waiters with ``PullAborted``. Outside
    an expected pull the hooks return at once. ``waited_s``: how long forward was held in this pull."""

    def __init__(self, model: torch.nn.Module, flat: FlatParams, chunks: list[tuple[int, int]], per_layer: bool):
        self._n = len(chunks)
        self._cond = threading.Condition()
        self._pull = _Pull(set())
        self.waited_s = 0.0
        if not per_layer:
            model.register_forward_pre_hook(self._hook(range(self._n)))
            return
        index = {id(p): i for i, p in enumerate(flat.parameters())}
        chunks_of = chunks_of_parameters(flat, chunks)
        for module in model.modules():
            own = {c for p in module.parameters(recurse=False) if id(p) in index for c in chunks_of[index[id(p)]]}
            if own:
                module.register_forward_pre_hook(self._hook(sorted(own)))

    @property
    def expecting(self) -> bool:
        return bool(self._pull.missing)

    def expect(self) -> None:
        with self._cond:
            self._pull, self.waited_s = _Pull(set(range(self._n))), 0.0

    def arrived(self, chunk: int) -> None:
        with self._cond:
            self._pull.missing.discard(chunk)
            self._cond.notify_all()

    def complete(self) -> None:
        """Every chunk of the pull is in place."""
        with self._cond:
            self._pull.missing.clear()
            self._cond.notify_all()

    def abort(self) -> None:
        """A forward waiting for this pull, or reaching a module whose chunks it lacks, raises
        (until the next ``expect``); a pull already complete is not touched."""
        with self._cond:
            self._pull.aborted = True
            self._cond.notify_all()

    def _hook(self, needs: Iterable[int]) -> Callable[..., None]:
        needs = tuple(needs)

        def wait(_module: object, _args: object) -> None:
            pull = self._pull
            if not pull.missing:  # the common case (nothing expected, or all in): no lock
                return
            with self._cond:
                t0 = time.perf_counter()
                while not pull.aborted and any(c in pull.missing for c in needs):
                    self._cond.wait()
                self.waited_s += time.perf_counter() - t0
            if pull.aborted:
                raise PullAborted("the parameters this step waits for will not arrive")

        return wait
