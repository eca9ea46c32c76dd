"""Training that diverges is stopped at once, with the step and what to change.

A learning rate too high for the model shows within a few steps: the loss turns NaN/Inf, or climbs
far above where it started. Training on would only burn time, so the master stops the run with a
``TrainingDiverged`` error naming the step, the loss and the learning rate.

The rule, on the loss of each recorded step (the union batch's mean in BSP):

* **non-finite**: ``NONFINITE_STEPS`` steps in a row with a NaN/Inf loss (one bad worker's NaN is
  skipped and forgiven: that is bad input, not divergence);
* **exploded**: the mean of the last ``WINDOW`` finite losses is more than ``factor`` times the
  first one, the loss of the untrained model (``--divergence-factor``, default 4; 0 turns the
  check off). The start, not a running minimum: a loss that later creeps up a little is noise,
  one that climbs over 4× where it started (ln 10 = 2.3 → 9.2 for ten classes) is not.
"""

from __future__ import annotations

import math
from collections import deque

from hetero_ps.errors import TrainingDiverged

WINDOW = 3
NONFINITE_STEPS = 3
DEFAULT_FACTOR = 4.0


class DivergenceWatch:
    def __init__(self, factor: float = DEFAULT_FACTOR):
        if not (factor == 0 or factor > 1):
            raise ValueError(f"the divergence factor must be 0 (off) or > 1, got {factor}")
        self.factor = factor
        self.start: float | None = None  # the first finite loss: the untrained model's
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.nonfinite_run = 0

    def replay(self, losses: list[float | None]) -> None:
        """Take up the losses of the steps already done (a resumed run): the start stays the run's start."""
        finite = [x for x in losses if x is not None and math.isfinite(x)]
        if finite:
            self.start = finite[0]
            self.recent.extend(finite[-WINDOW:])

    def observe(self, step: int, loss: float, lr: float) -> None:
        """Raise ``TrainingDiverged`` when ``loss`` (at ``step``, trained with ``lr``) shows divergence."""
        if not self.factor:
            return
        if not math.isfinite(loss):
            self.nonfinite_run += 1
            if self.nonfinite_run >= NONFINITE_STEPS:
                raise TrainingDiverged(
                    f"training diverged at step {step}: the loss has been {loss} for {self.nonfinite_run} "
                    f"steps in a row. {self._hint(lr)}"
                )
            return
        self.nonfinite_run = 0
        if self.start is None:
            self.start = loss
        self.recent.append(loss)
        if self.start <= 0 or len(self.recent) < WINDOW:
            return
        mean = sum(self.recent) / WINDOW
        if mean > self.factor * self.start:
            raise TrainingDiverged(
                f"training diverged at step {step}: the loss rose to {mean:.4g} (mean of the last {WINDOW} "
                f"steps) from {self.start:.4g} at the start, over {self.factor:g}×. {self._hint(lr)}"
            )

    @staticmethod
    def _hint(lr: float) -> str:
        return (
            f"Lower the learning rate (--lr, {lr:g} at this step) or lengthen the warmup (--warmup-steps); "
            "leaving both unset uses the model's recipe (README, model table). "
            "--divergence-factor 0 turns this check off."
        )
