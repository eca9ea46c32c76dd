"""The numeric kernels of hetero_ps, and the one place that imports the C++ extension.

Backend, chosen once at import:

* ``HETERO_PS_KERNELS=reference`` — the pure-numpy twins in ``_reference.py``;
* otherwise ``hetero_ps._C`` (built from ``csrc/`` by ``pip install -e .``); if it cannot be
  imported, the numpy reference with one ``RuntimeWarning`` that says how to build it
  (``HETERO_PS_KERNELS=native`` turns that fallback into an ImportError).

``HETERO_PS_ISA=scalar|sse4.2|avx2|avx512`` caps the SIMD level the native kernels use.

``BACKEND`` says which one (``"native"`` or ``"reference"``). Both give the same bits (see
docs/KERNELS.md for every kernel's maths, NaN/inf rules and wire meaning); tests get both through
``backends()``.

Inputs may be numpy arrays, CPU torch tensors (bfloat16 ones included) or bytes-like objects (read
as raw bytes of the dtype the argument needs). They are viewed, never copied: a non-contiguous
input, a size mismatch or a read-only output raise ``ValueError``; a wrong dtype ``TypeError``.
Multi-dimensional contiguous arrays are treated as flat. float16/bfloat16 data travel as uint16 bit
patterns (float16 arrays are accepted for binary16 too).

Functions (all of them release the GIL in the native backend)::

    weighted_accumulate(acc, g, w, *, g_dtype=None) -> acc        acc += w * g
    f32_to_f16(src, out=None) / f16_to_f32 / f32_to_bf16 / bf16_to_f32 -> out
    quantize_int8(src, block=256, out=None, scales_out=None) -> (q, scales)
    dequantize_int8(q, scales, block=256, out=None) -> out
    dequantize_accumulate_int8(acc, q, scales, w, block=256) -> acc
    topk_error_feedback(g, residual, k) -> (indices int32, values float32)
    topk(x, k) -> (indices, values)
    scatter_accumulate(acc, indices, values, w) -> acc
    checksum(buf, value=0) -> int                                  CRC-32C
    sgd_step(param, grad, momentum_buf, *, lr, momentum, weight_decay)        one SGD(-momentum) step
    adam_step(param, grad, exp_avg, exp_avg_sq, *, lr, step, betas, eps,
              weight_decay, decoupled)                                         one Adam/AdamW step
    set_num_threads(n), get_num_threads()

PowerSGD's low-rank products live in ``kernels.lowrank`` (``power_step``, ``lowrank_accumulate``,
``lowrank_into``, ``lowrank_subtract``): numpy/BLAS matrix products, the same code on both backends
(BLAS already runs them at memory bandwidth and releases the GIL).
"""

from __future__ import annotations

import numbers
import operator
import os
import sys
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from hetero_ps.errors import ConfigError
from hetero_ps.kernels import _reference, lowrank

__all__ = [
    "BACKEND",
    "NATIVE_ERROR",
    "Kernels",
    "backends",
    "get_backend",
    "weighted_accumulate",
    "f32_to_f16",
    "f16_to_f32",
    "f32_to_bf16",
    "bf16_to_f32",
    "quantize_int8",
    "dequantize_int8",
    "dequantize_accumulate_int8",
    "topk_error_feedback",
    "topk",
    "scatter_accumulate",
    "checksum",
    "sgd_step",
    "adam_step",
    "set_num_threads",
    "get_num_threads",
    "cpu_features",
    "lowrank",
]

ENV_VAR = "HETERO_PS_KERNELS"
ISA_ENV_VAR = "HETERO_PS_ISA"
ISA_LEVELS = ("scalar", "sse4.2", "avx2", "avx512")
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the hetero_ps checkout (needs CMake "
    ">= 3.18, a C++17 compiler and pybind11)"
)

F32, F16, U16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16)
I8, I32, I64, U8 = np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.uint8)
_RAW_FORMATS = frozenset({"B", "b", "c"})
_G_DTYPES = {"f32": (F32,), "f16": (U16, F16), "bf16": (U16,)}


# ------------------------------------------------------------------ zero-copy views
def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor cannot exist unless torch was imported
    return torch is not None and isinstance(x, torch.Tensor)


