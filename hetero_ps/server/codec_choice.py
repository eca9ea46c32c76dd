"""``--compression auto`` / ``--pull-compression auto``: each worker's codecs, from its link.

The master measures each worker's link where it can see it: the arrival of the worker's pushed
chunks. The chunks a worker pushes after its backward pass leave back to back, so once the first
one is in, the others arrive at the link's pace (chunks marked ``early``, pushed while backward still
ran, came at backward's pace and are not counted): ``bytes after the first / (last arrival − first arrival)`` is a
sample of the link's rate. It is used only when it says something about the link: at least
``MIN_SPAN_BYTES`` after the first chunk, and a span longer than ``LINK_BOUND`` × the worker's
own encode time (else the worker's encoder, not the link, set the pace, as with top-k on loopback).
The estimate is the median of the latest ``RECENT`` samples, acted on from the third one, so one
odd span (a hiccup on a fast link, a burst) is outvoted; a link is taken to carry the same rate
both ways. A worker on top-k over a fast link would push too little to be measured again, which is
why a bad first estimate must not send it there.

The codecs form a ladder, from least to most compressed, the same for pushes and pulls (a pull of
int8 or top-k is a delta against the worker's replica, ``pull_delta.py``)::

    none (4 B/value) → fp16 (2) → int8 (~1) → topk:0.01 (~0.08)

An adaptive optimizer (adam, adamw) stops at int8 (``ladder_for``): top-k's error feedback promises
that what it holds back arrives later, summed, which SGD's linear update honours but Adam's
per-coordinate normalisation does not (a held-back coordinate arrives as a burst its second moment
never saw; 1-bit Adam, Tang et al. 2021, freezes the variance for the same reason). Measured on
gpt2 tiny after 3 epochs: perplexity 130 with top-k 1 % both ways against 36 uncompressed and 36
with int8 (``benchmarks/RESULTS_links.md``).

With a rate ``R`` the transfer time at a level is ``T = (push bytes + pull bytes) / R`` (the bytes
from the codecs' own size bounds; a direction that is not ``auto`` keeps its codec). After each
step, with ``C`` that step's compute time (the slowest worker's in BSP, the barrier everyone waits
for), a worker moves to the least compressed level with ``T ≤ COMM_SHARE · C`` (the most
compressed when none fits). It moves back toward less compression only when that level would fit
in ``RELAX_SHARE · C``: the two thresholds keep a worker near a boundary from switching every step.
Every worker starts uncompressed: its first pushes measure its link.

A slow link gets top-k both ways; loopback and a fast LAN keep exact or 16-bit transfers. A switch
also moves the worker's measured step times in the scheduler from the push and pull it measured to
the new codecs' predicted transfer (``Scheduler.shift_fixed``), so the next batch split already
counts the new codec. Each
switch is logged with its inputs (``codec_choice`` event); the worker learns its push codec from
the next SCHEDULE and reads each pull's codec from its PARAMS frames.
"""

from __future__ import annotations

import collections
import statistics
import time

from hetero_ps.wire import codecs

LADDER = ("none", "fp16", "int8", "topk:0.01")
ADAPTIVE_OPTIMIZERS = ("adam", "adamw")  # their ladder stops at int8 (see above)
COMM_SHARE = 0.5  # transfer may take up to this share of the step's compute...
RELAX_SHARE = 0.2  # ...and a less compressed level is taken back only if it fits in this share
MIN_SPAN_BYTES = 64 << 10  # a push span's bytes after its first chunk, to count as a rate sample
LINK_BOUND = 1.5  # the span must be this many times the worker's encode time
RECENT = 5  # the rate is the median of this many latest samples: one odd span moves nothing...
MIN_SAMPLES = 3  # ...and the first decision waits for three, so one hiccup on a fast link is outvoted
# (a --sync local round pushes the whole change once per H steps: its first push decides, or a slow
# link would send two more rounds' changes uncompressed)


is_auto = codecs.is_auto


def ladder_for(optimizer: str | None) -> tuple[str, ...]:
    """The levels ``auto`` may choose from for the job's (resolved) optimizer."""
    return LADDER[: LADDER.index("int8") + 1] if optimizer in ADAPTIVE_OPTIMIZERS else LADDER


