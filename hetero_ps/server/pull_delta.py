"""Pulls that shrink: a worker is sent the change since what it holds, compressed, with error feedback.

With a delta codec (``--pull-compression int8[:BLOCK]`` or ``topk[:RATIO]``) the master keeps, for
each worker, a *replica*: the parameters that worker holds, bit for bit, because both sides add the
same decoded frames with the same kernel. A pull sends ``encode(params − replica)`` and adds its
decoding to the replica. What the codec dropped (int8's rounding, the entries top-k left out) stays
in ``params − replica`` and goes out with a later pull: error feedback, with no residual kept apart.

The replica's *error* after a pull is ``‖params − replica‖₂ / ‖params‖₂``. A full float32 resync
replaces the replica at the worker's first pull, every ``resync_every`` pulls, and at the next pull
after the error passed ``bound``; the master logs each one (``pull_resync`` event) with its reason.

Why per worker and not one stream for all: workers join, are suspended and come back at different
versions; a replica per worker makes each one's delta right whatever it missed, for one model-sized
buffer per worker on the master. The 16-bit codecs (``fp16``/``bf16``) stay full-parameter pulls,
encoded once per version for everyone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hetero_ps.wire import codecs, protocol
from hetero_ps.wire.messages import params_from_codec
from hetero_ps.wire.protocol import MsgType

DELTA_CODECS = (codecs.CodecId.INT8, codecs.CodecId.TOPK)


def is_delta_codec(spec: str) -> bool:
    """Whether ``--pull-compression spec`` sends parameter changes (else the parameters themselves)."""
    return codecs.parse_codec(spec).id in DELTA_CODECS


class ReplicaPull:
    """One worker's pulls: its replica, the codecs that encode its deltas, and when to resync it."""

    def __init__(self, spec: str, chunks: list[tuple[int, int]], bound: float, resync_every: int):
        self.spec, self.chunks = spec, chunks
        self.bound, self.resync_every = bound, resync_every
        self.codecs = [codecs.make_codec(spec, n) for _, n in chunks]
        self.replica: np.ndarray | None = None  # what the worker holds (None: nothing known yet)
        self.pulls = 0  # delta pulls since the last resync
        self.error = 0.0  # the replica's relative distance to the master's parameters after the last pull
        self._delta: np.ndarray | None = None

    def use_codec(self, spec: str) -> None:
        """Encode the next deltas with ``spec`` (``--pull-compression auto`` moved this worker); the
        replica stays: it is what the worker holds, whichever codec brought it there."""
        if spec != self.spec:
            self.spec = spec
            self.codecs = [codecs.make_codec(spec, n) for _, n in self.chunks]

    def assume(self, params: np.ndarray) -> None:
        """The worker holds exactly ``params`` (its last pull was uncompressed): start its replica
        from them instead of a full resync at its first delta pull."""
        self.replica = np.array(params, dtype=np.float32, copy=True)
        if self._delta is None:
            self._delta = np.empty_like(self.replica)
        self.pulls, self.error = 0, 0.0

    def forget(self) -> None:
        """The worker may not have received all of the last frames: resync it next time."""
        self.replica = None

    def resync_reason(self) -> str:
        """Why the next pull must be a full resync ('' when a delta will do)."""
        if self.replica is None:
            return "first pull"
        if self.resync_every and self.pulls >= self.resync_every:
            return f"every {self.resync_every} pulls"
        if not self.error <= self.bound:  # NaN too
            return f"error {self.error:.3g} past the bound {self.bound:g}"
        return ""

    def frames(self, params: np.ndarray, version: int, base: int) -> tuple[list[Any], str]:
        """The PARAMS frames that bring the worker from ``base`` to ``params`` (version ``version``),
        and the reason when they are a full resync ('' for a delta). Valid until the next call."""
        why = self.resync_reason()
        if why:
            return self._resync(params, version), why
        replica, delta = self.replica, self._delta
        assert replica is not None and delta is not None
        np.subtract(params, replica, out=delta)
        out = []
        for i, (off, n) in enumerate(self.chunks):
            codec = self.codecs[i]
            codec.reset()  # top-k's own residual stays empty: params − replica is the residual
            fields, segments = codec.encode(delta[off : off + n])
            header = params_from_codec(
                fields, version=version, chunk=i, offset=off, numel=n, codec=self.spec, delta=True, base=base
            )
            codec.decode_accumulate(replica[off : off + n], header.codec_header(), segments, 1.0)
            out.append(protocol.encode_frame(MsgType.PARAMS, header.to_header(), segments))
        np.subtract(params, replica, out=delta)
        scale = float(np.linalg.norm(params))
        self.error = float(np.linalg.norm(delta)) / scale if scale > 0 else float(np.linalg.norm(delta))
        if not math.isfinite(self.error):
            self.error = math.inf
        self.pulls += 1
        return out, ""

    def _resync(self, params: np.ndarray, version: int) -> list[Any]:
        """Full float32 parameters; the frames point into the new replica (a copy, which the master's
        next updates do not touch), so they stay valid while they are sent."""
        self.assume(params)
        replica = self.replica
        assert replica is not None
        out = []
        for i, (off, n) in enumerate(self.chunks):
            segment = replica[off : off + n].data.cast("B")
            fields = {"codec_id": int(codecs.CodecId.NONE), "numel": n}
            header = params_from_codec(fields, version=version, chunk=i, offset=off, numel=n, codec="none")
            out.append(protocol.encode_frame(MsgType.PARAMS, header.to_header(), [segment]))
        return out
