"""Low-rank (PowerSGD) kernels: numpy/BLAS matrix products, the same code on both backends.

A PowerSGD codec views a chunk of ``n`` float32 values as a ``rows × cols`` matrix ``M`` (row-major,
``rows · cols ≥ n``, the tail of the last row zero) and sends a rank-``r`` factorisation ``P Qᵀ``
(Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization"). One step of it, as torch's ``powerSGD_hook`` does it::

    Q ← orth(Q)          Q (cols × r): the previous step's Q (warm start), or a seeded normal
    P ← M Q              P (rows × r)
    P ← orth(P)          an orthonormal basis of span(M Q)
    Q ← Mᵀ P             so that P Qᵀ = P Pᵀ M, the projection of M's columns on span(P)

``orth`` is a Householder QR (LAPACK ``sgeqrf``/``sorgqr`` through ``np.linalg.qr``): it stays
orthonormal when its input is rank-deficient (an all-zero chunk gives P = the first r unit
vectors and Q = 0), where Gram-Schmidt would divide by zero. ``P Qᵀ = P Pᵀ M`` depends only on the
subspace span(M Q), not on the basis chosen for it, so any orthonormalisation (torch uses
Gram-Schmidt for r ≤ 2 and QR above) gives the same approximation up to rounding.

Cost: two matrix products that read ``M`` once each (``2 · n · r`` multiply-adds, memory-bound for
small r: ~0.25 ms per 1 M floats here, near ``np.copyto`` speed) and two QRs of tall thin matrices
(``O((rows + cols) · r²)``, negligible). The products ``P Qᵀ`` that rebuild the matrix (the
residual on the encoder, the decoded chunk on the receiver) are computed ``BLOCK_FLOATS`` values
(whole rows) at a time into a per-thread scratch buffer, so they never need a chunk-sized temporary
and stay in cache; every caller cuts the same blocks, so the encoder's ``P Qᵀ`` and the decoder's
are the same bits on the same BLAS. Those rank-r products are what BLAS does worst (K = r is too
short to amortise its packing): ~6-9 GB/s of float32 output here, where MKL's ``addmm_`` reaches
11-17 and ``np.copyto`` ~20 (benchmarks/bench_codecs.py). numpy's products and QR release the GIL
(scipy's ``sgemm`` with ``beta = 1`` would fuse the add, but its wrapper holds the GIL).

Every function takes float32, C-contiguous arrays of matching shapes (the codec checks what comes
from the wire before calling them) and writes in place.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np

BLOCK_FLOATS = 1 << 18  # values per block of P Qᵀ (1 MiB of scratch per thread; whole rows, at least one)

_local = threading.local()


def layout(numel: int, rank: int) -> tuple[int, int, int]:
    """``(rows, cols, rank)`` of the matrix a chunk of ``numel`` values is sent as, for a requested rank.

    Normally a square: ``cols = ⌈√numel⌉``, ``rows = ⌈numel / cols⌉`` (so ``rows ≤ cols`` and fewer
    than ``cols`` values of padding), at the requested rank. Why square: the chunk is a slice of the
    flattened gradient cut at fixed byte offsets, not at parameter boundaries, so no column count
    recovers a layer's own matrix in general. What the shape does decide is the size of the factors,
    ``(rows + cols) · rank`` floats, which a square minimises for a given area (torch's
    ``batched_powerSGD_hook`` makes the same choice); the products cost ``numel · rank`` whatever
    the shape.

    A chunk too small for the factors to be smaller than itself (``(rows + cols) · rank ≥ numel``:
    ``numel ≤ ~4 · rank²``, which covers every rank ≥ rows) is laid out as one row, ``1 × numel``
    at rank 1: then ``P = [±1]`` and ``Q = ±`` the chunk, ``numel + 1`` floats that reproduce it
    exactly (nothing is left in the residual).
    """
    if numel <= 0 or rank <= 0:
        raise ValueError(f"numel and rank must be positive, got {numel} and {rank}")
    cols = math.isqrt(numel - 1) + 1  # ⌈√numel⌉, exact in integers
    rows = -(-numel // cols)
    if (rows + cols) * rank >= numel:
        return 1, numel, 1
    return rows, cols, rank


def initial_q(cols: int, rank: int, seed: int = 0) -> np.ndarray:
    """The encoder's first Q: ``cols × rank`` standard normals from ``default_rng(seed)`` (float32)."""
    return np.random.default_rng(seed).standard_normal((cols, rank), dtype=np.float32)


def orthonormalize(a: np.ndarray) -> None:
    """In place: the columns of ``a`` (``k × r``, ``r ≤ k``) → an orthonormal basis holding their span."""
    qf, _ = np.linalg.qr(a)
    a[...] = qf


def power_step(m: np.ndarray, p: np.ndarray, q: np.ndarray) -> bool:
    """One PowerSGD step on ``m`` (rows × cols): ``q ← orth(q); p ← m q; p ← orth(p); q ← mᵀ p``.

    Returns False when ``m q`` or ``mᵀ p`` is not finite (a NaN or inf in ``m``, or an overflow):
    ``p``/``q`` then hold the non-finite products, so ``p qᵀ`` is non-finite too, and the caller
    restarts its state.
    """
    orthonormalize(q)
    np.matmul(m, q, out=p)
    if not np.isfinite(p).all():
        return False
    orthonormalize(p)
    np.matmul(m.T, p, out=q)
    return bool(np.isfinite(q).all())


def _scratch(size: int) -> np.ndarray:
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(max(size, BLOCK_FLOATS), dtype=np.float32)
    return buf[:size]


def _row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_FLOATS // cols)
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def _products(p: np.ndarray, q: np.ndarray, n: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(lo, hi, block)``: ``block`` = ``(p qᵀ).ravel()[lo:hi]``, block by block, in the scratch."""
    cols = q.shape[0]
    qt = q.T
    for a, b in _row_blocks(p.shape[0], cols):
        t = _scratch((b - a) * cols).reshape(b - a, cols)
        np.matmul(p[a:b], qt, out=t)
        lo = a * cols
        hi = min(n, b * cols)
        yield lo, hi, t.reshape(-1)[: hi - lo]


def lowrank_accumulate(acc: np.ndarray, p: np.ndarray, q: np.ndarray, w: float) -> None:
    """``acc += ((f32(w) · p) qᵀ).ravel()[:len(acc)]``.

    The weight scales the small factor, not the product: one pass less over each block (~25 %
    faster here), at the price of a rounding that differs from ``w · (p qᵀ)`` in the last bit.
    """
    w32 = np.float32(w)
    if w32 != 1:
        p = p * w32  # rows × rank: small
    for lo, hi, t in _products(p, q, acc.size):
        np.add(acc[lo:hi], t, out=acc[lo:hi])


def lowrank_into(out: np.ndarray, p: np.ndarray, q: np.ndarray) -> None:
    """``out = (p qᵀ).ravel()[:len(out)]``."""
    for lo, hi, t in _products(p, q, out.size):
        out[lo:hi] = t


def lowrank_subtract(m: np.ndarray, p: np.ndarray, q: np.ndarray) -> None:
    """``m -= p qᵀ`` for the whole ``rows × cols`` matrix ``m`` (the encoder's residual)."""
    flat = m.reshape(-1)
    for lo, hi, t in _products(p, q, flat.size):
        np.subtract(flat[lo:hi], t, out=flat[lo:hi])