class LinkChoice:
    """One worker's link rate estimate and the codecs chosen for it."""

    def __init__(
        self,
        push: str,
        pull: str,
        chunks: list[tuple[int, int]],
        ladder: tuple[str, ...] = LADDER,
        min_samples: int = MIN_SAMPLES,
    ):
        self.push_auto, self.pull_auto = is_auto(push), is_auto(pull)
        self.min_samples = min_samples  # rate samples before the first decision
        self.chunks = chunks
        self.ladder = ladder  # ladder_for(the job's optimizer)
        self.level = 0
        self.fixed_push, self.fixed_pull = push, pull
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)  # rate samples, bytes/s
        self._span: tuple[int, int, float, float, int, int] | None = None  # step, attempt, t0, t1, bytes, chunks

    @property
    def auto(self) -> bool:
        return self.push_auto or self.pull_auto

    @property
    def push(self) -> str:
        return self.ladder[self.level] if self.push_auto else self.fixed_push

    @property
    def pull(self) -> str:
        return self.ladder[self.level] if self.pull_auto else self.fixed_pull

    # -- measuring ----------------------------------------------------------------------------------
    def on_push(self, step: int, attempt: int, nbytes: int, now: float | None = None, early: bool = False) -> None:
        """A pushed chunk of ``nbytes`` arrived (``now``: time.perf_counter()); ``early``: sent during backward."""
        if early:
            return
        now = time.perf_counter() if now is None else now
        s = self._span
        if s is None or (s[0], s[1]) != (step, attempt):
            self._span = (step, attempt, now, now, 0, 1)
        else:
            self._span = (step, attempt, s[2], now, s[4] + nbytes, s[5] + 1)

    def on_report(self, step: int, attempt: int, encode_s: float) -> float | None:
        """The worker's report for that push: take its span as a rate sample if the link set its pace."""
        s, self._span = self._span, None
        if s is None or (s[0], s[1]) != (step, attempt) or s[5] < 2:
            return None
        span, nbytes = s[3] - s[2], s[4]
        encode_after_first = encode_s * (s[5] - 1) / s[5]
        if nbytes < MIN_SPAN_BYTES or span <= 0 or span < LINK_BOUND * encode_after_first:
            return None
        sample = nbytes / span
        self.recent.append(sample)
        return sample

    @property
    def rate(self) -> float | None:
        """The link's rate in bytes/s: the median of the recent samples (None before the first)."""
        return statistics.median(self.recent) if self.recent else None

    # -- deciding -----------------------------------------------------------------------------------
    def transfer_s(self, level: int) -> float:
        """Predicted seconds of push + pull per step at ``level`` (needs a rate)."""
        rate = self.rate
        assert rate, "measured first"
        push = self.ladder[level] if self.push_auto else self.fixed_push
        pull = self.ladder[level] if self.pull_auto else self.fixed_pull
        return (_wire_bytes(push, self.chunks) + _wire_bytes(pull, self.chunks)) / rate

    def decide(self, compute_s: float) -> str:
        """Re-choose the level for a step of ``compute_s`` seconds of compute; the reason if it moved ('' if not)."""
        if not self.auto or len(self.recent) < self.min_samples or not compute_s > 0:
            return ""
        levels = range(len(self.ladder))
        fits = [lv for lv in levels if self.transfer_s(lv) <= COMM_SHARE * compute_s]
        target = fits[0] if fits else levels[-1]
        if target < self.level:  # less compression: only with room to spare
            relaxed = [lv for lv in levels if self.transfer_s(lv) <= RELAX_SHARE * compute_s]
            target = relaxed[0] if relaxed and relaxed[0] < self.level else self.level
        if target == self.level:
            return ""
        before, now = self.transfer_s(self.level), self.transfer_s(target)
        why = (
            f"more compression; budget {COMM_SHARE:g} × compute"
            if target > self.level
            else f"less compression: it fits {RELAX_SHARE:g} × compute"
        )
        self.level = target
        return (
            f"link {8 * (self.rate or 0.0) / 1e6:.0f} Mbit/s: {before:.3g} s of transfer per step before, "
            f"{now:.3g} s now, against {compute_s:.3g} s of compute ({why})"
        )


_BYTES: dict[tuple[str, tuple[tuple[int, int], ...]], int] = {}


def _wire_bytes(spec: str, chunks: list[tuple[int, int]]) -> int:
    """The most bytes one push or pull of ``spec`` puts on the wire for these chunks."""
    key = (spec, tuple(chunks))
    if key not in _BYTES:
        _BYTES[key] = sum(codecs.make_codec(spec, n).max_encoded_bytes() for _, n in chunks)
    return _BYTES[key]
