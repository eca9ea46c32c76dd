"""A TensorBoard sink for the master's step, epoch and event records (``--tensorboard DIR``).

Layout under ``logdir`` (point ``tensorboard --logdir`` at it):

* the run itself (``logdir/``): ``train/loss``, ``train/lr``, ``train/samples_per_s``, ``train/step_s``,
  ``server/aggregate_s``, ``server/optimizer_s``, ``server/broadcast_s``, ``eval/loss``,
  ``eval/accuracy``, and ``cluster/ideal_samples_per_s`` when known; load-balancing decisions and
  membership changes as text (``events/schedule``, ``events/workers``);
* one sub-run per worker (``logdir/worker-<rank>/``) with the same tags for every worker —
  ``worker/batch``, ``worker/share``, ``worker/samples_per_s`` (its contribution, ``batch / step_s``),
  ``worker/loss``, ``worker/compute_s``, ``worker/encode_s``, ``worker/push_s``, ``worker/wait_s``,
  ``worker/pull_s``, ``worker/bytes_out``, ``worker/bytes_in`` — so TensorBoard overlays the workers on
  one chart per tag.

The x axis is the step number everywhere (epochs are plotted at the step they ended on).
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time, see __init__
    from torch.utils.tensorboard import SummaryWriter

WORKER_TIMES = ("compute_s", "encode_s", "push_s", "wait_s", "pull_s")


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


class TensorBoardSink:
    """Writes the records it is given as TensorBoard scalars; ``close()`` flushes and closes every file."""

    def __init__(self, logdir: str, flush_secs: int = 10):
        # Imported here: torch's tensorboard module pulls in the tensorboard package, only needed when
        # this sink is asked for.
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard==2.21.0") from exc
        self._Writer = SummaryWriter
        self.logdir = logdir
        self.flush_secs = flush_secs
        os.makedirs(logdir, exist_ok=True)
        self.main = SummaryWriter(logdir, flush_secs=flush_secs)
        self.workers: dict[str, SummaryWriter] = {}
        self._closed = False

    def _scalar(self, writer, tag: str, value, step: int) -> None:
        v = _num(value)
        if v is not None:
            writer.add_scalar(tag, v, step)

    def _worker(self, rank: str):
        w = self.workers.get(rank)
        if w is None:
            w = self._Writer(os.path.join(self.logdir, f"worker-{rank}"), flush_secs=self.flush_secs)
            self.workers[rank] = w
        return w

    def add_step(self, rec: dict) -> None:
        """One ``steps.jsonl`` record."""
        step = int(rec["step"])
        m = self.main
        self._scalar(m, "train/loss", rec.get("loss"), step)
        self._scalar(m, "train/lr", rec.get("lr"), step)
        self._scalar(m, "train/samples_per_s", rec.get("samples_per_s"), step)
        self._scalar(m, "train/step_s", rec.get("step_s"), step)
        for k, v in (rec.get("server") or {}).items():
            self._scalar(m, f"server/{k}", v, step)
        step_s, samples = _num(rec.get("step_s")), rec.get("samples") or 0
        for rank, w in (rec.get("workers") or {}).items():
            out = self._worker(str(rank))
            batch = w.get("batch") or 0
            self._scalar(out, "worker/batch", batch, step)
            self._scalar(out, "worker/share", batch / samples if samples else None, step)
            self._scalar(out, "worker/samples_per_s", batch / step_s if step_s else None, step)
            self._scalar(out, "worker/loss", w.get("loss"), step)
            for k in WORKER_TIMES + ("bytes_out", "bytes_in"):
                self._scalar(out, f"worker/{k}", w.get(k), step)

    def add_epoch(self, rec: dict) -> None:
        """One ``epochs.jsonl`` record (plotted at the step the epoch ended on)."""
        step = int(rec.get("step", rec.get("epoch", 0)))
        self._scalar(self.main, "eval/loss", rec.get("eval_loss"), step)
        self._scalar(self.main, "eval/accuracy", rec.get("eval_accuracy"), step)
        self._scalar(self.main, "eval/seconds", rec.get("eval_s"), step)

    def add_event(self, rec: dict) -> None:
        """One ``events.jsonl`` record: decisions and membership changes become text entries."""
        step = int(rec.get("step") or 0)
        kind = rec.get("event")
        if kind == "schedule":
            sizes = ", ".join(
                f"rank {r}: {b}" for r, b in sorted((rec.get("sizes") or {}).items(), key=lambda kv: int(kv[0]))
            )
            self.main.add_text(
                "events/schedule", f"**{rec.get('policy', '?')}** {sizes} — {rec.get('reason', '')}", step
            )
            self._scalar(self.main, "scheduler/predicted_step_s", rec.get("predicted_step_s"), step)
        elif kind in ("worker_joined", "worker_lost"):
            self.main.add_text(
                "events/workers",
                f"{kind} rank {rec.get('rank')} {rec.get('host', '')} "
                f"{rec.get('device') or rec.get('reason') or ''}".strip(),
                step,
            )
        else:
            self.main.add_text(f"events/{kind}", json.dumps(rec, default=str), step)

    def set_ideal(self, samples_per_s: float, step: int = 0) -> None:
        self._scalar(self.main, "cluster/ideal_samples_per_s", samples_per_s, step)

    def flush(self) -> None:
        self.main.flush()
        for w in self.workers.values():
            w.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.main.close()
        for w in self.workers.values():
            w.close()
