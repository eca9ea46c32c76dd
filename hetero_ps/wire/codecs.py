"""Gradient and parameter codecs, registered by their wire enum (``CodecId``).

A codec instance serves one chunk of ``numel`` float32 values for the life of a job and owns its
buffers, allocated on first use and reused (no allocation on the hot path except top-k's k-sized
outputs):

* ``encode(src) -> (fields, segments)`` — ``fields`` go into the frame's msgpack header (always
  ``codec_id`` and ``numel``, plus the codec's parameters), ``segments`` are raw byte buffers
  (``memoryview``, format ``B``) sent as the frame's payloads. They stay valid until the next
  ``encode`` on this instance; ``none`` sends ``src`` itself, so do not modify ``src`` before the
  frame is written.
* ``decode_accumulate(acc, header, segments, weight)`` — ``acc += weight · decode(segments)`` in one
  fused kernel call (the server's aggregation: weight = b_i / B).
* ``decode_into(out, header, segments)`` — ``out = decode(segments)`` (a worker's pull).

Everything read from the peer — ``codec_id``, ``numel``, ``k``, ``block``, ``rank``, ``rows``,
``cols``, the number and byte sizes of the segments, top-k indices — is checked *before*
``acc``/``out`` is touched; a mismatch raises ``RemoteProtocolError`` and leaves them unchanged.
Values are not checked: a NaN gradient stays a NaN, so the aggregate is non-finite and the server
skips the step (the worker reports it too).

Codecs (``parse_codec`` syntax → wire bytes per element):

=================  ======  ==================================================================
``none``           4       float32 as is
``fp16``           2       IEEE half (round to nearest even); |x| > 65504 becomes ±inf
``bf16``           2       bfloat16 (round to nearest even): float32's range, 8 bits of mantissa
``int8[:BLOCK]``   ~1      blockwise absmax: q = rint(x · (127 / max|x|)) per BLOCK (256) values,
                           sent with s = max|x| / 127, so |x − s·q| ≤ s / 2 (+ rounding) per element
``topk[:RATIO]``   8·RATIO the k = ceil(RATIO · numel) largest |x + residual| (RATIO 0.01 default)
                           as int32 indices (ascending) + float32 values; what is not sent stays
                           in the worker's residual (error feedback) and is added next step, so
                           Σ_steps sent + residual = Σ_steps gradients exactly
``powersgd[:R]``   ~8R/√n  PowerSGD (rank R, default 4): the chunk as a ~√n × √n matrix M (plus
                           the residual), sent as float32 factors P (rows × R, orthonormal) and
                           Q (cols × R) with P Qᵀ = P Pᵀ M, one warm-started power iteration per
                           step; M − P Qᵀ stays in the worker's residual (error feedback). A 1 M
                           value chunk at R = 4 is 32 KiB instead of 4 MiB (128×). Push only
=================  ======  ==================================================================

Only ``hetero_ps.kernels`` does the arithmetic (C++ or its numpy twin).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from hetero_ps import kernels
from hetero_ps.errors import ConfigError, RemoteProtocolError
from hetero_ps.kernels import lowrank

MAX_INT8_BLOCK = 1 << 16
MAX_POWERSGD_RANK = 1024  # past ~√numel / 2 the factors outgrow a float32 chunk anyway


class CodecId(IntEnum):
    """Codec numbers on the wire (``codec_id`` header field). Never renumber."""

    NONE = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3
    TOPK = 4
    POWERSGD = 5


NAMES = {
    "none": CodecId.NONE,
    "fp16": CodecId.FP16,
    "bf16": CodecId.BF16,
    "int8": CodecId.INT8,
    "topk": CodecId.TOPK,
    "powersgd": CodecId.POWERSGD,
}


@dataclass(frozen=True)
class CodecSpec:
    """A parsed ``--compression`` value."""

    id: CodecId
    ratio: float = 0.0  # topk: fraction of the entries sent per chunk
    block: int = 0  # int8: values per scale
    rank: int = 0  # powersgd: rank of the factors (at most; a small chunk may use less)

    def __str__(self) -> str:
        if self.id == CodecId.TOPK:
            return f"topk:{self.ratio:g}"
        if self.id == CodecId.POWERSGD:
            return f"powersgd:{self.rank}"
        if self.id == CodecId.INT8 and self.block != 256:
            return f"int8:{self.block}"
        return self.id.name.lower()


def parse_codec(spec: str) -> CodecSpec:
    """``"none" | "fp16" | "bf16" | "int8[:BLOCK]" | "topk[:RATIO]" | "powersgd[:RANK]"`` → ``CodecSpec``;
    ConfigError otherwise."""
    if isinstance(spec, CodecSpec):
        return spec
    choices = "none, fp16, bf16, int8[:BLOCK], topk[:RATIO] (e.g. topk:0.01) or powersgd[:RANK] (e.g. powersgd:4)"
    if not isinstance(spec, str):
        raise ConfigError(f"codec must be a string, one of {choices}; got {spec!r}")
    name, _, arg = spec.strip().lower().partition(":")
    if name not in NAMES:
        raise ConfigError(f"unknown codec {spec!r}; choose {choices}")
    cid = NAMES[name]
    if cid == CodecId.TOPK:
        try:
            ratio = float(arg) if arg else 0.01
        except ValueError:
            raise ConfigError(f"topk ratio must be a number in (0, 1], got {arg!r}") from None
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"topk ratio must be in (0, 1], got {ratio}")
        return CodecSpec(cid, ratio=ratio)
    if cid == CodecId.INT8:
        try:
            block = int(arg) if arg else 256
        except ValueError:
            raise ConfigError(f"int8 block must be an integer, got {arg!r}") from None
        if not 1 <= block <= MAX_INT8_BLOCK:
            raise ConfigError(f"int8 block must be in [1, {MAX_INT8_BLOCK}], got {block}")
        return CodecSpec(cid, block=block)
    if cid == CodecId.POWERSGD:
        try:
            rank = int(arg) if arg else 4
        except ValueError:
            raise ConfigError(f"powersgd rank must be an integer in [1, {MAX_POWERSGD_RANK}], got {arg!r}") from None
        if not 1 <= rank <= MAX_POWERSGD_RANK:
            raise ConfigError(f"powersgd rank must be in [1, {MAX_POWERSGD_RANK}], got {rank}")
        return CodecSpec(cid, rank=rank)
    if arg:
        raise ConfigError(f"codec {name} takes no parameter, got {spec!r}")
    return CodecSpec(cid)


# -- helpers ---------------------------------------------------------------------------------------


def _bytes(a: np.ndarray) -> memoryview:
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12, so mypy on 3.11 misses it
    return memoryview(a).cast("B")  # type: ignore[arg-type]


def _nbytes(seg) -> int:
    return memoryview(seg).nbytes


def _int_field(header: dict, key: str, lo: int, hi: int) -> int:
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RemoteProtocolError(f"codec header field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _view(seg, dtype, count: int, what: str) -> np.ndarray:
    """The segment as a 1-D array of ``count`` ``dtype`` values, or RemoteProtocolError."""
    want = count * np.dtype(dtype).itemsize
    try:
        mv = memoryview(seg)
    except TypeError:
        raise RemoteProtocolError(f"{what}: segment is not a buffer ({type(seg).__name__})") from None
    if mv.nbytes != want:
        raise RemoteProtocolError(f"{what}: expected {want} bytes ({count} × {np.dtype(dtype).name}), got {mv.nbytes}")
    if not mv.c_contiguous:
        raise RemoteProtocolError(f"{what}: segment is not contiguous")
    # Any alignment is fine: the kernels take unaligned pointers (csrc/kernels.h).
    return np.frombuffer(mv, dtype=dtype, count=count)


class Codec(ABC):
    """One chunk's encoder/decoder; see the module docstring for the contract."""

    id: ClassVar[CodecId]
    n_segments: ClassVar[int] = 1
    # Keeps what it did not send in ``self.residual`` (float32 × numel, None before the first
    # encode) and adds it to the next chunk: top-k, PowerSGD. A worker that redoes a step puts the
    # residual back as it was before the aborted attempt.
    error_feedback: ClassVar[bool] = False

    def __init__(self, numel: int, spec: CodecSpec):
        if not isinstance(numel, int) or numel <= 0:
            raise ValueError(f"a codec needs a positive chunk size, got {numel!r}")
        self.numel = numel
        self.spec = spec

    # subclasses implement these three -------------------------------------------------------------
    @abstractmethod
    def _encode(self, src: np.ndarray) -> tuple[dict, list]: ...

    @abstractmethod
    def _parse(self, header: dict, segments: list | tuple) -> tuple:
        """Validate the peer's header and segments; return the decoded-view arguments."""

    @abstractmethod
    def _accumulate(self, acc: np.ndarray, parsed: tuple, weight: float) -> None: ...

    @abstractmethod
    def _decode_into(self, out: np.ndarray, parsed: tuple) -> None: ...

    def max_encoded_bytes(self) -> int:
        """Upper bound on the payload bytes of one encoded chunk (for receive-buffer limits)."""
        return 4 * self.numel

    def reset(self) -> None:  # noqa: B027 - a hook: most codecs carry no state, so doing nothing is right
        """Forget any state carried between steps (top-k's and PowerSGD's residual)."""

    def feedback(self) -> np.ndarray | None:
        """An error-feedback codec's residual as a writable view (None before its first encode or without one)."""
        return None

    # the public API ------------------------------------------------------------------------------
    def encode(self, src: np.ndarray) -> tuple[dict, list]:
        self._check_local(src, "source")
        fields, segments = self._encode(src)
        return {"codec_id": int(self.id), "numel": self.numel, **fields}, segments

    def decode_accumulate(self, acc: np.ndarray, header: dict, segments, weight: float) -> None:
        """``acc += weight · decode(segments)``; nothing is written unless everything checks out."""
        self._check_local(acc, "accumulator", writable=True)
        if not math.isfinite(weight):
            raise ValueError(f"weight must be finite, got {weight}")
        parsed = self._parse_all(header, segments)
        self._accumulate(acc, parsed, float(weight))

    def decode_into(self, out: np.ndarray, header: dict, segments) -> None:
        """``out[:] = decode(segments)``."""
        self._check_local(out, "output", writable=True)
        self._decode_into(out, self._parse_all(header, segments))

    def _parse_all(self, header: dict, segments) -> tuple:
        if not isinstance(header, dict):
            raise RemoteProtocolError("codec header must be a map")
        cid: Any = header.get("codec_id")  # the peer's value, of any msgpack type until checked
        if cid != int(self.id):
            got = CodecId(cid).name.lower() if cid in CodecId._value2member_map_ else repr(cid)
            raise RemoteProtocolError(f"expected a {self.id.name.lower()} chunk, got codec {got}")
        numel = header.get("numel")
        if numel != self.numel or isinstance(numel, bool):
            raise RemoteProtocolError(f"chunk has {numel!r} values, this codec expects {self.numel}")
        if not isinstance(segments, (list, tuple)) or len(segments) != self.n_segments:
            n = len(segments) if isinstance(segments, (list, tuple)) else type(segments).__name__
            raise RemoteProtocolError(f"{self.id.name.lower()} chunk needs {self.n_segments} segment(s), got {n}")
        return self._parse(header, segments)

    def _check_local(self, a: np.ndarray, what: str, writable: bool = False) -> None:
        # A wrong local buffer is our own bug, not the peer's: ValueError.
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 1 or a.size != self.numel:
            raise ValueError(
                f"{what} must be a 1-D float32 array of {self.numel} values, got "
                f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            )
        if not a.flags.c_contiguous or (writable and not a.flags.writeable):
            raise ValueError(f"{what} must be C-contiguous{' and writable' if writable else ''}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec}, numel={self.numel})"


_CODECS: dict[CodecId, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    if cls.id in _CODECS:
        raise RuntimeError(f"codec {cls.id!r} registered twice")
    _CODECS[cls.id] = cls
    return cls


@register
class NoneCodec(Codec):
    """float32 as is: zero-copy encode, ``acc += w·g`` (memory-bandwidth bound)."""

    id = CodecId.NONE

    def _encode(self, src):
        return {}, [_bytes(src)]

    def _parse(self, header, segments):
        return (_view(segments[0], np.float32, self.numel, "none payload"),)

    def _accumulate(self, acc, parsed, weight):
        kernels.weighted_accumulate(acc, parsed[0], weight)

    def _decode_into(self, out, parsed):
        g = parsed[0]
        if g.ctypes.data != out.ctypes.data:  # the transport may already have received into `out`
            np.copyto(out, g)


class _HalfCodec(Codec):
    """16-bit floats (as uint16 bit patterns); fused widen + scale + add on decode."""

    kind: ClassVar[str]
    _to16: ClassVar[str]
    _to32: ClassVar[str]

    def __init__(self, numel, spec):
        super().__init__(numel, spec)
        self._out: np.ndarray | None = None

    def max_encoded_bytes(self):
        return 2 * self.numel

    def _encode(self, src):
        if self._out is None:
            self._out = np.empty(self.numel, dtype=np.uint16)
        getattr(kernels, self._to16)(src, out=self._out)
        return {}, [_bytes(self._out)]

    def _parse(self, header, segments):
        return (_view(segments[0], np.uint16, self.numel, f"{self.kind} payload"),)

    def _accumulate(self, acc, parsed, weight):
        kernels.weighted_accumulate(acc, parsed[0], weight, g_dtype=self.kind)

    def _decode_into(self, out, parsed):
        getattr(kernels, self._to32)(parsed[0], out=out)


@register
class Fp16Codec(_HalfCodec):
    id = CodecId.FP16
    kind, _to16, _to32 = "f16", "f32_to_f16", "f16_to_f32"


@register
class Bf16Codec(_HalfCodec):
    id = CodecId.BF16
    kind, _to16, _to32 = "bf16", "f32_to_bf16", "bf16_to_f32"


@register
class Int8Codec(Codec):
    """Blockwise absmax int8: segments ``[scales f32 × ceil(numel / block), q int8 × numel]``.

    Scales first: the payload starts aligned, so the float32 scales stay 4-byte aligned whatever
    ``numel`` is (int8 values need no alignment).
    """

    id = CodecId.INT8
    n_segments = 2

    def __init__(self, numel, spec):
        super().__init__(numel, spec)
        self.block = spec.block or 256
        self._q: np.ndarray | None = None
        self._scales: np.ndarray | None = None

    def max_encoded_bytes(self):
        return self.numel + 4 * math.ceil(self.numel / self.block)

    def _encode(self, src):
        if self._q is None:
            self._q = np.empty(self.numel, dtype=np.int8)
            self._scales = np.empty(math.ceil(self.numel / self.block), dtype=np.float32)
        kernels.quantize_int8(src, block=self.block, out=self._q, scales_out=self._scales)
        return {"block": self.block}, [_bytes(self._scales), _bytes(self._q)]

    def _parse(self, header, segments):
        block = _int_field(header, "block", 1, MAX_INT8_BLOCK)
        scales = _view(segments[0], np.float32, math.ceil(self.numel / block), "int8 scales")
        q = _view(segments[1], np.int8, self.numel, "int8 values")
        return q, scales, block

    def _accumulate(self, acc, parsed, weight):
        q, scales, block = parsed
        kernels.dequantize_accumulate_int8(acc, q, scales, weight, block=block)

    def _decode_into(self, out, parsed):
        q, scales, block = parsed
        kernels.dequantize_int8(q, scales, block=block, out=out)


@register
class TopKCodec(Codec):
    """Top-k with error feedback: segments ``[indices int32 × k (ascending), values f32 × k]``.

    The residual (what was not sent yet) lives in this instance, so a worker keeps one codec per
    chunk for the whole job; ``reset()`` clears it (e.g. after the worker reloads parameters from a
    checkpoint). Decoding needs no state.
    """

    id = CodecId.TOPK
    n_segments = 2
    error_feedback = True

    def __init__(self, numel, spec):
        super().__init__(numel, spec)
        self.k = max(1, min(numel, math.ceil(spec.ratio * numel)))
        self.residual: np.ndarray | None = None

    def max_encoded_bytes(self):
        return 8 * self.k

    def feedback(self):
        return self.residual

    def reset(self):
        if self.residual is not None:
            self.residual.fill(0.0)

    def _encode(self, src):
        if self.residual is None:
            self.residual = np.zeros(self.numel, dtype=np.float32)
        idx, vals = kernels.topk_error_feedback(src, self.residual, self.k)
        return {"k": int(len(idx))}, [
            _bytes(np.ascontiguousarray(idx, dtype=np.int32)),
            _bytes(np.ascontiguousarray(vals, dtype=np.float32)),
        ]

    def _parse(self, header, segments):
        k = _int_field(header, "k", 1, self.numel)
        idx = _view(segments[0], np.int32, k, "topk indices")
        vals = _view(segments[1], np.float32, k, "topk values")
        # Strictly ascending and in range: no out-of-bounds write, no index counted twice.
        if idx[0] < 0 or idx[-1] >= self.numel or (k > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise RemoteProtocolError(f"topk indices must be strictly ascending within [0, {self.numel})")
        return idx, vals

    def _accumulate(self, acc, parsed, weight):
        kernels.scatter_accumulate(acc, parsed[0], parsed[1], weight)

    def _decode_into(self, out, parsed):
        out.fill(0.0)
        kernels.scatter_accumulate(out, parsed[0], parsed[1], 1.0)


@register
class PowerSGDCodec(Codec):
    """PowerSGD with error feedback: segments ``[P f32 × rows·rank, Q f32 × cols·rank]``.

    Header fields ``rank``, ``rows``, ``cols``; ``P`` is ``rows × rank`` and ``Q`` ``cols × rank``,
    both row-major, and the chunk is the first ``numel`` values of ``P Qᵀ`` read row by row. The
    shape and the rank are ``kernels.lowrank.layout(numel, spec.rank)``: a ~√numel square, or, for a
    chunk too small for the factors to save bytes, one row at rank 1, which sends the chunk exactly
    (``numel + 1`` floats). A receiver accepts only its own ``rows × cols`` (both sides derive it
    from ``numel``; the header names it so a mismatch is refused, not misread) and a rank in
    ``[1, its own rank]``.

    Encoder, per step (see ``kernels.lowrank``): ``M = chunk + residual``; ``Q ← orth(Q)``;
    ``P = orth(M Q)``; ``Q = Mᵀ P``; send P, Q; ``residual = M − P Qᵀ`` (the padding of the last row
    is kept at zero: it is not part of the chunk). So Σ_steps decoded + residual = Σ_steps chunks
    (to float32 rounding). Q starts as ``initial_q`` (seeded normals, so the first step is
    deterministic) and is warm-started from the previous step after that, which is what makes one
    power iteration per step enough; a Q that collapsed to zero (an all-zero chunk) starts over from
    ``initial_q``. A non-finite ``M Q`` or ``Mᵀ P`` (a NaN or inf in the gradient) is sent as it is,
    so the decoded chunk is non-finite and the server skips the step, and the encoder starts over
    (residual zero, Q from its seed). ``reset()`` zeroes the residual and keeps Q, which carries no
    gradient, only a starting subspace. Decoding needs no state.
    """

    id = CodecId.POWERSGD
    n_segments = 2
    error_feedback = True

    def __init__(self, numel, spec):
        super().__init__(numel, spec)
        self.rows, self.cols, self.rank = lowrank.layout(numel, spec.rank or 4)
        self._m: np.ndarray | None = None  # residual, then M, as rows × cols (row-major, padded)
        self._p: np.ndarray | None = None
        self._q: np.ndarray | None = None
        self._restart = False  # the last chunk was not finite: start Q over before the next one

    @property
    def residual(self) -> np.ndarray | None:
        """What was not sent yet (a writable view of ``numel`` values; None before the first encode)."""
        return None if self._m is None else self._m[: self.numel]

    def max_encoded_bytes(self):
        return 4 * (self.rows + self.cols) * self.rank

    def feedback(self):
        return self.residual

    def reset(self):
        if self._m is not None:
            self._m.fill(0.0)

    def _encode(self, src):
        if self._m is None or self._p is None or self._q is None:
            self._m = np.zeros(self.rows * self.cols, dtype=np.float32)
            self._p = np.empty((self.rows, self.rank), dtype=np.float32)
            self._q = lowrank.initial_q(self.cols, self.rank)
        m, p, q, n = self._m, self._p, self._q, self.numel
        if self._restart or not q.any():
            q[...] = lowrank.initial_q(self.cols, self.rank)
            self._restart = False
        kernels.weighted_accumulate(m[:n], src, 1.0)  # M = residual + chunk (exact: 1 · g)
        mat = m.reshape(self.rows, self.cols)
        if lowrank.power_step(mat, p, q):
            lowrank.lowrank_subtract(mat, p, q)  # residual = M − P Qᵀ
            m[n:] = 0.0
        else:
            m.fill(0.0)
            self._restart = True
        return {"rank": self.rank, "rows": self.rows, "cols": self.cols}, [_bytes(p), _bytes(q)]

    def _parse(self, header, segments):
        rank = _int_field(header, "rank", 1, self.rank)
        rows, cols = header.get("rows"), header.get("cols")
        if type(rows) is not int or type(cols) is not int or (rows, cols) != (self.rows, self.cols):
            raise RemoteProtocolError(
                f"powersgd matrix {rows!r} × {cols!r} is not how {self.numel} values are laid out "
                f"({self.rows} × {self.cols})"
            )
        p = _view(segments[0], np.float32, rows * rank, "powersgd P").reshape(rows, rank)
        q = _view(segments[1], np.float32, cols * rank, "powersgd Q").reshape(cols, rank)
        # A segment at an odd offset: BLAS wants aligned floats, and the factors are small.
        return (p if p.flags.aligned else p.copy()), (q if q.flags.aligned else q.copy())

    def _accumulate(self, acc, parsed, weight):
        lowrank.lowrank_accumulate(acc, parsed[0], parsed[1], weight)

    def _decode_into(self, out, parsed):
        lowrank.lowrank_into(out, parsed[0], parsed[1])


_missing = set(CodecId) - set(_CODECS)
if _missing:  # not an assert: must hold under python -O too
    raise ImportError(f"codecs without an implementation: {sorted(c.name for c in _missing)}")


AUTO = "auto"  # --compression/--pull-compression auto: the master picks each worker's codec (not a codec itself)


def is_auto(spec: object) -> bool:
    return isinstance(spec, str) and spec.strip().lower() == AUTO


def make_codec(spec, numel: int) -> Codec:
    """A fresh codec instance for one chunk of ``numel`` values (``spec``: string or CodecSpec)."""
    s = parse_codec(spec)
    return _CODECS[s.id](numel, s)


def codec_class(cid: CodecId) -> type[Codec]:
    return _CODECS[CodecId(cid)]
