"""The in-memory state of one run, fed by the master and read by the dashboard.

The master calls the ``set_*``/``add_*``/``update_worker`` methods from its asyncio loop (they never
block and never await); the HTTP side reads :meth:`MetricsHub.status`, :meth:`steps_since` and
:meth:`events`, and live clients :meth:`subscribe` to a queue of ``(kind, payload)`` messages:

========== ======================================================================
kind       payload
========== ======================================================================
``step``   the step record (as in ``steps.jsonl``)
``epoch``  the epoch record (as in ``epochs.jsonl``)
``event``  the event record (as in ``events.jsonl``) plus ``seq``, its index
``workers`` the whole worker table (rows ordered by rank), once per loop iteration that changed it
``status`` :meth:`status` (after ``set_job``, ``set_ideal`` and ``finish``)
``resync`` ``{"dropped": n}``: this queue overflowed and was emptied; refetch
``close``  ``None``: the hub is shutting down
========== ======================================================================

Memory is bounded whatever the run length or the clients do: the last ``max_steps`` step records,
the last ``max_events`` events and, per subscriber, at most ``queue_size`` messages. A subscriber that
falls behind (a slow browser, a stalled connection) never blocks the master: when its queue is full
the backlog is dropped, oldest first, and a single ``resync`` marker takes its place so the client
refetches what it missed from the JSON API (step records carry their step number, so the client
ignores any it already has).

Records are copied on the way in and every non-finite float becomes ``None`` (JSON has no NaN, and a
browser's ``JSON.parse`` rejects it), so the master may keep mutating its own dicts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from hetero_ps.observe.jsonsafe import sanitize_record

#: Worker table columns, in the order the page shows them.
WORKER_FIELDS = (
    "rank",
    "host",
    "device",
    "status",
    "batch",
    "share",
    "samples_per_s",
    "staleness",
    "cpu_util",
    "mem_bytes",
    "gpu_util",
    "gpu_mem_bytes",
)
WORKER_STATUSES = ("joined", "training", "standby", "suspended", "lost")
RECENT_STEPS = 20  # window for "current" throughput and the ETA


class Subscription(asyncio.Queue):
    """A bounded queue that never blocks the producer: on overflow it drops its backlog for a resync."""

    def __init__(self, maxsize: int):
        if maxsize < 2:
            raise ValueError(f"a subscription needs room for at least 2 messages, got {maxsize}")
        super().__init__(maxsize)
        self.dropped = 0  # messages discarded over this subscription's life

    def offer(self, item) -> None:
        if self.full():
            n = 0
            while not self.empty():
                self.get_nowait()
                n += 1
            self.dropped += n
            self.put_nowait(("resync", {"dropped": n}))
        self.put_nowait(item)


class MetricsHub:
    """Live state of one run: job, worker table, recent steps, epochs, events, totals.

    Not thread-safe: call it from the thread that runs the master's event loop.
    """

    def __init__(self, max_steps: int = 10_000, max_events: int = 5_000, queue_size: int = 512):
        if max_steps < 1 or max_events < 1:
            raise ValueError("max_steps and max_events must be at least 1")
        self.queue_size = queue_size
        self.job: dict = {}
        self.ideal_samples_per_s: float | None = None
        self.summary: dict | None = None
        self.started = time.time()
        self._steps: deque[dict] = deque(maxlen=max_steps)
        self._epochs: deque[dict] = deque(maxlen=max_steps)
        self._events: deque[dict] = deque(maxlen=max_events)
        self._event_seq = 0
        self._workers: dict[int, dict] = {}
        self._subs: set[Subscription] = set()
        self._workers_pending = False
        # Running totals over the whole run (the deque only keeps the tail).
        self._n_steps = 0
        self._samples = 0
        self._step_s = 0.0
        self._slowest_compute_s = 0.0
        self._bytes_out = 0
        self._bytes_in = 0
        self._skipped = 0
        self._first_step_t: float | None = None

    # -- feeding ----------------------------------------------------------------------------------
    def set_job(self, job: dict) -> None:
        """The job as the master runs it (``JobConfig.to_wire()`` plus, when known, ``experiment``,
        ``total_steps``, ``steps_per_epoch``, ``parameters``); shown on the page and used for progress."""
        self.job = sanitize_record(dict(job))
        self._publish("status", self.status())

    def set_ideal(self, samples_per_s: float | None) -> None:
        """The ideal cluster throughput (Σ of each worker's solo samples/s), or None if unknown."""
        if samples_per_s is not None and not (samples_per_s > 0 and math.isfinite(samples_per_s)):
            raise ValueError(f"ideal samples/s must be a positive number, got {samples_per_s!r}")
        self.ideal_samples_per_s = samples_per_s
        self._publish("status", self.status())

    def update_worker(self, rank: int, **fields) -> None:
        """Merge ``fields`` (any of :data:`WORKER_FIELDS`) into worker ``rank``'s row and push the table."""
        unknown = set(fields) - set(WORKER_FIELDS)
        if unknown:
            raise ValueError(f"unknown worker field(s) {sorted(unknown)}; known: {', '.join(WORKER_FIELDS)}")
        if "status" in fields and fields["status"] not in WORKER_STATUSES:
            raise ValueError(f"worker status must be one of {WORKER_STATUSES}, got {fields['status']!r}")
        self._row(int(rank)).update(sanitize_record(fields))
        self._workers_changed()

    def add_step(self, rec: dict) -> None:
        """One finished step (the ``steps.jsonl`` record). Also refreshes each worker's batch, share and
        samples/s: a worker's samples/s is its contribution ``batch / step_s``, so they sum to the total."""
        rec = sanitize_record(rec)
        step_s = rec.get("step_s") or 0.0
        samples = rec.get("samples") or 0
        workers = rec.get("workers") or {}
        self._steps.append(rec)
        self._n_steps += 1
        self._samples += samples
        self._step_s += step_s
        if self._first_step_t is None:
            self._first_step_t = time.time() - step_s
        if rec.get("applied") is False:
            self._skipped += 1
        compute = [w.get("compute_s") or 0.0 for w in workers.values()]
        self._slowest_compute_s += max(compute, default=0.0)
        for rank, w in workers.items():
            self._bytes_out += w.get("bytes_out") or 0
            self._bytes_in += w.get("bytes_in") or 0
            row = self._row(int(rank))
            batch = w.get("batch") or 0
            row["batch"] = batch
            row["share"] = batch / samples if samples else None
            row["samples_per_s"] = batch / step_s if step_s > 0 else None
            if row.get("status") not in ("lost", "suspended"):
                row["status"] = "training"
        self._publish("step", rec)
        if workers:
            self._workers_changed()

    def add_epoch(self, rec: dict) -> None:
        """One evaluated epoch (the ``epochs.jsonl`` record)."""
        rec = sanitize_record(rec)
        self._epochs.append(rec)
        self._publish("epoch", rec)

    def add_event(self, rec: dict) -> None:
        """One event (the ``events.jsonl`` record). Joins, losses, suspensions, resumptions and role changes
        (``worker_role``: standby or back in the steps) update the table."""
        rec = sanitize_record(rec)
        rec["seq"] = self._event_seq
        self._event_seq += 1
        self._events.append(rec)
        self._publish("event", rec)
        kind, rank = rec.get("event"), rec.get("rank")
        if kind in ("worker_joined", "worker_lost", "worker_suspended", "worker_resumed") and isinstance(rank, int):
            row = self._row(rank)
            if kind == "worker_joined":
                row.update(status="joined", host=rec.get("host", row["host"]), device=rec.get("device", row["device"]))
            elif kind == "worker_resumed":
                row.update(status="training")
            else:
                status = "lost" if kind == "worker_lost" else "suspended"
                row.update(status=status, batch=0, share=0.0, samples_per_s=0.0)
            self._workers_changed()
        if kind == "worker_role" and isinstance(rank, int):
            row = self._row(rank)
            if rec.get("role") == "standby":
                row.update(status="standby", batch=0, share=0.0, samples_per_s=0.0)
            elif row.get("status") == "standby":
                row.update(status="training")
            self._workers_changed()

    def finish(self, summary: dict) -> None:
        """The run is over; ``summary`` is what ``summary.json`` holds."""
        self.summary = sanitize_record(summary)
        self._publish("status", self.status())

    # -- reading ----------------------------------------------------------------------------------
    def workers(self) -> list[dict]:
        return [dict(self._workers[r]) for r in sorted(self._workers)]

    def steps_since(self, step: int, limit: int | None = None) -> list[dict]:
        """Step records with ``rec["step"] > step``, oldest first, at most ``limit`` of them."""
        out = []
        for rec in reversed(self._steps):  # steps only grow: walk back from the newest
            if rec.get("step", -1) <= step:
                break
            out.append(rec)
        out.reverse()
        return out[:limit] if limit is not None else out

    def epochs(self) -> list[dict]:
        return list(self._epochs)

    def events(self) -> list[dict]:
        return list(self._events)

    def status(self) -> dict:
        """Everything but the series: job, state, progress, totals, the worker table, last records."""
        last = self._steps[-1] if self._steps else None
        recent = [self._steps[-i] for i in range(1, min(RECENT_STEPS, len(self._steps)) + 1)]
        r_samples = sum(r.get("samples") or 0 for r in recent)
        r_time = sum(r.get("step_s") or 0.0 for r in recent)
        recent_sps = r_samples / r_time if r_time > 0 else None
        total_steps = self.job.get("total_steps")
        done = last["step"] + 1 if last else 0
        eta = None
        if total_steps and recent and r_time > 0:
            eta = max(0, total_steps - done) * r_time / len(recent)
        ideal = self.ideal_samples_per_s
        state = "finished" if self.summary is not None else ("training" if last else "waiting")
        return {
            "state": state,
            "job": self.job,
            "started": self.started,
            "now": time.time(),
            "progress": {
                "step": done,
                "total_steps": total_steps,
                "fraction": min(1.0, done / total_steps) if total_steps else None,
                "epoch": last.get("epoch") if last else None,
                "epochs": self.job.get("epochs"),
                "elapsed_s": time.time() - self._first_step_t if self._first_step_t else 0.0,
                "eta_s": 0.0 if state == "finished" else eta,
            },
            "totals": {
                "steps": self._n_steps,
                "samples": self._samples,
                "samples_per_s": recent_sps,
                "mean_samples_per_s": self._samples / self._step_s if self._step_s > 0 else None,
                "ideal_samples_per_s": ideal,
                "efficiency": recent_sps / ideal if ideal and recent_sps else None,
                "communication_overhead": 1 - self._slowest_compute_s / self._step_s if self._step_s > 0 else None,
                "bytes_out": self._bytes_out,
                "bytes_in": self._bytes_in,
                "skipped_steps": self._skipped,
                "loss": last.get("loss") if last else None,
            },
            "workers": self.workers(),
            "last_step": last,
            "last_epoch": self._epochs[-1] if self._epochs else None,
            "summary": self.summary,
        }

    # -- live clients -------------------------------------------------------------------------------
    def subscribe(self) -> Subscription:
        """A new bounded queue of ``(kind, payload)`` messages; pass it to :meth:`unsubscribe` when done."""
        q = Subscription(self.queue_size)
        self._subs.add(q)
        return q

    def unsubscribe(self, q: Subscription) -> None:
        self._subs.discard(q)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def close(self) -> None:
        """Tell every subscriber the hub is going away (the dashboard's streams then end)."""
        self._publish("close", None)

    # -- internals ----------------------------------------------------------------------------------
    def _row(self, rank: int) -> dict:
        row = self._workers.get(rank)
        if row is None:
            row = dict.fromkeys(WORKER_FIELDS)
            row.update(rank=rank, status="joined")
            self._workers[rank] = row
        return row

    def _workers_changed(self) -> None:
        # The master may update several rows in a row (a step, then each worker's utilisation): send the
        # table once, after the current callback, rather than once per call.
        if not self._subs or self._workers_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script feeding the hub): send now
            self._publish("workers", self.workers())
            return
        self._workers_pending = True
        loop.call_soon(self._flush_workers)

    def _flush_workers(self) -> None:
        self._workers_pending = False
        self._publish("workers", self.workers())

    def _publish(self, kind: str, payload) -> None:
        for q in self._subs:
            q.offer((kind, payload))