def _view(x: Any, name: str, raw: np.dtype | None, *, out: bool = False) -> tuple[np.ndarray, bool]:
    """A flat numpy view of x and whether x was a torch bfloat16 tensor (seen as uint16).

    ``raw`` is the dtype that raw bytes (bytes/bytearray/byte memoryview) are read as; None means
    raw bytes are not accepted here because the dtype cannot be inferred.
    """
    bf16 = False
    if isinstance(x, np.ndarray):
        a = x
    elif _is_tensor(x):
        import torch

        if x.device.type != "cpu":
            raise TypeError(f"{name} is on {x.device}; the kernels take CPU tensors")
        if not x.is_contiguous():
            raise ValueError(f"{name} is a non-contiguous tensor (no copy is made)")
        x = x.detach()
        if x.dtype == torch.bfloat16:
            a, bf16 = x.view(torch.int16).numpy().view(np.uint16), True
        else:
            try:
                a = x.numpy()
            except TypeError as e:
                raise TypeError(f"{name}: unsupported tensor dtype {x.dtype}") from e
    else:
        try:
            m = memoryview(x)
        except TypeError:
            raise TypeError(
                f"{name} must be a numpy array, a CPU torch tensor or a bytes-like object, got {type(x).__name__}"
            ) from None
        if not m.c_contiguous:
            raise ValueError(f"{name} is a non-contiguous buffer (no copy is made)")
        if m.format in _RAW_FORMATS:
            if raw is None:
                raise TypeError(f"{name} is raw bytes; say which dtype they hold")
            if m.nbytes % raw.itemsize:
                raise ValueError(f"{name} has {m.nbytes} bytes, not a whole number of {raw} values")
            a = np.frombuffer(m, dtype=raw)
        else:
            a = np.asarray(m)
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous (no copy is made)")
    if out and not a.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return a.reshape(-1), bf16


def _arr(
    x: Any, name: str, dtypes: tuple[np.dtype, ...], *, out: bool = False, size: int | None = None, bf16: bool = False
) -> np.ndarray:
    """_view checked against the accepted dtypes (raw bytes read as dtypes[0]) and size.

    ``bf16``: this argument holds bfloat16 bits, so a torch.bfloat16 tensor is welcome (elsewhere a
    bfloat16 tensor would be misread as binary16 or integers, so it is a TypeError).
    """
    a, is_bf16 = _view(x, name, dtypes[0], out=out)
    if a.dtype not in dtypes or (is_bf16 and not bf16):
        got = "torch.bfloat16" if is_bf16 else str(a.dtype)
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {got}")
    if size is not None and a.size != size:
        raise ValueError(f"{name} has {a.size} elements, expected {size}")
    return a


def _weight(w: Any) -> float:
    if not isinstance(w, numbers.Real):
        raise TypeError(f"w must be a real number, got {type(w).__name__}")
    return float(w)


