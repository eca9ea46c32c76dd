"""Pure-numpy twins of the C++ kernels in ``csrc/`` (the ``reference`` backend).

Same low-level interface as ``hetero_ps._C``: arguments are flat, C-contiguous numpy arrays of the
right dtype and size, already checked by ``hetero_ps.kernels``; outputs are written in place. The
results are the C++ results bit for bit (both do the same float32 operations in the same order;
see docs/KERNELS.md), so either backend can decode what the other encoded. Everything is vectorised
numpy except the CRC fallback, which is only used when the ``crc32c`` package is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_crc32c: Callable[..., int] | None  # None: the package is missing, use the table below
try:
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - crc32c is a declared dependency
    _crc32c = None

U32 = np.uint32
_ABS = U32(0x7FFFFFFF)
_INF_BITS = U32(0x7F800000)

_threads = 1


# ------------------------------------------------------------------ float16 / bfloat16
def _f16_bits(src: np.ndarray) -> np.ndarray:
    """float32 -> binary16 bit patterns (uint16): round to nearest even, quiet NaNs."""
    bits = src.view(U32)
    with np.errstate(all="ignore"):  # overflow to inf and NaN casts are the specified behaviour
        h = src.astype(np.float16).view(np.uint16)
    nan = (bits & _ABS) > _INF_BITS
    if nan.any():  # numpy keeps NaN payloads its own way; we keep sign + top 10 bits, quiet
        qnan = ((bits >> U32(16)) & U32(0x8000)) | U32(0x7E00) | ((bits >> U32(13)) & U32(0x3FF))
        h = np.where(nan, qnan.astype(np.uint16), h)
    return h


def _f16_widen(h: np.ndarray) -> np.ndarray:
    """binary16 bit patterns -> float32 (exact; NaNs made quiet)."""
    h = h.view(np.uint16)
    f = h.view(np.float16).astype(np.float32)
    nan = (h & np.uint16(0x7FFF)) > np.uint16(0x7C00)
    if nan.any():
        h32 = h.astype(U32)
        qnan = ((h32 & U32(0x8000)) << U32(16)) | U32(0x7FC00000) | ((h32 & U32(0x3FF)) << U32(13))
        f = np.where(nan, qnan.view(np.float32), f)
    return f


def _bf16_bits(src: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns: round to nearest even on the top 16 bits, quiet NaNs."""
    u = src.view(U32)
    r = (u + U32(0x7FFF) + ((u >> U32(16)) & U32(1))) >> U32(16)  # uint32 wrap-around is never reached
    nan = (u & _ABS) > _INF_BITS
    if nan.any():
        r = np.where(nan, (u >> U32(16)) | U32(0x40), r)
    return r.astype(np.uint16)


def _bf16_widen(b: np.ndarray) -> np.ndarray:
    u = b.view(np.uint16).astype(U32)
    nan = (u & U32(0x7FFF)) > U32(0x7F80)
    if nan.any():
        u = np.where(nan, u | U32(0x40), u)
    return (u << U32(16)).view(np.float32)


def f32_to_f16(src: np.ndarray, out: np.ndarray) -> None:
    out.view(np.uint16)[...] = _f16_bits(src)


def f16_to_f32(src: np.ndarray, out: np.ndarray) -> None:
    out[...] = _f16_widen(src)


def f32_to_bf16(src: np.ndarray, out: np.ndarray) -> None:
    out[...] = _bf16_bits(src)


def bf16_to_f32(src: np.ndarray, out: np.ndarray) -> None:
    out[...] = _bf16_widen(src)


def _widen(g: np.ndarray, g_dtype: str) -> np.ndarray:
    if g_dtype == "f32":
        return g
    return _f16_widen(g) if g_dtype == "f16" else _bf16_widen(g)


def weighted_accumulate(acc: np.ndarray, g: np.ndarray, w: float, g_dtype: str) -> None:
    """acc = acc + float32(w) * float32(g): one float32 multiply, then one add."""
    with np.errstate(all="ignore"):  # inf - inf, 0 * inf: NaN is the specified result
        prod = np.multiply(_widen(g, g_dtype), np.float32(w), dtype=np.float32)
        np.add(acc, prod, out=acc)


# ------------------------------------------------------------------ int8
def _blocks(x: np.ndarray, block: int, fill=0) -> np.ndarray:
    """x padded with `fill` to whole blocks, shape (n_blocks, block)."""
    nb = -(-x.size // block)
    pad = nb * block - x.size
    if pad:
        x = np.concatenate([x, np.full(pad, fill, dtype=x.dtype)])
    return x.reshape(nb, block)


def quantize_int8(src: np.ndarray, block: int, q: np.ndarray, scales: np.ndarray) -> None:
    """Blockwise absmax: scale = amax / 127, q = clip(rint(x * (127 / amax)), -127, 127)."""
    if src.size == 0:
        return
    amax_bits = _blocks(src.view(U32) & _ABS, block).max(axis=1)
    amax = amax_bits.view(np.float32)
    finite = amax_bits < _INF_BITS
    with np.errstate(all="ignore"):
        inv = np.float32(127) / amax
        scale = amax / np.float32(127)
    ok = finite & (amax_bits != 0) & (inv != np.float32(np.inf))
    scales[...] = np.where(ok, scale, np.where(finite, np.float32(0), np.float32(np.nan)))
    inv = np.where(ok, inv, np.float32(0))
    with np.errstate(all="ignore"):  # x * 0 for non-finite x in blocks that are zeroed anyway
        v = np.rint(_blocks(src, block) * inv[:, None])
    v = np.clip(v, np.float32(-127), np.float32(127))
    v = np.where(ok[:, None], v, np.float32(0))
    q[...] = v.reshape(-1)[: src.size].astype(np.int8)


def _per_element(scales: np.ndarray, block: int, n: int) -> np.ndarray:
    return np.repeat(scales, block)[:n]


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int, out: np.ndarray) -> None:
    """out = float32(q) * scale of its block."""
    with np.errstate(all="ignore"):
        np.multiply(q.astype(np.float32), _per_element(scales, block, q.size), out=out)


