"""One training run on disk: ``experiments/NAME/{config.json, summary.json, model.pt, logs/, metrics/}``.

Layout::

    experiments/NAME/
        config.json            the job and how the master was started (write_config)
        summary.json           the outcome (write_summary)
        model.pt               final weights (save_checkpoint)
        logs/server.log        the master's log (log_path("server"))
        logs/worker-R-HOST.log each worker's log (log_path("worker", R, HOST)), written by that node
        metrics/steps.jsonl    one JSON object per optimizer step
        metrics/epochs.jsonl   one per evaluation (eval loss / accuracy)
        metrics/events.jsonl   scheduler decisions, joins, losses, skipped steps ...

The metrics files are opened line-buffered and every record is one ``write`` of one line, so a crash
loses at most the record being written and every complete line parses on its own.
Non-finite floats (a NaN loss) are written as ``null`` so every line is strict JSON.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import torch

from hetero_ps.errors import ConfigError
from hetero_ps.observe.jsonsafe import sanitize

METRIC_STREAMS = ("steps", "epochs", "events")


def _slug(s: str) -> str:
    """A file-name-safe version of a model/data set name (``pkg.mod:fn`` → ``pkg.mod-fn``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.") or "x"


def _dump(obj) -> str:
    return json.dumps(sanitize(obj), allow_nan=False, separators=(",", ":"))


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(sanitize(obj), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers never see half a file


class MetricsWriter:
    """Appends JSON lines to ``metrics/{steps,epochs,events}.jsonl``; safe to call from threads."""

    def __init__(self, metrics_dir: str):
        os.makedirs(metrics_dir, exist_ok=True)
        self.dir = metrics_dir
        self._lock = threading.Lock()
        # buffering=1: line-buffered text files, each record reaches the OS when its newline does.
        self._files = {
            s: open(os.path.join(metrics_dir, f"{s}.jsonl"), "a", buffering=1, encoding="utf-8") for s in METRIC_STREAMS
        }

    def path(self, stream: str) -> str:
        return os.path.join(self.dir, f"{stream}.jsonl")

    def write(self, stream: str, record: dict) -> None:
        """Append ``record`` (a dict) as one line of ``stream`` (steps | epochs | events)."""
        if stream not in self._files:
            raise ValueError(f"unknown metrics stream {stream!r}; expected one of {METRIC_STREAMS}")
        line = _dump(record) + "\n"
        with self._lock:
            f = self._files[stream]
            if f.closed:
                raise ValueError(f"metrics writer for {self.dir} is closed")
            f.write(line)
            f.flush()

    def log_step(self, record: dict) -> None:
        """Per step: step, epoch, loss, lr, per-worker batch and times, bytes, samples/s."""
        self.write("steps", record)

    def log_epoch(self, record: dict) -> None:
        """Per evaluation: epoch, eval_loss, eval_accuracy, ..."""
        self.write("epochs", record)

    def log_event(self, record: dict) -> None:
        """Anything else worth a line (scheduler decisions with reasons, joins, losses). Adds ``t``."""
        self.write("events", record if "t" in record else {"t": time.time(), **record})

    def positions(self, durable: bool = False) -> dict[str, int]:
        """How many bytes each stream holds now (every record written so far is in them).

        ``durable``: fsync them first, so the lengths a checkpoint records survive an OS crash too."""
        with self._lock:
            if durable:
                for f in self._files.values():
                    f.flush()
                    os.fsync(f.fileno())
            return {s: f.tell() for s, f in self._files.items()}

    def check_positions(self, positions: dict[str, int]) -> None:
        """Raise ``ValueError`` naming the stream that is shorter than ``positions`` says (lost lines)."""
        with self._lock:
            for s, f in self._files.items():
                f.flush()
                size = os.fstat(f.fileno()).st_size
                if s in positions and size < positions[s]:
                    raise ValueError(f"{self.path(s)} holds {size} bytes, the checkpoint recorded {positions[s]}")

    def rewind(self, positions: dict[str, int]) -> None:
        """Cut each stream back to ``positions`` (what a checkpoint recorded): later lines are redone."""
        with self._lock:
            for s, f in self._files.items():
                if s in positions and f.tell() > positions[s]:
                    f.flush()
                    f.truncate(positions[s])
                    f.seek(positions[s])

    def keep(self, stream: str, wanted) -> None:
        """Rewrite ``stream`` with only the records for which ``wanted(record)`` is true.

        Through a temporary file and a rename, so a crash leaves either the old file or the new one."""
        with self._lock:
            f = self._files[stream]
            f.flush()
            path = self.path(stream)
            with open(path, encoding="utf-8") as src:
                lines = [line for line in src if line.strip() and wanted(json.loads(line))]
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as out:
                out.writelines(lines)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            f.close()
            self._files[stream] = open(path, "a", buffering=1, encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                if not f.closed:
                    f.close()


class Experiment:
    """The directory of one run. ``name=None`` → ``YYYYmmdd-HHMMSS-<model>-<dataset>``.

    A name that already holds a run (it has a ``config.json``) is never reused: ``-2``, ``-3``, ...
    is appended, so a rerun never mixes its metrics into an old run's files. ``self.name`` and
    ``self.path`` are the ones actually used.
    """

    def __init__(self, root: str = "experiments", name: str | None = None, job=None, reuse: bool = False):
        """``reuse``: open the existing run ``name`` as it is (to resume it) instead of a new folder."""
        self.root = root
        if name is None:
            model = _slug(getattr(job, "model", "model"))
            dataset = _slug(getattr(job, "dataset", "data"))
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{dataset}"
        elif not name or name in (".", "..") or _slug(name) != name:
            raise ConfigError(f"experiment name {name!r} may only use letters, digits, '.', '_' and '-'")
        base, n = name, 1
        while not reuse and os.path.exists(os.path.join(root, name, "config.json")):
            n += 1
            name = f"{base}-{n}"
        self.name = name
        self.path = os.path.join(root, name)
        self.logs_dir = os.path.join(self.path, "logs")
        self.metrics_dir = os.path.join(self.path, "metrics")
        os.makedirs(self.logs_dir, exist_ok=True)
        self.metrics = MetricsWriter(self.metrics_dir)
        self.job = job

    def log_path(self, role: str, rank: int | None = None, host: str | None = None) -> str:
        """``logs/server.log`` for the master, ``logs/worker-<rank>-<host>.log`` for a worker."""
        if role in ("server", "master"):
            return os.path.join(self.logs_dir, "server.log")
        if role == "worker":
            if rank is None or host is None:
                raise ValueError("a worker's log path needs its rank and host")
            return os.path.join(self.logs_dir, f"worker-{int(rank)}-{_slug(host)}.log")
        raise ValueError(f"role must be 'server' or 'worker', got {role!r}")

    def write_config(self, config: dict) -> str:
        path = os.path.join(self.path, "config.json")
        _write_json_atomic(path, config)
        return path

    def write_summary(self, summary: dict) -> str:
        path = os.path.join(self.path, "summary.json")
        _write_json_atomic(path, summary)
        return path

    def save_checkpoint(self, model_state: dict, job=None, path: str = "model.pt", **extra) -> str:
        """Save ``{"model": state_dict, "job": job dict, ...extra}`` to ``path`` (relative to the run).

        Loads with plain ``torch.load(path, weights_only=True)``; then
        ``model.load_state_dict(ckpt["model"])``. ``extra`` values must be plain Python/tensors too.
        """
        full = path if os.path.isabs(path) else os.path.join(self.path, path)
        job = job if job is not None else self.job
        ckpt = {"model": dict(model_state), "format": 1}
        if job is not None:
            ckpt["job"] = job.to_wire() if hasattr(job, "to_wire") else dict(job)
        ckpt.update(extra)
        tmp = f"{full}.tmp{os.getpid()}"
        torch.save(ckpt, tmp)
        os.replace(tmp, full)
        return full

    def close(self) -> None:
        self.metrics.close()

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