def _count(v: Any, name: str, minimum: int) -> int:
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _n_blocks(n: int, block: int) -> int:
    return -(-n // block)


# ------------------------------------------------------------------ the API on one implementation
class Kernels:
    """The public kernel API running on one implementation (``hetero_ps._C`` or ``_reference``).

    Argument checking and conversion happen here, identically for both, so the two can only differ
    in the arithmetic — which they must not.
    """

    def __init__(self, name: str, impl: ModuleType):
        self.name = name
        self.impl = impl

    def __repr__(self) -> str:
        return f"<hetero_ps kernels: {self.name}>"

    def weighted_accumulate(self, acc, g, w, *, g_dtype: str | None = None):
        """``acc += w * g`` in float32 (a multiply then an add, no FMA); returns ``acc``.

        ``g`` is float32, binary16 or bfloat16. Its type comes from its dtype (float32, float16,
        torch.bfloat16); uint16 arrays and raw bytes need ``g_dtype="f16"|"bf16"|"f32"``.
        """
        a = _arr(acc, "acc", (F32,), out=True)
        if g_dtype is None:
            gv, bf16 = _view(g, "g", None)
            if bf16:
                kind = "bf16"
            elif gv.dtype == F32:
                kind = "f32"
            elif gv.dtype == F16:
                kind = "f16"
            elif gv.dtype == U16:
                raise TypeError("g is uint16: pass g_dtype='f16' or g_dtype='bf16'")
            else:
                raise TypeError(f"g must be float32, float16 or bfloat16, got {gv.dtype}")
            if gv.size != a.size:
                raise ValueError(f"g has {gv.size} elements, expected {a.size}")
        else:
            if g_dtype not in _G_DTYPES:
                raise ValueError(f"g_dtype must be 'f32', 'f16' or 'bf16', got {g_dtype!r}")
            kind = g_dtype
            gv, bf16 = _view(g, "g", _G_DTYPES[kind][0])
            if gv.dtype not in _G_DTYPES[kind] or (bf16 and kind != "bf16"):
                got = "torch.bfloat16" if bf16 else str(gv.dtype)
                raise TypeError(
                    f"g_dtype={kind!r} needs g of dtype {' or '.join(str(d) for d in _G_DTYPES[kind])}, got {got}"
                )
            if gv.size != a.size:
                raise ValueError(f"g has {gv.size} elements, expected {a.size}")
        self.impl.weighted_accumulate(a, gv, _weight(w), kind)
        return acc

    def _convert(self, fn: str, src, out, src_dtypes, out_dtypes):
        s = _arr(src, "src", src_dtypes, bf16=fn == "bf16_to_f32")
        if out is None:
            o = np.empty(s.size, dtype=out_dtypes[0])
            ret = o
        else:
            o, ret = _arr(out, "out", out_dtypes, out=True, size=s.size, bf16=fn == "f32_to_bf16"), out
        getattr(self.impl, fn)(s, o)
        return ret

    def f32_to_f16(self, src, out=None):
        """float32 -> IEEE binary16 bits (uint16): round to nearest even, overflow -> inf, NaN quiet."""
        return self._convert("f32_to_f16", src, out, (F32,), (U16, F16))

    def f16_to_f32(self, src, out=None):
        """binary16 (uint16 bits or float16) -> float32, exact."""
        return self._convert("f16_to_f32", src, out, (U16, F16), (F32,))

    def f32_to_bf16(self, src, out=None):
        """float32 -> bfloat16 bits (uint16), round to nearest even as torch does."""
        return self._convert("f32_to_bf16", src, out, (F32,), (U16,))

    def bf16_to_f32(self, src, out=None):
        """bfloat16 bits (uint16, or a torch.bfloat16 tensor) -> float32, exact."""
        return self._convert("bf16_to_f32", src, out, (U16,), (F32,))

    def quantize_int8(self, src, block: int = 256, out=None, scales_out=None):
        """Blockwise absmax int8: returns ``(q int8[n], scales float32[ceil(n / block)])``.

        ``scale = amax / 127``; ``q = clip(rint(x * (127 / amax)), -127, 127)``; a block with a NaN
        or inf gets ``scale = NaN`` and ``q = 0``; an all-zero block ``scale = 0``.
        """
        block = _count(block, "block", 1)
        s = _arr(src, "src", (F32,))
        nb = _n_blocks(s.size, block)
        if out is None:
            q = q_ret = np.empty(s.size, dtype=I8)
        else:
            q, q_ret = _arr(out, "out", (I8,), out=True, size=s.size), out
        if scales_out is None:
            sc = sc_ret = np.empty(nb, dtype=F32)
        else:
            sc, sc_ret = _arr(scales_out, "scales_out", (F32,), out=True, size=nb), scales_out
        self.impl.quantize_int8(s, block, q, sc)
        return q_ret, sc_ret

    def dequantize_int8(self, q, scales, block: int = 256, out=None):
        """``out = q * scale`` of each element's block; returns ``out``."""
        block = _count(block, "block", 1)
        qa = _arr(q, "q", (I8,))
        sc = _arr(scales, "scales", (F32,), size=_n_blocks(qa.size, block))
        if out is None:
            o = ret = np.empty(qa.size, dtype=F32)
        else:
            o, ret = _arr(out, "out", (F32,), out=True, size=qa.size), out
        self.impl.dequantize_int8(qa, sc, block, o)
        return ret

    def dequantize_accumulate_int8(self, acc, q, scales, w, block: int = 256):
        """``acc += q * (w * scale)`` (``w * scale`` rounded to float32 once per block); returns ``acc``."""
        block = _count(block, "block", 1)
        a = _arr(acc, "acc", (F32,), out=True)
        qa = _arr(q, "q", (I8,), size=a.size)
        sc = _arr(scales, "scales", (F32,), size=_n_blocks(a.size, block))
        self.impl.dequantize_accumulate_int8(a, qa, sc, _weight(w), block)
        return acc

    @staticmethod
    def _k(k, n: int) -> int:
        k = _count(k, "k", 0)
        if k > n:
            raise ValueError(f"k = {k} is larger than the number of values ({n})")
        if n > np.iinfo(np.int32).max:
            raise ValueError("top-k handles at most 2^31 - 1 values (int32 indices)")
        return k

    def topk_error_feedback(self, g, residual, k: int):
        """``residual += g``; take the k largest ``|residual|`` (ties: lowest index; NaN largest);
        return ``(indices int32 ascending, values float32)`` and zero them in ``residual``."""
        r = _arr(residual, "residual", (F32,), out=True)
        gv = _arr(g, "g", (F32,), size=r.size)
        k = self._k(k, r.size)
        idx, vals = np.empty(k, dtype=I32), np.empty(k, dtype=F32)
        self.impl.topk_error_feedback(gv, r, k, idx, vals)
        return idx, vals

    def topk(self, x, k: int):
        """The k largest ``|x|`` as ``(indices int32 ascending, values float32)``; x is unchanged."""
        xa = _arr(x, "x", (F32,))
        k = self._k(k, xa.size)
        idx, vals = np.empty(k, dtype=I32), np.empty(k, dtype=F32)
        self.impl.topk(xa, k, idx, vals)
        return idx, vals

    def scatter_accumulate(self, acc, indices, values, w):
        """``acc[indices[j]] += w * values[j]`` in order (duplicates add up); returns ``acc``.

        Indices are int32 or int64; one outside ``[0, len(acc))`` raises ValueError before any write.
        """
        a = _arr(acc, "acc", (F32,), out=True)
        ia = _arr(indices, "indices", (I32, I64))
        va = _arr(values, "values", (F32,), size=ia.size)
        self.impl.scatter_accumulate(a, ia, va, _weight(w))
        return acc

    def checksum(self, buf, value: int = 0) -> int:
        """CRC-32C (Castagnoli) of buf's bytes, continuing from ``value`` (a previous result)."""
        t = type(buf)
        if t is not bytes and t is not bytearray:
            if t is memoryview:
                if not buf.c_contiguous:
                    raise ValueError("buf is a non-contiguous buffer (no copy is made)")
            else:
                buf = _view(buf, "buf", U8)[0]
        if type(value) is not int:
            value = _count(value, "value", 0)
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"value must be a CRC in [0, 2^32), got {value}")
        return self.impl.checksum(buf, value)

    def sgd_step(self, param, grad, momentum_buf=None, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        """One SGD step in place: ``d = g + wd·p``; with ``momentum_buf``, ``buf = momentum·buf + d`` and
        ``d = buf``; ``p = p − lr·d`` (float32, each operation rounded; torch's SGD with dampening 0)."""
        p = _arr(param, "param", (F32,), out=True)
        g = _arr(grad, "grad", (F32,), size=p.size)
        b = None if momentum_buf is None else _arr(momentum_buf, "momentum_buf", (F32,), out=True, size=p.size)
        self.impl.sgd_step(p, g, b, _weight(lr), _weight(momentum), _weight(weight_decay))
        return param

    def adam_step(
        self,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        *,
        lr: float,
        step: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ):
        """One Adam (``decoupled``: AdamW) step in place, ``step`` counted from 1 (torch's, no amsgrad)."""
        step = _count(step, "step", 1)
        p = _arr(param, "param", (F32,), out=True)
        g = _arr(grad, "grad", (F32,), size=p.size)
        m = _arr(exp_avg, "exp_avg", (F32,), out=True, size=p.size)
        v = _arr(exp_avg_sq, "exp_avg_sq", (F32,), out=True, size=p.size)
        lr, wd, (b1, b2) = _weight(lr), _weight(weight_decay), (_weight(betas[0]), _weight(betas[1]))
        step_size = lr / (1.0 - b1**step)
        bias2_sqrt = (1.0 - b2**step) ** 0.5
        self.impl.adam_step(p, g, m, v, step_size, bias2_sqrt, b1, b2, _weight(eps), wd, 1.0 - lr * wd, bool(decoupled))
        return param

    def set_num_threads(self, n: int) -> None:
        """Threads a kernel may use on large inputs (default min(cores, 8))."""
        self.impl.set_num_threads(_count(n, "n", 1))

    def get_num_threads(self) -> int:
        return self.impl.get_num_threads()

    def cpu_features(self) -> dict:
        """CPU flags the native backend saw and the code path each kernel takes."""
        return self.impl.cpu_features()


# ------------------------------------------------------------------ choosing the backend
def _import_native() -> tuple[ModuleType | None, str | None]:
    try:
        from hetero_ps import _C
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return _C, None


_choice = os.environ.get(ENV_VAR, "").strip().lower()
if _choice not in ("", "auto", "native", "reference"):
    raise ConfigError(f"{ENV_VAR}={_choice!r}: expected 'native', 'reference' or unset")
# Read by _C itself (a cap on the SIMD level); checked here so a typo is an error, not a fallback.
_isa_cap = os.environ.get(ISA_ENV_VAR, "")
if _isa_cap and _isa_cap not in ISA_LEVELS:
    raise ConfigError(f"{ISA_ENV_VAR}={_isa_cap!r}: expected one of {', '.join(ISA_LEVELS)} or unset")

_REFERENCE = Kernels("reference", _reference)
if _choice == "reference":
    _NATIVE: Kernels | None = None
    NATIVE_ERROR: str | None = f"{ENV_VAR}=reference"
else:
    _mod, NATIVE_ERROR = _import_native()
    _NATIVE = Kernels("native", _mod) if _mod is not None else None
    if _NATIVE is None:
        if _choice == "native":
            raise ImportError(f"{ENV_VAR}=native but hetero_ps._C cannot be imported ({NATIVE_ERROR}); {BUILD_HINT}")
        warnings.warn(
            f"hetero_ps._C, the C++ kernels, cannot be imported ({NATIVE_ERROR}); using the numpy "
            f"reference kernels, which are several times slower. To fix it, {BUILD_HINT}; to "
            f"choose the reference kernels on purpose, set {ENV_VAR}=reference.",
            RuntimeWarning,
            stacklevel=2,
        )

_ACTIVE = _NATIVE or _REFERENCE
BACKEND: str = _ACTIVE.name


def backends() -> dict[str, Kernels]:
    """Every implementation usable in this process, by name (``native`` only if it imported)."""
    out = {"reference": _REFERENCE}
    if _NATIVE is not None:
        out = {"native": _NATIVE, **out}
    return out


def get_backend(name: str) -> Kernels:
    """One implementation by name; ImportError (with the reason) if ``native`` is unavailable."""
    if name == "native":
        if _NATIVE is None:
            raise ImportError(f"native kernels unavailable: {NATIVE_ERROR}")
        return _NATIVE
    if name == "reference":
        return _REFERENCE
    raise ValueError(f"unknown kernel backend {name!r} (expected 'native' or 'reference')")


weighted_accumulate = _ACTIVE.weighted_accumulate
f32_to_f16 = _ACTIVE.f32_to_f16
f16_to_f32 = _ACTIVE.f16_to_f32
f32_to_bf16 = _ACTIVE.f32_to_bf16
bf16_to_f32 = _ACTIVE.bf16_to_f32
quantize_int8 = _ACTIVE.quantize_int8
dequantize_int8 = _ACTIVE.dequantize_int8
dequantize_accumulate_int8 = _ACTIVE.dequantize_accumulate_int8
topk_error_feedback = _ACTIVE.topk_error_feedback
topk = _ACTIVE.topk
scatter_accumulate = _ACTIVE.scatter_accumulate
checksum = _ACTIVE.checksum
sgd_step = _ACTIVE.sgd_step
adam_step = _ACTIVE.adam_step
set_num_threads = _ACTIVE.set_num_threads
get_num_threads = _ACTIVE.get_num_threads
cpu_features = _ACTIVE.cpu_features
