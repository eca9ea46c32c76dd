"""Codecs: round trips and error bounds, fused accumulate, top-k error feedback, hostile segments.

``scripts/test.sh`` runs this file a second time with ``HETERO_PS_KERNELS=reference``, so every
codec is checked on the C++ kernels and on their numpy twins.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hetero_ps.errors import ConfigError, RemoteProtocolError
from hetero_ps.wire import codecs
from hetero_ps.wire.codecs import CodecId, CodecSpec, make_codec, parse_codec

N = 5000  # not a multiple of the int8 block: the last block is ragged
SPECS = ["none", "fp16", "bf16", "int8", "int8:64", "topk:0.05", "topk:1", "powersgd:3"]


def _grad(n=N, seed=0):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(n) * np.exp(rng.uniform(-6, 2, n))).astype(np.float32)  # wide dynamic range
    return g


def _wire(segments):
    return [memoryview(bytes(s)) for s in segments]  # read-only, as received


def _roundtrip(spec, g):
    enc, dec = make_codec(spec, len(g)), make_codec(spec, len(g))
    fields, segments = enc.encode(g)
    out = np.full(len(g), 7.0, dtype=np.float32)
    dec.decode_into(out, dict(fields), _wire(segments))
    return out, fields, segments


def test_parse_codec_and_registry():
    assert parse_codec("none") == CodecSpec(CodecId.NONE)
    assert parse_codec("TopK:0.01") == CodecSpec(CodecId.TOPK, ratio=0.01)
    assert parse_codec("topk").ratio == 0.01
    assert parse_codec("int8").block == 256 and parse_codec("int8:64").block == 64
    for s in ("none", "fp16", "bf16", "int8", "int8:64", "topk:0.25", "powersgd:4"):
        assert str(parse_codec(s)) == s
    for bad, msg in (
        ("gzip", "choose none, fp16"),
        ("topk:2", r"\(0, 1\]"),
        ("topk:x", "number"),
        ("fp16:3", "no parameter"),
        ("int8:0", "block"),
        ("powersgd:0", "rank"),
        (3, "string"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_codec(bad)
    for cid in CodecId:  # every wire value has an implementation
        assert codecs.codec_class(cid).id == cid


def test_none_is_exact_and_zero_copy():
    g = _grad()
    out, fields, segments = _roundtrip("none", g)
    assert np.array_equal(out, g) and fields == {"codec_id": 0, "numel": N}
    assert np.frombuffer(segments[0], np.float32).ctypes.data == g.ctypes.data


def test_half_precision_round_trips_within_their_precision():
    g = _grad()
    normal = np.abs(g) > 1e-4  # fp16's normal range starts at 6.1e-5
    out, _, segs = _roundtrip("fp16", g)
    assert sum(memoryview(s).nbytes for s in segs) == 2 * N
    assert np.all(np.abs(out - g)[normal] <= 2.0**-11 * np.abs(g)[normal] * 1.0001)
    assert np.all(np.abs(out - g) <= 2.0**-24 + 2.0**-11 * np.abs(g))
    np.testing.assert_array_equal(out, g.astype(np.float16).astype(np.float32))  # round to nearest even
    out, _, _ = _roundtrip("bf16", g)
    assert np.all(np.abs(out - g) <= 2.0**-8 * np.abs(g) * 1.0001)
    assert _roundtrip("fp16", np.full(4, 1e5, np.float32))[0][0] == np.inf  # documented overflow


@pytest.mark.parametrize("block", [256, 64])
def test_int8_error_is_at_most_half_a_step_per_block(block):
    g = _grad()
    out, fields, segs = _roundtrip(f"int8:{block}", g)
    assert fields["block"] == block
    nblocks = math.ceil(N / block)
    assert [memoryview(s).nbytes for s in segs] == [4 * nblocks, N]
    for i in range(nblocks):
        x, y = g[i * block : (i + 1) * block], out[i * block : (i + 1) * block]
        step = np.abs(x).max() / 127
        assert np.all(np.abs(x - y) <= step / 2 * 1.001 + 1e-30)
    zeros, _, _ = _roundtrip("int8", np.zeros(300, np.float32))
    assert np.array_equal(zeros, np.zeros(300, np.float32))


def test_topk_sends_the_largest_entries():
    g = _grad()
    out, fields, segs = _roundtrip("topk:0.05", g)
    k = math.ceil(0.05 * N)
    assert fields["k"] == k and [memoryview(s).nbytes for s in segs] == [4 * k, 4 * k]
    sent = np.flatnonzero(out)
    assert len(sent) == k
    assert np.abs(g[sent]).min() >= np.sort(np.abs(g))[-k]  # exactly the top k by magnitude
    assert np.array_equal(out[sent], g[sent])
    full, _, _ = _roundtrip("topk:1", g)
    assert np.array_equal(full, g)


@pytest.mark.parametrize("spec", SPECS)
def test_decode_accumulate_is_acc_plus_weight_times_decode(spec):
    g = _grad(seed=1)
    enc, dec = make_codec(spec, N), make_codec(spec, N)
    fields, segments = enc.encode(g)
    wire = _wire(segments)
    decoded = np.empty(N, np.float32)
    dec.decode_into(decoded, dict(fields), wire)
    acc = _grad(seed=2)
    want = acc + np.float32(0.3) * decoded
    dec.decode_accumulate(acc, dict(fields), wire, 0.3)
    np.testing.assert_allclose(acc, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "topk:0.05", "powersgd:3"])
def test_encode_reuses_its_buffers(spec):
    enc = make_codec(spec, N)
    first = [np.frombuffer(s, np.uint8).ctypes.data for s in enc.encode(_grad(seed=1))[1]]
    snapshot = [bytes(s) for s in enc.encode(_grad(seed=1))[1]]
    second_segs = enc.encode(_grad(seed=3))[1]
    if not spec.startswith("topk"):  # top-k's outputs are k-sized, fresh per call by the kernel API
        assert [np.frombuffer(s, np.uint8).ctypes.data for s in second_segs] == first
    assert [bytes(s) for s in second_segs] != snapshot


def test_topk_error_feedback_keeps_what_was_not_sent():
    enc, dec = make_codec("topk:0.02", N), make_codec("topk:0.02", N)
    total_g = np.zeros(N, np.float64)
    total_sent = np.zeros(N, np.float64)
    for step in range(12):
        g = _grad(seed=10 + step)
        total_g += g
        fields, segments = enc.encode(g)
        out = np.empty(N, np.float32)
        dec.decode_into(out, dict(fields), _wire(segments))
        total_sent += out
    np.testing.assert_allclose(total_sent + enc.residual, total_g, rtol=1e-5, atol=1e-5)
    assert np.abs(enc.residual).max() > 0
    enc.reset()
    assert not enc.residual.any()


def _corrupt_cases():
    g = _grad(seed=4)
    cases = []
    for spec in SPECS:
        fields, segments = make_codec(spec, N).encode(g)
        raw = [bytes(s) for s in segments]
        cases.append((spec, "short segment", dict(fields), [raw[0][:-1], *raw[1:]], "expected .* bytes"))
        cases.append((spec, "missing segment", dict(fields), raw[:-1] or [], "segment"))
        cases.append((spec, "extra segment", dict(fields), raw + [b"x"], "segment"))
        cases.append((spec, "other codec", {**fields, "codec_id": (fields["codec_id"] + 1) % 5}, raw, "expected a"))
        cases.append((spec, "unknown codec", {**fields, "codec_id": 99}, raw, "expected a"))
        cases.append((spec, "wrong numel", {**fields, "numel": N - 1}, raw, "values"))
        cases.append((spec, "bool numel", {**fields, "numel": True}, raw, "values"))
    f, s = make_codec("int8", N).encode(g)
    raw = [bytes(x) for x in s]
    cases.append(("int8", "block mismatch", {**f, "block": 128}, raw, "int8 scales"))
    cases.append(("int8", "zero block", {**f, "block": 0}, raw, "block"))
    cases.append(("int8", "string block", {**f, "block": "256"}, raw, "block"))
    f, s = make_codec("topk:0.05", N).encode(g)
    idx, vals = np.frombuffer(bytes(s[0]), np.int32).copy(), bytes(s[1])
    k = len(idx)
    cases.append(("topk:0.05", "k too large", {**f, "k": N + 1}, [idx.tobytes(), vals], "'k'"))
    cases.append(("topk:0.05", "k disagrees", {**f, "k": k - 1}, [idx.tobytes(), vals], "expected"))
    for what, bad in (
        ("out of range", lambda a: a.__setitem__(-1, N)),
        ("negative", lambda a: a.__setitem__(0, -1)),
        ("duplicate", lambda a: a.__setitem__(1, a[0])),
        ("descending", lambda a: a.__setitem__(slice(0, 2), a[1::-1].copy())),
    ):
        a = idx.copy()
        bad(a)
        cases.append(("topk:0.05", what, dict(f), [a.tobytes(), vals], "ascending"))
    return cases


@pytest.mark.parametrize(
    "spec,what,header,segments,msg", _corrupt_cases(), ids=lambda v: v if isinstance(v, str) and " " in v else None
)
def test_corrupt_or_mismatched_chunks_are_rejected_before_touching_acc(spec, what, header, segments, msg):
    dec = make_codec(spec, N)
    acc = _grad(seed=5)
    before = acc.copy()
    with pytest.raises(RemoteProtocolError, match=msg):
        dec.decode_accumulate(acc, header, [memoryview(s) for s in segments], 0.5)
    assert np.array_equal(acc, before), f"{spec}/{what}: acc was modified"
    out = before.copy()
    with pytest.raises(RemoteProtocolError):
        dec.decode_into(out, header, [memoryview(s) for s in segments])
    assert np.array_equal(out, before)


def test_local_misuse_is_a_value_error():
    dec = make_codec("fp16", N)
    fields, segments = make_codec("fp16", N).encode(_grad())
    for bad in (
        np.zeros(N, np.float64),
        np.zeros(N + 1, np.float32),
        np.zeros((N, 1), np.float32),
        np.zeros(2 * N, np.float32)[::2],
    ):
        with pytest.raises(ValueError):
            dec.decode_accumulate(bad, dict(fields), _wire(segments), 1.0)
    ro = np.zeros(N, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        dec.decode_into(ro, dict(fields), _wire(segments))
    with pytest.raises(ValueError, match="finite"):
        dec.decode_accumulate(np.zeros(N, np.float32), dict(fields), _wire(segments), float("nan"))
    with pytest.raises(ValueError):
        make_codec("none", 0)
    assert make_codec("int8", 1000).max_encoded_bytes() == 1000 + 4 * 4


@pytest.mark.parametrize("spec", SPECS)
def test_segments_at_odd_offsets_decode_the_same(spec):
    g = _grad(seed=6)
    fields, segments = make_codec(spec, N).encode(g)
    want = np.empty(N, np.float32)
    make_codec(spec, N).decode_into(want, dict(fields), _wire(segments))
    shifted = []
    for s in segments:  # e.g. a segment that follows an odd-length one in the same payload
        buf = bytearray(memoryview(s).nbytes + 1)
        buf[1:] = bytes(s)
        shifted.append(memoryview(buf)[1:])
    got = np.empty(N, np.float32)
    make_codec(spec, N).decode_into(got, dict(fields), shifted)
    assert np.array_equal(got, want)
