"""Codec hot path: encode + decode_accumulate of one gradient vs the obvious torch code for the same job.

Full mode: a 16 M-float (64 MiB) gradient; quick mode: 1 M floats. ``nbytes`` is the float32 gradient's
size, so GB/s compare like with like. The torch baselines do what a straightforward PyTorch parameter
server would: ``.half()`` then ``acc.add_(h, alpha=w)``; blockwise int8 with tensor ops;
``torch.topk`` + ``index_add_``.

PowerSGD has its own benchmark on one chunk (4 M floats full, 1 M quick: a 2048² / 1024² matrix),
encode and decode_accumulate timed apart against the same step in plain torch (``torch.linalg.qr``,
``@``, ``addmm_``), with the bytes it puts on the wire against float32's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.conftest import best_of, report, report_value, size
from hetero_ps import kernels
from hetero_ps.kernels import lowrank
from hetero_ps.wire import codecs

N = size(16 << 20, 1 << 20)
N_LOWRANK = size(4 << 20, 1 << 20)  # one PowerSGD chunk (a default chunk is 1 M floats)
W = 0.25


def _grad():
    return np.random.default_rng(0).standard_normal(N).astype(np.float32)


def _torch_baseline(spec: str, g: torch.Tensor, acc: torch.Tensor, residual: torch.Tensor):
    if spec == "none":
        return lambda: acc.add_(g, alpha=W)
    if spec in ("fp16", "bf16"):
        dt = torch.float16 if spec == "fp16" else torch.bfloat16
        return lambda: acc.add_(g.to(dt), alpha=W)
    if spec == "int8":

        def int8():
            blocks = g.view(-1, 256)
            scales = blocks.abs().amax(1) / 127
            q = torch.round(blocks / scales.clamp_min(1e-30)[:, None]).to(torch.int8)
            acc.view(-1, 256).add_(q.float() * (scales * W)[:, None])

        return int8
    k = max(1, math.ceil(float(spec.split(":")[1]) * N))

    def topk():
        e = g + residual
        idx = torch.topk(e.abs(), k, sorted=False).indices
        vals = e[idx]
        residual.copy_(e)
        residual[idx] = 0
        acc.index_add_(0, idx, vals, alpha=W)

    return topk


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "int8", "topk:0.01"])
def bench_codec_encode_decode_accumulate(spec):
    g = _grad()
    acc = np.zeros(N, np.float32)
    enc, dec = codecs.make_codec(spec, N), codecs.make_codec(spec, N)

    def ours():
        fields, segments = enc.encode(g)
        dec.decode_accumulate(acc, fields, segments, W)

    t_ours = best_of(ours)
    tg, tacc, tres = torch.from_numpy(g.copy()), torch.zeros(N), torch.zeros(N)
    t_base = best_of(_torch_baseline(spec, tg, tacc, tres))
    copy_dst = np.empty_like(g)
    t_copy = best_of(lambda: np.copyto(copy_dst, g))
    rec = report(
        f"codec {spec} encode+decode_accumulate [{kernels.BACKEND}]",
        t_ours,
        {"torch": t_base, "np.copyto (memory bandwidth)": t_copy},
        g.nbytes,
    )
    assert rec["ours_s"] > 0


def _torch_powersgd(g: torch.Tensor, residual: torch.Tensor, q: torch.Tensor, rows: int, cols: int):
    """One PowerSGD step as plain torch code would write it (powerSGD_hook's maths, one process)."""

    def encode():
        m = (g + residual).view(rows, cols)
        p = m @ torch.linalg.qr(q).Q
        p = torch.linalg.qr(p).Q
        q.copy_(m.T @ p)
        residual.copy_((m - p @ q.T).view(-1))
        return p

    return encode


@pytest.mark.parametrize("spec", ["powersgd:4", "powersgd:16"])
def bench_codec_powersgd(spec):
    n = N_LOWRANK
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    acc = np.zeros(n, np.float32)
    enc, dec = codecs.make_codec(spec, n), codecs.make_codec(spec, n)
    fields, segments = enc.encode(g)
    rows, cols, rank = fields["rows"], fields["cols"], fields["rank"]
    assert rows * cols == n  # a square: the torch baseline needs no padding
    t_encode = best_of(lambda: enc.encode(g))
    t_decode = best_of(lambda: dec.decode_accumulate(acc, fields, segments, W))

    tg, tres, tacc = torch.from_numpy(g.copy()), torch.zeros(n), torch.zeros(rows, cols)
    tq = torch.from_numpy(lowrank.initial_q(cols, rank))
    torch_encode = _torch_powersgd(tg, tres, tq, rows, cols)
    tp = torch_encode()
    t_torch_encode = best_of(torch_encode)
    t_torch_decode = best_of(lambda: tacc.addmm_(tp, tq.T, alpha=W))
    copy_dst = np.empty_like(g)
    t_copy = best_of(lambda: np.copyto(copy_dst, g))

    name = f"codec {spec} ({rows}x{cols})"
    report(f"{name} encode [{kernels.BACKEND}]", t_encode, {"torch": t_torch_encode, "np.copyto": t_copy}, g.nbytes)
    rec = report(
        f"{name} decode_accumulate [{kernels.BACKEND}]",
        t_decode,
        {"torch addmm_": t_torch_decode, "np.copyto": t_copy},
        g.nbytes,
    )
    wire = sum(memoryview(s).nbytes for s in segments)
    report_value(
        f"{name} bytes on the wire",
        g.nbytes / wire,
        "x smaller than float32",
        extra={"wire_bytes": wire, "float32_bytes": g.nbytes},
    )
    assert rec["ours_s"] > 0 and wire == enc.max_encoded_bytes()
