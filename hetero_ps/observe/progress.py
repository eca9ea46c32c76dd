"""Training progress for people and for log files: a live bar on a terminal, plain or JSON lines elsewhere.

``Progress`` picks its output once:

* ``fmt="plain"`` and the stream is a terminal (and ``TERM`` is not ``dumb``): a tqdm bar showing
  step/total, rate, ETA and a postfix with epoch, loss, samples/s and batch size;
* ``fmt="plain"`` otherwise (a pipe, a file, ``nohup``): one ordinary line every ``interval_s``
  seconds, on the first step and on the last — never a carriage return, so log files stay readable::

      12:04:31 master progress step 120/1000 (12.0 %) epoch 1/3 loss 0.4321 1234 samples/s batch 128 ETA 0:12:34

* ``fmt="json"`` (``--log-format json``): the same, as one JSON object per line, whatever the stream.

The ETA is the remaining steps divided by the step rate over the last ``ETA_WINDOW`` updates, so it
follows the current speed (a rebalance, a lost worker) rather than the whole run's average.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import deque

from hetero_ps.errors import ConfigError

FORMATS = ("plain", "json")
ETA_WINDOW = 50  # updates behind the step rate used for the ETA
DEFAULT_INTERVAL_S = 10.0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def format_eta(seconds: float | None) -> str:
    """``3725`` → ``"1:02:05"``; None → ``"?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Reports training progress for ``role`` (``master``, ``worker-1``, ...).

    ``total_steps`` may be None or 0 where it is unknown (a worker before the job says): then there is
    no percentage and no ETA. ``epochs`` (optional) is the number of epochs, for "epoch 2/3".
    ``interval_s`` is the time between plain/JSON lines (env ``HETERO_PS_PROGRESS_INTERVAL``, default
    10 s); 0 writes a line on every update. ``clock`` (seconds, monotonic) is replaceable for tests.
    """

    def __init__(
        self,
        total_steps: int | None,
        role: str,
        fmt: str = "plain",
        stream=None,
        interval_s: float | None = None,
        epochs: int | None = None,
        clock=time.monotonic,
    ):
        if fmt not in FORMATS:
            raise ValueError(f"progress format must be one of {FORMATS}, got {fmt!r}")
        if interval_s is None:
            raw = os.environ.get("HETERO_PS_PROGRESS_INTERVAL", "")
            try:
                interval_s = float(raw) if raw.strip() else DEFAULT_INTERVAL_S
            except ValueError:
                raise ConfigError(f"HETERO_PS_PROGRESS_INTERVAL={raw!r} is not a number of seconds") from None
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.total = total_steps or None
        self.role, self.fmt, self.epochs = role, fmt, epochs
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self._window: deque[tuple[float, int]] = deque(maxlen=ETA_WINDOW)
        self._last_emit: float | None = None
        self._last: dict | None = None  # the latest update
        self._emitted: dict | None = None  # the latest update written as a line
        self._bar = None
        if fmt == "plain" and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=role,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0.5,
                smoothing=0.1,
                leave=True,
            )

    @property
    def uses_bar(self) -> bool:
        return self._bar is not None

    def update(self, step: int, epoch: int, loss: float | None, samples_per_s: float | None, batch: int | None) -> None:
        """Step ``step`` (0-based, as in the step records) of epoch ``epoch`` (0-based) has finished."""
        now = self.clock()
        done = step + 1
        self._window.append((now, done))
        rec = {
            "step": done,
            "total_steps": self.total,
            "epoch": epoch,
            "loss": _finite(loss),
            "samples_per_s": _finite(samples_per_s),
            "batch": batch,
            "eta_s": self.eta_s(),
            "elapsed_s": now - self.started,
        }
        self._last = rec
        if self._bar is not None:
            self._bar.update(max(0, done - self._bar.n))
            self._bar.set_postfix_str(self._postfix(rec), refresh=False)
            return
        final = self.total is not None and done >= self.total
        if self._last_emit is None or final or now - self._last_emit >= self.interval_s:
            self._emit(rec)

    def eta_s(self) -> float | None:
        """Seconds left at the recent step rate, or None if unknown."""
        if self.total is None or len(self._window) < 2:
            return None
        (t0, s0), (t1, s1) = self._window[0], self._window[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return max(0, self.total - s1) * (t1 - t0) / (s1 - s0)

    def close(self) -> None:
        """Finish: the bar is closed; in line mode the latest state is written if it was not yet."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last is not None and self._last is not self._emitted:
            self._emit(self._last)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def redirect_logging(self):
        """A context manager that routes console logging through the bar (so log lines do not tear it);
        a no-op without a bar. Meant for the CLI, which owns logging."""
        if self._bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    # -- output -------------------------------------------------------------------------------
    def _epoch_text(self, epoch: int) -> str:
        return f"epoch {epoch + 1}/{self.epochs}" if self.epochs else f"epoch {epoch + 1}"

    def _postfix(self, r: dict) -> str:
        parts = [self._epoch_text(r["epoch"])]
        if r["loss"] is not None:
            parts.append(f"loss {r['loss']:.4f}")
        if r["samples_per_s"] is not None:
            parts.append(f"{r['samples_per_s']:.0f} samples/s")
        if r["batch"] is not None:
            parts.append(f"batch {r['batch']}")
        return " ".join(parts)

    def _emit(self, r: dict) -> None:
        self._last_emit = self.clock()
        self._emitted = r
        if self.fmt == "json":
            line = json.dumps(
                {"t": round(time.time(), 3), "role": self.role, "event": "progress", **r}, allow_nan=False
            )
        else:
            head = (
                f"step {r['step']}/{self.total} ({100 * r['step'] / self.total:.1f} %)"
                if self.total
                else f"step {r['step']}"
            )
            eta = f" ETA {format_eta(r['eta_s'])}" if self.total else ""
            line = f"{time.strftime('%H:%M:%S')} {self.role} progress {head} {self._postfix(r)}{eta}"
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except ValueError:  # the stream was closed under us (interpreter shutdown): nothing to say
            pass