def dequantize_accumulate_int8(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, w: float, block: int) -> None:
    """acc = acc + float32(q) * (float32(w) * scale): w * scale is rounded once per block."""
    with np.errstate(all="ignore"):
        ws = np.multiply(scales, np.float32(w), dtype=np.float32)
        np.add(acc, q.astype(np.float32) * _per_element(ws, block, q.size), out=acc)


# ------------------------------------------------------------------ top-k
def _select(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest keys (|x| bit patterns; ties -> lowest index)."""
    n = x.size
    if k == 0:
        return np.empty(0, dtype=np.int32)
    key = x.view(U32) & _ABS
    thresh = np.partition(key, n - k)[n - k]  # the k-th largest key
    above = np.flatnonzero(key > thresh)
    equal = np.flatnonzero(key == thresh)[: k - above.size]
    return np.sort(np.concatenate([above, equal])).astype(np.int32)


def topk(x: np.ndarray, k: int, idx_out: np.ndarray, val_out: np.ndarray) -> None:
    idx = _select(x, k)
    idx_out[...] = idx
    val_out[...] = x[idx]


def topk_error_feedback(g: np.ndarray, residual: np.ndarray, k: int, idx_out: np.ndarray, val_out: np.ndarray) -> None:
    with np.errstate(all="ignore"):
        np.add(residual, g, out=residual)
    idx = _select(residual, k)
    idx_out[...] = idx
    val_out[...] = residual[idx]
    residual[idx] = 0.0


def scatter_accumulate(acc: np.ndarray, indices: np.ndarray, values: np.ndarray, w: float) -> None:
    """acc[indices[j]] += float32(w) * values[j], in order (duplicates add up)."""
    if indices.size:
        bad = np.flatnonzero((indices < 0) | (indices >= acc.size))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"scatter_accumulate: index {int(indices[j])} at position {j} is outside [0, {acc.size})")
    with np.errstate(all="ignore"):
        np.add.at(acc, indices, np.multiply(values, np.float32(w), dtype=np.float32))


# ------------------------------------------------------------------ optimizer steps
_F = np.float32


def sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay) -> None:
    """d = g (+ wd·p); with a buffer: buf = momentum·buf + d, d = buf; p = p − lr·d (float32 each op)."""
    with np.errstate(all="ignore"):
        d = grad.copy()
        if _F(weight_decay) != 0:
            d = d + _F(weight_decay) * param
        if momentum_buf is not None:
            d = _F(momentum) * momentum_buf + d
            momentum_buf[...] = d
        param[...] = param - _F(lr) * d


def adam_step(param, grad, exp_avg, exp_avg_sq, step_size, bias2_sqrt, beta1, beta2, eps, weight_decay, decay,
              decoupled) -> None:  # fmt: skip
    """Adam(W) in float32, in the native kernel's order (docs/KERNELS.md, "Optimizer steps")."""
    with np.errstate(all="ignore"):
        g, p = grad, param.copy()
        if _F(weight_decay) != 0 and not decoupled:
            g = g + _F(weight_decay) * p
        if _F(weight_decay) != 0 and decoupled:
            p = p * _F(decay)
        m = _F(beta1) * exp_avg + _F(1.0 - beta1) * g
        v = _F(beta2) * exp_avg_sq + _F(1.0 - beta2) * (g * g)
        exp_avg[...] = m
        exp_avg_sq[...] = v
        denom = np.sqrt(v) / _F(bias2_sqrt) + _F(eps)
        param[...] = p - _F(step_size) * (m / denom)


# ------------------------------------------------------------------ CRC-32C
def _crc_table() -> list[int]:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE: list[int] | None = None


def checksum(buf, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of buf continuing from the finished CRC `value`."""
    if _crc32c is not None:
        return _crc32c(buf, value)
    global _TABLE
    if _TABLE is None:
        _TABLE = _crc_table()
    table, crc = _TABLE, value ^ 0xFFFFFFFF
    for byte in memoryview(buf).cast("B"):
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------ settings
def set_num_threads(n: int) -> None:
    """Recorded for symmetry with the native backend; numpy runs these on one thread."""
    global _threads
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _threads = n


def get_num_threads() -> int:
    return _threads


def cpu_features() -> dict:
    return {"detected": "numpy", "active": "numpy", "flags": {}, "paths": {}, "num_threads": _threads}
