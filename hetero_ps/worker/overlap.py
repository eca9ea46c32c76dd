"""Which gradient chunks the backward pass has finished, told as each one finishes.

Like DDP's reducer: a post-accumulate-grad hook on every parameter counts down, for each wire chunk
(``chunk_layout``), the parameters that overlap it; when the last one's gradient is accumulated the
chunk is final and can be pushed while backward goes on with the layers before it. Backward runs
from the last layer to the first, so the chunks come roughly in reverse order.

Only the last micro-batch's backward makes gradients final, so the hooks count only while
``arm``-ed (the trainer arms them just before that backward). A parameter that gets no gradient in a
step (unused in its forward) never fires: its chunks are pushed after backward, with the rest.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from hetero_ps.training.flat import FlatParams


class ChunkReadiness:
    def __init__(self, flat: FlatParams, chunks: list[tuple[int, int]]):
        starts = [off for off, _ in chunks]
        self._chunks_of: list[list[int]] = []  # parameter index -> chunks it overlaps
        self._need = [0] * len(chunks)  # chunk -> parameters overlapping it
        for i, ((_, _, off, n), p) in enumerate(zip(flat.layout(), flat.parameters())):
            first, last = bisect.bisect_right(starts, off) - 1, bisect.bisect_right(starts, off + n - 1) - 1
            self._chunks_of.append(list(range(first, last + 1)))
            for c in range(first, last + 1):
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
