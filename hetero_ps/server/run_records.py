"""The master's record of the run: steps, evaluations and events, written to every reader.

Each record goes to the experiment's JSONL files and to every sink (the dashboard hub, TensorBoard:
``add_step``/``add_epoch``/``add_event``), and steps also to the progress line. ``step`` — the
number of steps done — is how far the run is; every event is stamped with it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hetero_ps.errors import HeteroPSError
from hetero_ps.observe.jsonl import read_jsonl
from hetero_ps.observe.records import EpochRecord, Event, JSONObject, RunTotals, StepRecord

log = logging.getLogger("hetero_ps.server")


class RunRecords:
    def __init__(self, experiment: Any = None, sinks: list[Any] | tuple[Any, ...] = (), progress: Any = None):
        self.experiment = experiment
        self.sinks = list(sinks)
        self.progress = progress
        self.totals = RunTotals()  # the steps themselves go to the files and sinks, not to memory
        self.batches = 0  # global batches done: the progress clock (a --sync local round is H of them)
        self.evaluations: list[EpochRecord] = []
        self.started = time.time()

    @property
    def step(self) -> int:
        """Steps done so far (the index the next step record will carry)."""
        return self.totals.steps

    def add_step(self, rec: StepRecord) -> None:
        self.totals.add(rec)
        self.batches += max(1, rec.local_steps)
        self._publish("step", rec.to_json())
        if self.progress is not None:
            self.progress.update(self.batches - 1, rec.epoch, rec.loss, rec.samples_per_s, rec.samples)

    def restore(self, positions: dict[str, int], step: int) -> list[StepRecord]:
        """Go back to a checkpoint: cut the metrics files to ``positions`` (steps and events after it
        are redone), take up the totals and evaluations recorded up to ``step``, and return the steps."""
        metrics = self.experiment.metrics
        metrics.rewind({s: n for s, n in positions.items() if s != "epochs"})
        # An evaluation may be written after the checkpoint of an epoch that ended before it: keep
        # what scored a step the checkpoint covers, by content rather than by position.
        metrics.keep("epochs", lambda rec: rec.get("step", 0) <= step)
        history = [StepRecord.from_json(d) for d in read_jsonl(metrics.path("steps"))]
        if [r.step for r in history] != list(range(step)):
            raise HeteroPSError(
                f"{metrics.path('steps')} does not hold steps 0..{step - 1} as the checkpoint says; "
                "it was changed after the run: start a new experiment"
            )
        self.totals = RunTotals.of(history)
        self.batches = sum(max(1, r.local_steps) for r in history)
        self.evaluations = [EpochRecord.from_json(d) for d in read_jsonl(metrics.path("epochs"))]
        return history

    def add_epoch(self, rec: EpochRecord) -> None:
        self.evaluations.append(rec)
        self._publish("epoch", rec.to_json())

    def event(self, kind: str, **fields: Any) -> None:
        self._publish("event", Event(kind, self.step, time.time(), fields).to_json())

    def worker_utilisation(self, rank: int, **fields: Any) -> None:
        """A worker's CPU/GPU utilisation from its report, for the views that show it."""
        for sink in self.sinks:
            if hasattr(sink, "update_worker"):
                sink.update_worker(rank, **fields)

    def _publish(self, kind: str, rec: JSONObject) -> None:
        if self.experiment:
            getattr(self.experiment.metrics, f"log_{kind}")(rec)
        for sink in self.sinks:
            try:
                getattr(sink, f"add_{kind}")(rec)
            except Exception:  # a broken view must never stop training
                log.exception("metrics sink %r failed on a %s record", sink, kind)
